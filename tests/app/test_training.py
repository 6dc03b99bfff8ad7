"""Training: only adapters move, and a few steps learn conflicting tasks that need routing."""

import pytest
import torch

from polytropon import PolyConfig, get_peft_model


def conflicting_tasks(n, gen):
    """Sentences of low (3..42) or high (43..82) tokens. Task 0: label = high; task 1: label = low.

    Without the task id no model does better than chance: the tasks disagree on every example.
    """
    high = torch.randint(0, 2, (n,), generator=gen)
    ids = torch.randint(3, 43, (n, 6), generator=gen) + 40 * high[:, None]
    tasks = torch.randint(0, 2, (n,), generator=gen)
    return ids, tasks, high ^ tasks


def test_training_reduces_loss_and_learns_task_dependent_labels(tiny_bert_cls):
    torch.manual_seed(0)
    base = tiny_bert_cls(num_labels=2)
    frozen = {n: p.clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, PolyConfig(n_tasks=2, n_skills=2, r=4, target_modules=["query", "value", "intermediate.dense"]))
    model.train()
    # two-speed learning rate (Ponti et al. 2022): routing logits learn much faster than the skills
    skills = [p for n, p in model.named_parameters() if p.requires_grad and "module_logits" not in n]
    routers = [p for n, p in model.named_parameters() if "module_logits" in n]
    optimizer = torch.optim.AdamW([{"params": skills, "lr": 2e-2}, {"params": routers, "lr": 0.5}])
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(250):
        ids, tasks, labels = conflicting_tasks(32, gen)
        loss = model(input_ids=ids, labels=labels, task_ids=tasks).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    model.eval()
    ids, tasks, labels = conflicting_tasks(400, torch.Generator().manual_seed(1))
    with torch.no_grad():
        pred = model(input_ids=ids, task_ids=tasks).logits.argmax(-1)
        swapped = model(input_ids=ids, task_ids=1 - tasks).logits.argmax(-1)
    for t in (0, 1):
        assert (pred[tasks == t] == labels[tasks == t]).float().mean() > 0.85
    assert (swapped == labels).float().mean() < 0.2  # routing to the other task flips the answers
    for name, param in base.named_parameters():
        if "original_module" in name or "base_layer" in name or name in frozen:
            key = name.replace(".base_layer", "").replace(".original_module", "")
            torch.testing.assert_close(param, frozen[key], rtol=0, atol=0)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_gradients(reentrant, batch_inputs, randomize_, tiny_llama):
    """Checkpointed layers are recomputed inside backward(), after the call: they still get the task ids and
    the call's routing samples (drawn before the model ran), with either of torch's checkpoint modes."""
    import copy

    plain = get_peft_model(tiny_llama(), PolyConfig(n_tasks=3, n_splits=2, init_weights=False))
    randomize_(plain)
    checkpointed = copy.deepcopy(plain)
    kwargs = {"use_reentrant": reentrant}
    if hasattr(checkpointed.model, "activation_checkpointing_enable"):
        checkpointed.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers < 5
        checkpointed.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    inputs = batch_inputs("llama")
    grads, calls = [], []
    for model in (plain, checkpointed):
        model.train()
        count = []
        model.model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: count.append(1))
        torch.manual_seed(3)  # same relaxed-Bernoulli samples (checkpointing restores the RNG when recomputing)
        model(**inputs, labels=inputs["input_ids"], task_ids=[0, 1, 2, 0]).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        calls.append(len(count))
    assert calls == [1, 2]  # the checkpointed layer really ran again inside backward()
    assert set(grads[0]) == set(grads[1])
    for name, grad in grads[0].items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-6, atol=1e-7)


def test_infer_head_from_configs():
    from transformers import BertConfig, GPT2Config, LlamaConfig, T5Config

    from polytropon.app.training import infer_head

    assert infer_head(BertConfig()) == "classification"  # no architectures: an encoder family
    assert infer_head(BertConfig(architectures=["BertModel"])) == "classification"
    assert infer_head(BertConfig(architectures=["BertLMHeadModel"])) == "causal-lm"
    assert infer_head(GPT2Config()) == "causal-lm"
    assert infer_head(LlamaConfig(architectures=["LlamaForSequenceClassification"])) == "classification"
    assert infer_head(LlamaConfig()) == "causal-lm"
    assert infer_head(T5Config()) == "seq2seq"



def test_head_lr_flag_reaches_the_optimizer(tiny_bert):
    """``polytropon train --head-lr`` gives the head its own AdamW group; without it the head trains at ``--lr``."""
    from polytropon.app.cli import build_parser
    from polytropon.app.training import load_base_model, make_trainer

    base, tokenizer = load_base_model(tiny_bert, "classification", ["no", "yes"])
    model = get_peft_model(base, PolyConfig(r=4, n_tasks=2, n_skills=3, task_type="SEQ_CLS"))
    parser = build_parser()
    for flags, expected in ((["--head-lr", "0.001"], [("skills", 0.01), ("router", 0.3), ("head", 0.001)]),
                            ([], [("skills", 0.01), ("router", 0.3)])):
        args = parser.parse_args(["train", "--lr", "0.01", "--router-lr", "0.3", "--max-steps", "1", "--epochs", "1",
                                  "--batch-size", "2", "--seed", "0", *flags])
        optimizer = make_trainer(args, "/nonexistent/unused", model, tokenizer, None).create_optimizer()
        assert [(g["name"], g["lr"]) for g in optimizer.param_groups] == expected
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--head-lr", "0"])
