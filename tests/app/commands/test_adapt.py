"""``polytropon adapt``: few-shot adaptation of a trained run into a new run directory, on the tiny offline BERT."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from polytropon.app.cli import main
from polytropon.app.commands.adapt import take_shots
from polytropon.app.data import rows_from_dicts


TRAIN = ["--batch-size", "16", "--r", "4", "--quiet", "--no-baseline", "--max-steps", "4"]
NEW_NAMES = {"animal": "cat_check", "color": "red_check"}


def tree_digest(path) -> str:
    """SHA-256 over every file's relative path and bytes below ``path``."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode())
            with open(full, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def train_source(tiny_bert, tiny_data, out, *flags: str) -> str:
    """A short training run on the tiny data (animal, color) in ``out``."""
    train, evaluation = tiny_data
    code = main(["train", "--model", tiny_bert, "--data", train, "--eval-data", evaluation, "--output-dir", str(out),
                 *TRAIN, *flags])
    assert code == 0
    return str(out)


@pytest.fixture(scope="module")
def source_run(tiny_bert, tiny_data, tmp_path_factory):
    return train_source(tiny_bert, tiny_data, tmp_path_factory.mktemp("adapt") / "source", "--n-skills", "2")


@pytest.fixture(scope="module")
def new_tasks(tmp_path_factory, make_rows, write_jsonl):
    folder = tmp_path_factory.mktemp("new_tasks")
    files = []
    for name, n, seed in (("train.jsonl", 12, 3), ("eval.jsonl", 6, 4)):
        rows = [dict(row, task=NEW_NAMES[row["task"]]) for row in make_rows(n, seed)]
        files.append(write_jsonl(str(folder / name), rows))
    return tuple(files)


@pytest.fixture
def adapt(run_cli):
    """The factory ``adapt(...)`` below, built from the shared builders (fixtures)."""

    def adapt(capsys, source, new_tasks, out, mode, *extra: str) -> tuple[int, str, str]:
        train, evaluation = new_tasks
        return run_cli(capsys, "adapt", source, "--mode", mode, "--data", train, "--eval-data", evaluation, "--shots", "4",
                       "--max-steps", "3", "--output-dir", str(out), "--quiet", *extra)

    return adapt


def tensors(run_dir) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(run_dir, "adapter", "adapter_model.safetensors"))


@pytest.mark.parametrize("mode", ["mhr-z", "mhr-mu", "full", "lora"])
def test_each_mode_writes_a_new_run_and_never_touches_the_source(mode, source_run, new_tasks, tmp_path, capsys, adapt, run_cli):
    before = tree_digest(source_run)
    out = tmp_path / mode
    code, stdout, err = adapt(capsys, source_run, new_tasks, out, mode)
    assert code == 0, err
    assert tree_digest(source_run) == before
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["mode"] == mode and metrics["tasks"] == ["cat_check", "red_check"]
    assert set(metrics["per_task"]) == {"cat_check", "red_check"} and metrics["train_examples"] == 8
    assert all(m["n"] == 6 for m in metrics["per_task"].values())
    record = json.load(open(out / "run.json"))
    assert record["status"] == "complete" and record["adapted_from"]["mode"] == mode
    assert stdout.splitlines()[0].split() == ["task", "n", mode]
    code, stdout, err = run_cli(capsys, "eval", str(out), "--data", new_tasks[1])  # the new adapter loads and routes
    assert code == 0 and "cat_check" in stdout, err


def test_mhr_z_trains_only_the_new_tasks_routing(source_run, new_tasks, tmp_path, capsys, adapt):
    out = tmp_path / "z"
    assert adapt(capsys, source_run, new_tasks, out, "mhr-z")[0] == 0
    old, new = tensors(source_run), tensors(out)
    assert set(old) == set(new)
    changed_new_rows = False
    for key, value in old.items():
        if "module_logits" in key:  # (n_tasks * n_splits, n_skills) rows: the two old tasks first
            rows = value.shape[0]
            torch.testing.assert_close(new[key][:rows], value, rtol=0, atol=0)
            changed_new_rows |= bool(new[key][rows:].abs().max() > 0)  # new rows start at 0 (uniform)
        else:
            torch.testing.assert_close(new[key], value, rtol=0, atol=0)  # skills and head frozen
    assert changed_new_rows
    config = json.load(open(out / "adapter" / "adapter_config.json"))
    assert config["n_tasks"] == 4 and config["task_names"] == ["animal", "color", "cat_check", "red_check"]


def test_mhr_mu_starts_every_task_from_the_average_of_the_skills(source_run, new_tasks, tmp_path, capsys, adapt):
    out = tmp_path / "mu"
    assert adapt(capsys, source_run, new_tasks, out, "mhr-mu", "--lr", "0", "--router-lr", "0")[0] == 0
    old, new = tensors(source_run), tensors(out)
    config = json.load(open(out / "adapter" / "adapter_config.json"))
    assert (config["poly_type"], config["n_skills"], config["r"]) == ("private", 2, 4)
    checked = 0
    for key, value in old.items():
        if key.endswith("poly_lora_A") or key.endswith("poly_lora_B"):  # (1, n_skills, d, r) with one split
            assert value.abs().min() >= 0 and value.abs().max() > 0
            average = value.mean(dim=1, keepdim=True)
            torch.testing.assert_close(new[key], average.expand_as(new[key]), rtol=1e-6, atol=1e-7)
            checked += 1
        elif "classifier" in key:
            torch.testing.assert_close(new[key], value, rtol=0, atol=0)  # the run's head
    assert checked == 8  # 2 blocks x (query, value) x (A, B)


def test_lora_starts_from_scratch_and_full_moves_the_skills(source_run, new_tasks, tmp_path, capsys, adapt):
    assert adapt(capsys, source_run, new_tasks, tmp_path / "lora", "lora", "--lr", "0")[0] == 0
    fresh, old = tensors(tmp_path / "lora"), tensors(source_run)
    assert all(v.abs().max() == 0 for k, v in fresh.items() if k.endswith("poly_lora_B"))
    assert (fresh["base_model.model.classifier.weight"]
            != old["base_model.model.classifier.weight"]).any()
    assert adapt(capsys, source_run, new_tasks, tmp_path / "full", "full")[0] == 0
    full = tensors(tmp_path / "full")
    moved = [k for k in old if k.endswith("poly_lora_B") and not torch.equal(full[k], old[k])]
    assert moved


def test_suite_run_adapts_to_the_held_out_tasks_by_default(tiny_bert, tmp_path, capsys, assert_one_line_error, run_cli):
    source = tmp_path / "suite_run"
    code, _, err = run_cli(capsys, "train", "--model", tiny_bert, "--output-dir", str(source), "--max-steps", "1",
                           "--no-baseline", "--quiet", "--n-skills", "2", "--r", "2", "--max-length", "16", "--seed", "0")
    assert code == 0, err
    code, _, err = run_cli(capsys, "adapt", str(source), "--shots", "6", "--max-steps", "1", "--output-dir",
                           str(tmp_path / "z"), "--quiet")
    assert code == 0, err
    metrics = json.load(open(tmp_path / "z" / "metrics.json"))
    from polytropon.app.suite import HELDOUT_TASKS

    assert metrics["tasks"] == [t.name for t in HELDOUT_TASKS] and metrics["shots"] == 6
    assert metrics["train_examples"] == 6 * len(HELDOUT_TASKS) and metrics["eval_examples"] == 50 * len(HELDOUT_TASKS)
    code, _, err = run_cli(capsys, "adapt", str(source), "--shots", "1000", "--output-dir", str(tmp_path / "big"))
    assert_one_line_error(code, err, "--shots 1000", "held-out examples per task")


def test_take_shots_balances_the_targets_per_task():
    rows = rows_from_dicts(
        [{"task": "a", "input": str(i), "target": "yes" if i < 6 else "no"} for i in range(10)]
        + [{"task": "b", "input": "x", "target": "yes"}]
    )
    kept = take_shots(rows, 4)
    assert [(r.task, r.input, r.target) for r in kept] == [
        ("a", "0", "yes"), ("a", "1", "yes"), ("a", "6", "no"), ("a", "7", "no"), ("b", "x", "yes")]


def test_bad_input_is_one_line_and_writes_nothing(source_run, new_tasks, tiny_data, tmp_path, capsys, assert_one_line_error, run_cli, write_jsonl):
    before = tree_digest(source_run)
    old_tasks = tiny_data[0]
    cases = [
        (["--data", old_tasks], ["task 'animal' is already a task"]),
        ([], ["was not trained on the built-in suite", "--data"]),
        (["--data", new_tasks[0], "--eval-data", str(tmp_path / "missing.jsonl")], ["missing.jsonl", "no such file"]),
        (["--eval-data", new_tasks[1]], ["--eval-data needs --data"]),
        (["--data", new_tasks[0], "--mode", "zero"], ["invalid choice"]),
        (["--data", new_tasks[0], "--shots", "0"], ["--shots", "positive"]),
        (["--data", new_tasks[0], "--lr", "-1"], ["--lr", "non-negative"]),
    ]
    for flags, fragments in cases:
        code, _, err = run_cli(capsys, "adapt", source_run, "--output-dir", str(tmp_path / "out"), *flags)
        assert_one_line_error(code, err, *fragments)
        assert not (tmp_path / "out").exists()
    bad_label = write_jsonl(str(tmp_path / "bad.jsonl"), [{"task": "new", "input": "the cat", "target": "maybe"}])
    code, _, err = run_cli(capsys, "adapt", source_run, "--data", bad_label, "--eval-data", bad_label,
                           "--output-dir", str(tmp_path / "out"))
    assert_one_line_error(code, err, "bad.jsonl", "'maybe' is not a label")
    code, _, err = run_cli(capsys, "adapt", source_run, "--data", new_tasks[0], "--output-dir",
                           os.path.join(source_run, "adapted"))
    assert_one_line_error(code, err, "inside the source run")
    code, _, err = run_cli(capsys, "adapt", str(tmp_path / "nowhere"), "--data", new_tasks[0])
    assert_one_line_error(code, err, "nowhere", "no such directory")
    assert tree_digest(source_run) == before


def test_mhr_z_needs_learned_routing(tiny_bert, tiny_data, new_tasks, tmp_path, capsys, adapt, assert_one_line_error):
    shared = train_source(tiny_bert, tiny_data, tmp_path / "shared", "--poly-type", "shared")
    capsys.readouterr()
    code, _, err = adapt(capsys, shared, new_tasks, tmp_path / "z", "mhr-z")
    assert_one_line_error(code, err, "--mode mhr-z", "poly_type shared")
    assert adapt(capsys, shared, new_tasks, tmp_path / "full", "full")[0] == 0  # full works on any variant
