"""``polytropon merge``: the base model with one task folded into its weights, saved as a plain model."""

from __future__ import annotations

import argparse

from ..adapters import load_for_one_task
from ..arguments import add_one_task_arguments

__all__ = ["VERB", "HELP", "DESCRIPTION", "add_arguments", "run"]

VERB = "merge"
HELP = "save the base model with one task merged into its weights"
DESCRIPTION = "Save the base model with one task merged into its weights."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``merge``: ``adapter --task --output [--model]``."""
    add_one_task_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Check the inputs and load the adapter on its base model; merge the task, save model and tokenizer."""
    model, tokenizer, task_id = load_for_one_task(args)
    merged = model.merge_and_unload(task_id)
    merged.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    print(f"wrote {args.output}: {type(merged).__name__} with task {task_id} merged (load with from_pretrained)")
    return 0
