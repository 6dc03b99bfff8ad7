"""``polytropon suite``: write the built-in suite as JSONL files plus its task x skill structure."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..arguments import positive_int
from ..defaults import DEFAULT_RUN
from ..runs import require_empty_dir, write_json

__all__ = ["VERB", "HELP", "DESCRIPTION", "add_arguments", "run", "SPLITS"]

VERB = "suite"
HELP = "write the built-in task suite as JSONL files"
DESCRIPTION = "Write the built-in suite's splits as JSONL plus its task x skill matrix."
#: The files written, one JSONL per split.
SPLITS = ("train", "eval", "heldout_train", "heldout_eval")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``suite``: an output directory, the seed and the split sizes."""
    parser.add_argument("output_dir", help="a new or empty directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train-per-task", type=positive_int, default=DEFAULT_RUN["n_train_per_task"])
    parser.add_argument("--n-eval-per-task", type=positive_int, default=DEFAULT_RUN["n_eval_per_task"])
    parser.add_argument("--n-heldout-shots", type=positive_int, default=16, help="training examples per held-out task")


def run(args: argparse.Namespace) -> int:
    """Check the directory, build the suite, write one JSONL per split and ``structure.json``."""
    from ..data import write_jsonl
    from ..suite import build_suite

    out = args.output_dir
    require_empty_dir(out, "refusing to write there")
    suite = build_suite(
        seed=args.seed,
        n_train_per_task=args.n_train_per_task,
        n_eval_per_task=args.n_eval_per_task,
        n_heldout_shots=args.n_heldout_shots,
        n_heldout_eval_per_task=args.n_eval_per_task,
    )
    os.makedirs(out, exist_ok=True)
    for split in SPLITS:
        write_jsonl(os.path.join(out, f"{split}.jsonl"), suite.rows(split))
    write_json(os.path.join(out, "structure.json"), structure_of(suite, args.seed))
    counts = ", ".join(f"{split} {len(suite.rows(split))}" for split in suite.splits)
    print(f"wrote {out}: {counts} examples; structure.json")
    return 0


def structure_of(suite: Any, seed: int) -> dict[str, Any]:
    """``structure.json``: the seed, skills, tasks, both task x skill matrices and the task descriptions."""
    return {
        "seed": seed,
        "skills": list(suite.skills),
        "tasks": suite.task_names,
        "heldout_tasks": suite.heldout_task_names,
        "task_skill_matrix": suite.skill_matrix().tolist(),
        "heldout_task_skill_matrix": suite.skill_matrix(heldout=True).tolist(),
        "descriptions": {t.name: t.description for t in suite.tasks + suite.heldout_tasks},
    }
