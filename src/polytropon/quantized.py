"""Quantized base layers: bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` and torchao-quantized ``nn.Linear``.

All three are ``nn.Linear`` (subclasses, or a ``Linear`` whose weight is a tensor subclass), so target matching
and :func:`~polytropon.layer.layer_features` treat them as Linear layers; a Poly layer calls the quantized
module for the base product (never its own fused kernels, which need a dense weight) and adds the float32
update to its output. Two things need care, and live here:

* merging a task into a quantized weight would write float values into packed integers: refused
  (:func:`check_mergeable`);
* bitsandbytes 4-bit on CPU repacks a weight for an inference kernel (``gemv_4bit``) the first time the layer
  runs in eval mode without autograd; that kernel has no backward, so every later *training* forward passes no
  gradient through the layer to its input, silently (adapters before it get wrong gradients). Models wrapped
  by polytropon keep the trainable layout (:func:`keep_trainable_layout`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def quantized_weight(module: nn.Module) -> Optional[str]:
    """A description (``"Params4bit (torch.uint8)"``) of ``module.weight`` if it is not a plain floating-point
    tensor (a quantized or packed weight, or a tensor subclass), else ``None``."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    if type(weight) in (torch.Tensor, nn.Parameter) and weight.is_floating_point():
        return None
    return f"{type(weight).__name__} ({weight.dtype})"


def check_mergeable(module: nn.Module, path: str) -> None:
    """Raise unless a task's update can be added to ``module.weight`` (a plain floating-point tensor).

    Raises:
        TypeError: the weight is quantized (bitsandbytes, torchao) or another tensor subclass, naming the layer.
    """
    described = quantized_weight(module)
    if described is not None:
        raise TypeError(
            f"cannot merge a task into layer {path!r}: its base weight is {described}, not a plain floating-point "
            "tensor. Route with task_ids instead, or export the task with export_lora(...) and merge it into an "
            "unquantized copy of the base model"
        )


def keep_trainable_layout(module: nn.Module) -> None:
    """Keep a bitsandbytes 4-bit layer's weight in the layout its autograd function differentiates (CPU).

    ``Linear4bit`` sets ``support_avx512bf16_for_cpu`` on CPUs with AVX512-BF16 and then, in eval mode without
    autograd, repacks its weight for ``gemv_4bit``, which has no backward. This turns the repacking off for the
    layer and undoes one already done, with bitsandbytes' own inverse (as ``Params4bit.cuda()`` does). Any other
    module is left alone.
    """
    if getattr(module, "support_avx512bf16_for_cpu", False):
        module.support_avx512bf16_for_cpu = False
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
