"""Export one task of a Poly/MHR adapter as a standard PEFT LoRA adapter.

With eval routing a task's update in every adapted layer is a rank-``r`` product (see
:class:`~polytropon.layer.PolyAdapter`)::

    y = W x + x @ A_t @ B_t / r          A_t (in_features, r),  B_t (r, out_features)  (B_t unscaled here)

which is exactly PEFT's LoRA forward ``y = W x + scaling * lora_B(lora_A(x))`` with ``scaling = lora_alpha / r``
when::

    lora_A.weight = A_t.T            (r, in_features)
    lora_B.weight = B_t.T            (out_features, r)
    lora_alpha    = 1                (so scaling = 1 / r, as ours; use_rslora = False)

The directory written is an ordinary PEFT LoRA adapter::

    adapter_config.json          "peft_type": "LORA", r, lora_alpha, fan_in_fan_out (True for GPT-2 Conv1D),
                                 target_modules (the adapted modules' full paths), modules_to_save, task_type
    adapter_model.safetensors    base_model.model.<module path>.lora_A.weight        (r, in_features)
                                 base_model.model.<module path>.lora_B.weight        (out_features, r)
                                 base_model.model.<saved module path>.<param>        modules_to_save copies

so ``peft.PeftModel.from_pretrained(base_model, directory)`` (or any LoRA server) serves the task.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import torch

from .checkpoint import KEY_PREFIX, WEIGHTS_NAME, atomic_write_bytes, save_tensors
from .config import CONFIG_NAME, PolyConfig
from .layer import PolyLayer
from .modules_to_save import ModulesToSave

LORA_PEFT_TYPE = "LORA"

#: ``(module path, module)`` pairs as :meth:`PolyModel.poly_layers` / :meth:`PolyModel.saved_modules` yield them
Layers = Iterable[tuple[str, PolyLayer]]
SavedModules = Iterable[tuple[str, ModulesToSave]]


def lora_state_dict(layers: Layers, saved: SavedModules, task_id: int, adapter_name: str) -> dict[str, torch.Tensor]:
    """The task's LoRA tensors under PEFT's LoRA key names (plus the adapter's ``modules_to_save`` copies).

    ``task_id`` and ``adapter_name`` must already be checked.
    """
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for path, layer in layers:
            if adapter_name not in layer.adapters:
                continue
            a, b = layer.adapters[adapter_name].task_factors(task_id, scaled=False)
            out[f"{KEY_PREFIX}{path}.lora_A.weight"] = a.T.contiguous()
            out[f"{KEY_PREFIX}{path}.lora_B.weight"] = b.T.contiguous()
        for path, wrapper in saved:
            if adapter_name in wrapper.modules_to_save:
                for name, tensor in wrapper.modules_to_save[adapter_name].state_dict().items():
                    out[f"{KEY_PREFIX}{path}.{name}"] = tensor
    return out


def lora_config_dict(config: PolyConfig, layers: Layers, saved: SavedModules, adapter_name: str) -> dict[str, Any]:
    """``adapter_config.json`` of the exported LoRA adapter, in PEFT's ``LoraConfig`` schema."""
    targets, fan_in_fan_out = [], []
    for path, layer in layers:
        if adapter_name in layer.adapters:
            targets.append(path)
            fan_in_fan_out.append(layer.fan_in_fan_out)
    saved_paths = sorted(path for path, wrapper in saved if adapter_name in wrapper.modules_to_save)
    return {
        "peft_type": LORA_PEFT_TYPE,
        "task_type": config.task_type,
        "base_model_name_or_path": config.base_model_name_or_path,
        "revision": config.revision,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": 1,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "lora_bias": False,
        # PEFT applies the flag per layer type anyway (True for Conv1D, False for Linear); record the majority
        "fan_in_fan_out": sum(fan_in_fan_out) * 2 > len(fan_in_fan_out),
        "target_modules": sorted(targets),
        "exclude_modules": None,
        "modules_to_save": saved_paths or None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "auto_mapping": None,
    }


def write_lora(save_directory: str, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Write a LoRA adapter directory; each file atomically (temporary file + rename).

    Raises:
        ValueError: ``save_directory`` is a file (nothing is written).
    """
    if os.path.isfile(save_directory):
        raise ValueError(f"{save_directory}: expected a directory, found a file")
    os.makedirs(save_directory, exist_ok=True)
    save_tensors(os.path.join(save_directory, WEIGHTS_NAME), tensors)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(os.path.join(save_directory, CONFIG_NAME), text.encode("utf-8"))


def export_task(
    save_directory: str, config: PolyConfig, layers: Layers, saved: SavedModules, task_id: int, adapter_name: str
) -> None:
    """Write task ``task_id`` (a checked id) of ``adapter_name`` as a PEFT LoRA adapter in ``save_directory``."""
    layers, saved = list(layers), list(saved)
    tensors = lora_state_dict(layers, saved, task_id, adapter_name)
    write_lora(save_directory, tensors, lora_config_dict(config, layers, saved, adapter_name))
