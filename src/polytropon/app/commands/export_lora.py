"""``polytropon export-lora``: one task of a saved adapter as a standard PEFT LoRA adapter."""

from __future__ import annotations

import argparse

from ..adapters import load_for_one_task
from ..arguments import add_one_task_arguments

__all__ = ["VERB", "HELP", "DESCRIPTION", "add_arguments", "run"]

VERB = "export-lora"
HELP = "write one task as a standard PEFT LoRA adapter"
DESCRIPTION = "Write one task as a standard PEFT LoRA adapter."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``export-lora``: ``adapter --task --output [--model]``."""
    add_one_task_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Check the inputs and load the adapter on its base model; write the task's LoRA adapter."""
    model, _, task_id = load_for_one_task(args)
    model.export_lora(args.output, task_id)
    print(f"wrote {args.output}: task {task_id} as a PEFT LoRA adapter (load with peft.PeftModel.from_pretrained)")
    return 0
