"""The papers' claims measured over seeds, in parallel worker processes: what the default run prints.

A *job* trains one method at one seed (:mod:`polytropon.app.experiment`) and, when few-shot methods start from
the model it trained, adapts copies of it to the held-out tasks in the same process, so the trained model never
crosses a process boundary. :func:`run_jobs` hands the jobs to ``workers`` processes (spawned, one torch thread
each, the base model and the suite loaded once per process), longest first::

    worker 1:  mhr @ seed 0 (+ mhr-z)      lora-params @ seed 1 (+ shared-ft)   ...
    worker 2:  lora-params @ seed 0 (+ shared-ft)   mhr @ seed 1 (+ mhr-z)       ...

:func:`compare` turns two lists of per-seed scores into a verdict: a claim that one method is ahead of another
*holds* when the difference of their means is larger than the seed spread (the larger of the two sample standard
deviations over seeds), and otherwise *does not hold at this budget*.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import multiprocessing
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .report import collapse_warning

__all__ = [
    "Setup",
    "Job",
    "Stat",
    "Verdict",
    "run_job",
    "run_jobs",
    "stat",
    "compare",
    "recovery_verdict",
    "collect",
    "scores",
    "claim_lines",
    "collapse_lines",
]


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every worker process loads once: the base model and the suite's splits."""

    model_path: str
    suite_seed: int = 0
    n_train: int = 400
    n_eval: int = 40
    n_shots: int = 16
    n_heldout_eval: int = 50
    validation: int = 0  # > 0: a recipe search (see polytropon.app.experiment.load_suite_data)
    max_length: int = 48
    threads: int = 1


@dataclasses.dataclass(frozen=True)
class Job:
    """One method at one seed.

    ``kind`` is ``"multitask"`` (train ``method`` on the training tasks, then each ``(few-shot method, recipe)``
    of ``few_shot`` from a copy of it), ``"few-shot"`` (the few-shot ``method`` from the base model: ``lora``), or
    ``"head-only"`` (a classification head on the frozen base model). ``recipe`` is an
    :class:`~polytropon.app.experiment.Recipe`; ``save_dir``, if set, receives the trained adapter.
    """

    kind: str
    method: str
    seed: int
    recipe: Any = None
    few_shot: tuple[tuple[str, Any], ...] = ()
    shots: int = 16
    few_shot_steps: int = 50
    save_dir: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("multitask", "few-shot", "head-only"):
            raise ValueError(f"job kind must be 'multitask', 'few-shot' or 'head-only', got {self.kind!r}")

    @property
    def cost(self) -> int:
        """Optimizer steps the job runs (to start the longest jobs first)."""
        steps = self.recipe.steps if self.kind == "multitask" and self.recipe is not None else 0
        return steps + self.few_shot_steps * (len(self.few_shot) + (self.kind == "few-shot"))


# --------------------------------------------------------------------------- inside a worker

_LOADED: dict[Setup, tuple[Any, Any]] = {}


def _load(setup: Setup) -> tuple[Any, Any]:
    """``(BaseModel, SuiteData)`` for ``setup``, loaded once per process."""
    if setup not in _LOADED:
        import torch

        from .experiment import BaseModel, load_suite_data

        torch.set_num_threads(setup.threads)
        base = BaseModel(setup.model_path)
        data = load_suite_data(base.tokenizer, setup.suite_seed, setup.n_train, setup.n_eval, setup.n_shots,
                               setup.n_heldout_eval, validation=setup.validation, max_length=setup.max_length)
        _LOADED.clear()
        _LOADED[setup] = (base, data)
    return _LOADED[setup]


def run_job(setup: Setup, job: Job) -> dict[str, Any]:
    """Run ``job`` in this process; returns ``{"job": ..., "record": ..., "few_shot": [records]}``."""
    from . import experiment

    base, data = _load(setup)
    if job.kind == "head-only":
        return {"job": job, "record": _head_only(base, data, job), "few_shot": []}
    if job.kind == "few-shot":
        record = experiment.few_shot(job.method, None, job.recipe, data, base, job.seed, job.shots, job.few_shot_steps)
        return {"job": job, "record": record, "few_shot": []}
    model, record = experiment.train_multitask(job.method, job.recipe, data, base, job.seed)
    if job.save_dir is not None:
        model.save_pretrained(job.save_dir)
        record["adapter"] = job.save_dir
    adapted = [experiment.few_shot(method, model, recipe, data, base, job.seed, job.shots, job.few_shot_steps)
               for method, recipe in job.few_shot]
    return {"job": job, "record": record, "few_shot": adapted}


def _head_only(base: Any, data: Any, job: Job) -> dict[str, Any]:
    """A classification head trained on the frozen base model (at most 1,280 training rows, 60 epochs), starting,
    like every method, from the head :meth:`~polytropon.app.experiment.BaseModel.fresh` draws from the job's seed."""
    import random

    from .experiment import LABEL_TO_ID, eval_examples, family_means
    from .training import head_only_baseline

    rows = list(data.train_rows)
    if len(rows) > 1280:
        rows = [rows[i] for i in sorted(random.Random(job.seed).sample(range(len(rows)), 1280))]
    task_to_id = {t: i for i, t in enumerate(data.tasks)}
    metrics = head_only_baseline(base.fresh(job.seed), base.tokenizer, rows, data.eval_rows, task_to_id,
                                 LABEL_TO_ID, job.recipe.max_length if job.recipe is not None else 48, epochs=60,
                                 seed=job.seed)
    per_task = {task: m["accuracy"] for task, m in metrics.items()}
    return {"method": "head-only", "seed": job.seed, "accuracy": family_means(per_task, data.suite.tasks),
            "per_task": per_task, "eval_loss": {task: m["loss"] for task, m in metrics.items()},
            "eval_examples": eval_examples(data.eval_rows)}


def _start_worker(setup: Setup) -> None:
    """Pool initializer: quiet the libraries' logging, load the model and the suite once."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    _settle_deepspeed_accelerator()
    _load(setup)


@contextlib.contextmanager
def _output_to_devnull(active: bool):
    """While active, file descriptors 1 and 2 point to ``/dev/null``: processes started now inherit that (their
    import-time noise from other libraries is dropped; their errors still reach the caller through the futures)."""
    if not active:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _settle_deepspeed_accelerator() -> None:
    """Let DeepSpeed (if installed; the Trainer asks it for its accelerator) pick one now, while the worker's
    import noise is hidden, instead of warning on every job's first Trainer."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        return
    try:
        from deepspeed.accelerator import get_accelerator

        get_accelerator()
    except Exception:  # noqa: BLE001 -- DeepSpeed is optional; a broken install shows itself where it is used
        pass


# --------------------------------------------------------------------------- the pool


def run_jobs(
    setup: Setup,
    jobs: Sequence[Job],
    workers: int,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    quiet_workers: bool = True,
) -> list[dict[str, Any]]:
    """Run ``jobs`` on ``workers`` spawned processes (in this process when ``workers == 1``, whose torch thread
    count then becomes ``setup.threads``), the costliest first; ``on_result`` sees each result as it arrives. Returns the results in the order of ``jobs``. With
    ``quiet_workers`` the workers' own output (other libraries' import and device messages) is dropped; a job's
    exception is raised here. The workers are spawned, so they import the caller's main module: a script calling
    this with ``workers > 1`` keeps its top-level code under ``if __name__ == "__main__":``.

    Raises:
        ValueError: ``workers`` is not a positive integer.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i].cost)
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    if workers == 1:
        for i in order:
            results[i] = run_job(setup, jobs[i])
            if on_result is not None:
                on_result(results[i])
        return results  # type: ignore[return-value]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                                initargs=(setup,)) as pool:
        with _output_to_devnull(quiet_workers):  # submit() starts the worker processes
            futures = {pool.submit(run_job, setup, jobs[i]): i for i in order}
        for future in concurrent.futures.as_completed(futures):
            results[futures[future]] = future.result()
            if on_result is not None:
                on_result(results[futures[future]])
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------- results

def collect(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The records of every job: ``multitask`` (incl. head-only) and ``few_shot``, and the task names."""
    multitask = [r["record"] for r in results]
    few_shot = [f for r in results for f in r["few_shot"]]
    few_shot += [r["record"] for r in results if r["job"].kind == "few-shot"]
    multitask = [r for r in multitask if "shots" not in r]
    tasks = list(next(r for r in multitask if r["method"] != "head-only")["per_task"])
    return {"multitask": multitask, "few_shot": few_shot, "tasks": tasks}


def scores(records: list[dict[str, Any]], method: str, key: str = "mean") -> list[float]:
    return [r["accuracy"][key] for r in sorted(records, key=lambda r: r["seed"]) if r["method"] == method]


def claim_lines(records: dict[str, Any], routed_method: str, baseline: str, routed_few_shot: str,
                shots: int) -> list[dict[str, Any]]:
    """The three claims on the records of :func:`collect`, each ``{"line": text, "record": numbers}``:
    ``routed_method`` ahead of ``baseline`` in multi-task accuracy; ``routed_few_shot`` ahead of a new LoRA
    (``lora``) and of the fine-tuned shared LoRA (``shared-ft``) on the held-out tasks; the routing's recovery
    of the true task structure above its shuffled-task chance level."""
    mt, fs = records["multitask"], records["few_shot"]
    routed, lora = scores(mt, routed_method), scores(mt, baseline)
    multi = compare(routed, lora)
    few_ours, few_new, few_ft = scores(fs, routed_few_shot), scores(fs, "lora"), scores(fs, "shared-ft")
    transfer = compare(few_ours, few_new, few_ft)
    routed_runs = sorted((r for r in mt if r["method"] == routed_method), key=lambda r: r["seed"])
    spearman = [r["recovery"]["spearman"] for r in routed_runs]
    chance = [r["recovery"]["spearman_chance"] for r in routed_runs]
    recovery = recovery_verdict(spearman, chance)
    n = len(routed)
    return [
        {"line": (f"multi-task accuracy: {routed_method} {stat(routed)}, shared LoRA of the same budget {stat(lora)} "
                  f"-> {multi.word} (difference {multi.margin:+.3f}, seed spread {multi.spread:.3f}, {n} seeds)"),
         "record": {"claim": "multi-task", "ours": routed, "lora": lora, **dataclasses.asdict(multi)}},
        {"line": (f"few-shot transfer ({shots} shots per held-out task): {routed_few_shot} "
                  f"{stat(few_ours)}, new LoRA {stat(few_new)}, shared LoRA fine-tuned {stat(few_ft)} -> {transfer.word} "
                  f"(smallest difference {transfer.margin:+.3f}, seed spread {transfer.spread:.3f})"),
         "record": {"claim": "few-shot", "ours": few_ours, "new_lora": few_new, "shared_ft": few_ft,
                    **dataclasses.asdict(transfer)}},
        {"line": (f"routing recovers the task structure: similarity rank correlation {stat(spearman)} against "
                  f"{stat(chance)} with shuffled tasks -> {recovery.word}"),
         "record": {"claim": "recovery", "spearman": spearman, "chance": chance, **dataclasses.asdict(recovery)}},
    ]


def collapse_lines(records: dict[str, Any], names: dict[str, str]) -> list[str]:
    """One warning per run that answered some task the same for every example (``names``: display names)."""
    lines = []
    for record in records["multitask"] + records["few_shot"]:
        n_tasks = len(record["per_task"])
        name = f"{names.get(record['method'], record['method'])} (seed {record['seed']})"
        line = collapse_warning(name, record.get("collapsed", []), n_tasks)
        if line is not None:
            lines.append(line)
    return lines


# --------------------------------------------------------------------------- statistics and verdicts


@dataclasses.dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (``n - 1``; 0 for one value) of per-seed scores."""

    mean: float
    std: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.std:.3f}"


def stat(values: Sequence[float]) -> Stat:
    """The :class:`Stat` of ``values``; ``ValueError`` when there are none."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values: expected one score per seed")
    return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Whether ``ours`` is ahead of every rival by more than the seed spread."""

    holds: bool
    margin: float  # the smallest difference of means, ours - rival
    spread: float  # the largest sample standard deviation among the compared methods

    @property
    def word(self) -> str:
        return "holds" if self.holds else "does not hold at this budget"


def compare(ours: Sequence[float], *rivals: Sequence[float]) -> Verdict:
    """The verdict on "``ours`` is ahead of each of ``rivals``": for per-seed scores with means ``m`` and
    sample standard deviations ``s``, it holds when ``min_k (m_ours - m_k) > max(s_ours, max_k s_k)``.

    With a single seed the spread is unknown (0) and the verdict only says which mean is larger.
    """
    if not rivals:
        raise ValueError("compare needs at least one rival")
    mine = stat(ours)
    theirs = [stat(r) for r in rivals]
    margin = min(mine.mean - t.mean for t in theirs)
    spread = max([mine.std] + [t.std for t in theirs])
    return Verdict(holds=margin > spread, margin=margin, spread=spread)


def recovery_verdict(spearman: Sequence[float], chance: Sequence[float]) -> Verdict:
    """Whether the routing recovers the true task structure above chance by more than the seed spread
    (the similarity rank correlation against its shuffled-task chance level, per seed)."""
    return compare(spearman, chance)
