"""What ``polytropon train`` sets beside Poly: a shared LoRA of the same trainable budget, and routing recovery.

* :func:`lora_baseline_args` -- the flags of the LoRA baseline: the run's own flags with one skill shared by
  every task (``--poly-type shared``) of rank ``r * n_skills``. Per adapted layer Poly trains
  ``n_skills * r * (d_in + d_out)`` skill parameters plus ``n_tasks * n_splits * n_skills`` router logits; the
  baseline trains ``(r * n_skills) * (d_in + d_out)``: the same budget but for the router.
* :func:`start_lora_baseline` / :func:`finish_lora_baseline` -- the baseline is a ``polytropon train`` run of
  its own in ``<run>/lora``, in a child process that trains while Poly trains (each on one thread: the two
  cores of a small machine both work), read back from its ``metrics.json``.
* :func:`routing_recovery` -- how well the learned routing recovers a known task x skill structure (the
  built-in suite's :meth:`~polytropon.app.suite.Suite.skill_matrix`), scored by
  :func:`polytropon.toolkit.recovery.recovery_scores` against the chance level of
  :func:`~polytropon.toolkit.recovery.shuffled_baseline`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from .console import CliError

__all__ = [
    "LORA_NAME",
    "lora_baseline_args",
    "routing_allocations",
    "routing_recovery",
    "recovery_line",
    "aligned_skill_names",
    "LoraBaseline",
    "start_lora_baseline",
    "finish_lora_baseline",
]

#: The LoRA baseline's name in tables and ``metrics.json``.
LORA_NAME = "lora"


def lora_baseline_args(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of the run's flags for a shared LoRA with Poly's trainable budget (rank ``r * n_skills``, one skill).

    Everything else (targets, steps, batch size, seed, head) is the run's, and the learning rate too unless
    ``--lora-lr`` gives the baseline its own; the routing flags (``--hard-routing``, ``--router-temperature``,
    ``--router-granularity``, the IBP prior) do not apply to one shared skill and are reset.
    """
    values = dict(vars(args))
    values.update(
        lr=getattr(args, "lora_lr", None) or args.lr,
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


# --------------------------------------------------------------------------- the LoRA baseline, in a child process

#: Environment of a torchrun / accelerate process; the child is a single process and must not see it.
DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                   "MASTER_PORT", "TORCHELASTIC_RUN_ID")


@dataclasses.dataclass
class LoraJob:
    """A LoRA baseline training in a child process."""

    process: Any
    run_dir: str
    log_path: str
    started: float


@dataclasses.dataclass
class LoraBaseline:
    """The finished LoRA baseline: per-task metrics, adapter config and size, where it is saved, its wall time."""

    per_task: dict[str, dict[str, float]]
    config: dict[str, Any]
    trainable: int
    adapter_dir: str
    seconds: float


def start_lora_baseline(
    args: argparse.Namespace, output_dir: str, subdir: str, train: Callable[[argparse.Namespace], int]
) -> LoraJob:
    """Start training the LoRA baseline of ``args`` as its own run in ``<output_dir>/<subdir>``, in a child process.

    The child runs ``train`` (the ``polytropon train`` verb, a module-level function the child imports by name)
    with :func:`lora_baseline_args`, no baselines of its own and quietly; its output goes to
    ``<output_dir>/<subdir>.log``. An unfinished baseline of an interrupted run is started afresh.
    """
    import multiprocessing

    run_dir = os.path.join(output_dir, subdir)
    if os.path.isdir(run_dir):  # left by an interrupted run of ours: train it again
        shutil.rmtree(run_dir)
    values = dict(vars(lora_baseline_args(args)))
    values.update(output_dir=run_dir, no_baseline=True, lora_baseline=False, quiet=True, resume=False)
    values.pop("func", None)
    log_path = run_dir + ".log"
    process = multiprocessing.get_context("spawn").Process(target=_train_in_child, args=(train, values, log_path), daemon=True)
    process.start()
    return LoraJob(process, run_dir, log_path, time.time())


def _train_in_child(train: Callable[[argparse.Namespace], int], values: dict[str, Any], log_path: str) -> None:
    """The child process: a single-process ``polytropon train`` run of ``values``, its output in ``log_path``."""
    for name in DISTRIBUTED_ENV:
        os.environ.pop(name, None)
    with open(log_path, "w", encoding="utf-8") as log:
        sys.stdout = sys.stderr = log
        from .console import set_quiet
        from .data import DataError
        from .training import ModelLoadError

        set_quiet(True)
        try:
            code = train(argparse.Namespace(**values))
        except (CliError, DataError, ModelLoadError) as err:
            print(f"polytropon: error: {err}")
            code = 2
        log.flush()
    sys.exit(code)


def finish_lora_baseline(job: LoraJob) -> LoraBaseline:
    """Wait for the child and read its ``metrics.json``; a failed child is a :class:`CliError` naming its log."""
    job.process.join()
    metrics_path = os.path.join(job.run_dir, "metrics.json")
    if job.process.exitcode != 0 or not os.path.isfile(metrics_path):
        raise CliError(f"the LoRA baseline failed (exit code {job.process.exitcode}); its output is in {job.log_path}")
    with open(metrics_path, encoding="utf-8") as fh:
        metrics = json.load(fh)
    return LoraBaseline(
        per_task=metrics["poly"]["per_task"],
        config=metrics["adapter"]["config"],
        trainable=metrics["adapter"]["trainable_parameters"],
        adapter_dir=os.path.join(job.run_dir, "adapter"),
        seconds=time.time() - job.started,
    )
