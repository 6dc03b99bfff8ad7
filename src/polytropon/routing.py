"""The routing state shared by a :class:`~polytropon.model.PolyModel` and its layers, and task-id checks.

A model owns one :class:`RoutingState`; every Poly layer holds a reference to it. The model sets the task ids
once at the start of ``forward``/``generate`` (:meth:`RoutingState.route`) and clears them when the call
ends; layers read them. Nothing is registered or removed per call.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch

TaskIds = Union[torch.Tensor, Sequence[Union[int, str]]]

#: Task id given to examples of an unknown task when ``PolyConfig.unknown_task="average"`` (eval only):
#: they are routed with uniform weights, i.e. to the average of the skills.
UNKNOWN_TASK = -1


@dataclass
class BatchRouting:
    """Task ids of one batch as a layer sees it.

    Attributes:
        task_ids: LongTensor of shape ``(batch,)``, one task per row of the layer's input.
        unique: the distinct task ids of the batch, sorted, shape ``(k,)``.
        inverse: for every row, the index of its task in ``unique``, shape ``(batch,)``.
        key: ``unique`` as a tuple, usable as a cache key.

    Ids equal to :data:`UNKNOWN_TASK` mark examples routed to the average of the skills (routers map them
    to uniform weights, see :func:`with_unknown_rows`).
    """

    task_ids: torch.Tensor
    unique: torch.Tensor
    inverse: torch.Tensor
    key: tuple[int, ...]


def with_unknown_rows(
    compute: Callable[[torch.Tensor], torch.Tensor], task_ids: torch.Tensor, n_splits: int, n_skills: int
) -> torch.Tensor:
    """``compute(task_ids)`` with the rows of :data:`UNKNOWN_TASK` set to uniform weights ``1 / n_skills``.

    Uniform weights make every split's mixed factors the plain average of the skills (MHR-mu). ``compute``
    maps known ids ``(k,)`` to weights ``(k, n_splits, n_skills)``; it is called on the known ids only.
    """
    unknown = task_ids == UNKNOWN_TASK
    if not bool(unknown.any()):
        return compute(task_ids)
    out_shape = (task_ids.shape[0], n_splits, n_skills)
    known = torch.nonzero(~unknown).squeeze(-1)
    if known.numel() == 0:
        probe = compute(task_ids[:0].clamp_min(0))  # no rows: only gives dtype and device
        return probe.new_full(out_shape, 1.0 / n_skills)
    weights = compute(task_ids[known])
    out = weights.new_full(out_shape, 1.0 / n_skills)
    return out.index_put((known.to(out.device),), weights)


@dataclass
class RoutingState:
    """What every Poly layer of one model needs to know to route its input.

    Attributes:
        active_adapter: name of the adapter the layers apply (``None``: none).
        disabled: ``True`` inside :meth:`PolyModel.disable_adapter`: layers run their base module only.
        merged_task: ``(adapter, task_id)`` while a task is merged into the base weights, else ``None``.
        task_ids: the task ids of the call in progress, shape ``(n,)``; ``None`` outside a call.
    """

    active_adapter: Optional[str] = None
    disabled: bool = False
    merged_task: Optional[tuple[str, int]] = None
    task_ids: Optional[torch.Tensor] = None
    _per_batch: dict[tuple[int, str], BatchRouting] = field(default_factory=dict, repr=False)
    #: scratch space that lives for one call (e.g. weights of routers shared by several layers)
    call_store: dict[Any, Any] = field(default_factory=dict, repr=False)
    _for_backward: Optional[torch.Tensor] = field(default=None, repr=False)
    _samples: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    _samples_for_backward: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    @contextmanager
    def route(self, task_ids: Optional[torch.Tensor], samples: Optional[dict[int, torch.Tensor]] = None) -> Iterator[None]:
        """Make ``task_ids`` (already validated) visible to the layers for the duration of one call.

        ``samples`` are training routing weights drawn for the call before the model runs, ``{id(router):
        (n, n_splits, n_skills)}`` (see :func:`polytropon.router.presample`); a router finds its own with
        :meth:`presampled`.
        """
        previous = self.task_ids, self._per_batch, self.call_store, self._samples
        kept = {} if task_ids is None else {key: (task_ids, w) for key, w in (samples or {}).items()}
        self.task_ids, self._per_batch, self.call_store, self._samples = task_ids, {}, {}, kept
        try:
            yield
        finally:
            self.task_ids, self._per_batch, self.call_store, self._samples = previous
            if task_ids is not None and torch.is_grad_enabled():
                # activation checkpointing re-runs layers inside backward(), after the call has ended: they
                # need the call's task ids and, to recompute the same function, its routing samples
                self._for_backward, self._samples_for_backward = task_ids, kept

    def __getstate__(self) -> dict[str, Any]:
        # copies and pickles of a model carry its configuration, not the tensors of a call (graph nodes)
        state = dict(self.__dict__)
        state.update(_per_batch={}, call_store={}, _samples={}, _samples_for_backward={}, _for_backward=None)
        return state

    def presampled(self, router: Any, task_ids: torch.Tensor) -> Optional[torch.Tensor]:
        """The training weights drawn for ``router`` at the start of this call, if any, for these task ids.

        A layer re-run by activation checkpointing inside ``backward()`` gets the weights of the last call
        routed with autograd on (the tensors the forward pass used, so gradients reach the router's logits).
        """
        samples = self._samples
        if self.task_ids is None and _in_backward():
            samples = self._samples_for_backward
        entry = samples.get(id(router))
        if entry is None:
            return None
        ids, weights = entry
        if torch.compiler.is_compiling():  # traced: one forward, its samples drawn for the batch's rows
            return weights
        if ids is task_ids or (ids.shape == task_ids.shape and torch.equal(ids, task_ids.to(ids.device))):
            return weights
        return None

    def for_batch(self, batch_size: int, device: torch.device, where: str = "", cache: bool = True) -> BatchRouting:
        """The task ids of the current call expanded to a layer input of ``batch_size`` rows.

        Generation runs the model on ``batch * k`` rows (beam search, ``num_return_sequences``), repeating
        every example ``k`` times in a row; the task ids are expanded the same way (``repeat_interleave``).
        The result is computed once per call and batch size, not once per layer (``cache=False``: computed
        afresh, as a layer traced by ``torch.compile`` asks, since the cache's contents would become guards).

        Under activation (gradient) checkpointing, layers recomputed during ``backward()`` get the task ids of
        the last routed call made with autograd on; so run each forward's backward before the next forward
        (as training loops, the HF Trainer and gradient accumulation do).

        Raises:
            ValueError: if no task ids were given, or ``batch_size`` is not a multiple of their number.
        """
        if self.task_ids is None and self._for_backward is not None and _in_backward():
            # a checkpointed segment being recomputed for the last routed call (not cached: the call is over)
            return _expand(self._for_backward, batch_size, device, where)
        if self.task_ids is None:
            raise ValueError(
                f"task_ids are required while adapter {self.active_adapter!r} is active: pass task_ids=... "
                "(one task id per example) to forward/generate"
            )
        if not cache:
            return _expand(self.task_ids, batch_size, device, where)
        cache_key = (batch_size, device)
        cached = self._per_batch.get(cache_key)
        if cached is None:
            cached = self._per_batch[cache_key] = _expand(self.task_ids, batch_size, device, where)
        return cached


def _expand(task_ids: torch.Tensor, batch_size: int, device: torch.device, where: str) -> BatchRouting:
    """:class:`BatchRouting` of ``task_ids`` (``(n,)``) for a layer input of ``batch_size`` rows (see ``for_batch``)."""
    n = task_ids.shape[0]
    if batch_size % n != 0:
        raise ValueError(
            f"got {n} task_ids but {where or 'a layer'} received a batch of {batch_size} rows; "
            "expected one task id per example (or a divisor of the batch size, for generation)"
        )
    ids = task_ids.to(device)
    if batch_size != n:
        ids = ids.repeat_interleave(batch_size // n)
    if torch.compiler.is_compiling():
        # traced by torch.compile: the layers route every row by its own id (PolyAdapter.add_update); the
        # distinct tasks (a data-dependent shape) and a Python cache key would make guards on task values
        return BatchRouting(ids, ids, torch.arange(batch_size, device=device), ())
    unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    return BatchRouting(ids, unique, inverse, tuple(unique.tolist()))


def _in_backward() -> bool:
    """Whether the autograd engine is running a backward pass on this thread."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


def check_task_ids(
    task_ids: Any, n_tasks: int, batch_size: Optional[int] = None, allow_unknown: bool = False
) -> torch.Tensor:
    """Validate user task ids and return them as a LongTensor of shape ``(n,)``.

    Args:
        task_ids: a 1-D integer tensor or a sequence of Python ints, one task per example.
        n_tasks: number of tasks of the active adapter; ids must lie in ``[0, n_tasks)``.
        batch_size: the batch size of the call when known: ``n`` must equal it or divide it.
        allow_unknown: also accept :data:`UNKNOWN_TASK` (examples routed to the average of the skills).

    Raises:
        TypeError: not a tensor or sequence of ints, or a tensor of non-integer dtype.
        ValueError: not 1-D, empty, an id out of range, or a length incompatible with ``batch_size``.
    """
    if isinstance(task_ids, torch.Tensor):
        if task_ids.dtype == torch.bool or task_ids.is_floating_point() or task_ids.is_complex():
            raise TypeError(f"task_ids must have an integer dtype, got a tensor of dtype {task_ids.dtype}")
        tensor = task_ids
    elif isinstance(task_ids, (list, tuple)):
        for value in task_ids:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(
                    f"task_ids must be a list of ints or a LongTensor, got element {value!r} "
                    f"({type(value).__name__})"
                )
        tensor = torch.tensor(list(task_ids), dtype=torch.long)
    else:
        raise TypeError(f"task_ids must be a LongTensor of shape (batch,) or a list of ints, got {type(task_ids).__name__}")
    if tensor.dim() != 1:
        raise ValueError(f"task_ids must be 1-D of shape (batch,), got shape {tuple(tensor.shape)}")
    if tensor.numel() == 0:
        raise ValueError("task_ids must not be empty")
    known = tensor[tensor != UNKNOWN_TASK] if allow_unknown else tensor
    if known.numel():
        low, high = int(known.min()), int(known.max())
        if low < 0:
            raise ValueError(f"task_ids must be >= 0, got task id {low}")
        if high >= n_tasks:
            raise ValueError(f"task id {high} is out of range: the adapter has n_tasks={n_tasks} (ids 0..{n_tasks - 1})")
    n = tensor.shape[0]
    if batch_size is not None and (batch_size % n != 0):
        raise ValueError(
            f"got {n} task_ids for a batch of {batch_size} examples: expected {batch_size} "
            "(one per example) or a divisor of it"
        )
    return tensor.long()
