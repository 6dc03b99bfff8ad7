"""Two-speed learning rates: optimizer groups that separate router logits from skill weights.

The reference code of Ponti et al. 2022 (arXiv 2202.13914) and Caccia et al. 2022 (arXiv 2211.03831) gives
the routing logits their own, larger learning rate than the LoRA skills; :func:`param_groups` builds the
groups for any ``torch.optim`` optimizer or the HF ``Trainer``. A third rate, for the trainable copies of
``modules_to_save`` (a classification head, say), is optional: a head that shares the skills' rate can
sharpen faster than the skills learn, see ``docs/RESULTS.md``.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from ..layer import PolyAdapter
from ..router import PolyRouter

def _check_lr(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
    return float(value)


def _trainable_by_role(model: nn.Module, split_head: bool) -> tuple[list, list, list]:
    """The trainable parameters, each once: ``(skills, routers, head)``; ``head`` (everything that is neither an
    adapter's nor a router's) stays empty, its parameters with the skills, unless ``split_head``."""
    router_ids = {id(p) for m in model.modules() if isinstance(m, PolyRouter) for p in m.parameters()}
    skill_ids = {id(p) for m in model.modules() if isinstance(m, PolyAdapter) for p in m.parameters()}
    skills, routers, head, seen = [], [], [], set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if id(param) in router_ids:
            routers.append(param)
        elif not split_head or id(param) in skill_ids:
            skills.append(param)
        else:
            head.append(param)
    return skills, routers, head


def param_groups(
    model: nn.Module,
    lr: float,
    router_lr: float,
    weight_decay: float = 0.0,
    router_weight_decay: float = 0.0,
    head_lr: float | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with one learning rate for router logits and another for everything else
    (optionally a third for the ``modules_to_save`` copies).

    Only trainable parameters are included, each once (shared routers too). Works with any
    ``torch.optim`` optimizer and with the HF ``Trainer``
    (``Trainer(..., optimizers=(torch.optim.AdamW(param_groups(model, 1e-4, 1e-3)), None))``).

    Args:
        model: a :class:`~polytropon.model.PolyModel` (or any module containing one).
        lr: learning rate of the skills (``poly_lora_A``/``poly_lora_B``), and of the ``modules_to_save``
            copies unless ``head_lr`` is given.
        router_lr: learning rate of the learned routers' ``module_logits``.
        weight_decay / router_weight_decay: weight decay of each group (the head group takes
            ``weight_decay``).
        head_lr: learning rate of every other trainable parameter -- the ``modules_to_save`` copies, e.g. a
            classification head -- in a group of its own; ``None`` keeps them in the skills group.

    Returns:
        ``[{"name": "skills", "params": [...], "lr": lr, "weight_decay": ...},
        {"name": "router", "params": [...], "lr": router_lr, "weight_decay": ...}]``, and with ``head_lr``
        ``{"name": "head", "params": [...], "lr": head_lr, "weight_decay": weight_decay}`` last; a group with no
        trainable parameters is left out (e.g. no router group for ``poly_type="fixed"``, or no skills
        group after :func:`freeze_skills`).

    Raises:
        ValueError: a negative or non-finite rate, or a model without trainable parameters.
    """
    lr, router_lr = _check_lr("lr", lr), _check_lr("router_lr", router_lr)
    weight_decay = _check_lr("weight_decay", weight_decay)
    router_weight_decay = _check_lr("router_weight_decay", router_weight_decay)
    if head_lr is not None:
        head_lr = _check_lr("head_lr", head_lr)
    skills, routers, head = _trainable_by_role(model, split_head=head_lr is not None)
    if not skills and not routers and not head:
        raise ValueError("the model has no trainable parameters (inference_mode adapter, or everything frozen)")
    groups = []
    if skills:
        groups.append({"name": "skills", "params": skills, "lr": lr, "weight_decay": weight_decay})
    if routers:
        groups.append({"name": "router", "params": routers, "lr": router_lr, "weight_decay": router_weight_decay})
    if head:
        groups.append({"name": "head", "params": head, "lr": head_lr, "weight_decay": weight_decay})
    return groups
