"""The routing state shared by a :class:`~polytropon.model.PolyModel` and its layers, and task-id checks.

A model owns one :class:`RoutingState`; every Poly layer holds a reference to it. What belongs to the model
(the active adapter, a merged task) lives on the state; what belongs to one call (its task ids and what is
derived from them: the ids expanded to a layer's rows, the routes drawn for training, the weights of routers
shared by several layers) lives in a :class:`CallRouting` that the model opens for the duration of the call
(:meth:`RoutingState.route`). It is one field of the context's :class:`ContextRouting` (with the ids of a
``task_context`` block and the ``disable_adapter`` flag), held in a single :mod:`contextvars` variable. Every
thread and every asyncio task sees its own calls only, so any number of them can run ``forward``/``generate``
on one model at once. Nothing is registered or removed per call.

Task ids can also be given for a whole block of code (:meth:`RoutingState.task_context`, behind
:meth:`PolyModel.task_context <polytropon.model.PolyModel.task_context>`): calls that pass no ``task_ids`` --
including direct calls of the base model, e.g. by a transformers ``pipeline`` -- are routed to them.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional, Sequence, Union

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
class CallRouting:
    """What the layers need to route one call: its task ids and what is derived from them.

    Attributes:
        task_ids: LongTensor ``(n,)``, one task per example of the call (or a single id for all of them).
        samples: training routing weights drawn for the call before the model runs, ``{id(router): (task_ids,
            weights (n, n_splits, n_skills))}`` (see :func:`polytropon.router.presample`).
        per_batch: :class:`BatchRouting` of the call per ``(rows, device)`` of a layer input, computed once.
        store: scratch space of the call (e.g. weights of routers shared by several layers).
        eval_steps: per adapted layer, what its eval update needs in this call with autograd off -- the adapter,
            its factors for the call's rows, the plain base layer -- resolved at the layer's first run in the
            call and reused while the call lasts (``generate`` runs every layer once per token); see
            :class:`polytropon.layer.EvalStep`.
    """

    task_ids: torch.Tensor
    samples: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    per_batch: dict[tuple[int, torch.device], BatchRouting] = field(default_factory=dict)
    store: dict[Any, Any] = field(default_factory=dict)
    eval_steps: dict[Any, Any] = field(default_factory=dict)


class ContextRouting(NamedTuple):
    """What one context (a thread or an asyncio task) has set on one model: immutable, replaced whole.

    Attributes:
        call: the :class:`CallRouting` of the call in progress (``None`` outside a call, or in a call that
            routes nothing, e.g. with adapters disabled).
        task_ids: the ids of the innermost :meth:`RoutingState.task_context`, or ``None``.
        disabled: ``True`` inside :meth:`PolyModel.disable_adapter <polytropon.model.PolyModel.disable_adapter>`.
    """

    call: Optional[CallRouting] = None
    task_ids: Optional[torch.Tensor] = None
    disabled: bool = False


_NOTHING = ContextRouting()
_EMPTY: Mapping[int, ContextRouting] = MappingProxyType({})
#: ``id(RoutingState)`` -> this context's :class:`ContextRouting` for that model. Replaced, never mutated.
_CONTEXTS: ContextVar[Mapping[int, ContextRouting]] = ContextVar("polytropon_routing", default=_EMPTY)


class RoutingState:
    """What every Poly layer of one model needs to know to route its input.

    Model-wide (one value for every caller):

    * ``active_adapter``: name of the adapter the layers apply (``None``: none);
    * ``merged_task``: ``(adapter, task_id)`` while a task is merged into the base weights, else ``None``;
    * ``recompute_inputs``: whether training layers recompute their inputs in backward from what the base model
      keeps, where they can, instead of keeping them (exact; :mod:`polytropon.recompute`). ``True`` by default.

    Per context (each thread / asyncio task sees its own), one :class:`ContextRouting` in a contextvar:

    * ``task_ids``: the task ids of this context's call in progress, ``None`` outside a call;
    * ``disabled``: ``True`` inside :meth:`PolyModel.disable_adapter`: layers run their base module only;
    * ``context_task_ids``: the ids of the innermost :meth:`task_context`, or ``None``.

    Read where the contextvar is out of reach: the last call routed with autograd on (layers re-run by
    activation checkpointing inside ``backward()``, after the call has ended, route with it), and the last
    :class:`ContextRouting` any context set (what a layer traced by ``torch.compile`` reads: dynamo cannot
    trace contextvars, and compiled calls are one thread's at a time).
    """

    #: see the class docstring (a class default too, for states pickled before the attribute existed)
    recompute_inputs: bool = True

    def __init__(self, active_adapter: Optional[str] = None, disabled: bool = False, merged_task: Optional[tuple[str, int]] = None) -> None:
        self.active_adapter = active_adapter
        self.merged_task = merged_task
        self.recompute_inputs = True
        self._for_backward: Optional[CallRouting] = None  # the last call routed with autograd on
        self._traced: ContextRouting = _NOTHING  # the last ContextRouting any context set (read while tracing)
        if disabled:
            self.disabled = True

    # ------------------------------------------------------------------ per-context values
    def _context(self) -> ContextRouting:
        if torch.compiler.is_compiling():
            return self._traced
        return _CONTEXTS.get().get(id(self), _NOTHING)

    def _set_context(self, context: ContextRouting) -> None:
        contexts = dict(_CONTEXTS.get())
        contexts[id(self)] = context
        _CONTEXTS.set(MappingProxyType(contexts))
        self._traced = context

    def current_call(self) -> Optional[CallRouting]:
        """The routing of this context's call in progress, or ``None``."""
        # read by every layer at every call: the lookup of _context() inlined
        if torch.compiler.is_compiling():
            return self._traced.call
        return _CONTEXTS.get().get(id(self), _NOTHING).call

    @property
    def task_ids(self) -> Optional[torch.Tensor]:
        call = self.current_call()
        return None if call is None else call.task_ids

    @property
    def disabled(self) -> bool:
        if torch.compiler.is_compiling():  # read by every layer at every call: _context() inlined
            return self._traced.disabled
        return _CONTEXTS.get().get(id(self), _NOTHING).disabled

    @disabled.setter
    def disabled(self, value: bool) -> None:
        self._set_context(self._context()._replace(disabled=bool(value)))

    @property
    def context_task_ids(self) -> Optional[torch.Tensor]:
        return self._context().task_ids

    @contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Inside the block (in this context) the layers run their base module only; restored on exit."""
        previous = self.disabled
        self.disabled = True
        try:
            yield
        finally:
            self.disabled = previous

    @contextmanager
    def task_context(self, task_ids: torch.Tensor) -> Iterator[None]:
        """Route calls without explicit task ids to ``task_ids`` (already validated) inside the block."""
        previous = self._context().task_ids
        self._set_context(self._context()._replace(task_ids=task_ids))
        try:
            yield
        finally:
            self._set_context(self._context()._replace(task_ids=previous))

    @contextmanager
    def route(self, task_ids: Optional[torch.Tensor], samples: Optional[dict[int, torch.Tensor]] = None) -> Iterator[None]:
        """Make ``task_ids`` (already validated) visible to the layers for the duration of one call.

        ``samples`` are training routing weights drawn for the call before the model runs, ``{id(router):
        (n, n_splits, n_skills)}`` (see :func:`polytropon.router.presample`); a router finds its own with
        :meth:`presampled`. The call's routing is visible in this context only (this thread or asyncio task).
        """
        call = None
        if task_ids is not None:
            call = CallRouting(task_ids, {key: (task_ids, w) for key, w in (samples or {}).items()})
        previous = self._context().call
        self._set_context(self._context()._replace(call=call))
        try:
            yield
        finally:
            self._set_context(self._context()._replace(call=previous))
            if call is not None and torch.is_grad_enabled():
                self._for_backward = CallRouting(call.task_ids, call.samples)

    def __getstate__(self) -> dict[str, Any]:
        # copies and pickles of a model carry its configuration, not the tensors of a call (graph nodes)
        return {
            "active_adapter": self.active_adapter, "merged_task": self.merged_task,
            "recompute_inputs": self.recompute_inputs, "_for_backward": None,
            "_traced": _NOTHING,
        }

    def _recomputing(self) -> Optional[CallRouting]:
        """The last call routed with autograd on, while a checkpointed layer is re-run inside ``backward()``."""
        if self._for_backward is not None and self.current_call() is None and in_backward():
            return self._for_backward
        return None

    def presampled(self, router: Any, task_ids: torch.Tensor) -> Optional[torch.Tensor]:
        """The training weights drawn for ``router`` at the start of this call, if any, for these task ids.

        A layer re-run by activation checkpointing inside ``backward()`` gets the weights of the last call
        routed with autograd on (the tensors the forward pass used, so gradients reach the router's logits).
        """
        call = self.current_call() or self._recomputing()
        entry = None if call is None else call.samples.get(id(router))
        if entry is None:
            return None
        ids, weights = entry
        if torch.compiler.is_compiling():  # traced: one forward, its samples drawn for the batch's rows
            return weights
        if ids is task_ids or (ids.shape == task_ids.shape and torch.equal(ids, task_ids.to(ids.device))):
            return weights
        return None

    def eval_steps(self) -> Optional[dict[Any, Any]]:
        """The :attr:`CallRouting.eval_steps` of this context's call in progress, or ``None``.

        ``None`` also where no step may be reused: outside a call, with adapters disabled in this context, with a
        task merged, and while ``torch.compile`` traces. One contextvar read: this runs in every adapted layer
        at every generated token.
        """
        if torch.compiler.is_compiling() or self.merged_task is not None:
            return None
        context = _CONTEXTS.get().get(id(self), _NOTHING)
        if context.disabled or context.call is None:
            return None
        return context.call.eval_steps

    def call_store(self) -> Optional[dict[Any, Any]]:
        """Scratch space of this context's call in progress (``None`` outside a call)."""
        call = self.current_call()
        return None if call is None else call.store

    def for_batch(self, batch_size: int, device: torch.device, where: str = "", cache: bool = True) -> BatchRouting:
        """The task ids of the current call expanded to a layer input of ``batch_size`` rows.

        Generation runs the model on ``batch * k`` rows (beam search, ``num_return_sequences``), repeating
        every example ``k`` times in a row; the task ids are expanded the same way (``repeat_interleave``), and
        so is a single id to any number of rows. The result is computed once per call and batch size, not once
        per layer (``cache=False``: computed afresh, as a layer traced by ``torch.compile`` asks, since the
        cache's contents would become guards). Outside a routed call (e.g. the base model called directly) the
        ids of the innermost :meth:`task_context` are used.

        Under activation (gradient) checkpointing, layers recomputed during ``backward()`` get the task ids of
        the last routed call made with autograd on; so run each forward's backward before the next forward
        (as training loops, the HF Trainer and gradient accumulation do).

        Raises:
            ValueError: if no task ids were given, or ``batch_size`` is not a multiple of their number.
        """
        call = self.current_call()
        if call is None:
            recomputing = self._recomputing()
            if recomputing is not None:  # a checkpointed segment re-run for the last routed call (not cached)
                return _expand(recomputing.task_ids, batch_size, device, where)
            context = self.context_task_ids
            if context is None:
                raise ValueError(
                    f"task_ids are required while adapter {self.active_adapter!r} is active: pass task_ids=... "
                    "(one task id per example) to forward/generate, or route a block of calls with "
                    "model.task_context(...)"
                )
            return _expand(context, batch_size, device, where)
        if not cache:
            return _expand(call.task_ids, batch_size, device, where)
        cache_key = (batch_size, device)
        cached = call.per_batch.get(cache_key)
        if cached is None:
            cached = call.per_batch[cache_key] = _expand(call.task_ids, batch_size, device, where)
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
        # traced by torch.compile: the layers route every row by its own id (PolyAdapter.traced_update); the
        # distinct tasks (a data-dependent shape) and a Python cache key would make guards on task values
        return BatchRouting(ids, ids, torch.arange(batch_size, device=device), ())
    unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    return BatchRouting(ids, unique, inverse, tuple(unique.tolist()))


def in_backward() -> bool:
    """Whether the autograd engine is running a backward pass on this thread."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


#: Keyword inputs whose first dimension is the batch (text, embeddings, images, audio features, raw audio), in the
#: order they are looked at: the first one given sets the batch size that the task ids are checked against.
BATCH_INPUTS = ("input_ids", "inputs_embeds", "pixel_values", "input_features", "input_values")


def call_batch_size(args: Sequence[Any], kwargs: Mapping[str, Any]) -> Optional[int]:
    """The number of examples of a model call: the first dimension of the first :data:`BATCH_INPUTS` keyword
    given as a tensor, else of the first positional argument if it is a tensor; ``None`` if none is."""
    for key in BATCH_INPUTS:
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return value.shape[0]
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 1:
        return args[0].shape[0]
    return None


def check_task_ids(
    task_ids: Any, n_tasks: int, batch_size: Optional[int] = None, allow_unknown: bool = False
) -> torch.Tensor:
    """Validate user task ids and return them as a LongTensor of shape ``(n,)``.

    Args:
        task_ids: a 1-D integer tensor or a sequence of Python ints, one task per example.
        n_tasks: number of tasks of the active adapter; ids must lie in ``[0, n_tasks)``.
        batch_size: the batch size of the call when known: ``n`` must equal it, or be 1 (one task for the
            whole batch).
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
    if batch_size is not None and n not in (1, batch_size):
        raise ValueError(
            f"got {n} task_ids for a batch of {batch_size} examples: expected {batch_size} "
            "(one per example) or 1 (one task for the whole batch)"
        )
    return tensor.long()
