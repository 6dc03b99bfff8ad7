"""Rows from CSV, JSON, JSONL and Parquet files and from a datasets.Dataset: same rows, clear errors."""

import json

import pytest

from polytropon.app.data import Columns, DataError, Row, load_rows, rows_from_dataset

RECORDS = [
    {"task": "sentiment", "input": "The film was great.", "target": "yes"},
    {"task": "topic", "input": "Stocks fell, again", "target": "finance"},
    {"task": "sentiment", "input": "Dull, \"long\" and slow.", "target": "no"},
]


def _expected(source_rows=RECORDS):
    return [(r["task"], r["input"], r["target"]) for r in source_rows]


def _as_tuples(rows: list[Row]):
    return [(r.task, r.input, r.target) for r in rows]


def _write(path, fmt, records):
    import datasets

    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(records), encoding="utf-8")
    elif fmt == "csv":
        datasets.Dataset.from_list(records).to_csv(str(path), index=False)
    else:
        datasets.Dataset.from_list(records).to_parquet(str(path))
    return path


@pytest.mark.parametrize("fmt", ["csv", "json", "jsonl", "parquet"])
def test_every_format_gives_the_same_rows(tmp_path, fmt):
    path = _write(tmp_path / f"data.{fmt}", fmt, RECORDS)
    assert _as_tuples(load_rows(path)) == _expected()


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_other_column_names(tmp_path, fmt):
    renamed = [{"dataset": r["task"], "text": r["input"], "label": r["target"], "extra": 1} for r in RECORDS]
    path = _write(tmp_path / f"data.{fmt}", fmt, renamed)
    rows = load_rows(path, Columns(task="dataset", input="text", target="label"))
    assert _as_tuples(rows) == _expected()
    with pytest.raises(DataError, match=r"missing (column|key)\(s\) task"):
        load_rows(path)


def test_missing_column_names_the_available_ones(tmp_path):
    path = _write(tmp_path / "data.csv", "csv", [{"task": "a", "text": "x", "target": "y"}])
    with pytest.raises(DataError, match=r"data\.csv: missing column\(s\) input; the data has columns task, text, target"):
        load_rows(path)


def test_numbers_in_typed_columns_are_text(tmp_path):
    path = _write(tmp_path / "data.csv", "csv", [{"task": "parity", "input": "3", "target": 1}])
    assert _as_tuples(load_rows(path)) == [("parity", "3", "1")]


def test_a_dataset_in_memory():
    import datasets

    assert _as_tuples(rows_from_dataset(datasets.Dataset.from_list(RECORDS))) == _expected()
    assert _as_tuples(rows_from_dataset(iter(RECORDS))) == _expected()  # any iterable of dicts
    with pytest.raises(DataError, match="no examples"):
        rows_from_dataset(datasets.Dataset.from_dict({"task": [], "input": [], "target": []}))


@pytest.mark.parametrize(
    "name,content,pattern",
    [
        ("data.txt", "x", r"unknown data format '\.txt'; expected one of \.csv, \.json, \.jsonl, \.parquet"),
        ("data.parquet", "not parquet", r"data\.parquet: cannot read as parquet"),
        ("data.json", '[{"task": "a", "input": null, "target": "b"}]', r"'input' must be a string, got NoneType"),
        ("data.jsonl", '{"task": "a", "input": "x"}\n', r"data\.jsonl:1: missing key\(s\) target"),
    ],
)
def test_bad_files_are_named(tmp_path, name, content, pattern):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=pattern):
        load_rows(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_rows(tmp_path / "nope.csv")
