"""The Indian Buffet Process prior of Poly (Ponti et al. 2022, arXiv 2202.13914) as a loss term.

Poly places an IBP prior on the binary task x skill allocation matrix; :func:`ibp_log_prior` is its finite
(Beta-Bernoulli) form with the skill probabilities integrated out, on a relaxed allocation, and
:func:`ibp_loss` applies it to every learned router of an adapter.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch

from ..router import PolyRouter
from ..variants import unique_routers

if TYPE_CHECKING:  # pragma: no cover
    from ..model import PolyModel


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
    adapter_name = model.resolve_adapter(adapter_name)
    routers = unique_routers([a.poly_router for _, a in model.named_adapters(adapter_name)])
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
