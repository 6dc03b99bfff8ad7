"""app.experiment: the suite's splits, the methods' configs, scoring, and training through the CLI's trainer."""

from __future__ import annotations

import pytest
import torch

from polytropon.app.data import Row
from polytropon.app.experiment import (
    BaseModel,
    Recipe,
    few_shot,
    load_suite_data,
    method_config,
    score,
    train_multitask,
)
from polytropon.app.suite import build_suite


def _row(task, target):
    return Row(task=task, input="x", target=target)


def test_score_gives_accuracy_and_collapsed_tasks_in_the_given_order():
    rows = [_row("b", "yes"), _row("a", "no"), _row("b", "no"), _row("a", "yes"), _row("c", "yes"), _row("c", "yes")]
    answers = [1, 0, 1, 0, 1, 1]  # b: always yes (gold differs) -> collapsed; a: 1/2; c: all yes and gold all yes
    accuracy, collapsed = score(answers, rows, ["a", "b", "c", "unseen"])
    assert accuracy == {"a": 0.5, "b": 0.5, "c": 1.0}
    assert list(accuracy) == ["a", "b", "c"] and collapsed == ["a", "b"]


def test_the_validation_split_never_reads_the_reported_splits(tokenizer_free_bert):
    tokenizer = tokenizer_free_bert
    data = load_suite_data(tokenizer, 0, n_train=12, n_eval=4, n_shots=4, n_heldout_eval=6, validation=3)
    suite = build_suite(seed=0, n_train_per_task=12, n_eval_per_task=4, n_heldout_shots=4, n_heldout_eval_per_task=6,
                        n_heldout_validation_per_task=6)
    reported = {r["input"] for split in ("eval", "heldout_eval") for r in suite.rows(split)}
    assert not reported & {r.input for r in data.eval_rows + data.heldout_eval_rows + data.train_rows}
    assert len(data.eval_rows) == 3 * 20 and len(data.train_rows) == 9 * 20 == len(data.train)
    assert {r.input for r in data.eval_rows} <= {r["input"] for r in suite.rows("train")}
    assert {r.input for r in data.heldout_eval_rows} == {r["input"] for r in suite.rows("heldout_validation")}
    plain = load_suite_data(tokenizer, 0, n_train=12, n_eval=4, n_shots=4, n_heldout_eval=6)
    assert [r.input for r in plain.eval_rows] == [r["input"] for r in suite.rows("eval")]
    assert [r.input for r in plain.heldout_eval_rows] == [r["input"] for r in suite.rows("heldout_eval")]


@pytest.fixture(scope="module")
def tokenizer_free_bert(tiny_bert):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert)


def test_method_configs_and_budgets():
    recipe = Recipe(r=4, n_skills=4, mhr_splits=2)
    names = [f"t{i}" for i in range(5)]
    lora, _ = method_config("lora-params", recipe, 5, names)
    assert (lora.poly_type, lora.n_skills, lora.r) == ("shared", 1, 16)
    mhr, extras = method_config("mhr", recipe, 5, names)
    assert (mhr.n_splits, mhr.n_skills, mhr.r, extras["ibp_weight"]) == (2, 4, 4, 0.0)
    assert method_config("poly-ibp", recipe, 5, names)[1]["ibp_weight"] > 0
    assert method_config("poly-hard", recipe, 5, names)[0].hard_routing
    with pytest.raises(ValueError, match="'nope'"):
        method_config("nope", recipe, 5, names)
    with pytest.raises(ValueError, match="unknown recipe field"):
        Recipe.from_dict({"lr": 1e-3, "learning_rate": 1})


@pytest.fixture(scope="module")
def trained(tiny_bert):
    torch.set_num_threads(1)
    base = BaseModel(tiny_bert)
    data = load_suite_data(base.tokenizer, 0, n_train=8, n_eval=4, n_shots=4, n_heldout_eval=4, max_length=16)
    recipe = Recipe(steps=4, batch_size=8, n_skills=2, r=2, mhr_splits=2, max_length=16)
    before = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    model, record = train_multitask("mhr", recipe, data, base, seed=0)
    assert all(torch.equal(before[n], p) for n, p in base.model.named_parameters())  # the base model is untouched
    return base, data, recipe, model, record


def test_train_multitask_trains_through_the_trainer_and_records_everything(trained):
    _, data, _, model, record = trained
    assert len(record["losses"]) == 4 and all(loss > 0 for loss in record["losses"])
    assert list(record["per_task"]) == data.tasks and record["eval_examples"] == {t: 4 for t in data.tasks}
    assert set(record["accuracy"]) == {"single", "and", "or", "mean"}
    assert record["trainable_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert -1 <= record["recovery"]["spearman"] <= 1 and len(record["recovery"]["aligned"]) == 20
    nonzero_b = [p for n, p in model.named_parameters() if "poly_lora_B" in n]
    assert nonzero_b and all(p.abs().sum() > 0 for p in nonzero_b)  # B starts at zero: training moved it


def test_few_shot_z_trains_only_the_new_router_rows_and_leaves_the_source(trained):
    base, data, recipe, model, _ = trained
    source_state = {n: p.detach().clone() for n, p in model.state_dict().items()}
    few = Recipe(steps=3, batch_size=8, r=2, max_length=16, router_lr=1.0)
    record = few_shot("mhr-z", model, few, data, base, seed=0, shots=4, steps=3)
    assert all(torch.equal(source_state[n], p) for n, p in model.state_dict().items())
    assert list(record["per_task"]) == data.heldout_tasks and record["shots"] == 4
    n_routers = sum(1 for n, _ in model.named_parameters() if "router" in n and "module_logits" in n)
    assert record["trainable_parameters"] == n_routers * 4 * 2 * 2  # 4 new tasks x 2 splits x 2 skills per router
    with pytest.raises(ValueError, match="few-shot method"):
        few_shot("mhr-x", model, few, data, base, seed=0, shots=4, steps=1)
