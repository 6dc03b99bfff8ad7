"""``polytropon eval`` of a saved run: the training run's own numbers, unknown tasks and labels, no overwrite."""

from __future__ import annotations

import json
import os

import pytest


def test_eval_on_saved_run(trained_run, tiny_data, capsys, tmp_path, assert_one_line_error, run_cli):
    _, evaluation = tiny_data
    out_json = str(tmp_path / "m.json")
    code, out, err = run_cli(capsys, "eval", trained_run, "--data", evaluation, "--json", out_json)
    assert code == 0, err
    assert "animal" in out and "color" in out and "accuracy" in out
    result = json.load(open(out_json))
    assert set(result["per_task"]) == {"animal", "color"}
    # the same numbers as the training run's own evaluation
    trained = json.load(open(os.path.join(trained_run, "metrics.json")))["poly"]["per_task"]
    for task in ("animal", "color"):
        assert result["per_task"][task]["accuracy"] == pytest.approx(trained[task]["accuracy"])
    # never overwrite
    code, _, err = run_cli(capsys, "eval", trained_run, "--data", evaluation, "--json", out_json)
    assert_one_line_error(code, err, "exists")


def test_unknown_task_in_eval_of_saved_adapter(trained_run, tmp_path, capsys, assert_one_line_error, run_cli, write_jsonl):
    evaluation = write_jsonl(str(tmp_path / "eval.jsonl"), [{"task": "weather", "input": "the red cat", "target": "no"}])
    code, _, err = run_cli(capsys, "eval", trained_run, "--data", evaluation)
    assert_one_line_error(code, err, "eval.jsonl:1:", "unknown task 'weather'")


def test_unknown_eval_target_label(trained_run, tmp_path, capsys, assert_one_line_error, run_cli, write_jsonl):
    evaluation = write_jsonl(str(tmp_path / "eval.jsonl"), [{"task": "animal", "input": "the red cat", "target": "maybe"}])
    code, _, err = run_cli(capsys, "eval", trained_run, "--data", evaluation)
    assert_one_line_error(code, err, "eval.jsonl:1:", "'maybe'")

