"""``polytropon export-lora``: one task, or every task, of a saved adapter as standard PEFT LoRA adapters."""

from __future__ import annotations

import argparse
import shlex

from ..adapters import load_for_all_tasks, load_for_one_task
from ..arguments import add_adapter_argument
from ..console import CliError

__all__ = ["VERB", "HELP", "DESCRIPTION", "add_arguments", "run"]

VERB = "export-lora"
HELP = "write one task (or every task) as a standard PEFT LoRA adapter"
DESCRIPTION = (
    "Write one task as a standard PEFT LoRA adapter; with --all-tasks, every task in its own folder plus "
    "lora_modules.json and lora_modules.txt (vLLM's --lora-modules name=path ...)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``export-lora``: ``adapter (--task T | --all-tasks) --output [--model]``."""
    add_adapter_argument(parser)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", help="the task: its name or its id")
    which.add_argument("--all-tasks", action="store_true", help="every task, one folder each, plus a manifest")
    parser.add_argument("--output", required=True, help="a new or empty directory")
    parser.add_argument("--model", help="base model (default: the one recorded in the adapter)")


def run(args: argparse.Namespace) -> int:
    """Check the inputs and load the adapter on its base model; write the task's (or every task's) LoRA adapter."""
    if not args.all_tasks:
        model, _, task_id = load_for_one_task(args)
        model.export_lora(args.output, task_id)
        print(f"wrote {args.output}: task {task_id} as a PEFT LoRA adapter (load with peft.PeftModel.from_pretrained)")
        return 0
    model, names = load_for_all_tasks(args)
    try:
        manifest = model.export_lora_all(args.output, names=names)
    except ValueError as err:
        raise CliError(str(err)) from None
    base = shlex.quote(manifest["base_model_name_or_path"] or "<base model>")
    print(f"wrote {args.output}: {len(manifest['adapters'])} tasks as PEFT LoRA adapters "
          f"({', '.join(e['name'] for e in manifest['adapters'])}); manifest lora_modules.json")
    rank, count = manifest["vllm_max_lora_rank"], len(manifest["adapters"])
    print(f"vllm serve {base} --enable-lora --max-lora-rank {rank} --max-loras {count} {manifest['lora_modules']}")
    return 0
