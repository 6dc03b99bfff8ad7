"""Two-speed learning rates: param_groups with torch optimizers and the HF Trainer."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import SMALL_VOCAB as VOCAB
from polytropon import PolyConfig, get_peft_model, param_groups


def _sequences(n: int, gen: torch.Generator, length: int = 8):
    """Synthetic multi-task LM data: task t continues an arithmetic sequence with step (1, 5, 11)[t]."""
    task = torch.randint(0, 3, (n,), generator=gen)
    start = torch.randint(3, VOCAB, (n, 1), generator=gen)
    step = torch.tensor([1, 5, 11])[task]
    seq = (start - 3 + step[:, None] * torch.arange(length)) % (VOCAB - 3) + 3
    return seq, task


# ---------------------------------------------------------------------- param_groups
@pytest.mark.parametrize("granularity", ["module", "model"])
def test_param_groups_split_router_logits_from_skills(granularity, routers, small_bert_cls):
    model = get_peft_model(small_bert_cls(), PolyConfig(n_tasks=3, router_granularity=granularity))
    groups = param_groups(model, lr=1e-4, router_lr=1e-2, weight_decay=0.1)
    assert [g["name"] for g in groups] == ["skills", "router"]
    skills, router = groups
    assert (skills["lr"], skills["weight_decay"], router["lr"], router["weight_decay"]) == (1e-4, 0.1, 1e-2, 0.0)
    logits_ids = {id(r.module_logits) for r in routers(model)}
    assert {id(p) for p in router["params"]} == logits_ids
    assert len(router["params"]) == (1 if granularity == "model" else len(list(model.poly_layers())))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(map(id, skills["params"] + router["params"])) == sorted(map(id, trainable))
    assert any(p.shape[0] == 3 and p.dim() == 2 for p in skills["params"])  # the classifier head copy
    torch.optim.AdamW(groups)  # accepted as is


def test_param_groups_put_the_head_in_its_own_group_with_head_lr(small_bert_cls):
    model = get_peft_model(small_bert_cls(), PolyConfig(n_tasks=3))
    plain = param_groups(model, lr=1e-2, router_lr=0.3, weight_decay=0.1)
    groups = param_groups(model, lr=1e-2, router_lr=0.3, weight_decay=0.1, head_lr=1e-3)
    assert [g["name"] for g in groups] == ["skills", "router", "head"]
    skills, router, head = groups
    assert (head["lr"], head["weight_decay"], skills["lr"]) == (1e-3, 0.1, 1e-2)
    head_ids = {id(p) for n, p in model.named_parameters() if p.requires_grad and "classifier" in n}
    assert head_ids and {id(p) for p in head["params"]} == head_ids  # the classifier copy, weight and bias
    adapter_ids = {id(p) for n, p in model.named_parameters() if "poly_lora_" in n}
    assert {id(p) for p in skills["params"]} == adapter_ids
    assert router["params"] == plain[1]["params"]
    assert sorted(map(id, skills["params"] + head["params"])) == sorted(map(id, plain[0]["params"]))
    with pytest.raises(ValueError, match="head_lr"):
        param_groups(model, 1e-2, 0.3, head_lr=-1e-3)


def test_poly_trainer_trains_the_head_at_head_lr(tmp_path, small_bert_cls):
    from transformers import TrainingArguments

    from polytropon import PolyTrainer

    model = get_peft_model(small_bert_cls(), PolyConfig(n_tasks=3))
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-2, weight_decay=0.05, report_to=[],
                             use_cpu=True, save_strategy="no")
    trainer = PolyTrainer(model=model, args=args, router_lr=0.3, head_lr=1e-4)
    optimizer = trainer.create_optimizer()
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [
        ("skills", 1e-2, 0.05), ("router", 0.3, 0.0), ("head", 1e-4, 0.05)]
    with pytest.raises(ValueError, match="head_lr"):
        PolyTrainer(model=model, args=args, head_lr=-1.0)


def test_param_groups_leave_out_empty_groups_and_check_rates(small_llama):
    fixed = get_peft_model(small_llama(), PolyConfig(poly_type="shared", n_skills=1, n_tasks=2))
    assert [g["name"] for g in param_groups(fixed, 1e-3, 1e-2)] == ["skills"]
    with pytest.raises(ValueError, match="router_lr"):
        param_groups(fixed, 1e-3, -1.0)
    with pytest.raises(ValueError, match="lr"):
        param_groups(fixed, float("nan"), 1.0)
    frozen = get_peft_model(small_llama(), PolyConfig(n_tasks=2, inference_mode=True))
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(frozen, 1e-3, 1e-2)


def test_training_with_param_groups_reduces_loss(routers, small_llama):
    torch.manual_seed(0)
    model = get_peft_model(
        small_llama(), PolyConfig(n_tasks=3, n_skills=4, r=4, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
    )
    optimizer = torch.optim.AdamW(param_groups(model, lr=5e-2, router_lr=2e-1))
    eval_x, eval_t = _sequences(48, torch.Generator().manual_seed(99))

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = model(input_ids=eval_x, labels=eval_x, task_ids=eval_t).loss.item()
        model.train()
        return loss

    initial_logits = [r.module_logits.detach().clone() for r in routers(model)]
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
    moved = max((r.module_logits - old).abs().max().item() for r, old in zip(routers(model), initial_logits))
    assert moved > 0.05  # the router group trained (init is within +-1e-3)


def test_param_groups_with_hf_trainer(tmp_path, routers, small_llama):
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(small_llama(), PolyConfig(n_tasks=3))
    gen = torch.Generator().manual_seed(0)
    x, t = _sequences(8, gen)
    data = [{"input_ids": x[i], "labels": x[i], "task_ids": t[i]} for i in range(8)]
    optimizer = torch.optim.AdamW(param_groups(model, lr=1e-3, router_lr=1e-1))
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, report_to=[], use_cpu=True,
        remove_unused_columns=False, save_strategy="no", logging_strategy="no",
    )
    before = [r.module_logits.detach().clone() for r in routers(model)]
    Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None)).train()
    assert [g["lr"] for g in optimizer.param_groups] != [None, None]
    assert any(not torch.equal(r.module_logits, old) for r, old in zip(routers(model), before))
