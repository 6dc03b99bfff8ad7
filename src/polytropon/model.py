"""``PolyModel``: a transformers model with Poly/MHR adapters, and ``get_peft_model``."""

from __future__ import annotations

import dataclasses
import operator
import os
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn

from .checkpoint import (
    KEY_PREFIX, WEIGHTS_NAME, adapter_directory, check_adapter_name, load_tensors, save_tensors,
)
from .config import PolyConfig
from .export import lora_config_dict, lora_state_dict, write_lora
from .fsdp import check_complete, gathered, is_local_full, is_sharded
from .layer import PolyAdapter, PolyLayer, layer_features
from .modules_to_save import ModulesToSave
from .router import PolyRouter, presample, relaxed_bernoulli_rsample
from .routing import RoutingState, TaskIds, check_task_ids
from .signature import bind_forward, forward_state
from .targets import TASK_TYPE_HEADS, default_target_modules, infer_task_type, matches
from .tasks import grow_tasks, resolve_task_names, task_index
from .variants import build_routers, check_tied_router_tensors


# ---------------------------------------------------------------------- planning (pure: never changes the model)
def _walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Named submodules of ``module``, not descending into Poly layers and saved-module wrappers."""
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        yield path, child
        if not isinstance(child, (PolyLayer, ModulesToSave)):
            yield from _walk(child, path)


@dataclasses.dataclass
class _Plan:
    config: PolyConfig
    targets: list[tuple[str, nn.Module]]  # (path, base module or existing PolyLayer)
    saved: list[tuple[str, nn.Module]]  # (path, original module or existing ModulesToSave)


def _resolve_config(model: nn.Module, config: PolyConfig) -> PolyConfig:
    """A copy of ``config`` with defaults filled in from the model (target modules, task type, heads)."""
    if not isinstance(config, PolyConfig):
        raise TypeError(f"config must be a polytropon.PolyConfig, got {type(config).__name__}")
    config = dataclasses.replace(config)
    if config.target_modules is None:
        config.target_modules = default_target_modules(model)
    if config.task_type is None:
        config.task_type = infer_task_type(model)
    heads = TASK_TYPE_HEADS.get(config.task_type, ())
    if heads:
        saved = list(config.modules_to_save or [])
        config.modules_to_save = saved + [h for h in heads if h not in saved]
    return config


def _plan(model: nn.Module, config: PolyConfig) -> _Plan:
    """Find and check every module an adapter with ``config`` would touch, without changing anything.

    Raises:
        ValueError: no module matches ``target_modules``; ``n_splits`` does not divide a layer's widths;
            a ``modules_to_save`` name (other than a task type's default head) matches nothing.
        TypeError: a matched module is neither ``nn.Linear`` nor ``Conv1D``.
    """
    config = _resolve_config(model, config)
    targets, saved = [], []
    for path, module in _walk(model):
        if isinstance(module, ModulesToSave):
            if matches(path, config.modules_to_save):
                saved.append((path, module))
            continue
        if not matches(path, config.target_modules) or matches(path, config.exclude_modules):
            if matches(path, config.modules_to_save):
                saved.append((path, module))
            continue
        base = module.base_layer if isinstance(module, PolyLayer) else module
        in_features, out_features, _ = layer_features(base, path)
        for what, width in (("in_features", in_features), ("out_features", out_features)):
            if width % config.n_splits != 0:
                raise ValueError(
                    f"n_splits={config.n_splits} does not divide {what}={width} of module {path!r}: choose "
                    "n_splits dividing every adapted layer's input and output widths"
                )
        targets.append((path, module))
    if not targets:
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no module of {type(model).__name__} "
            f"(exclude_modules={config.exclude_modules!r})"
        )
    found = {path for path, _ in saved}
    heads = set(TASK_TYPE_HEADS.get(config.task_type, ()))
    for name in config.modules_to_save or []:
        if name not in heads and not any(matches(path, [name]) for path in found):
            raise ValueError(f"modules_to_save entry {name!r} matches no module of {type(model).__name__}")
    return _Plan(config, targets, saved)


def _expected_shapes(plan: _Plan) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> tensor shape for an adapter built from ``plan`` (see :mod:`polytropon.checkpoint`)."""
    cfg = plan.config
    shapes: dict[str, tuple[int, ...]] = {}
    for path, module in plan.targets:
        base = module.base_layer if isinstance(module, PolyLayer) else module
        d_in, d_out, _ = layer_features(base, path)
        q, s = cfg.n_splits, cfg.n_skills
        shapes[f"{KEY_PREFIX}{path}.poly_lora_A"] = (q, s, d_in // q, cfg.r)
        shapes[f"{KEY_PREFIX}{path}.poly_lora_B"] = (q, s, cfg.r, d_out // q)
        if cfg.poly_type == "poly":  # fixed-allocation routers have no tensors (rebuilt from the config)
            shapes[f"{KEY_PREFIX}{path}.poly_router.module_logits"] = (cfg.n_tasks, q * s)
    for path, module in plan.saved:
        original = module.original_module if isinstance(module, ModulesToSave) else module
        for name, tensor in original.state_dict().items():
            shapes[f"{KEY_PREFIX}{path}.{name}"] = tuple(tensor.shape)
    return shapes


def _read_checkpoint(model: nn.Module, directory: str, config: Optional[PolyConfig] = None):
    """Read and check an adapter checkpoint against ``model``; returns ``(plan, tensors)``. Changes nothing.

    Raises:
        FileNotFoundError: missing directory, config or weights file.
        ValueError: corrupt files, another ``peft_type``, or tensors whose names/shapes do not fit the model.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such adapter directory")
    if config is None:
        config = PolyConfig.from_pretrained(directory)
    path, tensors = load_tensors(directory)
    try:
        plan = _plan(model, config)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: the checkpoint does not fit this model: {exc}") from None
    expected = _expected_shapes(plan)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing tensor(s), e.g. {missing[0]!r}")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]!r}")
        raise ValueError(f"{path}: the checkpoint does not fit this model: {'; '.join(detail)}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(
                f"{path}: tensor {key!r} has shape {tuple(tensors[key].shape)}, the model expects {shape}"
            )
    check_tied_router_tensors(plan.config, [p for p, _ in plan.targets], tensors, source=path)
    return plan, tensors


# ---------------------------------------------------------------------- the model
class PolyModel(nn.Module):
    """A transformers model whose target layers carry Poly/MHR adapters (drop-in for PEFT's Poly model).

    Every call takes ``task_ids``: one task per example, a LongTensor of shape ``(batch,)`` or a list of
    ints. They are checked, then handed to all adapted layers through one :class:`RoutingState` for the
    duration of the call. ``generate`` supports every decoding strategy: when transformers expands the batch
    (beam search, ``num_return_sequences``), each example's rows keep its task.

    Args:
        model: the transformers model to adapt. Its parameters are frozen; only adapter weights (and the
            ``modules_to_save`` copies) train.
        config: the adapter's :class:`PolyConfig`.
        adapter_name: name of the first adapter (see :func:`~polytropon.checkpoint.check_adapter_name`: ASCII
            letters, digits, ``_`` and ``-``).

    Attribute reads that PolyModel does not define fall through to the wrapped model (``model.config``).
    """

    def __init__(self, model: nn.Module, config: PolyConfig, adapter_name: str = "default") -> None:
        super().__init__()
        check_adapter_name(adapter_name)
        plan = _plan(model, config)  # before any change to the model
        self.model = model
        self.peft_config: dict[str, PolyConfig] = {}
        self.routing = RoutingState()
        self._router_cache: Optional[tuple[Optional[str], list[PolyRouter]]] = None  # see _active_routers
        for param in model.parameters():
            param.requires_grad_(False)
        self._inject(adapter_name, plan)
        self.set_adapter(adapter_name)
        self.training = model.training
        self.forward = bind_forward(self, type(self).forward)  # shows the wrapped model's parameters + task_ids

    def __getstate__(self) -> dict[str, Any]:
        return forward_state(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.forward = bind_forward(self, type(self).forward)

    # ------------------------------------------------------------------ adapters
    def _inject(self, adapter_name: str, plan: _Plan) -> None:
        cfg = plan.config
        self._router_cache = None
        routers = build_routers(cfg, [path for path, _ in plan.targets], self.routing)
        for path, module in plan.targets:
            if isinstance(module, PolyLayer):
                layer = module
            else:
                layer = PolyLayer(module, self.routing, path).train(module.training)
                self._replace(path, layer)
            weight = layer.base_layer.weight
            router, first = routers[path]
            adapter = PolyAdapter(
                layer.in_features, layer.out_features, cfg.r, cfg.n_tasks, cfg.n_skills, cfg.n_splits,
                init_weights=cfg.init_weights, router=router,
            )
            if first:  # drawn after this layer's skills: PEFT's order of random draws
                router.reset()
            # new modules follow the mode of the model they join (an eval-mode model stays deterministic)
            layer.adapters[adapter_name] = adapter.to(weight.device).train(layer.base_layer.training)
        for path, module in plan.saved:
            if isinstance(module, ModulesToSave):
                wrapper = module
            else:
                wrapper = ModulesToSave(module, self.routing).train(module.training)
                self._replace(path, wrapper)
            wrapper.add_copy(adapter_name)
        self.peft_config[adapter_name] = cfg

    def _replace(self, path: str, new: nn.Module) -> None:
        parent_path, _, child = path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        setattr(parent, child, new)

    def poly_layers(self) -> Iterator[tuple[str, PolyLayer]]:
        """``(path, PolyLayer)`` of every adapted layer, in the order of the model's modules."""
        for path, module in _walk(self.model):
            if isinstance(module, PolyLayer):
                yield path, module

    def saved_modules(self) -> Iterator[tuple[str, ModulesToSave]]:
        """``(path, ModulesToSave)`` of every module trained and saved beside the adapters (e.g. a head)."""
        for path, module in _walk(self.model):
            if isinstance(module, ModulesToSave):
                yield path, module

    def named_adapters(self, adapter_name: Optional[str] = None) -> list[tuple[str, PolyAdapter]]:
        """``(layer path, PolyAdapter)`` of every layer carrying ``adapter_name`` (default: the active adapter).

        Raises:
            ValueError: unknown adapter.
        """
        adapter_name = self.resolve_adapter(adapter_name)
        return [(path, layer.adapters[adapter_name]) for path, layer in self.poly_layers() if adapter_name in layer.adapters]

    def _check_adapter(self, adapter_name: Any) -> None:
        if not isinstance(adapter_name, str) or adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; existing adapters: {sorted(self.peft_config)}")

    def resolve_adapter(self, adapter_name: Optional[str] = None) -> str:
        """``adapter_name``, or the active adapter when ``None``, checked to exist.

        Raises:
            ValueError: no such adapter (or none given and none active), naming the existing ones.
        """
        name = self.routing.active_adapter if adapter_name is None else adapter_name
        self._check_adapter(name)
        return name

    def resolve_task_id(self, task: Union[int, str], adapter_name: Optional[str] = None) -> int:
        """A task given by id or by name (``PolyConfig.task_names``) as a checked id of ``adapter_name``.

        Raises:
            TypeError: neither an integer nor (with task names) a string. ValueError: unknown adapter, unknown
            name, or an id outside ``[0, n_tasks)``.
        """
        adapter_name = self.resolve_adapter(adapter_name)
        if isinstance(task, str):
            task = task_index(task, self.peft_config[adapter_name])
        return self._check_task_id(task, adapter_name)

    def add_adapter(self, adapter_name: str, config: PolyConfig) -> None:
        """Add another adapter (not active, not trainable until :meth:`set_adapter`).

        Raises:
            TypeError, ValueError: an invalid name (:func:`~polytropon.checkpoint.check_adapter_name`), a name
            taken, or a config that does not fit the model (nothing is changed).
        """
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists")
        if self.routing.merged_task is not None:
            raise ValueError("cannot add an adapter while a task is merged: call unmerge_adapter() first")
        self._inject(adapter_name, _plan(self.model, config))
        self._update_trainable()

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the adapter every layer applies, and the only trainable one."""
        self._check_adapter(adapter_name)
        if self.routing.merged_task is not None and self.routing.merged_task[0] != adapter_name:
            raise ValueError("cannot switch adapters while a task is merged: call unmerge_adapter() first")
        self.routing.active_adapter = adapter_name
        self._update_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter from every layer; if it was active, another one (if any) becomes active."""
        self._check_adapter(adapter_name)
        if self.routing.merged_task is not None and self.routing.merged_task[0] == adapter_name:
            raise ValueError(f"adapter {adapter_name!r} is merged: call unmerge_adapter() first")
        for _, layer in self.poly_layers():
            if adapter_name in layer.adapters:
                del layer.adapters[adapter_name]
        for _, wrapper in self.saved_modules():
            if adapter_name in wrapper.modules_to_save:
                del wrapper.modules_to_save[adapter_name]
        del self.peft_config[adapter_name]
        self._router_cache = None
        if self.routing.active_adapter == adapter_name:
            self.routing.active_adapter = next(iter(self.peft_config), None)
        self._update_trainable()

    def _update_trainable(self) -> None:
        active = self.routing.active_adapter
        trainable = active is not None and not self.peft_config[active].inference_mode
        for _, layer in self.poly_layers():
            for name, adapter in layer.adapters.items():
                adapter.requires_grad_(trainable and name == active)
        for _, wrapper in self.saved_modules():
            wrapper.original_module.requires_grad_(False)
            for name, copy in wrapper.modules_to_save.items():
                copy.requires_grad_(trainable and name == active)

    @property
    def active_adapter(self) -> Optional[str]:
        """Name of the adapter in use."""
        return self.routing.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return [] if self.routing.active_adapter is None else [self.routing.active_adapter]

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager: inside it the model computes the base model's outputs (task ids not needed)."""
        merged = self.routing.merged_task
        if merged is not None:
            self.unmerge_adapter()
        previous = self.routing.disabled
        self.routing.disabled = True
        try:
            yield
        finally:
            self.routing.disabled = previous
            if merged is not None:
                self.merge_adapter(merged[1], adapter_name=merged[0])

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model (with the adapter layers in place)."""
        return self.model

    # ------------------------------------------------------------------ the task axis and trainable set
    def add_tasks(
        self, tasks: Union[int, list[str]], init: Union[str, int] = "uniform", adapter_name: Optional[str] = None
    ) -> list[int]:
        """Add tasks to an adapter after training (few-shot adaptation); returns the new tasks' ids.

        Every router gets new rows (``init``: ``"uniform"``, ``"average"`` or a copy of an existing task);
        trained rows are kept bit for bit. See :func:`polytropon.tasks.grow_tasks`.

        Raises:
            TypeError / ValueError: bad ``tasks``, ``init`` or adapter (naming the value); nothing is changed.
        """
        adapter_name = self.resolve_adapter(adapter_name)
        config = self.peft_config[adapter_name]
        new_config = grow_tasks(config, self.named_adapters(adapter_name), tasks, init, adapter_name)
        self.peft_config[adapter_name] = new_config
        return list(range(config.n_tasks, new_config.n_tasks))

    def freeze_skills(self, adapter_name: Optional[str] = None, freeze_saved_modules: bool = True) -> int:
        """MHR-z: freeze the skills so that only the routing trains; returns the number of trainable parameters.

        Sets ``requires_grad=False`` on ``poly_lora_A``/``poly_lora_B`` of every layer (and, with
        ``freeze_saved_modules``, on the ``modules_to_save`` copies) of the adapter. Learned rows of other
        tasks get zero gradient, so with an optimizer without weight decay they stay unchanged.
        :meth:`set_adapter` restores the default trainable set.

        Raises:
            ValueError: the adapter is not the active (trainable) one, is in inference mode, or has no learned
            router.
        """
        adapter_name = self.resolve_adapter(adapter_name)
        config = self.peft_config[adapter_name]
        if adapter_name != self.active_adapter or config.inference_mode:
            raise ValueError(
                f"adapter {adapter_name!r} is not trainable (only the active adapter trains, and not in inference_mode)"
            )
        if config.poly_type != "poly":
            raise ValueError(
                f"adapter {adapter_name!r} has a fixed allocation (poly_type={config.poly_type!r}): with frozen "
                "skills nothing would train"
            )
        for _, adapter in self.named_adapters(adapter_name):
            adapter.poly_lora_A.requires_grad_(False)
            adapter.poly_lora_B.requires_grad_(False)
        if freeze_saved_modules:
            for _, wrapper in self.saved_modules():
                if adapter_name in wrapper.modules_to_save:
                    wrapper.modules_to_save[adapter_name].requires_grad_(False)
        return self.get_nb_trainable_parameters()[0]

    @torch.no_grad()
    def routing_weights(
        self, task: Optional[Union[int, str]] = None, adapter_name: Optional[str] = None
    ) -> dict[str, torch.Tensor]:
        """Eval routing weights of every adapted layer (``router.eval_weights``, whatever the mode).

        Returns:
            layer path -> float32 CPU tensor ``(n_tasks, n_splits, n_skills)``, or ``(n_splits, n_skills)`` for
            one ``task`` (id or name); each split's weights sum to 1. Layers sharing a router return the same
            tensor.

        Raises:
            ValueError / TypeError: unknown adapter or task.
        """
        adapter_name = self.resolve_adapter(adapter_name)
        index = None if task is None else self.resolve_task_id(task, adapter_name)
        ids = torch.arange(self.peft_config[adapter_name].n_tasks)
        computed: dict[int, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}
        for path, adapter in self.named_adapters(adapter_name):
            router = adapter.poly_router
            if id(router) not in computed:
                device = next(iter([*router.parameters(), *router.buffers()]), ids).device
                computed[id(router)] = router.eval_weights(ids.to(device)).float().cpu()
            out[path] = computed[id(router)] if index is None else computed[id(router)][index]
        return out

    # ------------------------------------------------------------------ calls
    @staticmethod
    def _batch_size(args: tuple, kwargs: dict) -> Optional[int]:
        for key in ("input_ids", "inputs_embeds"):
            value = kwargs.get(key)
            if isinstance(value, torch.Tensor) and value.dim() >= 1:
                return value.shape[0]
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 1:
            return args[0].shape[0]
        return None

    def _task_ids_for_call(self, task_ids: Optional[TaskIds], batch_size: Optional[int]) -> Optional[torch.Tensor]:
        """The checked task ids of one call: ``task_ids`` if given, else those of the innermost :meth:`task_context`.

        One id per example, or a single id for the whole batch (expanded to the batch when its size is known).
        """
        state = self.routing
        active = state.active_adapter
        from_context = task_ids is None
        if from_context:
            task_ids = state.context_task_ids
        if task_ids is None:
            if active is not None and not state.disabled and state.merged_task is None:
                raise ValueError(
                    f"task_ids are required while adapter {active!r} is active: pass task_ids=... "
                    "(a LongTensor of shape (batch,) or a list of ints, one task per example), or route a block "
                    "of calls with model.task_context(...)"
                )
            return None
        try:
            ids = self._check_call_task_ids(task_ids, batch_size)
        except ValueError as exc:
            if from_context:  # the caller passed no ids: say where they came from
                raise ValueError(f"{exc} (task ids of the enclosing model.task_context(...))") from None
            raise
        if batch_size is not None and ids.shape[0] == 1 and batch_size > 1:
            ids = ids.expand(batch_size)  # one route per example in training, as for a full list
        return ids

    def _check_call_task_ids(self, task_ids: TaskIds, batch_size: Optional[int]) -> torch.Tensor:
        """``task_ids`` (ids or names) checked against the active adapter, the batch size and a merged task."""
        state = self.routing
        if state.active_adapter is None:
            raise ValueError("task_ids were given but the model has no active adapter")
        config = self.peft_config[state.active_adapter]
        allow_unknown = config.unknown_task == "average" and not self.training
        task_ids = resolve_task_names(task_ids, config, allow_unknown=allow_unknown)
        ids = check_task_ids(task_ids, config.n_tasks, batch_size, allow_unknown=allow_unknown)
        if state.merged_task is not None and not state.disabled:
            merged = state.merged_task[1]
            other = ids[ids != merged]
            if other.numel():
                raise ValueError(
                    f"task {merged} is merged into the weights, got task id {int(other[0])}: "
                    "call unmerge_adapter() to route other tasks"
                )
        return ids

    @contextmanager
    def task_context(self, task_ids: Union[TaskIds, int, str]) -> Iterator[None]:
        """Route every call inside the block that gives no ``task_ids`` to these tasks.

        Covers ``forward`` and ``generate`` of this model and direct calls of :meth:`get_base_model` -- e.g. by a
        transformers ``pipeline`` or an evaluation harness that does not know about task ids::

            with model.task_context("sst2"):                    # or an id, or one id/name per example
                pipeline("text-classification", model=model.get_base_model(), tokenizer=tok)("great film")

        A single id or name applies to a batch of any size (and to every row of beam search); a list gives one
        task per example and must match the batch size of each call (through ``forward``/``generate``: exactly;
        a direct base-model call also accepts a multiple of it, each example's rows in a row, as generation
        makes). A ``task_ids=`` passed to a call inside the block wins over the block's. Blocks nest (the
        innermost wins) and are undone on exit, exceptions included. The block belongs to the current thread
        or asyncio task: other threads never see it.

        Raises:
            TypeError / ValueError: bad ids or names for the active adapter (checked on entry, nothing is set).
        """
        if isinstance(task_ids, (int, str)) and not isinstance(task_ids, bool):
            task_ids = [task_ids]
        ids = self._check_call_task_ids(task_ids, None)
        with self.routing.task_context(ids):
            yield

    def _manage_pre_hooks(self, task_ids: Union[TaskIds, int, str]) -> Any:
        """PEFT's spelling of :meth:`task_context` (``with peft_model._manage_pre_hooks(task_ids=...):``)."""
        return self.task_context(task_ids)

    def forward(self, *args: Any, task_ids: Optional[TaskIds] = None, labels: Any = None, **kwargs: Any) -> Any:
        """Run the wrapped model with every example routed to its task.

        Args:
            task_ids: ``(batch,)`` LongTensor or list of ints (or task names) in ``[0, n_tasks)``, one per
                example, or a single id for the whole batch; required while an adapter is active and not merged
                or disabled, unless a :meth:`task_context` gives them.
            labels: passed on to the wrapped model when given (named here so that trainers reading the class's
                signature find the label column).
            *args, **kwargs: the wrapped model's own arguments (``input_ids``, ``attention_mask``, ...).

        Raises:
            ValueError: no task ids, ids out of range, or a number of ids other than the batch size or 1
                (naming both numbers); raised before the model runs.
            TypeError: ids that are not integers (or names).
        """
        if labels is not None:
            kwargs["labels"] = labels
        if torch.compiler.is_compiling():
            return self._traced_forward(args, kwargs, task_ids)
        ids = self._task_ids_for_call(task_ids, self._batch_size(args, kwargs))
        with self.routing.route(ids, self._presample(ids)):
            return self.model(*args, **kwargs)

    def _traced_forward(self, args: tuple, kwargs: dict, task_ids: Optional[TaskIds]) -> Any:
        """:meth:`forward` as ``torch.compile`` traces it (see docs/deploy.md, "torch.compile").

        The task-id checks run eagerly, outside the graph (:func:`_checked_task_ids`): traced, their
        data-dependent branches would specialise the graph on the ids' values. A single id is expanded to the
        batch. In training every learned router's sample (shared ones too) is drawn here, once per call, with
        plain differentiable ops (:func:`_traced_samples`), so the layers trace no custom autograd function.
        """
        ids = _checked_task_ids(self, task_ids, self._batch_size(args, kwargs))
        samples = None
        state = self.routing
        if ids is not None and self.training and not state.disabled and state.merged_task is None:
            # the routers found afresh: filling the model's router cache while tracing would fail a guard next call
            samples = _traced_samples(self._find_active_routers(), ids)
        with state.route(ids, samples):
            return self.model(*args, **kwargs)

    def _presample(self, task_ids: Optional[torch.Tensor]) -> Optional[dict[int, torch.Tensor]]:
        """Draw the training routes of every layer's router at once, before the model runs.

        One relaxed-Bernoulli sample per example and layer, as when each layer samples its own, but in one
        autograd node for the whole model (:func:`polytropon.router.presample`) instead of a dozen tiny ops per
        layer. Drawn before the model runs, outside any activation-checkpointed segment, so a segment re-run in
        ``backward()`` uses the same samples. Random numbers are drawn in the order of the layers in the model.
        """
        state = self.routing
        if task_ids is None or state.disabled or state.merged_task is not None or not self.training:
            return None
        routers = [r for r in self._active_routers() if r.batchable and r.routing_state is state]
        if not routers or not all(is_local_full(r.module_logits, (r.n_tasks, r.n_splits * r.n_skills)) for r in routers):
            # sharded (FSDP): a layer's logits exist only inside its own forward, where its router samples
            return None
        return presample(routers, task_ids)

    def _active_routers(self) -> list[PolyRouter]:
        """The distinct learned routers of the active adapter, in the order of the layers (cached)."""
        active = self.routing.active_adapter
        if self._router_cache is None or self._router_cache[0] != active:
            self._router_cache = (active, self._find_active_routers())
        return self._router_cache[1]

    def _find_active_routers(self) -> list[PolyRouter]:
        active = self.routing.active_adapter
        routers: dict[int, PolyRouter] = {}
        for _, layer in self.poly_layers():
            router = getattr(layer.adapters[active], "poly_router", None) if active in layer.adapters else None
            if isinstance(router, PolyRouter):
                routers.setdefault(id(router), router)
        return list(routers.values())

    def generate(self, *args: Any, task_ids: Optional[TaskIds] = None, **kwargs: Any) -> Any:
        """``model.generate`` with every example routed to its task, for any decoding strategy.

        ``task_ids`` as in :meth:`forward` (one per input example, or one for all); when transformers expands
        the batch (beam search, ``num_return_sequences``), every example's rows keep its task.
        """
        ids = self._task_ids_for_call(task_ids, self._batch_size(args, kwargs))
        with self.routing.route(ids):
            return self.model.generate(*args, **kwargs)

    # ------------------------------------------------------------------ merging
    def _check_task_id(self, task_id: Any, adapter_name: str) -> int:
        """``task_id`` as a Python int after checking it names a task of ``adapter_name``.

        Accepts an int, a NumPy integer or a 0-d integer tensor (anything with ``__index__``, except bool).

        Raises:
            TypeError: not an integer.
            ValueError: outside ``[0, n_tasks)``.
        """
        n_tasks = self.peft_config[adapter_name].n_tasks
        if isinstance(task_id, bool) or not hasattr(type(task_id), "__index__"):
            raise TypeError(f"task_id must be an int, got {task_id!r} ({type(task_id).__name__})")
        try:
            value = operator.index(task_id)
        except TypeError:  # e.g. a tensor with more than one element, or a float tensor
            raise TypeError(f"task_id must be an int, got {task_id!r} ({type(task_id).__name__})") from None
        if not 0 <= value < n_tasks:
            raise ValueError(
                f"task_id {value} is out of range: adapter {adapter_name!r} has n_tasks={n_tasks} (ids 0..{n_tasks - 1})"
            )
        return value

    def merge_adapter(self, task_id: int, adapter_name: Optional[str] = None) -> None:
        """Fold one task's mixture (eval routing) into the base weights of every adapted layer.

        For every adapted layer ``W <- W + (A_t @ B_t)`` in the weight's layout, where ``A_t (in, r)`` and
        ``B_t (r, out)`` are the task's mixed factors with eval routing (sigmoid, normalised per split) and
        ``1/r`` folded into ``B_t`` (see :class:`~polytropon.layer.PolyAdapter`). While merged the adapted
        layers run their base module only, so the task costs nothing extra; ``task_ids`` may be omitted in
        ``forward``/``generate``, and ids of any other task raise ValueError. Merging another task first
        unmerges the current one; merging the merged task again does nothing.

        Args:
            task_id: the task: an id in ``[0, n_tasks)`` or, with ``PolyConfig.task_names``, its name.
            adapter_name: the adapter (default: the active one); it becomes the active adapter.

        Raises:
            TypeError: ``task_id`` is neither an integer nor (with task names) a string. ValueError: unknown
            adapter, unknown task name or ``task_id`` out of range. All are raised before anything changes.
        """
        adapter_name = self.resolve_adapter(adapter_name or None)
        task_id = self.resolve_task_id(task_id, adapter_name)
        if self.routing.merged_task == (adapter_name, task_id):
            return
        if self.routing.merged_task is not None:
            self.unmerge_adapter()
        if adapter_name != self.routing.active_adapter:
            self.set_adapter(adapter_name)
        for _, layer in self.poly_layers():
            if adapter_name in layer.adapters:
                layer.merge(adapter_name, task_id)
        self.routing.merged_task = (adapter_name, task_id)

    @property
    def merged_task(self) -> Optional[int]:
        """The task id merged into the base weights, or ``None``."""
        merged = self.routing.merged_task
        return None if merged is None else merged[1]

    def unmerge_adapter(self) -> None:
        """Subtract the merged task from the base weights and return to routing by ``task_ids``.

        Each layer subtracts the very factors it added, so the base weights come back to float32 round-off
        even if the adapter was trained while merged. Does nothing when no task is merged.
        """
        if self.routing.merged_task is None:
            return
        for _, layer in self.poly_layers():
            layer.unmerge()
        self.routing.merged_task = None

    def _unload(self, keep_saved_copy: bool) -> nn.Module:
        for path, layer in list(self.poly_layers()):
            self._replace(path, layer.base_layer)
        active = self.routing.active_adapter
        for path, wrapper in list(self.saved_modules()):
            if keep_saved_copy and active in wrapper.modules_to_save:
                self._replace(path, wrapper.modules_to_save[active])
            else:
                self._replace(path, wrapper.original_module)
        self.routing.merged_task = None
        return self.model

    def merge_and_unload(self, task_id: int, adapter_name: Optional[str] = None) -> nn.Module:
        """Return the plain base model (its own class) with task ``task_id`` folded into its weights.

        ``modules_to_save`` are replaced by the adapter's trained copies. The PolyModel is consumed.
        """
        self.merge_adapter(task_id, adapter_name)
        return self._unload(keep_saved_copy=True)

    def unload(self) -> nn.Module:
        """Return the plain base model with every adapter module removed (and any merged task subtracted)."""
        self.unmerge_adapter()
        return self._unload(keep_saved_copy=False)

    def export_lora(
        self, save_directory: Union[str, os.PathLike], task_id: int, adapter_name: Optional[str] = None
    ) -> None:
        """Write one task as a standard PEFT LoRA adapter (``"peft_type": "LORA"``) in ``save_directory``.

        With eval routing the task's update in every layer is ``x @ A_t @ B_t / r``; the export writes
        ``lora_A = A_t^T (r, in)``, ``lora_B = B_t^T (out, r)`` and ``lora_alpha = 1`` (PEFT's scaling
        ``lora_alpha / r`` is then our ``1 / r``), plus the adapter's ``modules_to_save`` copies, so
        ``peft.PeftModel.from_pretrained(base_model, save_directory)`` computes what this model computes for
        ``task_id``. See :mod:`polytropon.export`.

        Raises:
            TypeError: ``task_id`` is not an integer. ValueError: unknown adapter, ``task_id`` out of range,
            or ``save_directory`` is a file (nothing is written).
        """
        adapter_name = self.resolve_adapter(adapter_name)
        task_id = self.resolve_task_id(task_id, adapter_name)
        layers, saved = list(self.poly_layers()), list(self.saved_modules())
        tensors = lora_state_dict(layers, saved, task_id, adapter_name)
        write_lora(os.fspath(save_directory), tensors, lora_config_dict(self.peft_config[adapter_name], layers, saved, adapter_name))

    # ------------------------------------------------------------------ parameters
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable parameters, all parameters)``, each shared tensor counted once."""
        trainable = total = 0
        for param in self.parameters():
            total += param.numel()
            if param.requires_grad:
                trainable += param.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print the trainable and total parameter counts."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------------ checkpoints
    def adapter_state_dict(self, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors under PEFT's checkpoint key names (see :mod:`polytropon.checkpoint`)."""
        adapter_name = self.resolve_adapter(adapter_name or None)
        out: dict[str, torch.Tensor] = {}
        for path, layer in self.poly_layers():
            if adapter_name in layer.adapters:
                adapter = layer.adapters[adapter_name]
                out[f"{KEY_PREFIX}{path}.poly_lora_A"] = adapter.poly_lora_A
                out[f"{KEY_PREFIX}{path}.poly_lora_B"] = adapter.poly_lora_B
                if isinstance(adapter.poly_router, PolyRouter):  # a shared router is written under every layer
                    out[f"{KEY_PREFIX}{path}.poly_router.module_logits"] = adapter.poly_router.module_logits
        for path, wrapper in self.saved_modules():
            if adapter_name in wrapper.modules_to_save:
                for name, tensor in wrapper.modules_to_save[adapter_name].state_dict().items():
                    out[f"{KEY_PREFIX}{path}.{name}"] = tensor
        return out

    def save_pretrained(self, save_directory: Union[str, os.PathLike], selected_adapters: Optional[list[str]] = None, **kwargs: Any) -> None:
        """Save adapters in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

        The ``"default"`` adapter goes to ``save_directory``, any other to ``save_directory/<name>``. Each
        file is written to a temporary file and renamed into place, so an interrupted save never leaves a
        half-written file where a good one was.

        A model sharded with FSDP2 (``fully_shard``) must be saved by every rank at once: each adapter tensor
        is gathered in full (a collective call), rank 0 writes the complete, unsharded adapter, and every rank
        returns once the files are written.

        Raises:
            ValueError: ``save_directory`` is a file, an unknown adapter is selected, an adapter's folder
                resolves outside ``save_directory`` (a symbolic link to elsewhere), or a tensor is only partly
                held by this process (DeepSpeed ZeRO-3 partitions, which are not gathered here); checked before
                anything is written.
        """
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory}: expected a directory, found a file")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        for name in names:
            self._check_adapter(name)
        directories = {name: adapter_directory(save_directory, name) for name in names}
        sharded = is_sharded(self)
        adapters = {name: gathered(self.adapter_state_dict(name)) if sharded else self.adapter_state_dict(name) for name in names}
        for tensors in adapters.values():
            check_complete(tensors)
        if not sharded or torch.distributed.get_rank() == 0:
            for name, tensors in adapters.items():
                os.makedirs(directories[name], exist_ok=True)
                config = dataclasses.replace(self.peft_config[name], inference_mode=True)  # as PEFT writes it
                save_tensors(os.path.join(directories[name], WEIGHTS_NAME), tensors)
                config.save_pretrained(directories[name])
        if sharded:
            torch.distributed.barrier()  # every rank returns once the files are in place

    def _load_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, target in self.adapter_state_dict(adapter_name).items():
                target.copy_(tensors[key])

    def load_adapter(self, model_id: Union[str, os.PathLike], adapter_name: str, is_trainable: bool = False, **kwargs: Any) -> None:
        """Load a saved adapter (ours or PEFT's) into this model under ``adapter_name``.

        The checkpoint is read and checked completely before anything changes. It becomes trainable only
        with ``is_trainable=True``; it does not become the active adapter (use :meth:`set_adapter`).

        Raises:
            FileNotFoundError, ValueError: see :func:`_read_checkpoint`; an invalid or taken ``adapter_name``.
            The model is left unchanged.
        """
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists")
        config = PolyConfig.from_pretrained(os.fspath(model_id))
        config.inference_mode = not is_trainable
        plan, tensors = _read_checkpoint(self.model, model_id, config)
        self._inject(adapter_name, plan)
        self._load_tensors(adapter_name, tensors)
        self._update_trainable()

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: Union[str, os.PathLike],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: Optional[PolyConfig] = None,
        **kwargs: Any,
    ) -> "PolyModel":
        """Wrap ``model`` with the adapter saved in ``model_id`` (written by polytropon or by PEFT).

        The checkpoint is read and checked before ``model`` is touched. Without ``is_trainable`` the adapter is
        frozen and the model is put in eval mode.

        Raises:
            FileNotFoundError: missing directory, ``adapter_config.json`` or ``adapter_model.safetensors``.
            ValueError: corrupt file, another ``peft_type``, tensors that do not fit the model, or an invalid
            ``adapter_name``.
        """
        check_adapter_name(adapter_name)
        model_id = os.fspath(model_id)
        if config is None:
            config = PolyConfig.from_pretrained(model_id)
        config = dataclasses.replace(config, inference_mode=not is_trainable)
        plan, tensors = _read_checkpoint(model, model_id, config)
        poly = cls(model, plan.config, adapter_name)
        poly._load_tensors(adapter_name, tensors)
        if not is_trainable:
            poly.eval()
        return poly

    # ------------------------------------------------------------------ attribute fall-through
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)


@torch.compiler.disable
def _checked_task_ids(model: PolyModel, task_ids: Optional[TaskIds], batch_size: Optional[int]) -> Optional[torch.Tensor]:
    """``model._task_ids_for_call`` run eagerly from a compiled forward (a graph break; returns a tensor)."""
    return model._task_ids_for_call(task_ids, batch_size)


def _traced_samples(routers: list[PolyRouter], task_ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Training routing weights of ``routers`` for ``task_ids`` ``(n,)``, in plain ops: ``{id(router): (n, q, s)}``.

    ``w = normalise(RelaxedBernoulli(T, logits=Z[t]).rsample())`` per router (hard routing: the binary
    allocation with the soft weights' gradient), as :class:`~polytropon.router.PolyRouter` defines it.
    """
    return {
        id(router): router._normalise(relaxed_bernoulli_rsample(router._logits(task_ids), router.temperature))
        for router in routers
    }


def get_peft_model(model: nn.Module, peft_config: PolyConfig, adapter_name: str = "default", **kwargs: Any) -> PolyModel:
    """Wrap ``model`` with a new Poly/MHR adapter (same call as ``peft.get_peft_model``).

    Raises:
        TypeError: ``peft_config`` is not a :class:`PolyConfig`, or a target is not Linear/Conv1D.
        ValueError: targets match nothing, or ``n_splits`` does not divide a target layer's widths.
    """
    return PolyModel(model, peft_config, adapter_name)
