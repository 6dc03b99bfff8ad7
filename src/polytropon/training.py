"""Training helpers of the papers: two-speed learning rates, the IBP prior, MHR-z and MHR-mu.

* :func:`param_groups` -- separate optimizer groups for router logits and skill weights (Ponti et al. 2022 and
  Caccia et al. 2022 train the routing with a larger learning rate than the skills).
* :func:`ibp_loss` -- the negative log of the Indian Buffet Process prior (finite Beta-Bernoulli form) on the
  task x skill allocation, the prior of Ponti et al. 2022 (arXiv 2202.13914, sec. 3), as a loss term.
* :func:`freeze_skills` -- MHR-z (Caccia et al. 2022, arXiv 2211.03831, sec. 5): for few-shot adaptation
  only the routing is trained.
* :func:`collapse_to_average` -- MHR-mu (same paper): drop the routing and average the skills into one
  LoRA, then fine-tune that.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from .router import PolyRouter
from .tasks import _adapter_name, adapters_of
from .variants import unique_routers

if TYPE_CHECKING:  # pragma: no cover
    from .model import PolyModel


def _router_param_ids(model: "PolyModel") -> set[int]:
    ids = set()
    for _, layer in model._poly_layers():
        for adapter in layer.adapters.values():
            if isinstance(adapter.poly_router, PolyRouter):
                ids.add(id(adapter.poly_router.module_logits))
    return ids


def _check_lr(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
    return float(value)


def param_groups(
    model: nn.Module,
    lr: float,
    router_lr: float,
    weight_decay: float = 0.0,
    router_weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with one learning rate for router logits and another for everything else.

    Only trainable parameters are included, each once (shared routers too). Works with any
    ``torch.optim`` optimizer and with the HF ``Trainer``
    (``Trainer(..., optimizers=(torch.optim.AdamW(param_groups(model, 1e-4, 1e-3)), None))``).

    Args:
        model: a :class:`~polytropon.model.PolyModel` (or any module containing one).
        lr: learning rate of the skills (``poly_lora_A``/``poly_lora_B``) and ``modules_to_save`` copies.
        router_lr: learning rate of the learned routers' ``module_logits``.
        weight_decay / router_weight_decay: weight decay of each group.

    Returns:
        ``[{"name": "skills", "params": [...], "lr": lr, "weight_decay": ...},
        {"name": "router", "params": [...], "lr": router_lr, "weight_decay": ...}]``; a group with no
        trainable parameters is left out (e.g. no router group for ``poly_type="fixed"``, or no skills
        group after :func:`freeze_skills`).

    Raises:
        ValueError: a negative or non-finite rate, or a model without trainable parameters.
    """
    lr, router_lr = _check_lr("lr", lr), _check_lr("router_lr", router_lr)
    weight_decay = _check_lr("weight_decay", weight_decay)
    router_weight_decay = _check_lr("router_weight_decay", router_weight_decay)
    poly = model
    while not hasattr(poly, "_poly_layers") and hasattr(poly, "model"):
        poly = poly.model
    router_ids = _router_param_ids(poly) if hasattr(poly, "_poly_layers") else set()
    skills, routers, seen = [], [], set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (routers if id(param) in router_ids else skills).append(param)
    if not skills and not routers:
        raise ValueError("the model has no trainable parameters (inference_mode adapter, or everything frozen)")
    groups = []
    if skills:
        groups.append({"name": "skills", "params": skills, "lr": lr, "weight_decay": weight_decay})
    if routers:
        groups.append({"name": "router", "params": routers, "lr": router_lr, "weight_decay": router_weight_decay})
    return groups


def ibp_log_prior(probs: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Log of the finite Indian Buffet Process prior of a (relaxed) task x skill allocation matrix.

    With ``N`` tasks and ``K`` skills, skill ``k`` is used by each task with probability
    ``pi_k ~ Beta(alpha / K, 1)`` (Griffiths & Ghahramani's finite IBP, the prior of Ponti et al. 2022);
    integrating ``pi_k`` out, a binary ``Z`` (``N x K``) with column counts ``m_k = sum_i Z[i, k]`` has::

        log p(Z) = sum_k [ log(alpha/K) + lgamma(m_k + alpha/K) + lgamma(N - m_k + 1) - lgamma(N + 1 + alpha/K) ]

    Here ``Z`` is relaxed to probabilities in ``[0, 1]`` (the routers' ``sigmoid(logits)``), so ``m_k`` is the
    expected count and the expression is differentiable. It rewards skills used by few tasks or by almost all
    (``d log p / d m_k = digamma(m_k + alpha/K) - digamma(N - m_k + 1)``): sparse, reusable skills.

    Args:
        probs: ``(..., N, K)`` allocation probabilities; leading dims are independent matrices.
        alpha: IBP concentration (positive): the expected number of skills per task.

    Returns:
        ``log p(Z)`` of shape ``probs.shape[:-2]``.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0 or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    n, k = probs.shape[-2], probs.shape[-1]
    a = alpha / k
    counts = probs.sum(dim=-2)  # (..., K)
    per_skill = (
        math.log(a) + torch.lgamma(counts + a) + torch.lgamma(n - counts + 1.0) - math.lgamma(n + 1.0 + a)
    )
    return per_skill.sum(dim=-1)


def ibp_loss(
    model: "PolyModel", alpha: float = 1.0, adapter_name: Optional[str] = None, reduction: str = "mean"
) -> torch.Tensor:
    """Negative IBP log-prior of the adapter's learned allocations, to add to the task loss.

    Every distinct learned router (shared routers once) contributes one ``n_tasks x n_skills`` matrix per
    split, ``Z = sigmoid(module_logits)``; see :func:`ibp_log_prior`. Usage::

        loss = task_loss + weight * ibp_loss(model, alpha=1.0)

    Args:
        model: the :class:`~polytropon.model.PolyModel`.
        alpha: IBP concentration.
        adapter_name: adapter whose routers to use (default: active).
        reduction: ``"mean"`` over (router, split) matrices (independent of depth) or ``"sum"`` (the joint
            log-prior of all of them).

    Raises:
        ValueError: the adapter has no learned router (fixed-allocation ``poly_type``), or a bad ``reduction``.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    adapter_name = _adapter_name(model, adapter_name)
    routers = unique_routers([a.poly_router for _, a in adapters_of(model, adapter_name)])
    learned = [r for r in routers if isinstance(r, PolyRouter)]
    if not learned:
        raise ValueError(
            f"adapter {adapter_name!r} has no learned router (poly_type={model.peft_config[adapter_name].poly_type!r}): "
            "the IBP prior applies to learned allocations"
        )
    terms = []
    for router in learned:
        probs = torch.sigmoid(router.module_logits.view(router.n_tasks, router.n_splits, router.n_skills))
        terms.append(-ibp_log_prior(probs.transpose(0, 1), alpha))  # (n_splits,)
    stacked = torch.cat(terms)
    return stacked.mean() if reduction == "mean" else stacked.sum()


def freeze_skills(model: "PolyModel", adapter_name: Optional[str] = None, freeze_saved_modules: bool = True) -> int:
    """MHR-z: freeze the skills so that only the routing trains; returns the number of trainable parameters.

    Sets ``requires_grad=False`` on ``poly_lora_A``/``poly_lora_B`` of every layer (and, with
    ``freeze_saved_modules``, on the ``modules_to_save`` copies) of the adapter. Typical few-shot use::

        add_tasks(model, ["new_task"]); freeze_skills(model)     # then train on the new task only

    Learned rows of other tasks get zero gradient, so with an optimizer without weight decay they stay
    unchanged. :meth:`PolyModel.set_adapter` restores the default trainable set; so does
    :func:`unfreeze_skills`.

    Raises:
        ValueError: the adapter is not the active (trainable) one, is in inference mode, or has no learned router.
    """
    adapter_name = _adapter_name(model, adapter_name)
    config = model.peft_config[adapter_name]
    if adapter_name != model.active_adapter or config.inference_mode:
        raise ValueError(
            f"adapter {adapter_name!r} is not trainable (only the active adapter trains, and not in inference_mode)"
        )
    if config.poly_type != "poly":
        raise ValueError(
            f"adapter {adapter_name!r} has a fixed allocation (poly_type={config.poly_type!r}): with frozen skills "
            "nothing would train"
        )
    for _, adapter in adapters_of(model, adapter_name):
        adapter.poly_lora_A.requires_grad_(False)
        adapter.poly_lora_B.requires_grad_(False)
    if freeze_saved_modules:
        for _, wrapper in model._saved_modules():
            if adapter_name in wrapper.modules_to_save:
                wrapper.modules_to_save[adapter_name].requires_grad_(False)
    return model.get_nb_trainable_parameters()[0]


def unfreeze_skills(model: "PolyModel") -> int:
    """Undo :func:`freeze_skills`: the active adapter trains fully again; returns the trainable count."""
    model._update_trainable()
    return model.get_nb_trainable_parameters()[0]


@torch.no_grad()
def collapse_to_average(
    model: "PolyModel",
    adapter_name: Optional[str] = None,
    new_adapter_name: str = "average",
    activate: bool = True,
) -> str:
    """MHR-mu: add an adapter that is the average of an adapter's skills, with routing dropped.

    For every layer, with ``A`` of shape ``(n_splits, n_skills, in/n_splits, r)`` and ``B`` of shape
    ``(n_splits, n_skills, r, out/n_splits)``::

        A_mu = concat over splits q of  mean_s A[q, s]      -> (in, r)
        B_mu = concat over splits q of  mean_s B[q, s]      -> (r, out)
        y    = W x + x A_mu B_mu / r

    which is exactly the adapter routed with uniform weights (every task's "average of the skills"). The new
    adapter is a single LoRA: ``poly_type="shared"``, ``n_skills=1``, ``n_tasks=1``, ``n_splits=1`` (call it
    with ``task_ids=[0]``); its ``modules_to_save`` copies start from the source adapter's. Fine-tune it like
    any adapter; the LoRA export handles it as a one-skill adapter.

    Args:
        model: the :class:`~polytropon.model.PolyModel`.
        adapter_name: the adapter to average (default: active).
        new_adapter_name: name of the new adapter.
        activate: make the new adapter active (and so the trainable one).

    Returns:
        ``new_adapter_name``.

    Raises:
        ValueError: unknown source adapter, or ``new_adapter_name`` already taken (nothing is changed).
    """
    adapter_name = _adapter_name(model, adapter_name)
    if not isinstance(new_adapter_name, str) or not new_adapter_name:
        raise ValueError(f"new_adapter_name must be a non-empty string, got {new_adapter_name!r}")
    if new_adapter_name in model.peft_config:
        raise ValueError(f"an adapter named {new_adapter_name!r} already exists")
    source = model.peft_config[adapter_name]
    config = dataclasses.replace(
        source, poly_type="shared", n_skills=1, n_tasks=1, n_splits=1, task_names=None, allocation=None,
        router_granularity="module", hard_routing=False, router_temperature=1.0, unknown_task="error",
        inference_mode=False,
    )
    if isinstance(config.target_modules, list):  # exactly the source's layers, whatever the patterns match now
        config.target_modules = [path for path, _ in adapters_of(model, adapter_name)]
    averaged = {}
    for path, adapter in adapters_of(model, adapter_name):
        a, b = adapter.poly_lora_A, adapter.poly_lora_B
        q, _, d_in, r = a.shape
        a_mu = a.mean(dim=1).reshape(q * d_in, r)  # splits stacked along in_features
        b_mu = b.mean(dim=1).permute(1, 0, 2).reshape(r, -1)  # splits stacked along out_features
        averaged[path] = (a_mu, b_mu)
    model.add_adapter(new_adapter_name, config)
    for path, adapter in adapters_of(model, new_adapter_name):
        a_mu, b_mu = averaged[path]
        adapter.poly_lora_A.copy_(a_mu.view_as(adapter.poly_lora_A))
        adapter.poly_lora_B.copy_(b_mu.view_as(adapter.poly_lora_B))
    for _, wrapper in model._saved_modules():
        if adapter_name in wrapper.modules_to_save and new_adapter_name in wrapper.modules_to_save:
            wrapper.modules_to_save[new_adapter_name].load_state_dict(wrapper.modules_to_save[adapter_name].state_dict())
    if activate:
        model.set_adapter(new_adapter_name)
    return new_adapter_name
