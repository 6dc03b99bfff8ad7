"""The built-in default run: ``polytropon train`` with no arguments measures the papers' claims over seeds.

On the built-in suite (20 training tasks over 8 known attributes, 4 held-out tasks) and the packaged
all-MiniLM-L6-v2, with the recipes of :data:`~polytropon.app.defaults.CLAIMS_RUN`, for every seed:

* the routed method (MHR or Poly) and the shared LoRA of the same trainable budget, each trained on the
  training tasks (one job each, which then adapts copies of its model to the held-out tasks: MHR-z / Poly-z
  from the routed model, the fine-tuned shared LoRA from the LoRA);
* a new LoRA trained on the held-out tasks' few shots from the base model;
* once, a classification head on the frozen base model (the floor).

The jobs run on two worker processes (:func:`polytropon.app.claims.run_jobs`). The run prints the per-task
table (means over seeds), then one line per claim with its numbers and its verdict
(:func:`polytropon.app.claims.compare`), and names every run that answered some task the same for every example.
The run directory holds ``run.json``, ``adapter/`` (the routed method at the first seed, usable by ``polytropon
evaluate`` / ``inspect`` / ``export-lora``), ``seeds/<method>-seed<s>/`` (every trained multi-task adapter),
``metrics.json`` (every per-seed record and the claims) and ``routing.png`` (the first seed's allocation aligned
to the true attributes).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Any

from .claims import Job, Setup, claim_lines, collapse_lines, collect, run_jobs
from .console import CliError, say, world_size
from .defaults import CLAIMS_RUN, DEFAULT_MODEL_NAME, default_model_path, model_path, portable_model_ref
from .report import format_table
from .runs import ADAPTER_SUBDIR, METRICS_FILE, RUN_FILE, TASKS_FILE, json_ready, mark_run_complete, write_json

__all__ = ["CLAIMS_FLAGS", "wants_claims", "check_claims_flags", "parse_seeds", "run_claims"]

#: The ``train`` flags the default run's claims read; any other flag set asks for a single run.
CLAIMS_FLAGS = ("seeds", "workers", "few_shot_steps", "max_steps", "suite_seed", "output_dir", "quiet", "model",
                "threads")
#: Label of each method in tables and claim lines.
NAMES = {"mhr": "mhr", "poly": "poly", "lora-params": "lora", "head-only": "head-only", "mhr-z": "mhr-z",
         "poly-z": "poly-z", "mhr-full": "mhr-full", "poly-full": "poly-full", "lora": "new LoRA",
         "shared-ft": "shared LoRA fine-tuned"}
SEEDS_SUBDIR = "seeds"


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)``; distinct integers, at least one (``CliError`` otherwise)."""
    try:
        seeds = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise CliError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise CliError(f"--seeds must name one or more distinct seeds, got {text!r}")
    return seeds


def wants_claims(args: argparse.Namespace) -> bool:
    """Whether ``train`` runs the claims: the built-in suite (no ``--data``), no single ``--seed``, no resume."""
    return args.data is None and args.seed is None and not args.resume


def check_claims_flags(args: argparse.Namespace, defaults: argparse.Namespace) -> None:
    """Refuse flags the claims do not read (they belong to a single run), naming the first one, and a
    launch on several processes (the claims start their own workers)."""
    if world_size() > 1:
        raise CliError("the default run starts its own worker processes; under torchrun or accelerate give --seed N "
                       "(and --data) for one distributed run")
    for key, value in vars(args).items():
        if key in CLAIMS_FLAGS or key in ("func", "verb", "command") or not hasattr(defaults, key):
            continue
        if value != getattr(defaults, key):
            flag = "--" + key.replace("_", "-")
            raise CliError(f"{flag}: the default run measures the claims with each method's searched recipe "
                           f"(polytropon.app.defaults.CLAIMS_RUN); add --seed N for one run with your own settings")


# --------------------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True)
class ClaimsPlan:
    seeds: tuple[int, ...]
    routed: str
    baseline: str
    routed_few_shot: str
    jobs: tuple[Job, ...]


def make_plan(args: argparse.Namespace, output_dir: str) -> ClaimsPlan:
    """Every job of the run: per seed the routed method (+ its few-shot method), the LoRA baseline (+ its
    fine-tuning), a new LoRA on the held-out tasks; the head-only floor at the first seed."""
    from .experiment import Recipe

    seeds = parse_seeds(args.seeds) if isinstance(args.seeds, str) else tuple(args.seeds or CLAIMS_RUN["seeds"])
    steps = args.max_steps or CLAIMS_RUN["steps"]
    few_steps = args.few_shot_steps or CLAIMS_RUN["few_shot_steps"]
    routed, baseline = CLAIMS_RUN["routed"], CLAIMS_RUN["baseline"]
    recipe = {m: Recipe(steps=steps, **kw) for m, kw in CLAIMS_RUN["recipes"].items()}
    few = {m: Recipe(steps=few_steps, **kw) for m, kw in CLAIMS_RUN["few_shot"].items()}
    routed_few = CLAIMS_RUN["routed_few_shot"]
    common = dict(shots=CLAIMS_RUN["shots"], few_shot_steps=few_steps)
    jobs: list[Job] = []
    for seed in seeds:
        jobs += [
            Job("multitask", routed, seed, recipe[routed], ((routed_few, few[routed_few]),),
                save_dir=os.path.join(output_dir, SEEDS_SUBDIR, f"{routed}-seed{seed}"), **common),
            Job("multitask", baseline, seed, recipe[baseline], (("shared-ft", few["shared-ft"]),),
                save_dir=os.path.join(output_dir, SEEDS_SUBDIR, f"{NAMES[baseline]}-seed{seed}"), **common),
            Job("few-shot", "lora", seed, few["lora"], **common),
        ]
    jobs.append(Job("head-only", "head-only", seeds[0], recipe[routed]))
    return ClaimsPlan(seeds, routed, baseline, routed_few, tuple(jobs))


# --------------------------------------------------------------------------- the verb


def run_claims(args: argparse.Namespace, output_dir: str) -> int:
    """Run the claims into ``output_dir`` (checked and empty) and print them; returns the exit code."""
    started = time.time()
    model_ref = model_path(args.model) if args.model else default_model_path()
    workers = args.workers or CLAIMS_RUN["workers"]
    plan = make_plan(args, output_dir)
    setup = Setup(model_path=model_ref, suite_seed=args.suite_seed, threads=args.threads or 1)
    announce(args, plan, workers)
    os.makedirs(os.path.join(output_dir, SEEDS_SUBDIR), exist_ok=True)
    write_json(os.path.join(output_dir, RUN_FILE), run_record(args, plan, model_ref))
    results = run_jobs(setup, plan.jobs, workers, on_result=lambda result: say(progress_line(result)))
    records = collect(results)
    first = next(r for r in records["multitask"] if r["method"] == plan.routed and r["seed"] == plan.seeds[0])
    adapter_dir = publish_adapter(first["adapter"], output_dir, records["tasks"], args, model_ref)
    routing_png = plot_routing(first, records, os.path.join(output_dir, "routing.png"))
    claims = claim_lines(records, plan.routed, plan.baseline, plan.routed_few_shot, plan.jobs[0].shots)
    warnings = collapse_lines(records, NAMES)
    seconds = {"total": round(time.time() - started, 1), "workers": workers}
    metrics = {"kind": "claims", "model": args.model or DEFAULT_MODEL_NAME, "base_model": portable_model_ref(model_ref),
               "suite_seed": args.suite_seed, "seeds": list(plan.seeds), "routed": plan.routed, "baseline": plan.baseline,
               "claims": [c["record"] for c in claims], "collapsed": warnings, "runs": records, "seconds": seconds,
               "recipes": {"multitask": CLAIMS_RUN["recipes"], "few_shot": CLAIMS_RUN["few_shot"]}}
    write_json(os.path.join(output_dir, METRICS_FILE), json_ready(metrics))
    mark_run_complete(output_dir)
    print_summary(args, plan, records, claims, warnings,
                  {"adapter": adapter_dir, "metrics": os.path.join(output_dir, METRICS_FILE), "routing": routing_png},
                  seconds)
    return 0


def announce(args: argparse.Namespace, plan: ClaimsPlan, workers: int) -> None:
    routed = plan.jobs[0].recipe
    lora = next(j.recipe for j in plan.jobs if j.method == plan.baseline)
    say(f"polytropon: built-in suite (seed {args.suite_seed}): 20 training tasks, 4 held-out tasks; model "
        f"{args.model or DEFAULT_MODEL_NAME}; seeds {', '.join(map(str, plan.seeds))} on {workers} worker process(es)")
    say(f"polytropon: {plan.routed} ({routed.n_skills} skills of rank {routed.r}, lr {routed.lr:g}, router lr "
        f"{routed.router_lr:g}{head_lr_text(routed)}) against a shared LoRA of rank {routed.r * routed.n_skills} "
        f"(lr {lora.lr:g}{head_lr_text(lora)}), "
        f"{routed.steps} steps of {routed.batch_size}; few-shot: {plan.jobs[0].shots} examples per held-out task, "
        f"{plan.jobs[0].few_shot_steps} steps")


def head_lr_text(recipe: Any) -> str:
    return "" if recipe.head_lr is None else f", head lr {recipe.head_lr:g}"


def run_record(args: argparse.Namespace, plan: ClaimsPlan, model_ref: str) -> dict[str, Any]:
    from .runs import new_run_record
    from .suite import TRAIN_TASKS

    tasks = [task.name for task in TRAIN_TASKS]
    record = new_run_record(args, tasks, ["no", "yes"], "classification", portable_model_ref(model_ref))
    record["kind"] = "claims"
    record["args"]["seeds"] = list(plan.seeds)
    return record


def progress_line(result: dict[str, Any]) -> str:
    """One line per finished job: its accuracy (and its few-shot accuracies) and its training time."""
    record = result["record"]
    job = result["job"]
    text = f"polytropon: seed {job.seed} {NAMES.get(job.method, job.method)}: {record['accuracy']['mean']:.3f}"
    if "train_seconds" in record:
        text += f" (train {record['train_seconds']:.0f}s)"
    for few in result["few_shot"]:
        text += f"; {NAMES.get(few['method'], few['method'])} on held-out tasks {few['accuracy']['mean']:.3f}"
    return text


# --------------------------------------------------------------------------- outputs


def publish_adapter(source: str, output_dir: str, tasks: list[str], args: argparse.Namespace, model_ref: str) -> str:
    """Copy the first seed's routed adapter to ``<run>/adapter`` with its ``polytropon_tasks.json``."""
    import shutil

    target = os.path.join(output_dir, ADAPTER_SUBDIR)
    shutil.copytree(source, target)
    write_json(os.path.join(target, TASKS_FILE),
               {"tasks": tasks, "labels": ["no", "yes"], "head": "classification", "max_length": 48,
                "model": portable_model_ref(args.model or model_ref)})
    return target


def plot_routing(first: dict[str, Any], records: dict[str, Any], path: str) -> str:
    """``routing.png``: the first seed's learned allocation aligned to the true attributes, beside the truth."""
    import numpy as np

    from .comparison import aligned_skill_names
    from .plots import plot_routing_matrix
    from .suite import SKILLS, TRAIN_TASKS

    tasks = records["tasks"]
    reference = np.zeros((len(TRAIN_TASKS), len(SKILLS)))
    for i, task in enumerate(TRAIN_TASKS):
        for skill in task.skills:
            reference[i, SKILLS.index(skill)] = 1
    return plot_routing_matrix(np.asarray(first["recovery"]["aligned"]), tasks, path,
                               title=f"{first['method']} (seed {first['seed']}): routing aligned to the true skills",
                               skill_names=aligned_skill_names(SKILLS), reference=reference,
                               reference_names=list(SKILLS))


def per_task_columns(plan: ClaimsPlan, records: dict[str, Any]) -> list[tuple[str, dict]]:
    """Table columns: head-only (first seed), the LoRA and the routed method (means over seeds)."""
    columns = []
    for method in ("head-only", plan.baseline, plan.routed):
        runs = [r for r in records["multitask"] if r["method"] == method]
        per_task = {t: {"accuracy": sum(r["per_task"][t] for r in runs) / len(runs), "n": runs[0]["eval_examples"][t]}
                    for t in records["tasks"]}
        columns.append((NAMES[method], per_task))
    return columns


def print_summary(args: argparse.Namespace, plan: ClaimsPlan, records: dict[str, Any], claims: list[dict],
                  warnings: list[str], paths: dict[str, str], seconds: dict[str, Any]) -> None:
    seeds = ", ".join(map(str, plan.seeds))
    table = format_table(records["tasks"], per_task_columns(plan, records), "accuracy")
    if not args.quiet:
        print()
    print(f"Per-task accuracy on the eval split of the training tasks (mean over seeds {seeds}; head-only: seed "
          f"{plan.seeds[0]}):")
    print(table)
    print()
    print(f"Claims (mean ± standard deviation over seeds {seeds}; a claim holds when the difference of the means "
          f"exceeds the larger standard deviation):")
    for claim in claims:
        print("  " + claim["line"])
    for warning in warnings:
        print(warning)
    if args.quiet:
        return
    print(f"adapter:  {paths['adapter']}  ({plan.routed}, seed {plan.seeds[0]}; every seed's in "
          f"{os.path.join(os.path.dirname(paths['adapter']), SEEDS_SUBDIR)})")
    print(f"metrics:  {paths['metrics']}")
    print(f"routing:  {paths['routing']}")
    print(f"time:     {seconds['total']:.0f}s on {seconds['workers']} worker process(es)")
