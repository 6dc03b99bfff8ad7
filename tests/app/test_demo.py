"""app.demo: ``polytropon train`` with no arguments measures the claims over seeds."""

from __future__ import annotations

import json
import os

import pytest

from polytropon.app.console import CliError
from polytropon.app.demo import parse_seeds


def test_parse_seeds():
    assert parse_seeds("0,1,2") == (0, 1, 2) and parse_seeds(" 7 ") == (7,)
    for bad in ("", "0,x", "1,1"):
        with pytest.raises(CliError, match="--seeds"):
            parse_seeds(bad)


@pytest.mark.parametrize("flags, named", [(["--lr", "0.1"], "--lr"), (["--n-splits", "2"], "--n-splits"),
                                          (["--no-baseline"], "--no-baseline"), (["--seeds", "1,1"], "--seeds")])
def test_single_run_flags_are_refused_before_anything_is_written(flags, named, tmp_path, capsys, assert_one_line_error,
                                                                 run_cli):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *flags, "--output-dir", str(out))
    assert_one_line_error(code, err, named)
    assert not out.exists()


def test_the_default_run_writes_claims_adapters_and_verdicts(tiny_bert, tmp_path, capsys, run_cli):
    from polytropon import PolyModel
    from polytropon.app.defaults import CLAIMS_RUN
    from polytropon.app.training import load_base_model

    routed = CLAIMS_RUN["routed"]
    out = tmp_path / "run"
    code, stdout, _ = run_cli(capsys, "train", "--model", tiny_bert, "--seeds", "3,4", "--max-steps", "2",
                              "--few-shot-steps", "1", "--workers", "1", "--suite-seed", "1", "--output-dir", str(out))
    assert code == 0
    assert "Per-task accuracy on the eval split of the training tasks (mean over seeds 3, 4; head-only: seed 3)" in stdout
    claims = [line for line in stdout.splitlines() if line.startswith("  ")]
    assert [c.split(":")[0].strip() for c in claims] == ["multi-task accuracy", "few-shot transfer (16 shots per held-out task)",
                                                         "routing recovers the task structure"]
    assert all(" -> holds" in c or " -> does not hold at this budget" in c for c in claims)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kind"] == "claims" and metrics["seeds"] == [3, 4] and metrics["routed"] == routed
    assert metrics["suite_seed"] == 1 and "built-in suite (seed 1)" in stdout
    assert [c["claim"] for c in metrics["claims"]] == ["multi-task", "few-shot", "recovery"]
    assert len(metrics["claims"][0]["ours"]) == len(metrics["claims"][0]["lora"]) == 2
    methods = sorted((r["method"], r["seed"]) for r in metrics["runs"]["multitask"])
    assert methods == [("head-only", 3), ("lora-params", 3), ("lora-params", 4), (routed, 3), (routed, 4)]
    assert sorted(os.listdir(out / "seeds")) == ["lora-seed3", "lora-seed4", f"{routed}-seed3", f"{routed}-seed4"]
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert (out / "routing.png").stat().st_size > 0
    # the published adapter is the routed method's at the first seed, and loads with its task names
    base, _ = load_base_model(tiny_bert, "classification", ["no", "yes"])
    model = PolyModel.from_pretrained(base, str(out / "adapter"))
    config = model.peft_config[model.active_adapter]
    assert config.n_splits == (4 if routed == "mhr" else 1) and config.task_names == metrics["runs"]["tasks"]
    assert json.loads((out / "adapter" / "polytropon_tasks.json").read_text())["tasks"] == config.task_names
    # the run is a source for few-shot adaptation like a single run
    code, _, err = run_cli(capsys, "adapt", str(out), "--shots", "4", "--max-steps", "1", "--output-dir",
                           str(tmp_path / "adapted"), "--quiet")
    assert code == 0, err
    assert json.loads((tmp_path / "adapted" / "metrics.json").read_text())


def test_a_single_seed_runs_the_single_flow(tiny_bert, tmp_path, capsys, run_cli):
    out = tmp_path / "single"
    code, stdout, _ = run_cli(capsys, "train", "--model", tiny_bert, "--seed", "1", "--max-steps", "2", "--no-baseline",
                              "--quiet", "--output-dir", str(out))
    assert code == 0 and "Claims" not in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert "kind" not in metrics and metrics["train"]["global_steps"] == 2
