"""A saved adapter directory: find it, read its files, load it onto its base model.

An adapter directory holds PEFT's ``adapter_config.json`` and ``adapter_model.safetensors`` and, when
``polytropon train`` wrote it, ``polytropon_tasks.json`` (task names, labels, head, max length, model).
Every verb that reads an adapter accepts either that directory or the run directory above it.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any

from .console import CliError, quiet_transformers
from .runs import ADAPTER_SUBDIR, TASKS_FILE, require_empty_dir

__all__ = [
    "resolve_adapter_dir",
    "read_tasks_file",
    "read_tasks_file_if_present",
    "read_adapter_config",
    "load_adapted",
    "task_id_of",
    "load_for_one_task",
    "check_labels",
    "load_for_all_tasks",
]


def resolve_adapter_dir(path: str) -> str:
    """``path`` itself if it holds ``adapter_config.json``, else its ``adapter/`` subdirectory if that does."""
    if not os.path.isdir(path):
        raise CliError(f"{path}: no such directory")
    for candidate in (path, os.path.join(path, ADAPTER_SUBDIR)):
        if os.path.isfile(os.path.join(candidate, "adapter_config.json")):
            return candidate
    raise CliError(f"{path}: no adapter here (no adapter_config.json in it or in {ADAPTER_SUBDIR}/)")


def read_tasks_file(adapter_dir: str) -> dict[str, Any]:
    """The adapter's ``polytropon_tasks.json``; its ``tasks`` list is required."""
    path = os.path.join(adapter_dir, TASKS_FILE)
    try:
        with open(path, encoding="utf-8") as fh:
            info = json.load(fh)
    except FileNotFoundError:
        raise CliError(f"{adapter_dir}: no {TASKS_FILE} (task names are needed to map tasks to router rows)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise CliError(f"{path}: unreadable ({err})") from None
    if not isinstance(info, dict) or not isinstance(info.get("tasks"), list):
        raise CliError(f"{path}: malformed")
    return info


def read_tasks_file_if_present(adapter_dir: str) -> dict[str, Any]:
    """:func:`read_tasks_file`, or ``{}`` when the adapter has no such file (one not written by the CLI)."""
    if os.path.isfile(os.path.join(adapter_dir, TASKS_FILE)):
        return read_tasks_file(adapter_dir)
    return {}


def read_adapter_config(adapter_dir: str) -> Any:
    """The adapter's :class:`~polytropon.PolyConfig`."""
    from ..config import PolyConfig

    try:
        return PolyConfig.from_pretrained(adapter_dir)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise CliError(f"{adapter_dir}: cannot read adapter_config.json ({err})") from None


def load_adapted(adapter_dir: str, info: dict[str, Any], config: Any, model_arg: str | None) -> tuple[Any, Any]:
    """``(PolyModel, tokenizer)`` of a saved adapter on its base model (``--model`` or the recorded one).

    The default model's public id (:data:`~polytropon.app.defaults.DEFAULT_MODEL_ID`) loads from the installed
    package, offline.
    """
    from .defaults import model_path

    quiet_transformers()
    model_ref = model_arg or info.get("model") or config.base_model_name_or_path
    if not model_ref:
        raise CliError(f"{adapter_dir}: no base model recorded; pass --model")
    model_ref = model_path(model_ref)
    from ..model import PolyModel
    from .training import load_base_model

    base, tokenizer = load_base_model(model_ref, info.get("head", "classification"), info.get("labels"), config.revision)
    try:
        model = PolyModel.from_pretrained(base, adapter_dir, is_trainable=False)
    except (OSError, ValueError, TypeError) as err:
        raise CliError(f"{adapter_dir}: adapter does not fit {model_ref} ({err})") from None
    return model, tokenizer


def task_id_of(text: str, tasks: Sequence[str]) -> int:
    """A ``--task`` value (a task name, or an id) as a task id."""
    if text in tasks:
        return list(tasks).index(text)
    try:
        task_id = int(text)
    except ValueError:
        raise CliError(f"unknown task {text!r}; tasks: {', '.join(tasks)}") from None
    if not 0 <= task_id < len(tasks):
        raise CliError(f"task id {task_id} is out of range: the adapter has {len(tasks)} tasks (0..{len(tasks) - 1})")
    return task_id


def load_for_one_task(args: argparse.Namespace) -> tuple[Any, Any, int]:
    """``(PolyModel, tokenizer, task id)`` for ``export-lora`` / ``merge``.

    ``adapter``, ``--task`` and ``--output`` are checked before any model is loaded.
    """
    adapter_dir = resolve_adapter_dir(args.adapter)
    config = read_adapter_config(adapter_dir)
    info = read_tasks_file_if_present(adapter_dir)
    tasks = info.get("tasks") or getattr(config, "task_names", None) or [str(i) for i in range(config.n_tasks)]
    task_id = task_id_of(args.task, tasks)
    require_empty_dir(args.output, "refusing to overwrite")
    model, tokenizer = load_adapted(adapter_dir, info, config, args.model)
    return model, tokenizer, task_id


def check_labels(rows: list, head: str, labels: list[str] | None) -> dict[str, int] | None:
    """``{label: class id}`` of the adapter (``None`` without labels); for a classifier, every target must be one."""
    label_to_id = {label: i for i, label in enumerate(labels)} if labels else None
    if head == "classification":
        for row in rows:
            if row.target not in label_to_id:
                raise CliError(f"{row.where}: target {row.target!r} is not a label of this adapter ({', '.join(labels)})")
    return label_to_id
def load_for_all_tasks(args: argparse.Namespace) -> tuple[Any, list[str]]:
    """``(PolyModel, task names)`` for ``export-lora --all-tasks``; ``adapter`` and ``--output`` checked first.

    The names are those of ``polytropon_tasks.json``, else ``PolyConfig.task_names``, else ``task_<id>``.
    """
    adapter_dir = resolve_adapter_dir(args.adapter)
    config = read_adapter_config(adapter_dir)
    info = read_tasks_file_if_present(adapter_dir)
    tasks = info.get("tasks") or getattr(config, "task_names", None) or [f"task_{i}" for i in range(config.n_tasks)]
    if len(tasks) != config.n_tasks:
        raise CliError(f"{adapter_dir}: {TASKS_FILE} names {len(tasks)} tasks, the adapter has {config.n_tasks}")
    require_empty_dir(args.output, "refusing to overwrite")
    model, _ = load_adapted(adapter_dir, info, config, args.model)
    return model, [str(t) for t in tasks]
