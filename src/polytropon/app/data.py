"""Multi-task data: loading and validation, tokenization, and batching with ``task_ids``.

Every example is a row with three text fields, a task name, an input and a target::

    {"task": "sentiment", "input": "The film was great.", "target": "yes"}

:func:`load_rows` reads them from local CSV, JSON, JSONL or Parquet files (through 🤗 ``datasets``; JSONL
with line-precise errors), with other column names if the file has them (:class:`Columns`);
:func:`rows_from_dataset` takes a ``datasets.Dataset`` (or any iterable of dicts) already in memory.

:class:`PolyDataCollator` (the library's, :mod:`polytropon.toolkit.training`, importable from here too) pads a
batch and adds a ``task_ids`` ``LongTensor`` next to ``input_ids``/``attention_mask``/``labels``; see
``docs/training.md`` for training with the Hugging Face ``Trainer`` and TRL.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch.utils.data import Dataset

__all__ = [
    "HeadType",
    "HEAD_TYPES",
    "DataError",
    "Row",
    "Columns",
    "DATA_FORMATS",
    "load_rows",
    "load_jsonl",
    "rows_from_dataset",
    "write_jsonl",
    "task_names_of",
    "check_tasks",
    "encode_rows",
    "PolyDataset",
    "PolyDataCollator",
    "rows_from_dicts",
    "split_rows",
]

HeadType = Literal["classification", "causal-lm", "seq2seq"]
HEAD_TYPES: tuple[str, ...] = ("classification", "causal-lm", "seq2seq")

REQUIRED_KEYS: tuple[str, ...] = ("task", "input", "target")

#: file ending -> the ``datasets`` builder that reads it
DATA_FORMATS: dict[str, str] = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class Columns:
    """Which column of a data file holds each field of a row."""

    task: str = "task"
    input: str = "input"
    target: str = "target"

    def names(self) -> tuple[str, str, str]:
        """The column names of the task, the input and the target."""
        return self.task, self.input, self.target


class DataError(ValueError):
    """Invalid user data; the message names the file and, where it applies, the line."""


@dataclass(frozen=True)
class Row:
    """One example, with where it came from (for error messages)."""

    task: str
    input: str
    target: str
    source: str = "<memory>"
    line: int = 0

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}" if self.line else self.source


def _row_from_obj(obj: Any, source: str, line: int, columns: Columns = Columns(), typed: bool = False) -> Row:
    where = f"{source}:{line}" if line else source
    names = columns.names()
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with keys {', '.join(names)}")
    missing = [c for c in names if c not in obj]
    if missing:
        raise DataError(f"{where}: missing key(s) {', '.join(missing)}")
    values = {}
    for key, column in zip(REQUIRED_KEYS, names):
        value = obj[column]
        if isinstance(value, (bool, int)) and typed:  # CSV / Parquet columns of numbers: "1" was meant
            value = str(value).lower() if isinstance(value, bool) else str(value)
        if not isinstance(value, str):
            raise DataError(f"{where}: {column!r} must be a string, got {type(value).__name__} ({value!r})")
        values[key] = value
    if not values["task"]:
        raise DataError(f"{where}: {columns.task!r} is empty")
    return Row(values["task"], values["input"], values["target"], source, line)


def load_jsonl(path: str | os.PathLike[str], columns: Columns = Columns()) -> list[Row]:
    """Read and validate a JSONL file of ``{"task", "input", "target"}`` objects.

    Blank lines are skipped; extra keys are ignored. Raises :class:`DataError` naming
    the file and 1-based line number on the first problem, or if the file is missing,
    unreadable, or holds no example.
    """
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise DataError(f"{source}: no such file")
    rows: list[Row] = []
    try:
        with open(source, encoding="utf-8") as fh:
            for lineno, text in enumerate(fh, start=1):
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as err:
                    raise DataError(f"{source}:{lineno}: not valid JSON ({err.msg})") from None
                rows.append(_row_from_obj(obj, source, lineno, columns))
    except UnicodeDecodeError:
        raise DataError(f"{source}: not UTF-8 text") from None
    except OSError as err:
        raise DataError(f"{source}: cannot read ({err.strerror})") from None
    if not rows:
        raise DataError(f"{source}: no examples")
    return rows


def rows_from_dicts(items: Iterable[dict[str, Any]], source: str = "<memory>") -> list[Row]:
    """Validate in-memory ``{"task", "input", "target"}`` dicts (e.g. from :mod:`polytropon.app.suite`)."""
    return [_row_from_obj(obj, source, 0) for obj in items]


def load_rows(path: str | os.PathLike[str], columns: Columns = Columns()) -> list[Row]:
    """Read and validate a local CSV, JSON, JSONL or Parquet file of rows (format from the file ending).

    JSONL is read line by line (errors name the line); the other formats through ``datasets``
    (``load_dataset("csv" | "json" | "parquet", data_files=path)``), offline. Numbers in typed columns
    (a CSV target ``1``) are taken as their text.

    Raises:
        DataError: missing file, unknown ending (naming the known ones), unreadable file, a missing column
            (naming the file's columns), a bad value (naming the row), or no example.
    """
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise DataError(f"{source}: no such file")
    ending = os.path.splitext(source)[1].lower()
    if ending not in DATA_FORMATS:
        raise DataError(f"{source}: unknown data format {ending or '(no ending)'!r}; expected one of {', '.join(DATA_FORMATS)}")
    if ending == ".jsonl":
        return load_jsonl(source, columns)
    return rows_from_dataset(_read_dataset(source, DATA_FORMATS[ending]), columns, source)


def _read_dataset(source: str, builder: str) -> Any:
    try:
        import datasets
    except ImportError:  # pragma: no cover - installed with the train and test extras
        raise DataError(f"{source}: reading {builder} files needs the 'datasets' package (pip install datasets)") from None
    try:
        return datasets.load_dataset(builder, data_files=source, split="train")
    except Exception as err:  # datasets raises many types for a malformed file
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{source}: cannot read as {builder} ({message})") from None


def rows_from_dataset(dataset: Any, columns: Columns = Columns(), source: str = "<dataset>") -> list[Row]:
    """Validate the rows of a ``datasets.Dataset`` (or any iterable of dicts), one per example.

    Raises:
        DataError: a missing column (naming the available ones), a bad value (naming the row), or no example.
    """
    available = getattr(dataset, "column_names", None)
    if available is not None:
        missing = [c for c in columns.names() if c not in available]
        if missing:
            raise DataError(f"{source}: missing column(s) {', '.join(missing)}; the data has columns {', '.join(available)}")
    rows = [_row_from_obj(obj, source, index + 1, columns, typed=True) for index, obj in enumerate(dataset)]
    if not rows:
        raise DataError(f"{source}: no examples")
    return rows


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[Row | dict[str, Any]]) -> None:
    """Write rows as JSONL (the format :func:`load_jsonl` reads)."""
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            obj = row if isinstance(row, dict) else {"task": row.task, "input": row.input, "target": row.target}
            fh.write(json.dumps(obj, ensure_ascii=False) + "\n")


def task_names_of(rows: Sequence[Row]) -> list[str]:
    """Task names in order of first appearance."""
    return list(dict.fromkeys(r.task for r in rows))


def check_tasks(rows: Sequence[Row], task_names: Sequence[str]) -> None:
    """Raise :class:`DataError` if a row's task is not one of ``task_names``."""
    known = set(task_names)
    for row in rows:
        if row.task not in known:
            raise DataError(f"{row.where}: unknown task {row.task!r} (the adapter knows {len(known)} tasks)")


def encode_rows(
    rows: Sequence[Row],
    tokenizer: Any,
    head: HeadType,
    task_to_id: dict[str, int],
    label_to_id: dict[str, int] | None = None,
    max_length: int = 128,
) -> list[dict[str, Any]]:
    """Tokenize rows into features for :class:`PolyDataCollator`.

    * ``classification``: ``labels`` is the class index of ``target`` in ``label_to_id``.
    * ``causal-lm``: the sequence is ``input`` followed by `` target`` and EOS; ``labels``
      masks the prompt with ``-100`` so the loss covers only the answer.
    * ``seq2seq``: ``input`` is encoded, ``target`` becomes ``labels``.
    """
    check_tasks(rows, list(task_to_id))
    features: list[dict[str, Any]] = []
    if head == "classification":
        if label_to_id is None:
            raise ValueError("classification needs label_to_id")
        for row in rows:
            if row.target not in label_to_id:
                raise DataError(f"{row.where}: unknown target {row.target!r} (labels: {', '.join(label_to_id)})")
        enc = tokenizer([r.input for r in rows], truncation=True, max_length=max_length)
        for i, row in enumerate(rows):
            features.append(
                {
                    "input_ids": enc["input_ids"][i],
                    "attention_mask": enc["attention_mask"][i],
                    "labels": label_to_id[row.target],
                    "task_ids": task_to_id[row.task],
                }
            )
    elif head == "causal-lm":
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        prompts = tokenizer([r.input for r in rows])["input_ids"]
        answers = tokenizer([" " + r.target for r in rows], add_special_tokens=False)["input_ids"]
        for row, prompt, answer in zip(rows, prompts, answers):
            answer = (answer + eos)[:max_length]
            prompt = prompt[-(max_length - len(answer)) :] if max_length > len(answer) else []
            ids = prompt + answer
            features.append(
                {
                    "input_ids": ids,
                    "attention_mask": [1] * len(ids),
                    "labels": [-100] * len(prompt) + answer,
                    "task_ids": task_to_id[row.task],
                }
            )
    elif head == "seq2seq":
        enc = tokenizer([r.input for r in rows], truncation=True, max_length=max_length)
        tgt = tokenizer(text_target=[r.target for r in rows], truncation=True, max_length=max_length)
        for i, row in enumerate(rows):
            features.append(
                {
                    "input_ids": enc["input_ids"][i],
                    "attention_mask": enc["attention_mask"][i],
                    "labels": tgt["input_ids"][i],
                    "task_ids": task_to_id[row.task],
                }
            )
    else:
        raise ValueError(f"unknown head {head!r}; expected one of {HEAD_TYPES}")
    return features


class PolyDataset(Dataset):
    """A list of tokenized features (see :func:`encode_rows`) as a map-style dataset."""

    def __init__(self, features: Sequence[dict[str, Any]]):
        self.features = list(features)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.features[index]


from ..toolkit.training import PolyDataCollator  # noqa: E402  (the library's collator, under its old path)


def split_rows(rows: Sequence[Row], fraction: float, seed: int = 0) -> tuple[list[Row], list[Row]]:
    """Hold out about ``fraction`` of every task's rows (at least one when a task has two or more).

    Returns ``(train, held_out)``; deterministic for ``seed``.
    """
    import random

    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    by_task: dict[str, list[Row]] = {}
    for row in rows:
        by_task.setdefault(row.task, []).append(row)
    rng = random.Random(seed)
    train: list[Row] = []
    held: list[Row] = []
    for task_rows in by_task.values():
        shuffled = list(task_rows)
        rng.shuffle(shuffled)
        k = max(1, round(fraction * len(shuffled))) if len(shuffled) >= 2 else 0
        held.extend(shuffled[:k])
        train.extend(shuffled[k:])
    return train, held
