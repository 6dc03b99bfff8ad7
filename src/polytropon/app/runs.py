"""The files of a run directory, and strict JSON writing.

A run directory (``--output-dir``) holds::

    run.json          the run record: arguments, tasks, labels, head, model, status
    adapter/          the saved adapter (PEFT's files) plus polytropon_tasks.json
    checkpoints/      adapter-only Trainer checkpoints, for --resume
    train_log.jsonl   the Trainer's log dicts (loss, learning rate, ...), one JSON object a line
    lora/, lora.log   the shared-LoRA baseline's own run directory and its output (with --lora-baseline)
    metrics.json      written when the run completes
    routing.png, plots/

A directory with ``run.json`` is a polytropon run; one whose record says ``"status": "complete"``
is finished and is never written again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any

from .console import CliError

__all__ = [
    "RUN_FILE",
    "RUN_FORMAT",
    "TASKS_FILE",
    "ADAPTER_SUBDIR",
    "CHECKPOINT_SUBDIR",
    "METRICS_FILE",
    "LOG_FILE",
    "LORA_SUBDIR",
    "check_output_dir",
    "read_run",
    "new_run_record",
    "mark_run_complete",
    "require_empty_dir",
    "write_json",
    "finite",
    "json_ready",
]

#: Where the run marker lives; a directory with this file is a polytropon run.
RUN_FILE = "run.json"
RUN_FORMAT = "polytropon-run"
#: Task names, labels and head of an adapter, saved next to ``adapter_config.json``.
TASKS_FILE = "polytropon_tasks.json"
ADAPTER_SUBDIR = "adapter"
CHECKPOINT_SUBDIR = "checkpoints"
METRICS_FILE = "metrics.json"
LOG_FILE = "train_log.jsonl"
LORA_SUBDIR = "lora"


def check_output_dir(path: str, resume: bool) -> dict[str, Any] | None:
    """Validate ``--output-dir``; returns the stored run record when resuming."""
    run_file = os.path.join(path, RUN_FILE)
    if os.path.exists(path) and not os.path.isdir(path):
        raise CliError(f"{path}: exists and is not a directory")
    if resume:
        if not os.path.isfile(run_file):
            raise CliError(f"{path}: no polytropon run to resume (no {RUN_FILE})")
        record = read_run(path)
        if record.get("status") == "complete":
            raise CliError(f"{path}: the run is already complete; choose another --output-dir")
        return record
    if os.path.isdir(path) and os.listdir(path):
        if os.path.isfile(run_file):
            raise CliError(f"{path}: holds a polytropon run; pass --resume to continue it or choose another --output-dir")
        raise CliError(f"{path}: exists, is not empty and is not a polytropon run; refusing to write there")
    return None


def read_run(path: str) -> dict[str, Any]:
    """The run record of the run directory ``path``."""
    try:
        with open(os.path.join(path, RUN_FILE), encoding="utf-8") as fh:
            record = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise CliError(f"{os.path.join(path, RUN_FILE)}: unreadable ({err})") from None
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT:
        raise CliError(f"{os.path.join(path, RUN_FILE)}: not a polytropon run record")
    return record


def new_run_record(
    args: argparse.Namespace, tasks: list[str], labels: list[str] | None, head: str, model: str
) -> dict[str, Any]:
    """The record of a run that starts training now; ``args`` are what ``--resume`` starts again from."""
    return {
        "format": RUN_FORMAT,
        "version": 1,
        "status": "training",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "tasks": tasks,
        "labels": labels,
        "head": head,
        "model": model,
    }


def mark_run_complete(path: str) -> None:
    """Set the run record's status to ``complete``: the directory will not be written again."""
    record = read_run(path)
    record["status"] = "complete"
    write_json(os.path.join(path, RUN_FILE), record)


def require_empty_dir(path: str, refusal: str) -> None:
    """Refuse (``path: exists and is not an empty directory; <refusal>``) unless ``path`` is new or empty."""
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise CliError(f"{path}: exists and is not an empty directory; {refusal}")


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented strict JSON (no NaN), atomically (a temporary file, then a rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, allow_nan=False)
        fh.write("\n")
    os.replace(tmp, path)


def finite(obj: Any) -> Any:
    """``obj`` with NaN/inf floats replaced by ``None`` (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def json_ready(obj: Any) -> Any:
    """``obj`` as plain JSON data: tensors and arrays become lists, other objects strings, NaN ``None``."""
    return finite(json.loads(json.dumps(obj, default=_plain)))


def _plain(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)
