"""``polytropon suite``: a synthetic task suite written as JSONL that ``train`` accepts."""

from __future__ import annotations

import json
import os


def test_suite_command_writes_jsonl_that_train_accepts(tmp_path, capsys, assert_one_line_error, run_cli):
    from polytropon.app.data import load_jsonl

    out = tmp_path / "suite"
    code, stdout, err = run_cli(capsys, "suite", str(out), "--n-train-per-task", "4", "--n-eval-per-task", "2")
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["eval.jsonl", "heldout_eval.jsonl", "heldout_train.jsonl", "structure.json", "train.jsonl"]
    rows = load_jsonl(out / "train.jsonl")
    structure = json.load(open(out / "structure.json"))
    assert len(rows) == 4 * len(structure["tasks"])
    assert {r.task for r in rows} == set(structure["tasks"])
    assert len(structure["task_skill_matrix"]) == len(structure["tasks"])
    code, _, err = run_cli(capsys, "suite", str(out))
    assert_one_line_error(code, err, "not an empty directory")

