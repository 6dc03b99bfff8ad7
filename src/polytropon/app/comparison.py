"""What ``polytropon train`` sets beside Poly: a shared LoRA of the same trainable budget, and routing recovery.

* :func:`lora_baseline_args` -- the flags of the LoRA baseline: the run's own flags with one skill shared by
  every task (``--poly-type shared``) of rank ``r * n_skills``. Per adapted layer Poly trains
  ``n_skills * r * (d_in + d_out)`` skill parameters plus ``n_tasks * n_splits * n_skills`` router logits; the
  baseline trains ``(r * n_skills) * (d_in + d_out)``: the same budget but for the router.
* :func:`routing_recovery` -- how well the learned routing recovers a known task x skill structure (the
  built-in suite's :meth:`~polytropon.app.suite.Suite.skill_matrix`), scored by
  :func:`polytropon.toolkit.recovery.recovery_scores` against the chance level of
  :func:`~polytropon.toolkit.recovery.shuffled_baseline`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

__all__ = [
    "LORA_NAME",
    "lora_baseline_args",
    "routing_allocations",
    "routing_recovery",
    "recovery_line",
    "aligned_skill_names",
]

#: The LoRA baseline's name in tables and ``metrics.json``.
LORA_NAME = "lora"


def lora_baseline_args(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of the run's flags for a shared LoRA with Poly's trainable budget (rank ``r * n_skills``, one skill).

    Everything else (targets, learning rate, steps, batch size, seed, head) is the run's; the routing flags
    (``--hard-routing``, ``--router-temperature``, ``--router-granularity``, the IBP prior) do not apply to
    one shared skill and are reset.
    """
    values = dict(vars(args))
    values.update(
        poly_type="shared", n_skills=1, n_splits=1, r=args.r * args.n_skills, allocation=None, hard_routing=False,
        router_temperature=None, router_granularity=None, ibp_alpha=None, ibp_weight=None, unknown_task=None,
    )
    return argparse.Namespace(**values)


def routing_allocations(model: Any, n_tasks: int) -> list[Any]:
    """One ``(n_tasks, n_skills)`` eval allocation per distinct router and split, for the first ``n_tasks`` rows."""
    from ..toolkit.analysis import snapshot

    mats = []
    for weights in snapshot(model).per_router():  # (rows, n_splits, n_skills)
        for q in range(weights.shape[1]):
            mats.append(weights[:n_tasks, q, :].double().numpy())
    return mats


def routing_recovery(model: Any, reference: Any, n_shuffles: int = 20, seed: int = 0) -> tuple[dict[str, float], Any]:
    """``(scores, aligned)``: the recovery of ``reference`` (``(n_tasks, n_true)``) by the model's routing.

    ``scores`` has ``spearman`` (rank correlation of learned and true task x task similarity) and
    ``agreement`` (routing mass on the true skills after the optimal matching of learned to true skills),
    each with its shuffled-task chance level (``*_chance``); ``aligned`` is the ``(n_tasks, n_true)``
    learned allocation aligned to the true skills (mean over routers and splits).
    """
    from ..toolkit.recovery import recovery_scores, shuffled_baseline

    mats = routing_allocations(model, reference.shape[0])
    scores = recovery_scores(mats, reference)
    chance = shuffled_baseline(mats, reference, n_shuffles=n_shuffles, seed=seed)
    summary = {
        "spearman": scores.spearman,
        "spearman_chance": chance["spearman"],
        "spearman_chance_std": chance["spearman_std"],
        "agreement": scores.agreement,
        "agreement_chance": chance["agreement"],
        "agreement_chance_std": chance["agreement_std"],
    }
    return summary, scores.aligned


def recovery_line(scores: dict[str, float]) -> str:
    """One line for the run summary: both scores with their chance levels."""
    return (
        f"routing recovery: similarity rank correlation {scores['spearman']:.2f} "
        f"(shuffled tasks {scores['spearman_chance']:.2f}), aligned agreement {scores['agreement']:.2f} "
        f"(shuffled tasks {scores['agreement_chance']:.2f})"
    )


def aligned_skill_names(reference_names: Sequence[str]) -> list[str]:
    """Column labels of the aligned allocation: the learned skill matched to each true skill."""
    return [f"~{name}" for name in reference_names]
