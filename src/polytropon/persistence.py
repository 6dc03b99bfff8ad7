"""Saving and loading a model's adapters: state dicts under PEFT's keys, checked reads, complete writes.

The file format itself (key names, safetensors, atomic writes, adapter folders) is :mod:`polytropon.checkpoint`;
this module maps a model's adapters onto it. A checkpoint is read and checked in full against the model
(:func:`read_checkpoint`) before anything changes; a save checks everything before the first byte is written
(:func:`save_adapters`), and under FSDP2 gathers the shards so that rank 0 writes the whole adapter.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Optional, Union

import torch
from torch import nn

from .checkpoint import KEY_PREFIX, TRAINER_STATE_NAME, WEIGHTS_NAME, adapter_directory, load_tensors, save_tensors
from .config import PolyConfig
from . import zero
from .fsdp import check_complete, gathered, is_sharded
from .injection import InjectionPlan, plan_injection, poly_layers, saved_modules
from .layer import PolyLayer, layer_features
from .modules_to_save import ModulesToSave
from .router import PolyRouter
from .variants import check_tied_router_tensors


def adapter_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_name`` in ``model`` under PEFT's checkpoint key names (the live parameters).

    Per adapted layer ``poly_lora_A``, ``poly_lora_B`` and, for a learned router, ``poly_router.module_logits``
    (a router shared by several layers is written under every one of them); per saved module, the state dict
    of the adapter's copy.
    """
    out: dict[str, torch.Tensor] = {}
    for path, layer in poly_layers(model):
        if adapter_name in layer.adapters:
            adapter = layer.adapters[adapter_name]
            out[f"{KEY_PREFIX}{path}.poly_lora_A"] = adapter.poly_lora_A
            out[f"{KEY_PREFIX}{path}.poly_lora_B"] = adapter.poly_lora_B
            if isinstance(adapter.poly_router, PolyRouter):
                out[f"{KEY_PREFIX}{path}.poly_router.module_logits"] = adapter.poly_router.module_logits
    for path, wrapper in saved_modules(model):
        if adapter_name in wrapper.modules_to_save:
            for name, tensor in wrapper.modules_to_save[adapter_name].state_dict().items():
                out[f"{KEY_PREFIX}{path}.{name}"] = tensor
    return out


def expected_shapes(plan: InjectionPlan) -> dict[str, tuple[int, ...]]:
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


def read_checkpoint(
    model: nn.Module, directory: Union[str, os.PathLike], config: Optional[PolyConfig] = None
) -> tuple[InjectionPlan, dict[str, torch.Tensor]]:
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
        plan = plan_injection(model, config)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: the checkpoint does not fit this model: {exc}") from None
    expected = expected_shapes(plan)
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


def load_adapter_tensors(model: nn.Module, adapter_name: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy checked ``tensors`` (:func:`read_checkpoint`) into the parameters of ``adapter_name``."""
    with torch.no_grad():
        for key, target in adapter_state_dict(model, adapter_name).items():
            target.copy_(tensors[key])


def check_save_directory(save_directory: Union[str, os.PathLike]) -> str:
    """``save_directory`` as a string; a file there is refused (ValueError) before anything is written."""
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise ValueError(f"{save_directory}: expected a directory, found a file")
    return save_directory


def trainable_names(model: nn.Module) -> list[str]:
    """Names (``model.named_parameters()``) of the trainable parameters: what a trainer's checkpoint must hold."""
    return [name for name, param in model.named_parameters() if param.requires_grad]


def frozen_state_keys(model: nn.Module) -> list[str]:
    """Keys of ``model.state_dict()`` that :data:`~polytropon.checkpoint.TRAINER_STATE_NAME` does not hold
    (the frozen base model, the inactive adapters): what loading that file leaves out, on purpose."""
    saved = set(trainable_names(model))
    return [key for key in model.state_dict() if key not in saved]


def save_adapters(
    model: nn.Module,
    save_directory: str,
    configs: Mapping[str, PolyConfig],
    state_dict: Optional[Mapping[str, torch.Tensor]] = None,
    is_main_process: bool = True,
    trainer_state: bool = False,
) -> None:
    """Write every adapter of ``configs`` of ``model`` (a ``PolyModel``): ``adapter_config.json`` +
    ``adapter_model.safetensors`` each; with ``trainer_state``, also
    :data:`~polytropon.checkpoint.TRAINER_STATE_NAME` in ``save_directory``.

    ``"default"`` goes to ``save_directory``, any other adapter to ``save_directory/<name>``
    (:func:`~polytropon.checkpoint.adapter_directory`). Every folder and tensor is checked before the first
    write; each file is written atomically. A model sharded by FSDP2 or partitioned by DeepSpeed ZeRO-3: every
    rank calls this; the adapters' tensors are gathered in full (a collective call), rank 0 writes and all ranks
    return once the files are in place. ``state_dict`` (the whole model's, already gathered by the caller, as the
    HF ``Trainer`` passes it) is used instead of the model's own tensors, with no collective call; with
    ``is_main_process=False`` nothing is written. ``trainer_state``: every trainable tensor under the model's own
    parameter names (:func:`trainable_names`), the file ``transformers.Trainer`` reads back with
    ``model.load_state_dict(..., strict=False)`` to resume or to load the best checkpoint.
    """
    directories = {name: adapter_directory(save_directory, name) for name in configs}
    adapters, trainable, sharded = _collect_adapters(model, list(configs), state_dict, is_main_process, trainer_state)
    for tensors in [*adapters.values(), trainable]:
        check_complete(tensors)
    if is_main_process and (not sharded or torch.distributed.get_rank() == 0):
        for name, tensors in adapters.items():
            os.makedirs(directories[name], exist_ok=True)
            config = dataclasses.replace(configs[name], inference_mode=True)  # as PEFT writes it
            save_tensors(os.path.join(directories[name], WEIGHTS_NAME), tensors)
            config.save_pretrained(directories[name])
        if trainer_state:
            os.makedirs(save_directory, exist_ok=True)
            save_tensors(os.path.join(save_directory, TRAINER_STATE_NAME), trainable)
    if sharded:
        torch.distributed.barrier()  # every rank returns once the files are in place


def _collect_adapters(
    model: nn.Module,
    names: list[str],
    state_dict: Optional[Mapping[str, torch.Tensor]],
    is_main_process: bool,
    trainer_state: bool,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor], bool]:
    """``({adapter: checkpoint tensors}, {trainable parameter name: tensor}, sharded)``: from ``state_dict`` when
    given, else the model's own tensors, gathered from FSDP2 shards / ZeRO-3 partitions (a collective call) when
    the model is sharded. The trainable tensors are collected only with ``trainer_state``."""
    wanted = trainable_names(model) if trainer_state else []
    if state_dict is not None:  # gathered by the caller (the HF Trainer under ZeRO-3/FSDP): no collective call
        if not is_main_process:
            return {}, {}, False
        shards = [k for k, t in state_dict.items() if hasattr(t, "full_tensor")]  # DTensors: only this rank's shard
        if shards:
            raise ValueError(
                f"the state_dict given to save_pretrained holds sharded tensors (DTensor), e.g. {shards[0]!r}: "
                "call save_pretrained on every rank without state_dict (polytropon.PolyTrainer does this under FSDP2)"
            )
        missing = [n for n in wanted if n not in state_dict]
        if missing:
            raise ValueError(f"state_dict lacks {len(missing)} trainable tensor(s), e.g. {missing[0]!r}")
        adapters = {name: zero.adapter_tensors_from_state_dict(model, name, state_dict) for name in names}
        return adapters, {n: state_dict[n] for n in wanted}, False
    params = dict(model.named_parameters())
    zero3 = zero.partitioned(zero.adapter_parameters(model, names) + [params[n] for n in wanted])
    zero3 = list({id(p): p for p in zero3}.values())
    sharded = is_sharded(model) or bool(zero3)
    with zero.gathered_parameters(zero3):  # ZeRO-3: every rank gathers the adapters' partitions (collective)
        held = {name: model.adapter_state_dict(name) for name in names}
        trainable = {n: params[n] for n in wanted}
        for tensors in [*held.values(), trainable]:
            check_complete(tensors)
        if not sharded:
            return held, trainable, False
        return ({name: zero.copies(gathered(tensors)) for name, tensors in held.items()},
                zero.copies(gathered(trainable)), True)
