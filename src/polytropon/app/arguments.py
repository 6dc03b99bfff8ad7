"""Argument types and argument groups that several verbs share."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

__all__ = [
    "positive_int",
    "positive_float",
    "non_negative_float",
    "add_adapter_argument",
    "add_one_task_arguments",
    "DATA_HELP",
    "add_column_arguments",
    "read_data",
    "read_train_and_eval",
]

#: What ``--data`` / ``--eval-data`` accept.
DATA_HELP = "a local CSV, JSON, JSONL or Parquet file of task, input and target columns"


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    value = _convert(text, int, "an integer")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _convert(text, float, "a number")
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (a learning rate of 0 freezes a parameter group)."""
    value = _convert(text, float, "a number")
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text}")
    return value


def _convert(text: str, kind: Callable[[str], Any], noun: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None


def add_adapter_argument(parser: argparse.ArgumentParser) -> None:
    """The positional ``adapter`` of the verbs that read a saved adapter."""
    parser.add_argument("adapter", help="a run directory or an adapter directory")


def add_one_task_arguments(parser: argparse.ArgumentParser) -> None:
    """``adapter --task --output [--model]``: the verbs that turn one task of an adapter into files."""
    add_adapter_argument(parser)
    parser.add_argument("--task", required=True, help="the task: its name or its id")
    parser.add_argument("--output", required=True, help="a new or empty directory")
    parser.add_argument("--model", help="base model (default: the one recorded in the adapter)")


def add_column_arguments(parser: Any) -> None:
    """``--task-column``, ``--input-column``, ``--target-column``: the data files' column names."""
    parser.add_argument("--task-column", default="task", metavar="NAME", help="column of the task name (default: task)")
    parser.add_argument("--input-column", default="input", metavar="NAME", help="column of the input text (default: input)")
    parser.add_argument("--target-column", default="target", metavar="NAME", help="column of the target (default: target)")


def read_data(path: str, args: argparse.Namespace) -> list:
    """The rows of a data file (:func:`polytropon.app.data.load_rows`) with the column flags of ``args``."""
    from .data import Columns, load_rows

    columns = Columns(
        task=getattr(args, "task_column", "task"),
        input=getattr(args, "input_column", "input"),
        target=getattr(args, "target_column", "target"),
    )
    return load_rows(path, columns)


def read_train_and_eval(args: argparse.Namespace) -> tuple[list, list, list[str]]:
    """``(train rows, eval rows, task names)`` from ``--data`` with ``--eval-data`` or ``--eval-fraction`` of it.

    Every eval row's task must be a task of the training rows.
    """
    from .console import CliError
    from .data import check_tasks, split_rows, task_names_of

    train = read_data(args.data, args)
    if args.eval_data is not None:
        evaluation = read_data(args.eval_data, args)
    else:
        if not 0 < args.eval_fraction < 1:
            raise CliError(f"--eval-fraction must be in (0, 1), got {args.eval_fraction}")
        train, evaluation = split_rows(train, args.eval_fraction, args.seed)
    tasks = task_names_of(train)
    check_tasks(evaluation, tasks)
    return train, evaluation, tasks
