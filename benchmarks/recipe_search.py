"""The documented search behind the default recipe (benchmarks/claims.py: DEFAULT_RECIPE).

Every configuration is trained on the built-in suite's training data minus a validation split carved from
it (the last ``--validation`` training examples of every task, 40 of 400 by default) and scored on that
validation split; the suite's eval split is never read. Poly and the shared-LoRA baseline of equal
trainable parameters (``lora-params``) get the same number of configurations and seeds. Every run appends
one JSON line to ``benchmarks/recipe_search.jsonl`` (runs already in the log are skipped, so the search
resumes where it stopped).

    python benchmarks/recipe_search.py --stage 1
    python benchmarks/recipe_search.py --stage 2

Stages and their configurations are listed in STAGES below; docs/RESULTS.md explains the choices.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import claims  # noqa: E402

LOG = os.path.join(HERE, "recipe_search.jsonl")
ALL = claims.ALL_TARGETS

# Each stage: (name, method, recipe overrides). Stage 1 varies one knob at a time from the previous default
# (reduced budget: 200 steps); the same number of configurations for Poly and for the LoRA baseline.
STAGES: dict[str, list[tuple[str, str, dict]]] = {
    "1": [
        ("P0 old default", "poly", {}),
        ("P1 +one router for the model", "poly", {"router_granularity": "model"}),
        ("P2 +all linear layers", "poly", {"router_granularity": "model", "target_modules": ALL}),
        # P2 diverged at lr 1e-2 (val below chance); P3.. go back to one router per module and lower the lr
        ("P3 all linear, lr 3e-3", "poly", {"target_modules": ALL, "lr": 3e-3}),
        ("P4 P3 +trained pooler", "poly", {"target_modules": ALL, "lr": 3e-3, "train_pooler": True}),
        ("L0 old default", "lora-params", {}),
        ("L1 all linear, lr 3e-3", "lora-params", {"target_modules": ALL, "lr": 3e-3}),
        ("L2 L1 +trained pooler", "lora-params", {"target_modules": ALL, "lr": 3e-3, "train_pooler": True}),
        # (all linear layers at lr 1e-2 was not run for LoRA: it diverged for Poly (P2), and time was short)
        ("L4 qv, lr 3e-2", "lora-params", {"lr": 3e-2}),
        ("L5 qv, lr 3e-3", "lora-params", {"lr": 3e-3}),
    ],
}
STAGE_STEPS = {"1": 200}


def already_done() -> set[tuple[str, str, int, int]]:
    done = set()
    if os.path.isfile(LOG):
        with open(LOG, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    rec = json.loads(line)
                    done.add((rec["stage"], rec["name"], rec["seed"], rec["recipe"]["steps"]))
    return done


def main() -> int:
    p = argparse.ArgumentParser(description="recipe search on a validation split")
    p.add_argument("--stage", required=True, choices=sorted(STAGES))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--validation", type=int, default=40, help="validation examples per task, from the training data")
    p.add_argument("--suite-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--names", help="comma-separated prefixes: run only these configurations")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    base = claims.Base(claims.default_model_path())
    data = claims.load_data(base.tokenizer, args.suite_seed, 400, 40, 16, 50, validation=args.validation)
    done = already_done()
    wanted = [n.strip() for n in args.names.split(",")] if args.names else None
    for seed in seeds:
        for name, method, overrides in STAGES[args.stage]:
            if wanted and not any(name.startswith(w) for w in wanted):
                continue
            recipe = dataclasses.replace(claims.DEFAULT_RECIPE, **{"steps": STAGE_STEPS[args.stage], **overrides})
            if (args.stage, name, seed, recipe.steps) in done:
                continue
            _, record = claims.train_multitask(method, recipe, data, base, seed)
            line = {
                "stage": args.stage, "name": name, "method": method, "seed": seed, "suite_seed": args.suite_seed,
                "validation_per_task": args.validation, "recipe": dataclasses.asdict(recipe),
                "val": record["accuracy"], "trainable_parameters": record["trainable_parameters"],
                "train_seconds": round(record["train_seconds"], 1),
                "recovery": {k: record["recovery"][k] for k in ("spearman", "agreement")} | {
                    "shuffled_spearman": record["recovery"]["shuffled"]["spearman"]} if "recovery" in record else None,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            with open(LOG, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(claims._json_safe(line)) + "\n")
            rec = line["recovery"]
            print(f"[{args.stage}] seed {seed} {name:<32} val {record['accuracy']['mean']:.3f} "
                  f"(single {record['accuracy']['single']:.3f} and {record['accuracy']['and']:.3f} xor "
                  f"{record['accuracy']['xor']:.3f}) {record['train_seconds']:.0f}s"
                  + (f" spearman {rec['spearman']:.3f} agreement {rec['agreement']:.3f}" if rec else ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
