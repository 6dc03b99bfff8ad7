"""PolyLayer against an independent, loop-by-loop computation of the method's formula."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from polytropon import PolyAdapter, PolyLayer, RoutingState
from polytropon.router import PolyRouter


def reference(x, weight_in_out, bias, adapter, task_ids):
    """y_b = x_b W + bias + x_b A_t B_t / r with A_t, B_t concatenated per split (plain loops)."""
    A, B = adapter.poly_lora_A.detach(), adapter.poly_lora_B.detach()
    n_splits, n_skills, _, r = A.shape
    logits = adapter.poly_router.module_logits.detach()
    out = []
    for b in range(x.shape[0]):
        w = torch.sigmoid(logits[task_ids[b]]).view(n_splits, n_skills)
        w = w / (w.sum(-1, keepdim=True) + 1e-12)
        a_parts, b_parts = [], []
        for q in range(n_splits):
            a_parts.append(sum(w[q, s] * A[q, s] for s in range(n_skills)))
            b_parts.append(sum(w[q, s] * B[q, s] for s in range(n_skills)))
        a_t = torch.cat(a_parts, dim=0)  # (in, r)
        b_t = torch.cat(b_parts, dim=1)  # (r, out)
        out.append(x[b] @ weight_in_out + bias + x[b] @ a_t @ b_t / r)
    return torch.stack(out)


def make_layer(base, n_tasks=3, n_skills=4, n_splits=2, r=4, seed=0):
    torch.manual_seed(seed)
    state = RoutingState(active_adapter="default")
    layer = PolyLayer(base, state, "layer")
    layer.adapters["default"] = PolyAdapter(layer.in_features, layer.out_features, r, n_tasks, n_skills, n_splits, init_weights=False)
    with torch.no_grad():
        layer.adapters["default"].poly_router.module_logits.normal_()
    return layer.eval(), state


@pytest.mark.parametrize("n_splits", [1, 2, 4])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_layer_matches_reference(kind, n_splits):
    torch.manual_seed(1)
    if kind == "linear":
        base = nn.Linear(16, 24)
        w_in_out = base.weight.detach().T
    else:
        base = Conv1D(24, 16)  # nf=24 outputs, nx=16 inputs; weight stored (16, 24)
        nn.init.normal_(base.weight, std=0.2)
        nn.init.normal_(base.bias, std=0.2)
        w_in_out = base.weight.detach()
    layer, state = make_layer(base, n_splits=n_splits)
    assert (layer.in_features, layer.out_features, layer.fan_in_fan_out) == (16, 24, kind == "conv1d")
    x = torch.randn(5, 3, 16)
    task_ids = torch.tensor([0, 2, 2, 1, 0])
    expected = reference(x, w_in_out, base.bias.detach(), layer.adapters["default"], task_ids)
    for grad in (False, True):  # cached no-grad path and autograd path
        with torch.set_grad_enabled(grad), state.route(task_ids):
            got = layer(x)
        torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad(), state.route(torch.tensor([1])):  # one task: the shared-matrix path
        got = layer(x)
    expected_one = reference(x, w_in_out, base.bias.detach(), layer.adapters["default"], torch.tensor([1] * 5))
    torch.testing.assert_close(got, expected_one, rtol=1e-5, atol=1e-6)


def test_two_dimensional_input():
    layer, state = make_layer(nn.Linear(8, 8), n_splits=2)
    x = torch.randn(4, 8)
    ids = torch.tensor([0, 1, 2, 1])
    with torch.no_grad(), state.route(ids):
        got = layer(x)
    expected = reference(x.unsqueeze(1), layer.base_layer.weight.T, layer.base_layer.bias, layer.adapters["default"], ids)
    torch.testing.assert_close(got, expected.squeeze(1), rtol=1e-5, atol=1e-6)


def test_eval_cache_is_invalidated_by_weight_updates():
    layer, state = make_layer(nn.Linear(8, 8), n_splits=1)
    x = torch.randn(2, 3, 8)
    ids = torch.tensor([0, 1])
    with torch.no_grad():
        with state.route(ids):
            first = layer(x)
        layer.adapters["default"].poly_lora_B.add_(0.5)  # an optimizer step does this in place
        with state.route(ids):
            second = layer(x)
        layer.adapters["default"].poly_router.module_logits.mul_(-1)
        with state.route(ids):
            third = layer(x)
    expected = reference(x, layer.base_layer.weight.T, layer.base_layer.bias, layer.adapters["default"], ids)
    torch.testing.assert_close(third, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(first, second) and not torch.allclose(second, third)


def test_training_mode_samples_and_backpropagates_to_every_parameter():
    layer, state = make_layer(nn.Linear(8, 8), n_splits=2)
    layer.train()
    x = torch.randn(4, 3, 8)
    with state.route(torch.tensor([0, 1, 2, 0])):
        y1 = layer(x)
        y2 = layer(x)
    assert not torch.allclose(y1, y2)  # relaxed Bernoulli samples differ
    (y1.square().sum()).backward()
    adapter = layer.adapters["default"]
    for p in (adapter.poly_lora_A, adapter.poly_lora_B, adapter.poly_router.module_logits):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # the logits row of a task not in the batch gets no gradient... every task was used here
    assert torch.all(adapter.poly_router.module_logits.grad.abs().sum(-1) > 0)


def test_router_weights_sum_to_one_per_split():
    router = PolyRouter(n_tasks=3, n_skills=5, n_splits=2)
    with torch.no_grad():
        router.module_logits.normal_()
    ids = torch.tensor([0, 2, 1])
    for mode in (True, False):
        w = router.train(mode)(ids)
        assert w.shape == (3, 2, 5)
        torch.testing.assert_close(w.sum(-1), torch.ones(3, 2))
    torch.testing.assert_close(router.eval_weights(ids), router.eval()(ids))


def test_disabled_and_inactive_layers_run_base_only():
    layer, state = make_layer(nn.Linear(8, 8))
    x = torch.randn(2, 8)
    base = layer.base_layer(x)
    state.disabled = True
    torch.testing.assert_close(layer(x), base)  # no task ids needed
    state.disabled = False
    state.active_adapter = "missing"
    torch.testing.assert_close(layer(x), base)


# --------------------------------------------------------------------------- merge / unmerge of one layer
# (PolyModel.merge_adapter / merge_and_unload over whole models: tests/test_merge.py)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merged_layer_computes_the_task_alone_and_unmerge_restores_the_weight(kind):
    torch.manual_seed(2)
    base = nn.Linear(16, 24) if kind == "linear" else Conv1D(24, 16)
    if kind == "conv1d":
        nn.init.normal_(base.weight, std=0.2)
    layer, state = make_layer(base, n_splits=2)
    w_in_out = (base.weight.T if kind == "linear" else base.weight).detach().clone()
    before = base.weight.detach().clone()
    x = torch.randn(3, 5, 16)
    expected = reference(x, w_in_out, base.bias.detach(), layer.adapters["default"], torch.tensor([2, 2, 2]))
    layer.merge("default", 2)
    state.merged_task = ("default", 2)
    assert layer.merged == ("default", 2)
    assert (base.weight - before).abs().max() > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)  # the base layer alone
    with pytest.raises(ValueError, match=r"layer 'layer' already has task 2 of adapter 'default' merged"):
        layer.merge("default", 1)
    with torch.no_grad():
        layer.adapters["default"].poly_lora_B.add_(1.0)  # an optimizer step while merged: unmerge still exact
    layer.unmerge()
    state.merged_task = None
    assert layer.merged is None
    torch.testing.assert_close(base.weight.detach(), before, rtol=0, atol=1e-6)
    layer.unmerge()  # nothing merged: nothing happens
    torch.testing.assert_close(base.weight.detach(), before, rtol=0, atol=1e-6)


def test_unmerge_puts_a_bfloat16_weight_back_bit_for_bit():
    layer, _ = make_layer(nn.Linear(16, 16).to(torch.bfloat16), n_splits=2)
    before = layer.base_layer.weight.detach().clone()
    for task in (0, 1, 2, 0):
        layer.merge("default", task)
        assert not torch.equal(layer.base_layer.weight, before)
        layer.unmerge()
        assert torch.equal(layer.base_layer.weight, before)
