"""``polytropon train`` on a tiny offline BERT (and GPT-2, T5): training outputs, resume, the inferred head, bad input."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.helpers import FAST_TRAIN


def test_train_writes_adapter_metrics_plot(trained_run):
    files = set(os.listdir(trained_run))
    assert {"adapter", "metrics.json", "routing.png", "plots", "run.json", "checkpoints"} <= files
    assert {"adapter_config.json", "adapter_model.safetensors", "polytropon_tasks.json"} <= set(os.listdir(os.path.join(trained_run, "adapter")))
    metrics = json.load(open(os.path.join(trained_run, "metrics.json")))
    assert metrics["tasks"] == ["animal", "color"]
    assert set(metrics["poly"]["per_task"]) == {"animal", "color"}
    assert metrics["baseline"]["name"] == "head-only"
    assert metrics["train"]["global_steps"] == 12
    assert 0.0 <= metrics["poly"]["mean"]["accuracy"] <= 1.0
    assert json.load(open(os.path.join(trained_run, "run.json")))["status"] == "complete"
    with open(os.path.join(trained_run, "routing.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    config = json.load(open(os.path.join(trained_run, "adapter", "adapter_config.json")))
    assert config["n_tasks"] == 2 and config["n_skills"] == 2 and config["r"] == 4 and config["task_type"] == "SEQ_CLS"


def test_adapter_reloads_with_identical_predictions(trained_run, tiny_bert):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from polytropon import PolyModel

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    batch = tok(["the big red cat runs", "the small blue dog sleeps"], return_tensors="pt", padding=True)
    outs = []
    for _ in range(2):
        base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
        model = PolyModel.from_pretrained(base, os.path.join(trained_run, "adapter"))
        with torch.no_grad():
            outs.append(model(**batch, task_ids=[0, 1]).logits)
    assert torch.allclose(outs[0], outs[1])


def test_resume_continues_from_last_checkpoint(trained_run, tmp_path, capsys, assert_one_line_error, run_cli):
    # Recreate what an interrupted run leaves on disk: checkpoint 6 only, no final outputs.
    run = str(tmp_path / "interrupted")
    shutil.copytree(trained_run, run)
    shutil.rmtree(os.path.join(run, "checkpoints", "checkpoint-12"))
    for name in ("adapter", "metrics.json", "routing.png"):
        path = os.path.join(run, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    record = json.load(open(os.path.join(run, "run.json")))
    record["status"] = "training"
    json.dump(record, open(os.path.join(run, "run.json"), "w"))

    code, _, err = run_cli(capsys, "train", "--output-dir", run)
    assert_one_line_error(code, err, "holds a polytropon run", "--resume")
    code, out, err = run_cli(capsys, "train", "--output-dir", run, "--resume")  # not --quiet: it says where it resumes
    assert code == 0, err
    assert "resuming from" in out and "checkpoint-6" in out
    metrics = json.load(open(os.path.join(run, "metrics.json")))
    assert metrics["train"]["global_steps"] == 12
    steps = [e["step"] for e in metrics["train"]["log_history"] if "loss" in e]
    assert min(steps) > 6  # only the steps after the checkpoint were run again
    code, _, err = run_cli(capsys, "train", "--output-dir", run, "--resume")
    assert_one_line_error(code, err, "already complete")


def test_train_learns_tiny_tasks(tiny_bert, tiny_data, tmp_path, capsys, run_cli):
    train, evaluation = tiny_data
    out = str(tmp_path / "learn")
    code, stdout, err = run_cli(capsys, "train", "--model", tiny_bert, "--data", train, "--eval-data", evaluation,
                                "--output-dir", out, "--max-steps", "150", "--save-steps", "1000", "--batch-size", "16",
                                "--lr", "1e-2", "--n-skills", "2", "--quiet", "--baseline-epochs", "20")
    assert code == 0, err
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    losses = [e["loss"] for e in metrics["train"]["log_history"] if "loss" in e]
    assert losses[-1] < losses[0] - 0.1
    # a shared head on a frozen random encoder cannot tell the two questions apart; Poly can
    assert metrics["poly"]["mean"]["accuracy"] >= 0.8
    assert metrics["poly"]["mean"]["accuracy"] > metrics["baseline"]["mean"]["accuracy"] + 0.2
    assert "head-only" in stdout and "poly" in stdout
    assert "collapsed" not in stdout and metrics["poly"]["collapsed"] == []


def test_train_warns_of_collapsed_tasks_for_poly_and_the_lora_baseline(tiny_bert, tiny_data, tmp_path, capsys, run_cli,
                                                                       make_rows, write_jsonl):
    # every eval example of "animal" is the same sentence with alternating labels: any model answers them alike
    train, _ = tiny_data
    rows = [r for r in make_rows(8, seed=2) if r["task"] == "color"]
    rows += [{"task": "animal", "input": "the big red cat runs", "target": "yes" if i % 2 else "no"} for i in range(8)]
    evaluation = write_jsonl(str(tmp_path / "eval.jsonl"), rows)
    out = str(tmp_path / "run")
    code, stdout, err = run_cli(capsys, "train", "--model", tiny_bert, "--data", train, "--eval-data", evaluation,
                                "--output-dir", out, "--max-steps", "4", "--save-steps", "1000", "--lora-baseline",
                                *FAST_TRAIN)
    assert code == 0, err
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert "animal" in metrics["poly"]["collapsed"] and "animal" in metrics["lora"]["collapsed"]
    warnings = [line for line in stdout.splitlines() if line.startswith("warning:")]
    assert [w.split()[1] for w in warnings] == ["poly", "lora"]
    for line, name in zip(warnings, ("poly", "lora")):
        assert "animal" in line and "of 2 tasks" in line
        assert ("color" in line) == ("color" in metrics[name]["collapsed"])


# --------------------------------------------------------------------------- bad input


def test_missing_data_file(tiny_bert, tmp_path, capsys, assert_one_line_error, run_cli):
    code, _, err = run_cli(capsys, "train", "--model", tiny_bert, "--data", str(tmp_path / "nope.jsonl"), "--output-dir", str(tmp_path / "o"))
    assert_one_line_error(code, err, "nope.jsonl", "no such file")
    assert not os.path.exists(tmp_path / "o")


def test_malformed_jsonl_names_file_and_line(tiny_bert, tmp_path, capsys, assert_one_line_error, run_cli):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"task": "a", "input": "the cat", "target": "yes"})
    path.write_text(f"{good}\n{good}\n{{not json\n")
    code, _, err = run_cli(capsys, "train", "--model", tiny_bert, "--data", str(path), "--output-dir", str(tmp_path / "o"))
    assert_one_line_error(code, err, f"{path}:3:", "not valid JSON")


def test_unknown_task_in_eval_data(tiny_bert, tiny_data, tmp_path, capsys, assert_one_line_error, make_rows, run_cli, write_jsonl):
    train, _ = tiny_data
    rows = make_rows(2, seed=5) + [{"task": "weather", "input": "the red cat", "target": "no"}]
    evaluation = write_jsonl(str(tmp_path / "eval.jsonl"), rows)
    code, _, err = run_cli(capsys, "train", "--model", tiny_bert, "--data", train, "--eval-data", evaluation, "--output-dir", str(tmp_path / "o"))
    assert_one_line_error(code, err, f"eval.jsonl:{len(rows)}:", "unknown task 'weather'")


@pytest.mark.parametrize("kind", ["missing", "empty", "garbage"])
def test_model_folder_that_does_not_load(kind, tiny_data, tmp_path, capsys, assert_one_line_error, run_cli):
    train, _ = tiny_data
    folder = tmp_path / "model"
    if kind != "missing":
        folder.mkdir()
    if kind == "garbage":
        (folder / "config.json").write_text("{ this is not json")
    code, _, err = run_cli(capsys, "train", "--model", str(folder), "--data", train, "--output-dir", str(tmp_path / "o"))
    assert_one_line_error(code, err, str(folder))
    assert not (tmp_path / "o").exists()


def test_output_dir_holding_something_else_is_never_touched(tiny_bert, tiny_data, tmp_path, capsys, assert_one_line_error, run_cli):
    train, _ = tiny_data
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.txt").write_text("do not delete")
    code, _, err = run_cli(capsys, "train", "--model", tiny_bert, "--data", train, "--output-dir", str(out))
    assert_one_line_error(code, err, "not a polytropon run")
    assert os.listdir(out) == ["thesis.txt"] and (out / "thesis.txt").read_text() == "do not delete"
    file_out = tmp_path / "a_file"
    file_out.write_text("x")
    code, _, err = run_cli(capsys, "train", "--model", tiny_bert, "--data", train, "--output-dir", str(file_out))
    assert_one_line_error(code, err, "not a directory")


def test_existing_run_is_not_overwritten(trained_run, tiny_bert, tiny_data, capsys, assert_one_line_error, run_cli):
    train, _ = tiny_data
    before = open(os.path.join(trained_run, "metrics.json")).read()
    code, _, err = run_cli(capsys, "train", "--model", tiny_bert, "--data", train, "--output-dir", trained_run)
    assert_one_line_error(code, err, "holds a polytropon run")
    assert open(os.path.join(trained_run, "metrics.json")).read() == before


def test_causal_lm_head_is_inferred_and_evaluated(tiny_gpt2_dir, tiny_data, tmp_path, capsys, run_cli):
    train, evaluation = tiny_data
    out = str(tmp_path / "lm")
    code, stdout, err = run_cli(capsys, "train", "--model", tiny_gpt2_dir, "--data", train, "--eval-data", evaluation,
                                "--output-dir", out, "--max-steps", "60", "--save-steps", "1000", "--batch-size", "16",
                                "--lr", "5e-2", "--n-skills", "2", "--quiet")
    assert code == 0, err
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["head"] == "causal-lm" and metrics["metric"] == "exact_match"
    assert metrics["baseline"]["name"] == "base"
    losses = [e["loss"] for e in metrics["train"]["log_history"] if "loss" in e]
    assert losses[-1] < losses[0]
    poly = metrics["poly"]["per_task"]["animal"]
    assert {"loss", "exact_match", "n"} <= set(poly)
    assert poly["loss"] < metrics["baseline"]["per_task"]["animal"]["loss"]
    assert json.load(open(os.path.join(out, "adapter", "adapter_config.json")))["task_type"] == "CAUSAL_LM"
    code, stdout, err = run_cli(capsys, "eval", out, "--data", evaluation)
    assert code == 0, err
    assert "exact_match" in stdout and "loss" in stdout


def test_run_routing_matches_the_saved_adapter(trained_run):
    """metrics.json's routing matrix is the toolkit's allocation of the saved adapter, with task names."""
    import numpy as np

    from polytropon.toolkit.analysis import allocation_matrix, load_snapshot

    snap = load_snapshot(os.path.join(trained_run, "adapter"))
    assert snap.task_names == ["animal", "color"]
    saved = np.array(json.load(open(os.path.join(trained_run, "metrics.json")))["routing"]["matrix"])
    assert np.allclose(saved, allocation_matrix(snap).numpy(), atol=1e-6)
    assert np.allclose(saved.sum(1), 1.0, atol=1e-5)
    assert {"allocation.png", "task_hierarchy.png"} <= set(os.listdir(os.path.join(trained_run, "plots")))


def test_seq2seq_head_is_inferred_and_learns(tiny_t5_dir, tiny_data, tmp_path, capsys, run_cli):
    train, evaluation = tiny_data
    out = str(tmp_path / "t5")
    code, _, err = run_cli(capsys, "train", "--model", tiny_t5_dir, "--data", train, "--eval-data", evaluation,
                           "--output-dir", out, "--max-steps", "120", "--save-steps", "1000", "--batch-size", "16",
                           "--lr", "5e-2", "--n-skills", "2", "--quiet")
    assert code == 0, err
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["head"] == "seq2seq"
    assert json.load(open(os.path.join(out, "adapter", "adapter_config.json")))["task_type"] == "SEQ_2_SEQ_LM"
    losses = [e["loss"] for e in metrics["train"]["log_history"] if "loss" in e]
    assert losses[-1] < losses[0] / 2
    assert metrics["poly"]["mean"]["exact_match"] > metrics["baseline"]["mean"]["exact_match"] + 0.3

