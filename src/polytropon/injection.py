"""Putting adapters into a model and taking them out: the plan, the injection, the unloading.

:func:`plan_injection` finds and checks every module an adapter would touch without changing anything (so a
bad config or checkpoint fails before the model changes); :func:`inject` then replaces each target
``Linear``/``Conv1D`` by a :class:`~polytropon.layer.PolyLayer` (or adds an adapter to one already there) and
wraps each ``modules_to_save`` entry in a :class:`~polytropon.modules_to_save.ModulesToSave`;
:func:`unload` puts the original modules back. The trainable set of a model's adapters is set here too
(:func:`update_trainable`, :func:`freeze_skills`).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, Mapping, Optional

from torch import nn

from .config import PolyConfig
from .layer import PolyAdapter, PolyLayer, layer_features
from .modules_to_save import ModulesToSave
from .quantized import check_mergeable, keep_trainable_layout
from .routing import RoutingState
from .targets import default_heads, default_target_modules, infer_task_type, matches
from .variants import build_routers


def walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Named submodules of ``module``, not descending into Poly layers and saved-module wrappers."""
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        yield path, child
        if not isinstance(child, (PolyLayer, ModulesToSave)):
            yield from walk(child, path)


def freeze_base(model: nn.Module) -> None:
    """Freeze every parameter of ``model`` and keep quantized weights in a layout that autograd can go through
    (bitsandbytes 4-bit on CPU repacks its weights for inference: :func:`~polytropon.quantized.keep_trainable_layout`)."""
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        keep_trainable_layout(module)


def poly_layers(model: nn.Module) -> Iterator[tuple[str, PolyLayer]]:
    """``(path, PolyLayer)`` of every adapted layer of ``model``, in the order of its modules."""
    for path, module in walk(model):
        if isinstance(module, PolyLayer):
            yield path, module


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    """``(path, ModulesToSave)`` of every module of ``model`` trained and saved beside the adapters."""
    for path, module in walk(model):
        if isinstance(module, ModulesToSave):
            yield path, module


@dataclasses.dataclass
class InjectionPlan:
    """Where an adapter goes: its resolved config, the target layers and the modules to save.

    Attributes:
        config: the config with the model's defaults filled in (:func:`resolve_config`).
        targets: ``(path, module)`` of every layer to adapt: a base ``Linear``/``Conv1D`` or a ``PolyLayer``.
        saved: ``(path, module)`` of every module to copy per adapter: the original or a ``ModulesToSave``.
    """

    config: PolyConfig
    targets: list[tuple[str, nn.Module]]
    saved: list[tuple[str, nn.Module]]


def resolve_config(model: nn.Module, config: PolyConfig) -> PolyConfig:
    """A copy of ``config`` with defaults filled in from the model (target modules, task type, heads)."""
    if not isinstance(config, PolyConfig):
        raise TypeError(f"config must be a polytropon.PolyConfig, got {type(config).__name__}")
    config = dataclasses.replace(config)
    if config.target_modules is None:
        config.target_modules = default_target_modules(model)
    if config.task_type is None:
        config.task_type = infer_task_type(model)
    heads = default_heads(model, config.task_type)
    if heads:
        saved = list(config.modules_to_save or [])
        config.modules_to_save = saved + [h for h in heads if h not in saved]
    return config


def plan_injection(model: nn.Module, config: PolyConfig) -> InjectionPlan:
    """Find and check every module an adapter with ``config`` would touch, without changing anything.

    Raises:
        ValueError: no module matches ``target_modules``; ``n_splits`` does not divide a layer's widths;
            a ``modules_to_save`` name (other than a task type's default head) matches nothing.
        TypeError: ``config`` is not a :class:`PolyConfig`; a matched module is neither ``nn.Linear`` nor
            ``Conv1D``.
    """
    config = resolve_config(model, config)
    targets, saved = [], []
    for path, module in walk(model):
        if isinstance(module, ModulesToSave):
            if matches(path, config.modules_to_save):
                saved.append((path, module))
            continue
        if not matches(path, config.target_modules) or matches(path, config.exclude_modules):
            if matches(path, config.modules_to_save):
                saved.append((path, module))
            continue
        _check_widths(module, path, config.n_splits)
        targets.append((path, module))
    if not targets:
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no module of {type(model).__name__} "
            f"(exclude_modules={config.exclude_modules!r})"
        )
    found = {path for path, _ in saved}
    heads = set(default_heads(model, config.task_type))
    for name in config.modules_to_save or []:
        if name not in heads and not any(matches(path, [name]) for path in found):
            raise ValueError(f"modules_to_save entry {name!r} matches no module of {type(model).__name__}")
    return InjectionPlan(config, targets, saved)


def _check_widths(module: nn.Module, path: str, n_splits: int) -> None:
    base = module.base_layer if isinstance(module, PolyLayer) else module
    in_features, out_features, _ = layer_features(base, path)
    for what, width in (("in_features", in_features), ("out_features", out_features)):
        if width % n_splits != 0:
            raise ValueError(
                f"n_splits={n_splits} does not divide {what}={width} of module {path!r}: choose "
                "n_splits dividing every adapted layer's input and output widths"
            )


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` (dotted) in ``model``."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def inject(model: nn.Module, state: RoutingState, adapter_name: str, plan: InjectionPlan) -> None:
    """Add adapter ``adapter_name`` to ``model`` where ``plan`` says (wrapping the modules the first time).

    Random numbers are drawn in PEFT's order: each layer's skills, then (for the first layer of a router's
    group) its router. New modules follow the train/eval mode of the module they wrap.
    """
    cfg = plan.config
    routers = build_routers(cfg, [path for path, _ in plan.targets], state)
    for path, module in plan.targets:
        if isinstance(module, PolyLayer):
            layer = module
        else:
            layer = PolyLayer(module, state, path).train(module.training)
            replace_module(model, path, layer)
        router, first = routers[path]
        adapter = PolyAdapter(
            layer.in_features, layer.out_features, cfg.r, cfg.n_tasks, cfg.n_skills, cfg.n_splits,
            init_weights=cfg.init_weights, router=router,
        )
        if first:  # drawn after this layer's skills: PEFT's order of random draws
            router.reset()
        layer.adapters[adapter_name] = adapter.to(layer.base_layer.weight.device).train(layer.base_layer.training)
    for path, module in plan.saved:
        if isinstance(module, ModulesToSave):
            wrapper = module
        else:
            wrapper = ModulesToSave(module, state).train(module.training)
            replace_module(model, path, wrapper)
        wrapper.add_copy(adapter_name)


def remove_adapter(model: nn.Module, adapter_name: str) -> None:
    """Delete ``adapter_name`` from every layer and saved-module wrapper of ``model`` (the wrappers stay)."""
    for _, layer in poly_layers(model):
        if adapter_name in layer.adapters:
            del layer.adapters[adapter_name]
    for _, wrapper in saved_modules(model):
        if adapter_name in wrapper.modules_to_save:
            del wrapper.modules_to_save[adapter_name]


def unload(model: nn.Module, keep_copy_of: Optional[str] = None) -> nn.Module:
    """Put every wrapped module of ``model`` back; returns ``model``.

    Each ``PolyLayer`` becomes its base layer; each ``ModulesToSave`` becomes the copy of adapter
    ``keep_copy_of`` if it has one, else the original module.
    """
    for path, layer in list(poly_layers(model)):
        replace_module(model, path, layer.base_layer)
    for path, wrapper in list(saved_modules(model)):
        if keep_copy_of is not None and keep_copy_of in wrapper.modules_to_save:
            replace_module(model, path, wrapper.modules_to_save[keep_copy_of])
        else:
            replace_module(model, path, wrapper.original_module)
    return model


def update_trainable(model: nn.Module, configs: Mapping[str, PolyConfig], active: Optional[str]) -> None:
    """Only the active adapter (unless in ``inference_mode``) and its saved copies require gradients."""
    trainable = active is not None and not configs[active].inference_mode
    for _, layer in poly_layers(model):
        for name, adapter in layer.adapters.items():
            adapter.requires_grad_(trainable and name == active)
    for _, wrapper in saved_modules(model):
        wrapper.original_module.requires_grad_(False)
        for name, copy in wrapper.modules_to_save.items():
            copy.requires_grad_(trainable and name == active)


def freeze_skills(
    model: nn.Module, configs: Mapping[str, PolyConfig], adapter_name: str, active: Optional[str],
    freeze_saved_modules: bool = True,
) -> None:
    """MHR-z: ``requires_grad=False`` on the skills of ``adapter_name`` (and, with ``freeze_saved_modules``, its
    ``modules_to_save`` copies), so that only its routing trains. Learned rows of other tasks get zero gradient,
    so with an optimizer without weight decay they stay unchanged.

    Raises:
        ValueError: the adapter is not the ``active`` (trainable) one, is in inference mode, or has no learned
        router.
    """
    config = configs[adapter_name]
    if adapter_name != active or config.inference_mode:
        raise ValueError(
            f"adapter {adapter_name!r} is not trainable (only the active adapter trains, and not in inference_mode)"
        )
    if config.poly_type != "poly":
        raise ValueError(
            f"adapter {adapter_name!r} has a fixed allocation (poly_type={config.poly_type!r}): with frozen "
            "skills nothing would train"
        )
    for _, layer in poly_layers(model):
        adapter = layer.adapters[adapter_name] if adapter_name in layer.adapters else None
        if adapter is not None:
            adapter.poly_lora_A.requires_grad_(False)
            adapter.poly_lora_B.requires_grad_(False)
    if freeze_saved_modules:
        for _, wrapper in saved_modules(model):
            if adapter_name in wrapper.modules_to_save:
                wrapper.modules_to_save[adapter_name].requires_grad_(False)


def count_parameters(parameters: Iterable[nn.Parameter]) -> tuple[int, int]:
    """``(trainable, all)`` numbers of elements of ``parameters``."""
    trainable = total = 0
    for param in parameters:
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def check_mergeable_layers(model: nn.Module, adapter_name: str) -> None:
    """Refuse to merge ``adapter_name`` when a layer carrying it has a quantized base weight (TypeError naming it)."""
    for path, layer in poly_layers(model):
        if adapter_name in layer.adapters:
            check_mergeable(layer.base_layer, path)


def merge_task(model: nn.Module, adapter_name: str, task_id: int) -> None:
    """Fold task ``task_id`` of ``adapter_name`` into the base weight of every layer carrying it (:meth:`PolyLayer.merge`)."""
    for _, layer in poly_layers(model):
        if adapter_name in layer.adapters:
            layer.merge(adapter_name, task_id)


def unmerge_task(model: nn.Module) -> None:
    """Subtract the merged task from every adapted layer (:meth:`PolyLayer.unmerge`; the very factors it added)."""
    for _, layer in poly_layers(model):
        layer.unmerge()
