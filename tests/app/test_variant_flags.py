"""``polytropon train``'s variant flags, the IBP prior in the loss, the LoRA baseline, --quiet, data columns, and the
portable base-model name, on the tiny offline BERT."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

from polytropon.app.cli import main
from polytropon.app.commands.train import Plan, TrainData, plot_run_routing
from polytropon.app.comparison import lora_baseline_args, routing_allocations, routing_recovery
from polytropon.app.defaults import DEFAULT_MODEL_ID, apply_run_defaults, default_model_path, model_path, portable_model_ref


FAST = ["--batch-size", "8", "--r", "4", "--quiet", "--no-baseline", "--max-steps", "2"]


def write_json(path, value) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(value, fh)
    return str(path)


@pytest.fixture
def train(run_cli):
    """The factory ``train(...)`` below, built from the shared builders (fixtures)."""

    def train(capsys, tiny_bert, tiny_data, out, *extra: str) -> tuple[int, str, str]:
        train_file, eval_file = tiny_data
        return run_cli(capsys, "train", "--model", tiny_bert, "--data", train_file, "--eval-data", eval_file,
                       "--output-dir", str(out), *FAST, *extra)

    return train


def saved_config(run_dir) -> dict:
    with open(os.path.join(run_dir, "adapter", "adapter_config.json"), encoding="utf-8") as fh:
        return json.load(fh)


# --------------------------------------------------------------------------- bad combinations


@pytest.mark.parametrize(
    "flags, fragments",
    [
        (["--allocation", "ALLOC"], ["--allocation needs --poly-type fixed"]),
        (["--poly-type", "fixed"], ["--poly-type fixed needs --allocation"]),
        (["--poly-type", "shared", "--hard-routing"], ["--hard-routing applies to learned routing", "shared"]),
        (["--poly-type", "private", "--ibp-alpha", "1"], ["--ibp-alpha applies to learned routing", "private"]),
        (["--poly-type", "fixed", "--allocation", "ALLOC", "--router-temperature", "0.5"], ["--router-temperature"]),
        (["--poly-type", "shared", "--router-granularity", "block"], ["--router-granularity"]),
        (["--ibp-weight", "0.1"], ["--ibp-weight needs --ibp-alpha"]),
        (["--poly-type", "shared", "--n-skills", "3"], ["exactly one skill", "--n-skills 3"]),
        (["--poly-type", "private", "--n-skills", "3"], ["--n-skills must be 2", "got 3"]),
        (["--n-splits", "5"], ["adapter:", "5"]),
        (["--router-temperature", "0"], ["--router-temperature", "positive"]),
        (["--poly-type", "mhr"], ["--poly-type", "invalid choice"]),
    ],
)
def test_bad_variant_combinations_are_one_line_errors(flags, fragments, tiny_bert, tiny_data, tmp_path, capsys, assert_one_line_error, run_cli):
    alloc = write_json(tmp_path / "alloc.json", [[1, 0], [0, 1]])
    flags = [alloc if f == "ALLOC" else f for f in flags]
    train_file, eval_file = tiny_data
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--model", tiny_bert, "--data", train_file, "--eval-data", eval_file,
                           "--output-dir", str(out), "--r", "4", "--max-steps", "1", "--no-baseline", *flags)
    assert_one_line_error(code, err, *fragments)
    assert not out.exists() or not (out / "adapter").exists()


@pytest.mark.parametrize(
    "allocation, fragments",
    [
        ({"animal": [0], "zebra": [1]}, ["unknown task 'zebra'", "animal, color"]),
        ({"animal": [0]}, ["no skills for task 'color'"]),
        ({"animal": [0], "color": [-1]}, ["non-empty list of skill indices"]),
        ([[1, 0], [0, 1], [1, 1]], ["expected 2 rows", "3 rows"]),
        ([[1, 0], [0, 0]], ["row 1 is all zeros"]),
        ([[1, -1], [0, 1]], ["row 0", "non-negative"]),
        ("nonsense", ["expected a JSON matrix"]),
    ],
)
def test_bad_allocation_files(allocation, fragments, tiny_bert, tiny_data, tmp_path, capsys, train, assert_one_line_error):
    alloc = write_json(tmp_path / "alloc.json", allocation)
    code, _, err = train(capsys, tiny_bert, tiny_data, tmp_path / "run", "--poly-type", "fixed", "--allocation", alloc)
    assert_one_line_error(code, err, "alloc.json", *fragments)
    assert not (tmp_path / "run").exists()


def test_allocation_that_is_not_json(tiny_bert, tiny_data, tmp_path, capsys, train, assert_one_line_error):
    bad = tmp_path / "alloc.json"
    bad.write_text("{not json")
    code, _, err = train(capsys, tiny_bert, tiny_data, tmp_path / "run", "--poly-type", "fixed", "--allocation", str(bad))
    assert_one_line_error(code, err, "alloc.json", "not a readable JSON file")
    code, _, err = train(capsys, tiny_bert, tiny_data, tmp_path / "run", "--poly-type", "fixed", "--allocation",
                         str(tmp_path / "missing.json"))
    assert_one_line_error(code, err, "missing.json", "no such file")


# --------------------------------------------------------------------------- each variant trains and is saved


def test_fixed_allocation_by_task_name_and_as_matrix(tiny_bert, tiny_data, tmp_path, capsys, train, assert_one_line_error):
    by_name = write_json(tmp_path / "by_name.json", {"color": [1, 2], "animal": [0]})
    code, _, err = train(capsys, tiny_bert, tiny_data, tmp_path / "a", "--poly-type", "fixed", "--allocation", by_name)
    assert code == 0, err
    config = saved_config(tmp_path / "a")
    assert config["poly_type"] == "fixed" and config["n_skills"] == 3  # one more than the largest index
    assert config["allocation"] == [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]  # rows in the data's task order
    matrix = write_json(tmp_path / "matrix.json", [[0.5, 0.5], [0, 2]])
    code, _, err = train(capsys, tiny_bert, tiny_data, tmp_path / "b", "--poly-type", "fixed", "--allocation", matrix)
    assert code == 0, err
    assert saved_config(tmp_path / "b")["allocation"] == [[0.5, 0.5], [0.0, 2.0]]
    code, _, err = train(capsys, tiny_bert, tiny_data, tmp_path / "c", "--poly-type", "fixed", "--allocation", matrix,
                         "--n-skills", "3")
    assert_one_line_error(code, err, "rows have 2 skills but --n-skills is 3")


def test_private_shared_and_learned_variants_record_their_config(tiny_bert, tiny_data, tmp_path, capsys, train, assert_one_line_error, make_rows, run_cli):
    assert train(capsys, tiny_bert, tiny_data, tmp_path / "private", "--poly-type", "private")[0] == 0
    config = saved_config(tmp_path / "private")
    assert (config["poly_type"], config["n_skills"], config["n_tasks"]) == ("private", 2, 2)

    code, _, err = train(capsys, tiny_bert, tiny_data, tmp_path / "shared", "--poly-type", "shared")
    assert code == 0, err
    assert (saved_config(tmp_path / "shared")["poly_type"], saved_config(tmp_path / "shared")["n_skills"]) == ("shared", 1)

    code, _, err = train(capsys, tiny_bert, tiny_data, tmp_path / "poly", "--hard-routing", "--router-temperature", "0.5",
                         "--router-granularity", "block", "--ibp-alpha", "2", "--ibp-weight", "0.1", "--n-splits", "2",
                         "--unknown-task", "average")
    assert code == 0, err
    config = saved_config(tmp_path / "poly")
    assert config["hard_routing"] is True and config["router_temperature"] == 0.5
    assert config["router_granularity"] == "block" and config["n_splits"] == 2 and config["unknown_task"] == "average"
    record = json.load(open(tmp_path / "poly" / "run.json"))
    assert record["args"]["ibp_alpha"] == 2.0 and record["args"]["ibp_weight"] == 0.1
    # --unknown-task average: eval accepts a task the adapter does not know and routes it to the skills' average
    new_rows = [dict(row, task="zebra") for row in make_rows(3, seed=9)]
    new_file = tmp_path / "new.jsonl"
    new_file.write_text("".join(json.dumps(row) + "\n" for row in new_rows))
    code, out, err = run_cli(capsys, "eval", str(tmp_path / "poly"), "--data", str(new_file))
    assert code == 0 and "zebra" in out, err
    code, _, err = run_cli(capsys, "eval", str(tmp_path / "shared"), "--data", str(new_file))
    assert_one_line_error(code, err, "unknown task 'zebra'")


def test_trainer_loss_adds_the_weighted_ibp_prior(tiny_bert, make_rows):
    """PolyTrainer.compute_loss = task loss + weight * ibp_loss(model, alpha), on random non-zero router logits."""
    from polytropon import PolyConfig, get_peft_model
    from polytropon.app.data import PolyDataCollator, encode_rows, rows_from_dicts
    from polytropon.app.training import load_base_model, make_trainer
    from polytropon.toolkit.priors import ibp_loss

    base, tokenizer = load_base_model(tiny_bert, "classification", ["no", "yes"])
    model = get_peft_model(base, PolyConfig(r=4, n_tasks=2, n_skills=3, task_type="SEQ_CLS"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "poly_lora" in name or "module_logits" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
    rows = rows_from_dicts(make_rows(4, seed=5))
    batch = PolyDataCollator(tokenizer)(encode_rows(rows, tokenizer, "classification", {"animal": 0, "color": 1},
                                                    {"no": 0, "yes": 1}, 32))
    args = argparse.Namespace(epochs=1.0, max_steps=1, lr=1e-2, router_lr=0.1, weight_decay=0.0, warmup_ratio=0.0,
                              batch_size=4, grad_accum=1, logging_steps=1, save_steps=10, seed=0, bf16=False, quiet=True,
                              ibp_alpha=None)
    model.eval()  # deterministic routing: the two losses differ by the prior only
    plain = make_trainer(args, "/nonexistent/unused", model, tokenizer, None).compute_loss(model, dict(batch))
    args.ibp_alpha = 1.5
    with_prior = make_trainer(args, "/nonexistent/unused", model, tokenizer, None, ibp_weight=0.3).compute_loss(model, dict(batch))
    expected = 0.3 * ibp_loss(model, alpha=1.5)
    assert expected.abs() > 1e-3
    torch.testing.assert_close(with_prior - plain, expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- LoRA baseline, recovery, quiet, data


def test_lora_baseline_has_polys_trainable_budget_and_is_saved(tiny_bert, tiny_data, tmp_path, capsys, run_cli):
    train_file, eval_file = tiny_data
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "train", "--model", tiny_bert, "--data", train_file, "--eval-data", eval_file,
                                "--output-dir", str(out), "--batch-size", "8", "--n-skills", "3", "--r", "4",
                                "--max-steps", "2", "--lora-baseline", "--baseline-epochs", "2")
    assert code == 0, err
    metrics = json.load(open(out / "metrics.json"))
    lora, poly = metrics["lora"], metrics["adapter"]
    assert (lora["config"]["poly_type"], lora["config"]["n_skills"], lora["config"]["r"]) == ("shared", 1, 12)
    # equal budgets but for the router logits: n_tasks * n_splits * n_skills per adapted layer
    layers = 2 * 2  # tiny BERT: 2 blocks x (query, value)
    assert poly["trainable_parameters"] - lora["trainable_parameters"] == layers * 2 * 1 * 3
    assert set(lora["per_task"]) == {"animal", "color"}
    assert os.path.isfile(out / "lora" / "adapter" / "adapter_config.json")  # the baseline's own run
    assert json.load(open(out / "lora" / "run.json"))["status"] == "complete"
    code, output, err = run_cli(capsys, "eval", str(out / "lora"), "--data", eval_file, "--json", str(tmp_path / "l.json"))
    assert code == 0, err
    assert json.load(open(tmp_path / "l.json"))["per_task"] == lora["per_task"]  # the same rows, the same numbers
    assert "vs lora" in stdout and "LoRA baseline" in stdout
    header = next(line for line in stdout.splitlines() if line.startswith("task"))
    assert header.split() == ["task", "n", "head-only", "lora", "poly"]


def test_a_failed_lora_baseline_is_a_one_line_error_naming_its_log(tmp_path):
    from polytropon.app.comparison import LoraJob, finish_lora_baseline
    from polytropon.app.console import CliError

    class Failed:
        exitcode = 1

        def join(self):
            pass

    job = LoraJob(Failed(), str(tmp_path / "lora"), str(tmp_path / "lora.log"), 0.0)
    with pytest.raises(CliError, match=r"LoRA baseline failed \(exit code 1\); its output is in .*lora\.log"):
        finish_lora_baseline(job)


def test_lora_baseline_args_keep_the_run_but_the_routing():
    args = argparse.Namespace(r=8, n_skills=8, n_splits=2, poly_type="poly", allocation=None, hard_routing=True,
                              router_temperature=0.5, router_granularity="block", ibp_alpha=1.0, ibp_weight=0.1,
                              unknown_task="average", lr=1e-3, max_steps=7)
    lora = lora_baseline_args(args)
    assert (lora.r, lora.n_skills, lora.n_splits, lora.poly_type) == (64, 1, 1, "shared")
    assert not lora.hard_routing and lora.ibp_alpha is None and (lora.lr, lora.max_steps) == (1e-3, 7)
    assert args.r == 8 and args.hard_routing  # the run's flags untouched
    args.lora_lr = 5e-3
    assert lora_baseline_args(args).lr == 5e-3 and args.lr == 1e-3


def test_demo_defaults_turn_the_lora_baseline_on():
    keys = dict(max_steps=None, epochs=None, lora_baseline=None, poly_type="poly", n_skills=None)
    demo, own = argparse.Namespace(**keys), argparse.Namespace(**keys)
    apply_run_defaults(demo, demo=True)
    apply_run_defaults(own, demo=False)
    assert demo.lora_baseline is True and own.lora_baseline is False
    private = argparse.Namespace(**{**keys, "poly_type": "private"})
    apply_run_defaults(private, demo=True)
    assert private.n_skills is None  # the variant decides (one skill per task)


def _tiny_routed_model(tiny_bert, logits_of):
    from polytropon import PolyConfig, get_peft_model
    from polytropon.app.training import load_base_model

    base, _ = load_base_model(tiny_bert, "classification", ["no", "yes"])
    model = get_peft_model(base, PolyConfig(r=2, n_tasks=6, n_skills=3, task_type="SEQ_CLS"))
    with torch.no_grad():
        for i, (_, adapter) in enumerate(model.named_adapters()):
            adapter.poly_router.module_logits.copy_(logits_of(i).view_as(adapter.poly_router.module_logits))
    return model


def test_routing_recovery_of_a_routing_equal_to_the_truth_up_to_skill_order(tiny_bert):
    truth = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=torch.float64)

    def logits(layer: int) -> torch.Tensor:  # each layer numbers its skills differently
        perm = torch.roll(torch.arange(3), layer)
        return (truth[:, perm] * 80 - 40).float()  # sigmoid: 0 or 1 to float precision

    model = _tiny_routed_model(tiny_bert, logits)
    mats = routing_allocations(model, 6)
    assert len(mats) == 4 and mats[0].shape == (6, 3)
    scores, aligned = routing_recovery(model, truth.numpy().astype(int))
    assert scores["spearman"] == pytest.approx(1.0) and scores["agreement"] > 0.999
    assert scores["agreement_chance"] < 0.8 and scores["spearman_chance"] < 0.5
    expected = truth / truth.sum(1, keepdim=True)
    assert aligned == pytest.approx(expected.numpy(), abs=1e-3)


def test_run_routing_plot_is_aligned_on_a_known_structure(tiny_bert, tmp_path):
    truth = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1]]
    gen = torch.Generator().manual_seed(3)
    model = _tiny_routed_model(tiny_bert, lambda layer: torch.randn(6, 3, generator=gen))
    tasks = [f"t{i}" for i in range(6)]
    data = TrainData([], [], tasks, "test", reference=torch.tensor(truth).numpy(), reference_names=["a", "b", "c"])
    routing, recovery, path = plot_run_routing(model, str(tmp_path), data)
    assert routing.shape == (6, 3) and os.path.getsize(path) > 1000
    assert set(recovery) >= {"spearman", "spearman_chance", "agreement", "agreement_chance"}
    plain = TrainData([], [], tasks, "test")
    (tmp_path / "plain").mkdir()
    assert plot_run_routing(model, str(tmp_path / "plain"), plain)[1] is None
    assert Plan  # the plan type is importable beside TrainData


def test_quiet_prints_only_the_table_and_logs_to_the_run(tiny_bert, tiny_data, tmp_path, capsys, train):
    code, out, err = train(capsys, tiny_bert, tiny_data, tmp_path / "run", "--logging-steps", "1")
    assert code == 0, err
    lines = out.strip().splitlines()
    # a collapse warning (tasks answered the same for every example) is printed even with --quiet, after the table
    warnings = [line for line in lines if line.startswith("warning: poly collapsed on")]
    collapsed = json.load(open(tmp_path / "run" / "metrics.json"))["poly"]["collapsed"]
    assert len(warnings) == (1 if collapsed else 0)
    lines = [line for line in lines if line not in warnings]
    assert lines[0].startswith("Per-task accuracy") and lines[1].split() == ["task", "n", "poly"]
    assert lines[-1].startswith("mean accuracy: poly") and len(lines) == 8  # caption, 2 + 2 tasks + 2, means
    assert not any("loss" in line or line.startswith("polytropon:") or line.startswith("{") for line in lines)
    assert err.strip() == ""
    log = [json.loads(line) for line in open(tmp_path / "run" / "train_log.jsonl")]
    assert [entry["step"] for entry in log if "loss" in entry] == [1, 2]


def test_data_in_other_formats_with_other_column_names(tiny_bert, tmp_path, capsys, assert_one_line_error, make_rows, run_cli):
    import pandas as pd

    rename = {"task": "job", "input": "sentence", "target": "answer"}
    pd.DataFrame(make_rows(12, seed=1)).rename(columns=rename).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(make_rows(4, seed=2)).rename(columns=rename).to_parquet(tmp_path / "eval.parquet")
    columns = ["--task-column", "job", "--input-column", "sentence", "--target-column", "answer"]
    code, _, err = run_cli(capsys, "train", "--model", tiny_bert, "--data", str(tmp_path / "train.csv"), "--eval-data",
                           str(tmp_path / "eval.parquet"), "--output-dir", str(tmp_path / "run"), *FAST, *columns)
    assert code == 0, err
    assert json.load(open(tmp_path / "run" / "metrics.json"))["tasks"] == ["animal", "color"]
    code, out, err = run_cli(capsys, "eval", str(tmp_path / "run"), "--data", str(tmp_path / "eval.parquet"), *columns)
    assert code == 0 and "animal" in out, err
    code, _, err = run_cli(capsys, "eval", str(tmp_path / "run"), "--data", str(tmp_path / "eval.parquet"))
    assert_one_line_error(code, err, "eval.parquet", "missing column(s) task, input, target")


def test_default_model_is_recorded_by_its_public_id_and_found_offline(tiny_data, tmp_path, capsys, run_cli):
    folder = default_model_path()
    assert portable_model_ref(folder) == DEFAULT_MODEL_ID == portable_model_ref(DEFAULT_MODEL_ID)
    assert model_path(DEFAULT_MODEL_ID) == folder and model_path("other/model") == "other/model"
    train_file, eval_file = tiny_data
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--model", folder, "--data", train_file, "--eval-data", eval_file,
                           "--output-dir", str(out), "--max-steps", "1", "--no-baseline", "--quiet", "--max-length", "16",
                           "--target-modules", "query")
    assert code == 0, err
    assert saved_config(out)["base_model_name_or_path"] == DEFAULT_MODEL_ID
    assert json.load(open(out / "adapter" / "polytropon_tasks.json"))["model"] == DEFAULT_MODEL_ID
    assert json.load(open(out / "run.json"))["model"] == DEFAULT_MODEL_ID
    assert "site-packages" not in (out / "adapter" / "adapter_config.json").read_text()
    code, output, err = run_cli(capsys, "eval", str(out), "--data", eval_file)  # HF_HUB_OFFLINE=1: no hub
    assert code == 0 and "animal" in output, err
