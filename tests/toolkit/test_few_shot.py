"""MHR-z (freeze_skills) and MHR-mu (collapse_to_average)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import small_bert_cls as tiny_bert_cls, small_gpt2 as tiny_gpt2, small_llama as tiny_llama
from polytropon import (
    PolyConfig,
    PolyModel,
    add_tasks,
    collapse_to_average,
    freeze_skills,
    get_peft_model,
    param_groups,
    unfreeze_skills,
)


# ---------------------------------------------------------------------- MHR-z
def test_freeze_skills_trains_only_router_logits(randomize_, routers, small_bert_cls, small_inputs):
    model = get_peft_model(small_bert_cls(), PolyConfig(n_tasks=3, init_weights=False))
    randomize_(model)
    n_logits = sum(r.module_logits.numel() for r in routers(model))
    assert freeze_skills(model) == n_logits
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model.train()
    out = model(**small_inputs("bert"), task_ids=[0, 1, 2, 0], labels=torch.tensor([0, 1, 2, 1]))
    out.loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith("module_logits") for n in changed)
    assert unfreeze_skills(model) > n_logits


def test_mhr_z_few_shot_on_new_task_keeps_old_rows(randomize_, routers, small_inputs, small_llama):
    model = get_peft_model(small_llama(), PolyConfig(n_tasks=3, task_names=["a", "b", "c"], init_weights=False))
    randomize_(model)
    add_tasks(model, ["new"], init="average")
    freeze_skills(model)
    old_rows = [r.module_logits[:3].detach().clone() for r in routers(model)]
    new_row = [r.module_logits[3].detach().clone() for r in routers(model)]
    optimizer = torch.optim.Adam(param_groups(model, lr=1e-3, router_lr=1e-1))
    model.train()
    x = small_inputs("llama")["input_ids"]
    for _ in range(3):
        loss = model(input_ids=x, labels=x, task_ids=["new"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for r, old, new in zip(routers(model), old_rows, new_row):
        assert torch.equal(r.module_logits[:3], old)
        assert not torch.equal(r.module_logits[3], new)


def test_freeze_skills_errors(small_llama):
    fixed = get_peft_model(small_llama(), PolyConfig(poly_type="shared", n_skills=1, n_tasks=2))
    with pytest.raises(ValueError, match="fixed allocation"):
        freeze_skills(fixed)
    model = get_peft_model(small_llama(), PolyConfig(n_tasks=2))
    model.add_adapter("other", PolyConfig(n_tasks=2))
    with pytest.raises(ValueError, match="'other' is not trainable"):
        freeze_skills(model, "other")


# ---------------------------------------------------------------------- MHR-mu
@pytest.mark.parametrize("make, kind", [(tiny_llama, "llama"), (tiny_gpt2, "gpt2"), (tiny_bert_cls, "bert")])
@pytest.mark.parametrize("n_splits", [1, 2])
def test_collapse_to_average_equals_uniform_routing(make, kind, n_splits, randomize_, small_inputs):
    model = get_peft_model(make(), PolyConfig(n_tasks=3, n_splits=n_splits, unknown_task="average"))
    randomize_(model)
    model.eval()

    def features(task_ids):  # last hidden states: O(1) values for every architecture (BERT's logits are ~1e-2)
        with torch.no_grad():
            return model(**small_inputs(kind), task_ids=task_ids, output_hidden_states=True).hidden_states[-1]

    average = features([99])  # unknown task: uniform routing
    known = features([1])
    name = collapse_to_average(model)
    assert model.active_adapter == name == "average"
    cfg = model.peft_config[name]
    assert (cfg.poly_type, cfg.n_skills, cfg.n_tasks, cfg.n_splits) == ("shared", 1, 1, 1)
    collapsed = features([0])
    torch.testing.assert_close(collapsed, average, atol=1e-5, rtol=1e-5)
    assert (collapsed - known).abs().max() > 1e-3  # not just any task's output
    # only the averaged LoRA (and head copy) trains
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".average" in n for n in trainable)
    assert not any("module_logits" in n for n in trainable)


def test_collapsed_adapter_saves_loads_and_trains(tmp_path, output_tensor, randomize_, small_inputs, small_llama):
    model = get_peft_model(small_llama(), PolyConfig(n_tasks=3, n_splits=2))
    randomize_(model)
    collapse_to_average(model, new_adapter_name="mu")
    model.train()
    x = small_inputs("llama")["input_ids"]
    loss = model(input_ids=x, labels=x, task_ids=[0]).loss
    loss.backward()
    grads = [layer.adapters["mu"].poly_lora_B.grad for _, layer in model.poly_layers()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    model.eval()
    model.save_pretrained(str(tmp_path), selected_adapters=["mu"])
    loaded = PolyModel.from_pretrained(small_llama(), str(tmp_path / "mu"))
    with torch.no_grad():
        torch.testing.assert_close(
            output_tensor(loaded(**small_inputs("llama"), task_ids=[0])), output_tensor(model(**small_inputs("llama"), task_ids=[0])),
            atol=1e-6, rtol=1e-6,
        )
    with pytest.raises(ValueError, match="already exists"):
        collapse_to_average(model, adapter_name="default", new_adapter_name="mu")


def test_collapsed_adapter_exports_as_a_peft_lora(tmp_path, output_tensor, randomize_, small_inputs, small_llama):
    """MHR-mu through the LoRA export: PEFT's LoRA computes what the collapsed adapter computes."""
    if not hasattr(PolyModel, "export_lora"):
        pytest.skip("PolyModel.export_lora is not on this branch yet")
    import warnings

    from peft import PeftModel

    model = get_peft_model(small_llama(), PolyConfig(n_tasks=3, n_splits=2))
    randomize_(model)
    collapse_to_average(model, new_adapter_name="mu")
    model.eval()
    model.export_lora(str(tmp_path), 0, adapter_name="mu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = PeftModel.from_pretrained(small_llama(), str(tmp_path)).eval()
    with torch.no_grad():
        expected = output_tensor(model(**small_inputs("llama"), task_ids=[0]))
        torch.testing.assert_close(output_tensor(lora(**small_inputs("llama"))), expected, atol=1e-5, rtol=1e-5)


def test_few_shot_example_workflow(tmp_path):
    """examples/few_shot_adaptation.py: train -> task hierarchy -> MHR-z and MHR-mu on an unseen task."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "examples" / "few_shot_adaptation.py"
    spec = importlib.util.spec_from_file_location("few_shot_adaptation", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    r = example.run(steps=150, few_shot_steps=20, plot_dir=str(tmp_path))
    # measured: similarity a-b 0.999, c-d 0.995, a-c 0.386; losses 3.953 -> 3.657 (MHR-z), 3.953 -> 3.700 (MHR-mu)
    assert min(r["sim_ab"], r["sim_cd"]) > r["sim_ac"] + 0.3
    assert {frozenset(r["dendrogram_order"][:2]), frozenset(r["dendrogram_order"][2:])} == {frozenset({0, 1}), frozenset({2, 3})}
    assert r["trained_task_a"] < r["trained_task_c"] - 0.2  # the unseen task follows a's rule
    assert r["mhr_z_trainable"] == 10 * 5 * 4  # 10 routers x 5 tasks x 4 skills
    assert r["mhr_z_after"] < r["mhr_z_before"] - 0.2
    assert abs(r["mhr_z_after"] - r["trained_task_a"]) < 0.05  # routing alone finds a's skills
    assert r["mhr_mu_after"] < r["mhr_mu_before"] - 0.1
    assert (tmp_path / "allocation.png").stat().st_size > 0 and (tmp_path / "task_hierarchy.png").stat().st_size > 0
