"""``torch.compile`` of a PolyModel: equal to eager, no recompilation when only the task ids change, training.

Compilation on a CPU is slow, so the models are tiny and most tests use the ``aot_eager`` backend (dynamo's
tracing and AOT autograd without code generation: guards and recompiles are the same as with inductor).
One test runs the default inductor backend.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from polytropon import PolyConfig, get_peft_model

VOCAB = 64


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def poly_llama(**overrides):
    config = dict(r=2, n_tasks=6, n_skills=3, n_splits=2, init_weights=False,
                  target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    config.update(overrides)
    model = get_peft_model(tiny_llama(), PolyConfig(**config))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "poly_" in name or "module_logits" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return model


#: Every form task ids take: a list or a tensor, one id per example or a single id for the batch. Each form is
#: compiled once (dynamo guards on the argument's type and a list's length), then only values change.
def forms(batch: int) -> list:
    return [[1] * batch, torch.tensor([2] * batch), [0]]


def task_id_batches(n_tasks: int, batch: int, count: int, seed: int = 0) -> list:
    """Task ids with 1 .. batch distinct tasks, in the forms of :func:`forms`."""
    rng = random.Random(seed)
    out = [[3] * batch, list(range(batch)), [4], torch.tensor([0] * batch)]
    while len(out) < count:
        k = rng.randint(1, batch)
        tasks = rng.sample(range(n_tasks), k)
        ids = [rng.choice(tasks) for _ in range(batch)]
        out.append(torch.tensor(ids) if rng.random() < 0.5 else ids)
    return out


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_compiled_eval_equals_eager_and_never_recompiles_for_new_task_ids():
    model = poly_llama(router_granularity="block").eval()  # one router per block: shared by the block's layers
    compiled = torch.compile(model, backend="aot_eager")
    ids = torch.randint(3, VOCAB, (4, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for task_ids in forms(4):  # compiles once per form
            got = compiled(input_ids=ids, task_ids=task_ids).logits
            torch.testing.assert_close(got, model(input_ids=ids, task_ids=task_ids).logits, rtol=1e-5, atol=1e-5)
    compiled_graphs = graphs()
    assert compiled_graphs >= 1
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for task_ids in task_id_batches(6, 4, 16):  # other ids, other numbers of distinct tasks
            got = compiled(input_ids=ids, task_ids=task_ids).logits
            torch.testing.assert_close(got, model(input_ids=ids, task_ids=task_ids).logits, rtol=1e-5, atol=1e-5)
    assert graphs() == compiled_graphs
    # with autograd on in eval mode the compiled model is traced once more (autograd is part of the guards)
    got = compiled(input_ids=ids, task_ids=[1, 2, 2, 1]).logits
    with torch._dynamo.config.patch(error_on_recompile=True):
        got2 = compiled(input_ids=ids, task_ids=[4, 0, 4, 0]).logits
    torch.testing.assert_close(got.detach(), model(input_ids=ids, task_ids=[1, 2, 2, 1]).logits.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got2.detach(), model(input_ids=ids, task_ids=[4, 0, 4, 0]).logits.detach(), rtol=1e-5, atol=1e-5)


def test_compiled_model_checks_task_ids_like_eager():
    model = poly_llama().eval()
    compiled = torch.compile(model, backend="aot_eager")
    ids = torch.randint(3, VOCAB, (4, 6))
    with torch.no_grad():
        compiled(input_ids=ids, task_ids=[0, 1, 2, 3])
        compiled(input_ids=ids, task_ids=torch.tensor([0, 1, 2, 3]))
        with torch._dynamo.config.patch(error_on_recompile=True):  # bad values: checked without recompiling
            with pytest.raises(ValueError, match="out of range"):
                compiled(input_ids=ids, task_ids=[0, 1, 2, 6])
            with pytest.raises(ValueError, match=">= 0"):
                compiled(input_ids=ids, task_ids=torch.tensor([0, -1, 2, 3]))
        with pytest.raises(TypeError, match="integer dtype"):  # another dtype or type: guarded, so traced anew
            compiled(input_ids=ids, task_ids=torch.zeros(4))
        with pytest.raises(ValueError, match="task_ids are required"):
            compiled(input_ids=ids)
        expected = model(input_ids=ids, task_ids=[5, 5, 4, 4]).logits
        torch.testing.assert_close(compiled(input_ids=ids, task_ids=[5, 5, 4, 4]).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("granularity, hard", [("module", False), ("block", True)])
def test_compiled_training_step_equals_eager_and_never_recompiles(granularity, hard):
    """With ``aot_eager`` the random numbers are torch's own: under one seed the routing samples, the loss and
    every gradient equal the eager step's (routers are drawn in the eager order: each layer's router in
    the order of the layers, then shared ones -- here a block's single router -- at first use)."""
    torch.manual_seed(0)
    eager = poly_llama(router_granularity=granularity, hard_routing=hard).train()
    traced = poly_llama(router_granularity=granularity, hard_routing=hard).train()
    compiled = torch.compile(traced, backend="aot_eager")
    ids = torch.randint(3, VOCAB, (4, 6), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD([p for p in traced.parameters() if p.requires_grad], lr=0.1)
    steps = [[0, 1, 2, 3], torch.tensor([4, 4, 1, 5]), [0, 0, 1, 1], torch.tensor([2, 2, 2, 2]), [5, 3, 5, 3]]
    for step, task_ids in enumerate(steps):
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
        torch.manual_seed(step)
        loss = eager(input_ids=ids, labels=ids, task_ids=task_ids).loss
        loss.backward()
        torch.manual_seed(step)
        with torch._dynamo.config.patch(error_on_recompile=step > 1):
            compiled_loss = compiled(input_ids=ids, labels=ids, task_ids=task_ids).loss
        compiled_loss.backward()
        torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
        grads = {n: p.grad for n, p in traced.named_parameters() if p.requires_grad}
        assert len(grads) > 0
        for name, param in eager.named_parameters():
            if param.requires_grad:
                torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
        # the same SGD step on both, so the next step starts from equal weights again
        optimizer.step()
        with torch.no_grad():
            for param in eager.parameters():
                if param.requires_grad:
                    param.sub_(0.1 * param.grad)


def test_compiled_decoding_equals_eager_and_never_recompiles_for_new_task_ids():
    """``generate`` runs eagerly; compiling the wrapped model's forward compiles every decoding step."""
    model = poly_llama(router_granularity="block").eval()
    prompt = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    expected = {tuple(t): model.generate(input_ids=prompt, task_ids=t, **kwargs) for t in ([0, 1], [2, 2], [5, 3])}
    model.model.forward = torch.compile(model.model.forward, backend="aot_eager")
    assert torch.equal(model.generate(input_ids=prompt, task_ids=[0, 1], **kwargs), expected[(0, 1)])  # compiles
    with torch._dynamo.config.patch(error_on_recompile=True):
        for task_ids in ([2, 2], [5, 3]):
            assert torch.equal(model.generate(input_ids=prompt, task_ids=task_ids, **kwargs), expected[tuple(task_ids)])


def test_default_inductor_backend_equals_eager():
    model = poly_llama().eval()
    compiled = torch.compile(model)  # inductor: generated C++ code
    ids = torch.randint(3, VOCAB, (3, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for task_ids in ([0, 1, 2], [4, 4, 1], [5, 5, 5]):
            got = compiled(input_ids=ids, task_ids=task_ids).logits
            torch.testing.assert_close(got, model(input_ids=ids, task_ids=task_ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not os.environ.get("POLYTROPON_SLOW_TESTS"), reason="inductor compiles forward and backward C++ "
                    "kernels for minutes on a small CPU; set POLYTROPON_SLOW_TESTS=1 to run it")
def test_default_inductor_backend_training_steps():
    model = poly_llama(router_granularity="block").train()
    compiled = torch.compile(model)
    ids = torch.randint(3, VOCAB, (3, 5), generator=torch.Generator().manual_seed(0))
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    for step, task_ids in enumerate(([0, 1, 2], [3, 3, 5], [1, 1, 1])):
        optimizer.zero_grad()
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            loss = compiled(input_ids=ids, labels=ids, task_ids=task_ids).loss
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
        optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, trainable))
