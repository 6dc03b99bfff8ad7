"""Every fast path of the adapter update agrees with PEFT's Poly (outputs and gradients) and with autograd."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from polytropon import PolyConfig, get_peft_model
from polytropon.kernels import RoutedLowRank, RoutedPoly, base_linear, mix_factors
from polytropon.router import relaxed_bernoulli_rsample

peft = pytest.importorskip("peft")

TOL = 1e-5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def pair(small_llama):
    """The factory ``pair(...)`` below, built from the shared builders (fixtures)."""

    def pair(tmp_path, n_splits: int = 2, n_tasks: int = 4):
        """Our model and PEFT's Poly on identical copies of a tiny Llama, with identical random adapters."""
        base = small_llama()
        torch.manual_seed(3)
        config = PolyConfig(r=4, n_tasks=n_tasks, n_skills=3, n_splits=n_splits, init_weights=False, target_modules=TARGETS)
        ours = get_peft_model(copy.deepcopy(base), config)
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for name, p in ours.named_parameters():
                if "module_logits" in name:
                    p.copy_(torch.randn(p.shape, generator=g))
        ours.save_pretrained(tmp_path)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path), is_trainable=True)
        return ours, theirs

    return pair


def adapter_grads(model) -> dict[str, torch.Tensor]:
    """Adapter gradients keyed by ``(layer path, tensor)``, comparable between our names and PEFT's."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            path = re.search(r"layers\.\d+\.\w+\.\w+_proj", name).group(0)
            kind = re.search(r"poly_lora_A|poly_lora_B|module_logits", name).group(0)
            out[(path, kind)] = p.grad.clone()
    return out


def test_relaxed_bernoulli_is_bit_identical_to_torch_distributions():
    logits = (torch.randn(6, 2, 5) * 3).requires_grad_()
    mine = logits.detach().clone().requires_grad_()
    torch.manual_seed(11)
    expected = torch.distributions.RelaxedBernoulli(1.0, logits=logits).rsample()
    torch.manual_seed(11)
    got = relaxed_bernoulli_rsample(mine)
    assert torch.equal(got, expected)
    weight = torch.randn_like(got)
    (expected * weight).sum().backward()
    (got * weight).sum().backward()
    assert torch.equal(mine.grad, logits.grad)


@pytest.mark.parametrize("as_view", [False, True])
def test_routed_low_rank_gradcheck(as_view):
    torch.manual_seed(0)
    n, t, d_in, d_out, r = 3, 4, 6, 5, 2
    x = torch.randn(n, t, d_in, dtype=torch.float64, requires_grad=True)
    a = torch.randn(n, d_in, r, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, r, d_out, dtype=torch.float64, requires_grad=True)
    base = torch.randn(n * t, d_out, dtype=torch.float64, requires_grad=True)

    def fn(base, x, a, b):
        result = base * 1.0  # a fresh non-leaf tensor, as a layer output is
        result = result.view(n, t, d_out) if as_view else result.reshape(n, t, d_out).clone()
        return RoutedLowRank.apply(result, x, a, b)

    assert torch.autograd.gradcheck(fn, (base, x, a, b))
    expected = base.view(n, t, d_out) + x @ a @ b
    torch.testing.assert_close(fn(base, x, a, b), expected)


@pytest.mark.parametrize("as_view", [False, True])
@pytest.mark.parametrize("n_splits", [1, 2])
def test_routed_poly_gradcheck(as_view, n_splits):
    """The training Function mixes inside and differentiates through the mixing by hand."""
    torch.manual_seed(0)
    n, t, d_in, d_out, r, n_skills = 3, 4, 6, 4, 2, 3
    f64 = dict(dtype=torch.float64, requires_grad=True)
    x = torch.randn(n, t, d_in, **f64)
    weights = torch.rand(n, n_splits, n_skills, **f64)
    lora_a = torch.randn(n_splits, n_skills, d_in // n_splits, r, **f64)
    lora_b = torch.randn(n_splits, n_skills, r, d_out // n_splits, **f64)
    base = torch.randn(n * t, d_out, **f64)

    def fn(base, x, weights, lora_a, lora_b):
        result = base * 1.0
        result = result.view(n, t, d_out) if as_view else result.reshape(n, t, d_out).clone()
        return RoutedPoly.apply(result, x, weights, lora_a, lora_b)

    assert torch.autograd.gradcheck(fn, (base, x, weights, lora_a, lora_b))
    a, b = mix_factors(weights, lora_a, lora_b)
    torch.testing.assert_close(fn(base, x, weights, lora_a, lora_b), base.view(n, t, d_out) + x @ a @ b)


@pytest.mark.parametrize("n_splits", [1, 2])
def test_training_step_matches_peft(tmp_path, n_splits, pair, rel_diff, tokens):
    ours, theirs = pair(tmp_path, n_splits)
    ours.train()
    theirs.train()
    ids = tokens(batch=4, length=6)
    task_ids = torch.tensor([0, 3, 1, 3])
    torch.manual_seed(21)
    loss_ours = ours(input_ids=ids, labels=ids, task_ids=task_ids).loss
    torch.manual_seed(21)
    loss_theirs = theirs(input_ids=ids, labels=ids, task_ids=task_ids).loss
    assert abs(loss_ours.item() - loss_theirs.item()) < TOL * abs(loss_theirs.item())
    loss_ours.backward()
    loss_theirs.backward()
    mine, ref = adapter_grads(ours), adapter_grads(theirs)
    assert len(mine) == 3 * 2 * len(TARGETS) and set(mine) == set(ref)
    for key in ref:
        assert rel_diff(mine[key], ref[key]) < 1e-4, key


@pytest.mark.parametrize("task_ids", [[2, 2, 2], [0, 3, 1], [1, 1, 0]], ids=["one-task", "all-distinct", "repeats"])
def test_eval_outputs_match_peft_without_and_with_autograd(tmp_path, task_ids, pair, rel_diff, tokens):
    ours, theirs = pair(tmp_path)
    ours.eval()
    theirs.eval()
    ids = tokens()
    tids = torch.tensor(task_ids)
    with torch.no_grad():
        expected = theirs(input_ids=ids, task_ids=tids).logits
        first = ours(input_ids=ids, task_ids=tids).logits  # mixes and caches
        second = ours(input_ids=ids, task_ids=tids).logits  # served from the cache
    assert rel_diff(first, expected) < TOL and torch.equal(first, second)
    # eval with autograd on (e.g. saliency, or eval-mode fine-tuning): same values, same gradients
    loss_ours = ours(input_ids=ids, task_ids=tids).logits.square().mean()
    loss_theirs = theirs(input_ids=ids, task_ids=tids).logits.square().mean()
    assert abs(loss_ours.item() - loss_theirs.item()) < TOL * loss_theirs.item()
    loss_ours.backward()
    loss_theirs.backward()
    mine, ref = adapter_grads(ours), adapter_grads(theirs)
    assert set(mine) == set(ref)
    for key in ref:
        assert rel_diff(mine[key], ref[key]) < 1e-4, key


def test_cache_follows_task_ids_and_weight_updates(tmp_path, pair, rel_diff, tokens):
    ours, theirs = pair(tmp_path)
    ours.eval()
    theirs.eval()
    ids = tokens()
    with torch.no_grad():
        for task_ids in ([0, 1, 2], [2, 1, 0], [3, 3, 3], [0, 1, 2]):
            assert rel_diff(ours(input_ids=ids, task_ids=task_ids).logits,
                            theirs(input_ids=ids, task_ids=torch.tensor(task_ids)).logits) < TOL
        for model in (ours, theirs):  # an optimizer-like in-place update of every adapter tensor
            for name, p in model.named_parameters():
                if "poly_" in name:
                    p.mul_(1.1)
        assert rel_diff(ours(input_ids=ids, task_ids=[0, 1, 2]).logits,
                        theirs(input_ids=ids, task_ids=torch.tensor([0, 1, 2])).logits) < TOL


@pytest.mark.parametrize("task_ids", [[1, 1], [3, 0]])
def test_cached_generation_matches_peft(tmp_path, task_ids, pair, rel_diff, tokens):
    ours, theirs = pair(tmp_path)
    ours.eval()
    theirs.eval()
    prompt = tokens(batch=2, length=5)
    kwargs = dict(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False, pad_token_id=0,
        output_scores=True, return_dict_in_generate=True,
    )
    mine = ours.generate(task_ids=task_ids, **kwargs)
    ref = theirs.generate(task_ids=torch.tensor(task_ids), **kwargs)
    assert torch.equal(mine.sequences, ref.sequences)
    for got, expected in zip(mine.scores, ref.scores):
        assert rel_diff(got, expected) < TOL


def test_conv1d_training_gradients_match_plain_autograd(rel_diff, small_gpt2, tokens):
    """GPT-2's Conv1D returns a view: the update must not go in place on it, and gradients stay exact."""
    torch.manual_seed(0)
    config = PolyConfig(r=4, n_tasks=3, n_skills=3, n_splits=2, init_weights=False, target_modules=["c_attn", "c_fc"])
    model = get_peft_model(small_gpt2(), config).train()
    with torch.no_grad():  # GPT-2 starts with zero biases: give them values, so a lost bias would show
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)
    ids = tokens(batch=3, length=5)
    torch.manual_seed(5)
    model(input_ids=ids, labels=ids, task_ids=[0, 2, 1]).loss.backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    # the same computation through plain differentiable ops
    from polytropon import layer as layer_module

    def slow(result, x, weights, lora_a, lora_b, base=None, replay=None):  # replay: how x is kept, not what is computed
        a, b = mix_factors(weights, lora_a, lora_b)
        if result is None:  # the fused path: the base layer is computed inside the Function
            calls.append(base)
            result = base_linear(x, base)
        return result + torch.bmm(torch.bmm(x, a), b)

    calls = []

    original = layer_module.RoutedPoly.apply
    layer_module.RoutedPoly.apply = slow
    try:
        torch.manual_seed(5)
        model(input_ids=ids, labels=ids, task_ids=[0, 2, 1]).loss.backward()
    finally:
        layer_module.RoutedPoly.apply = original
    slow_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert len(calls) == 2 * 2 and all(fan_in_fan_out for _, _, fan_in_fan_out in calls)  # every layer fused
    assert set(fast) == set(slow_grads) and len(fast) == 3 * 2 * 2
    for name in fast:
        assert rel_diff(fast[name], slow_grads[name]) < 1e-5, name


@pytest.mark.parametrize("arch", ["llama-linear", "gpt2-conv1d"])
@pytest.mark.parametrize("length", [1, 8, 20], ids=["one-token", "few-rows", "many-rows"])
def test_eval_layouts_by_rows_per_example_match_each_task_merged(arch, length, poly_model, rel_diff, tokens):
    """Every eval layout -- plain for a few rows per example, transposed with the base GEMM accumulated into the
    update for many -- equals each example run alone with its task merged into the weights (with a bias: GPT-2)."""
    model = poly_model(arch, "mhr")
    with torch.no_grad():  # GPT-2 starts with zero biases: give them values, so a lost bias would show
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)
    ids = tokens(batch=3, length=length)
    for task_ids in ([2, 0, 1], [1, 1, 1]):  # mixed tasks (per-row factors), one task (shared factors)
        with torch.no_grad():
            routed = model(input_ids=ids, task_ids=task_ids).logits
            for row, task in enumerate(task_ids):
                model.merge_adapter(task)
                alone = model(input_ids=ids[row : row + 1]).logits
                model.unmerge_adapter()
                assert rel_diff(routed[row : row + 1], alone) < TOL, (task_ids, row)
