"""``polytropon eval``: per-task metrics of a saved adapter on a data file (CSV, JSON, JSONL or Parquet)."""

from __future__ import annotations

import argparse
import os

from ..adapters import check_labels, load_adapted, read_adapter_config, read_tasks_file, resolve_adapter_dir
from ..arguments import DATA_HELP, add_adapter_argument, add_column_arguments, positive_int, read_data
from ..console import CliError
from ..report import format_table, means
from ..runs import finite, write_json

__all__ = ["VERB", "HELP", "DESCRIPTION", "add_arguments", "run"]

VERB = "eval"
HELP = "per-task metrics of a saved adapter on a data file"
DESCRIPTION = "Per-task accuracy (classification) or exact match and loss (LMs) of a saved adapter."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``eval``: an adapter, ``--data`` and a few evaluation knobs."""
    add_adapter_argument(parser)
    parser.add_argument("--data", required=True, help=DATA_HELP)
    add_column_arguments(parser)
    parser.add_argument("--model", help="base model (default: the one recorded in the adapter)")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--max-length", type=positive_int, help="default: the training value")
    parser.add_argument("--json", dest="json_out", help="also write the metrics to this JSON file (must not exist)")


def run(args: argparse.Namespace) -> int:
    """Check the adapter, the rows and ``--json`` before loading the model; evaluate; print; write the JSON."""
    from ..data import check_tasks, task_names_of

    adapter_dir = resolve_adapter_dir(args.adapter)
    info = read_tasks_file(adapter_dir)
    config = read_adapter_config(adapter_dir)
    rows = read_data(args.data, args)
    tasks: list[str] = info["tasks"]
    unknown = [t for t in task_names_of(rows) if t not in tasks] if config.unknown_task == "average" else []
    check_tasks(rows, tasks + unknown)  # with unknown_task="average", new tasks route to the average of the skills
    head = info.get("head", "classification")
    label_to_id = check_labels(rows, head, info.get("labels"))
    if args.json_out and os.path.exists(args.json_out):
        raise CliError(f"{args.json_out}: exists; refusing to overwrite")
    from ..training import evaluate_per_task

    model, tokenizer = load_adapted(adapter_dir, info, config, args.model)
    max_length = args.max_length or int(info.get("max_length", 128))
    from ...routing import UNKNOWN_TASK

    task_to_id = {t: i for i, t in enumerate(tasks)} | {t: UNKNOWN_TASK for t in unknown}
    metrics = evaluate_per_task(model, tokenizer, rows, head, task_to_id, label_to_id, max_length, args.batch_size)

    present = [t for t in tasks + unknown if t in metrics]
    shown = ["accuracy"] if head == "classification" else ["exact_match", "loss"]
    for metric in shown:
        print(format_table(present, [(metric, metrics)], metric))
    if args.json_out:
        summary = {"adapter": adapter_dir, "data": args.data, "per_task": metrics, "mean": means(metrics)}
        write_json(args.json_out, finite(summary))
    return 0

