"""Training helpers: param_groups, the IBP prior, MHR-z (freeze_skills), MHR-mu (collapse_to_average)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from _toolkit_models import VOCAB, inputs, logits, randomize, tiny_bert_cls, tiny_gpt2, tiny_llama
from polytropon import (
    PolyConfig,
    PolyModel,
    add_tasks,
    collapse_to_average,
    freeze_skills,
    get_peft_model,
    ibp_loss,
    param_groups,
    unfreeze_skills,
)
from polytropon.router import PolyRouter
from polytropon.training import ibp_log_prior
from polytropon.variants import unique_routers


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention
    yield
    torch.set_num_threads(previous)


def _routers(model, adapter="default"):
    return unique_routers([layer.adapters[adapter].poly_router for _, layer in model._poly_layers()])


def _sequences(n: int, gen: torch.Generator, length: int = 8):
    """Synthetic multi-task LM data: task t continues an arithmetic sequence with step (1, 5, 11)[t]."""
    task = torch.randint(0, 3, (n,), generator=gen)
    start = torch.randint(3, VOCAB, (n, 1), generator=gen)
    step = torch.tensor([1, 5, 11])[task]
    seq = (start - 3 + step[:, None] * torch.arange(length)) % (VOCAB - 3) + 3
    return seq, task


# ---------------------------------------------------------------------- param_groups
@pytest.mark.parametrize("granularity", ["module", "model"])
def test_param_groups_split_router_logits_from_skills(granularity):
    model = get_peft_model(tiny_bert_cls(), PolyConfig(n_tasks=3, router_granularity=granularity))
    groups = param_groups(model, lr=1e-4, router_lr=1e-2, weight_decay=0.1)
    assert [g["name"] for g in groups] == ["skills", "router"]
    skills, router = groups
    assert (skills["lr"], skills["weight_decay"], router["lr"], router["weight_decay"]) == (1e-4, 0.1, 1e-2, 0.0)
    logits_ids = {id(r.module_logits) for r in _routers(model)}
    assert {id(p) for p in router["params"]} == logits_ids
    assert len(router["params"]) == (1 if granularity == "model" else len(list(model._poly_layers())))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(map(id, skills["params"] + router["params"])) == sorted(map(id, trainable))
    assert any(p.shape[0] == 3 and p.dim() == 2 for p in skills["params"])  # the classifier head copy
    torch.optim.AdamW(groups)  # accepted as is


def test_param_groups_leave_out_empty_groups_and_check_rates():
    fixed = get_peft_model(tiny_llama(), PolyConfig(poly_type="shared", n_skills=1, n_tasks=2))
    assert [g["name"] for g in param_groups(fixed, 1e-3, 1e-2)] == ["skills"]
    with pytest.raises(ValueError, match="router_lr"):
        param_groups(fixed, 1e-3, -1.0)
    with pytest.raises(ValueError, match="lr"):
        param_groups(fixed, float("nan"), 1.0)
    frozen = get_peft_model(tiny_llama(), PolyConfig(n_tasks=2, inference_mode=True))
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(frozen, 1e-3, 1e-2)


def test_training_with_param_groups_reduces_loss():
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_llama(), PolyConfig(n_tasks=3, n_skills=4, r=4, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
    )
    optimizer = torch.optim.AdamW(param_groups(model, lr=5e-2, router_lr=2e-1))
    eval_x, eval_t = _sequences(48, torch.Generator().manual_seed(99))

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = model(input_ids=eval_x, labels=eval_x, task_ids=eval_t).loss.item()
        model.train()
        return loss

    initial_logits = [r.module_logits.detach().clone() for r in _routers(model)]
    start = eval_loss()
    gen = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(60):
        x, t = _sequences(16, gen)
        loss = model(input_ids=x, labels=x, task_ids=t).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    end = eval_loss()
    assert end < start - 0.15, (start, end)  # measured: 4.15 -> 3.85
    moved = max((r.module_logits - old).abs().max().item() for r, old in zip(_routers(model), initial_logits))
    assert moved > 0.05  # the router group trained (init is within +-1e-3)


def test_param_groups_with_hf_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_llama(), PolyConfig(n_tasks=3))
    gen = torch.Generator().manual_seed(0)
    x, t = _sequences(8, gen)
    data = [{"input_ids": x[i], "labels": x[i], "task_ids": t[i]} for i in range(8)]
    optimizer = torch.optim.AdamW(param_groups(model, lr=1e-3, router_lr=1e-1))
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, report_to=[], use_cpu=True,
        remove_unused_columns=False, save_strategy="no", logging_strategy="no",
    )
    before = [r.module_logits.detach().clone() for r in _routers(model)]
    Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None)).train()
    assert [g["lr"] for g in optimizer.param_groups] != [None, None]
    assert any(not torch.equal(r.module_logits, old) for r, old in zip(_routers(model), before))


# ---------------------------------------------------------------------- IBP prior
def test_ibp_log_prior_hand_checked():
    # N = 2 tasks, K = 1 skill, alpha = 1 (so alpha/K = 1); both tasks use the skill with p = 0.25 -> m = 0.5
    logit = torch.full((2, 1), math.log(0.25 / 0.75), requires_grad=True)
    log_p = ibp_log_prior(torch.sigmoid(logit), alpha=1.0)
    expected = math.log(1.0) + math.lgamma(0.5 + 1) + math.lgamma(2 - 0.5 + 1) - math.lgamma(2 + 1 + 1)
    assert abs(log_p.item() - expected) < 1e-6
    assert abs(log_p.item() - (-1.6278588)) < 1e-6  # lgamma(1.5) + lgamma(2.5) - log(6)
    (-log_p).backward()
    # d(-log p)/dm = digamma(N - m + 1) - digamma(m + a) = digamma(2.5) - digamma(1.5) = 1/1.5;
    # dm/dlogit = p (1 - p) = 0.1875  ->  0.125, positive: the prior pushes a rarely used skill further down
    torch.testing.assert_close(logit.grad, torch.full((2, 1), 0.125), atol=1e-6, rtol=1e-6)


def test_ibp_log_prior_prefers_sparse_or_shared_skills():
    # 4 tasks, 2 skills: skill 0 used by all, skill 1 by none  vs  every task half-using both
    structured = torch.tensor([[1.0, 0.0]] * 4).clamp(1e-4, 1 - 1e-4)
    diffuse = torch.full((4, 2), 0.5)
    assert ibp_log_prior(structured, alpha=1.0) > ibp_log_prior(diffuse, alpha=1.0)
    with pytest.raises(ValueError, match="alpha"):
        ibp_log_prior(diffuse, alpha=0.0)


def test_ibp_loss_over_model_routers():
    model = get_peft_model(tiny_llama(), PolyConfig(n_tasks=3, n_skills=4, n_splits=2, router_granularity="block"))
    randomize(model)
    routers = _routers(model)
    manual = []
    for r in routers:
        probs = torch.sigmoid(r.module_logits.detach()).view(3, 2, 4)
        for q in range(2):
            manual.append(-ibp_log_prior(probs[:, q], alpha=2.0))
    loss = ibp_loss(model, alpha=2.0)
    torch.testing.assert_close(loss, torch.stack(manual).mean())
    torch.testing.assert_close(ibp_loss(model, alpha=2.0, reduction="sum"), torch.stack(manual).sum())
    loss.backward()
    assert all(r.module_logits.grad is not None and r.module_logits.grad.abs().sum() > 0 for r in routers)
    assert all(p.grad is None for n, p in model.named_parameters() if "poly_lora" in n)
    fixed = get_peft_model(tiny_llama(), PolyConfig(poly_type="private", n_tasks=2, n_skills=2))
    with pytest.raises(ValueError, match="no learned router"):
        ibp_loss(fixed)
    with pytest.raises(ValueError, match="reduction"):
        ibp_loss(model, reduction="max")


# ---------------------------------------------------------------------- MHR-z
def test_freeze_skills_trains_only_router_logits():
    model = get_peft_model(tiny_bert_cls(), PolyConfig(n_tasks=3, init_weights=False))
    randomize(model)
    n_logits = sum(r.module_logits.numel() for r in _routers(model))
    assert freeze_skills(model) == n_logits
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model.train()
    out = model(**inputs("bert"), task_ids=[0, 1, 2, 0], labels=torch.tensor([0, 1, 2, 1]))
    out.loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith("module_logits") for n in changed)
    assert unfreeze_skills(model) > n_logits


def test_mhr_z_few_shot_on_new_task_keeps_old_rows():
    model = get_peft_model(tiny_llama(), PolyConfig(n_tasks=3, task_names=["a", "b", "c"], init_weights=False))
    randomize(model)
    add_tasks(model, ["new"], init="average")
    freeze_skills(model)
    old_rows = [r.module_logits[:3].detach().clone() for r in _routers(model)]
    new_row = [r.module_logits[3].detach().clone() for r in _routers(model)]
    optimizer = torch.optim.Adam(param_groups(model, lr=1e-3, router_lr=1e-1))
    model.train()
    x = inputs("llama")["input_ids"]
    for _ in range(3):
        loss = model(input_ids=x, labels=x, task_ids=["new"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for r, old, new in zip(_routers(model), old_rows, new_row):
        assert torch.equal(r.module_logits[:3], old)
        assert not torch.equal(r.module_logits[3], new)


def test_freeze_skills_errors():
    fixed = get_peft_model(tiny_llama(), PolyConfig(poly_type="shared", n_skills=1, n_tasks=2))
    with pytest.raises(ValueError, match="fixed allocation"):
        freeze_skills(fixed)
    model = get_peft_model(tiny_llama(), PolyConfig(n_tasks=2))
    model.add_adapter("other", PolyConfig(n_tasks=2))
    with pytest.raises(ValueError, match="'other' is not trainable"):
        freeze_skills(model, "other")


# ---------------------------------------------------------------------- MHR-mu
@pytest.mark.parametrize("make, kind", [(tiny_llama, "llama"), (tiny_gpt2, "gpt2"), (tiny_bert_cls, "bert")])
@pytest.mark.parametrize("n_splits", [1, 2])
def test_collapse_to_average_equals_uniform_routing(make, kind, n_splits):
    model = get_peft_model(make(), PolyConfig(n_tasks=3, n_splits=n_splits, unknown_task="average"))
    randomize(model)
    model.eval()

    def features(task_ids):  # last hidden states: O(1) values for every architecture (BERT's logits are ~1e-2)
        with torch.no_grad():
            return model(**inputs(kind), task_ids=task_ids, output_hidden_states=True).hidden_states[-1]

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


def test_collapsed_adapter_saves_loads_and_trains(tmp_path):
    model = get_peft_model(tiny_llama(), PolyConfig(n_tasks=3, n_splits=2))
    randomize(model)
    collapse_to_average(model, new_adapter_name="mu")
    model.train()
    x = inputs("llama")["input_ids"]
    loss = model(input_ids=x, labels=x, task_ids=[0]).loss
    loss.backward()
    grads = [layer.adapters["mu"].poly_lora_B.grad for _, layer in model._poly_layers()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    model.eval()
    model.save_pretrained(str(tmp_path), selected_adapters=["mu"])
    loaded = PolyModel.from_pretrained(tiny_llama(), str(tmp_path / "mu"))
    with torch.no_grad():
        torch.testing.assert_close(
            logits(loaded(**inputs("llama"), task_ids=[0])), logits(model(**inputs("llama"), task_ids=[0])),
            atol=1e-6, rtol=1e-6,
        )
    with pytest.raises(ValueError, match="already exists"):
        collapse_to_average(model, adapter_name="default", new_adapter_name="mu")


def test_collapsed_adapter_exports_as_a_peft_lora(tmp_path):
    """MHR-mu through the LoRA export: PEFT's LoRA computes what the collapsed adapter computes."""
    if not hasattr(PolyModel, "export_lora"):
        pytest.skip("PolyModel.export_lora is not on this branch yet")
    import warnings

    from peft import PeftModel

    model = get_peft_model(tiny_llama(), PolyConfig(n_tasks=3, n_splits=2))
    randomize(model)
    collapse_to_average(model, new_adapter_name="mu")
    model.eval()
    model.export_lora(str(tmp_path), 0, adapter_name="mu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    with torch.no_grad():
        expected = logits(model(**inputs("llama"), task_ids=[0]))
        torch.testing.assert_close(logits(lora(**inputs("llama"))), expected, atol=1e-5, rtol=1e-5)
