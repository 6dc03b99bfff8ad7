"""The learning-rate search behind the default run's recipe, per method, at the default run's budget.

Every run trains one method at one seed with :func:`polytropon.app.experiment.train_multitask` -- the
trainer of ``polytropon train`` (there is no training loop here) -- on the built-in suite's training data
minus a validation split carved from it (the last ``--validation`` training examples of every task, 40 of
400 by default), and is scored on that validation split; the suite's eval split is never read.

Budget: 300 optimizer steps x batch 16, max_length 48, r 8, 8 skills, LoRA on query and value, MHR with 4
splits, the classification head at lr 1e-3 -- the default run's. Every method gets the same number of
configurations x seeds.

Stages (data below, :data:`STAGES`):

* ``lr``       poly and mhr: lr in {5e-3, 1e-2} x router lr in {0.1, 0.3}; lora-params (the shared LoRA of
               Poly's trainable budget, rank 64): lr in {3e-3, 5e-3, 1e-2, 2e-2} (4 configurations each);
               training seeds 0 and 1 on suite seed 0.
* ``confirm``  the best two configurations of each method (by the rule of :func:`rank_configs`) on seed 2.
* ``transfer`` the chosen configuration of each method on suite seeds 1 and 2 (not tuned on), seeds 0, 1.

Selection rule: a configuration with a collapsed task (every validation example of a task answered the
same) in any of its runs is not eligible, unless every configuration of the method collapses somewhere;
among the eligible ones the highest mean validation accuracy over seeds wins.

Every run appends one JSON line to the log (default ``benchmarks/results/recipe_search_300_or.jsonl``; the
search on the suite with ``xor`` tasks, with the head at the skills' rate and a grid of 6, is
``recipe_search_300.jsonl``: ``--summary --log`` prints it); runs
already in the log are skipped, so the search resumes where it stopped. Runs are spread over ``--workers``
processes (spawned, one torch thread each); only the parent writes the log.

    python benchmarks/recipe_search.py --stage lr --workers 2
    python benchmarks/recipe_search.py --stage confirm --workers 2
    python benchmarks/recipe_search.py --stage transfer --workers 2
    python benchmarks/recipe_search.py --summary
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from polytropon.app.runs import json_ready

HERE = os.path.dirname(os.path.abspath(__file__))
LOG = os.path.join(HERE, "results", "recipe_search_300_or.jsonl")

#: The default run's budget and adapter shape (every run of the search).
BUDGET: dict[str, Any] = {
    "steps": 300, "batch_size": 16, "max_length": 48, "r": 8, "n_skills": 8, "mhr_splits": 4,
    "target_modules": ["query", "value"], "head_lr": 1e-3,
}
#: Suite sizes of the default run: training examples per task, eval, shots, held-out eval.
SUITE_SIZES = (400, 40, 16, 50)
METHODS = ("poly", "mhr", "lora-params")
ROUTED = ("poly", "mhr")

#: The grid per method (equal size): recipe overrides on top of :data:`BUDGET`.
GRID: dict[str, list[dict[str, float]]] = {
    "poly": [{"lr": lr, "router_lr": rlr} for lr in (5e-3, 1e-2) for rlr in (0.1, 0.3)],
    "mhr": [{"lr": lr, "router_lr": rlr} for lr in (5e-3, 1e-2) for rlr in (0.1, 0.3)],
    "lora-params": [{"lr": lr} for lr in (3e-3, 5e-3, 1e-2, 2e-2)],
}

#: Each stage: which configurations (``"grid"``, ``"top2"`` or ``"best"`` of the ``lr`` stage's suite seed),
#: on which training seeds and suite seeds.
STAGES: dict[str, dict[str, Any]] = {
    "lr": {"configs": "grid", "seeds": (0, 1), "suite_seeds": (0,)},
    "confirm": {"configs": "top2", "seeds": (2,), "suite_seeds": (0,)},
    "transfer": {"configs": "best", "seeds": (0, 1), "suite_seeds": (1, 2)},
}
TUNING_SUITE_SEED = 0


# --------------------------------------------------------------------------- configurations and the log


def config_key(method: str, overrides: dict[str, float]) -> tuple:
    """The identity of a configuration: method, lr and (for learned routing) router lr."""
    return (method, float(overrides["lr"]), float(overrides["router_lr"]) if method in ROUTED else None)


def config_label(key: tuple) -> str:
    method, lr, router_lr = key
    return f"{method} lr {lr:g}" + (f" router {router_lr:g}" if router_lr is not None else "")


def run_key(record: dict[str, Any]) -> tuple:
    """What makes two runs the same run: configuration, budget, training seed, suite seed, validation size."""
    recipe = record["recipe"]
    return config_key(record["method"], recipe) + (recipe["steps"], recipe["batch_size"], record["seed"],
                                                   record["suite_seed"], record["validation_per_task"])


def read_log(path: str) -> list[dict[str, Any]]:
    """Every record of the log (``[]`` when it does not exist yet)."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def recipe_overrides(method: str, overrides: dict[str, float]) -> dict[str, Any]:
    """The full set of recipe fields a run sets (budget, then the configuration's learning rates)."""
    out = {**BUDGET, **overrides}
    if method not in ROUTED:
        out.pop("router_lr", None)
    return out


# --------------------------------------------------------------------------- aggregation and selection


def summarise(records: Iterable[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """Group runs by ``(suite_seed,) + configuration`` and aggregate over training seeds.

    Returns per group: ``seeds``, ``val`` (``{mean, std}`` of the mean validation accuracy; std is the sample
    std, ddof 1, 0 for one seed), ``per_seed`` accuracies, ``collapsed`` (number of collapsed tasks per seed),
    ``collapsed_tasks`` (their union) and for learned routing ``spearman`` (``{mean, std}``).
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for rec in records:
        key = (rec["suite_seed"],) + config_key(rec["method"], rec["recipe"])
        groups.setdefault(key, []).append(rec)
    out = {}
    for key, recs in sorted(groups.items(), key=lambda kv: (kv[0][0], METHODS.index(kv[0][1])
                                                              if kv[0][1] in METHODS else 99, kv[0][2:])):
        recs = sorted(recs, key=lambda r: r["seed"])
        val = [r["val"]["mean"] for r in recs]
        entry: dict[str, Any] = {
            "seeds": [r["seed"] for r in recs],
            "val": _stat(val),
            "per_seed": val,
            "collapsed": [len(r["collapsed"]) for r in recs],
            "collapsed_tasks": sorted({t for r in recs for t in r["collapsed"]}),
        }
        spearman = [r["recovery"]["spearman"] for r in recs if r.get("recovery")]
        if spearman:
            entry["spearman"] = _stat(spearman)
        out[key] = entry
    return out


def _stat(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0}


def rank_configs(summary: dict[tuple, dict[str, Any]], method: str, suite_seed: int = TUNING_SUITE_SEED,
                 seeds: Sequence[int] | None = None,
                 collapsed_in: dict[tuple, dict[str, Any]] | None = None) -> list[tuple]:
    """The configurations of ``method`` on ``suite_seed``, best first.

    Eligible configurations (no collapsed task in any run of ``collapsed_in``, default ``summary``) come
    first, by mean validation accuracy in ``summary``; a configuration with a collapsed task ranks after
    every eligible one (so it is chosen only when every configuration of the method collapses somewhere).
    With ``seeds``, only configurations run on all of those seeds are ranked (``summary`` should then hold
    the records of exactly those seeds, so that every configuration is compared on the same seeds).
    """
    collapsed_in = summary if collapsed_in is None else collapsed_in
    ranked = []
    for key, entry in summary.items():
        if key[0] != suite_seed or key[1] != method:
            continue
        if seeds is not None and not set(seeds) <= set(entry["seeds"]):
            continue
        ranked.append((not eligible(collapsed_in.get(key, entry)), -entry["val"]["mean"], key[1:]))
    return [cfg for _, _, cfg in sorted(ranked)]


def eligible(entry: dict[str, Any]) -> bool:
    return sum(entry["collapsed"]) == 0


def chosen_config(records: Sequence[dict[str, Any]], method: str) -> tuple[tuple, tuple[int, ...]] | None:
    """The configuration chosen for ``method`` and the seeds its accuracy is compared on, or ``None``.

    :func:`rank_configs` on the tuning suite seed: accuracy compared on the ``lr`` stage's seeds (which every
    configuration has), eligibility judged on every run (a collapse at the ``confirm`` stage's seed counts).
    """
    lr_seeds = tuple(STAGES["lr"]["seeds"])
    tuning = [r for r in records if r["suite_seed"] == TUNING_SUITE_SEED]
    ranked = rank_configs(summarise(r for r in tuning if r["seed"] in lr_seeds), method, seeds=lr_seeds,
                          collapsed_in=summarise(tuning))
    return (ranked[0], lr_seeds) if ranked else None


def stage_configs(stage: str, records: list[dict[str, Any]]) -> list[tuple[str, dict[str, float]]]:
    """The ``(method, overrides)`` a stage runs: the grid, or picked from the ``lr`` stage's records."""
    kind = STAGES[stage]["configs"]
    if kind == "grid":
        size = len(GRID[METHODS[0]])  # methods interleaved: a partial stage covers every method alike
        return [(method, GRID[method][i]) for i in range(size) for method in METHODS]
    lr_seeds = tuple(STAGES["lr"]["seeds"])
    summary = summarise(r for r in records if r["suite_seed"] == TUNING_SUITE_SEED and r["seed"] in lr_seeds)
    out = []
    for method in METHODS:
        if kind == "top2":
            picked = rank_configs(summary, method, seeds=lr_seeds)[:2]
        else:
            chosen = chosen_config(records, method)
            picked = [chosen[0]] if chosen else []
        if not picked:
            raise SystemExit(f"stage {stage!r} needs the 'lr' stage's runs of {method} in the log first")
        for _, lr, router_lr in picked:
            out.append((method, {"lr": lr, **({"router_lr": router_lr} if router_lr is not None else {})}))
    return out


def format_summary(records: list[dict[str, Any]], markdown: bool = False) -> str:
    """The table: one line per suite seed x configuration, and the chosen configuration per method.

    Columns: validation accuracy mean ± sample std over training seeds, the accuracy of every seed, the
    number of collapsed tasks in every seed, and the routing recovery (similarity Spearman) mean ± std.
    """
    summary = summarise(records)
    head = ["suite seed", "configuration", "seeds", "val mean ± std", "per seed", "collapsed", "spearman"]
    rows = []
    for key, e in summary.items():
        sp = f"{e['spearman']['mean']:.3f} ± {e['spearman']['std']:.3f}" if "spearman" in e else "-"
        rows.append([str(key[0]), config_label(key[1:]), ",".join(map(str, e["seeds"])),
                     f"{e['val']['mean']:.3f} ± {e['val']['std']:.3f}", " ".join(f"{v:.3f}" for v in e["per_seed"]),
                     "/".join(map(str, e["collapsed"])), sp])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    else:
        widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [head] + rows]
    lines.append("")
    for method in METHODS:
        chosen = chosen_config(records, method)
        if chosen:
            cfg, seeds = chosen
            key = (TUNING_SUITE_SEED,) + cfg
            e = summary[key]
            sub = summarise(r for r in records if r["suite_seed"] == TUNING_SUITE_SEED and r["seed"] in seeds)[key]
            lines.append(f"chosen {method}: {config_label(cfg)}, val {sub['val']['mean']:.3f} ± {sub['val']['std']:.3f} "
                         f"over seeds {','.join(map(str, seeds))} ({e['val']['mean']:.3f} ± {e['val']['std']:.3f} "
                         f"over seeds {','.join(map(str, e['seeds']))})"
                         + ("" if eligible(e) else "; every configuration collapses somewhere"))
    return "\n".join(lines)


# --------------------------------------------------------------------------- running


_CACHE: dict[str, Any] = {}


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train and score one run (in a worker process); returns its log record."""
    from polytropon.app import experiment
    from polytropon.app.defaults import default_model_path

    if "base" not in _CACHE:
        _CACHE["base"] = experiment.BaseModel(default_model_path())
    base = _CACHE["base"]
    data_key = ("data", job["suite_seed"], job["validation_per_task"])
    if data_key not in _CACHE:
        n_train, n_eval, n_shots, n_heldout = SUITE_SIZES
        _CACHE[data_key] = experiment.load_suite_data(base.tokenizer, job["suite_seed"], n_train, n_eval, n_shots,
                                                      n_heldout, validation=job["validation_per_task"],
                                                      max_length=BUDGET["max_length"])
    recipe = experiment.Recipe.from_dict(job["recipe"])
    _, record = experiment.train_multitask(job["method"], recipe, _CACHE[data_key], base, job["seed"])
    rec = record.get("recovery")
    return json_ready({
        "stage": job["stage"], "method": job["method"], "seed": job["seed"], "suite_seed": job["suite_seed"],
        "validation_per_task": job["validation_per_task"], "recipe": recipe.to_dict(),
        "val": record["accuracy"], "per_task": record["per_task"], "collapsed": record["collapsed"],
        "recovery": None if rec is None else {k: rec[k] for k in ("spearman", "spearman_chance", "agreement",
                                                                   "agreement_chance")},
        "final_loss": record["losses"][-1] if record["losses"] else None,
        "trainable_parameters": record["trainable_parameters"],
        "train_seconds": round(record["train_seconds"], 1),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })


def plan(stage: str, records: list[dict[str, Any]], validation: int, prune: bool = False) -> list[dict[str, Any]]:
    """The jobs of ``stage`` not yet in ``records`` (seed-major: every configuration at one seed first).

    With ``prune``, a configuration that already collapsed in a logged run is not run on further seeds, as
    long as another configuration of its method has no collapsed run so far: the selection rule
    (:func:`rank_configs`) already excludes it, so more seeds of it cannot change the choice.
    """
    done = {run_key(r) for r in records}
    ineligible = _pruned(records) if prune else set()
    jobs = []
    spec = STAGES[stage]
    configs = stage_configs(stage, records)
    for suite_seed in spec["suite_seeds"]:
        for seed in spec["seeds"]:
            for method, overrides in configs:
                job = {"stage": stage, "method": method, "seed": seed, "suite_seed": suite_seed,
                       "validation_per_task": validation, "recipe": recipe_overrides(method, overrides)}
                full = {**job, "recipe": {"router_lr": 0.3, **job["recipe"]}}
                if run_key(full) not in done and (suite_seed,) + config_key(method, full["recipe"]) not in ineligible:
                    jobs.append(job)
    return jobs


def _pruned(records: list[dict[str, Any]]) -> set[tuple]:
    """``(suite_seed,) + configuration`` of the configurations :func:`plan` may stop running."""
    summary = summarise(records)
    clean = {(key[0], key[1]) for key, e in summary.items() if eligible(e)}
    return {key for key, e in summary.items() if not eligible(e) and (key[0], key[1]) in clean}


def run_jobs(jobs: list[dict[str, Any]], log: str, workers: int, prune: bool) -> None:
    """Run ``jobs`` on ``workers`` spawned processes (one torch thread each), at most ``workers`` at a time,
    appending every record to ``log`` as it arrives. With ``prune`` a job is checked against the log just
    before it starts, so a configuration that collapsed meanwhile is not run on further seeds."""
    ctx = multiprocessing.get_context("spawn")
    pending, running = list(jobs), []
    with ctx.Pool(workers, initializer=_init_worker, initargs=(1,)) as pool:
        while pending or running:
            while pending and len(running) < workers:
                job = pending.pop(0)
                key = (job["suite_seed"],) + config_key(job["method"], {"router_lr": 0.3, **job["recipe"]})
                if prune and key in _pruned(read_log(log)):
                    print(f"pruned: suite {job['suite_seed']} seed {job['seed']} {config_label(key[1:])}", flush=True)
                    continue
                running.append(pool.apply_async(run_one, (job,)))
            time.sleep(1.0)
            for result in [r for r in running if r.ready()]:
                running.remove(result)
                rec = result.get()
                with open(log, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(rec) + "\n")
                _print_run(rec)


def _print_run(rec: dict[str, Any]) -> None:
    key = config_key(rec["method"], rec["recipe"])
    sp = rec["recovery"]["spearman"] if rec.get("recovery") else None
    print(f"[{rec['stage']}] suite {rec['suite_seed']} seed {rec['seed']} {config_label(key):<34} "
          f"val {rec['val']['mean']:.3f} collapsed {len(rec['collapsed'])} {rec['collapsed'] or ''} "
          f"{rec['train_seconds']:.0f}s" + (f" spearman {sp:.3f}" if sp is not None else ""), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="per-method learning-rate search on a validation split")
    p.add_argument("--stage", choices=sorted(STAGES))
    p.add_argument("--summary", action="store_true", help="print mean ± std over seeds per configuration")
    p.add_argument("--log", default=LOG, help="the JSON-lines log (appended to; runs in it are skipped)")
    p.add_argument("--workers", type=int, default=1, help="runs in parallel processes (1 torch thread each)")
    p.add_argument("--validation", type=int, default=40, help="validation examples per task, from the training data")
    p.add_argument("--markdown", action="store_true", help="--summary as a Markdown table")
    p.add_argument("--prune", action="store_true",
                   help="skip further seeds of a configuration that collapsed (see plan())")
    p.add_argument("--dry-run", action="store_true", help="list the runs the stage would do, and stop")
    args = p.parse_args(argv)
    if args.workers < 1:
        raise SystemExit(f"--workers must be >= 1, got {args.workers}")
    if not args.stage and not args.summary:
        p.error("give --stage and/or --summary")
    if args.stage:
        jobs = plan(args.stage, read_log(args.log), args.validation, prune=args.prune)
        print(f"stage {args.stage}: {len(jobs)} runs to do", flush=True)
        for job in jobs if args.dry_run else []:
            print(f"  suite {job['suite_seed']} seed {job['seed']} "
                  f"{config_label(config_key(job['method'], {'router_lr': 0.3, **job['recipe']}))}")
        if jobs and not args.dry_run:
            os.makedirs(os.path.dirname(os.path.abspath(args.log)), exist_ok=True)
            os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned workers
            run_jobs(jobs, args.log, args.workers, args.prune)
    if args.summary:
        print(format_summary(read_log(args.log), markdown=args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
