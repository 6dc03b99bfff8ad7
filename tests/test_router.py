"""Routers: the batched training sample (all layers in one autograd node) equals per-layer sampling."""

from __future__ import annotations

import pytest
import torch

from polytropon import PolyConfig, get_peft_model
from polytropon.router import PolyRouter, _SampledRouting, presample, relaxed_bernoulli_rsample


def _routers(m: int, n_tasks: int = 5, n_splits: int = 2, n_skills: int = 3) -> list[PolyRouter]:
    torch.manual_seed(0)
    routers = [PolyRouter(n_tasks, n_skills, n_splits) for _ in range(m)]
    with torch.no_grad():
        for r in routers:
            r.module_logits.normal_(0, 3)  # far from zero: sigmoid and the clamps matter
    return routers


def test_presample_equals_one_sample_per_router_in_order():
    routers = _routers(3)
    task_ids = torch.tensor([4, 0, 0, 2])
    torch.manual_seed(7)
    batched = presample(routers, task_ids)
    torch.manual_seed(7)  # the same draws, router after router
    expected = [r._normalise(relaxed_bernoulli_rsample(r._logits(task_ids))) for r in routers]
    assert list(batched) == [id(r) for r in routers]
    for r, weights in zip(routers, expected):
        # the same random numbers; the elementwise ops may round differently in the last bit (SIMD vs scalar
        # code paths depend on the tensor's length)
        torch.testing.assert_close(batched[id(r)], weights, rtol=1e-6, atol=0)
    upstream = [torch.randn(w.shape, generator=torch.Generator().manual_seed(i)) for i, w in enumerate(expected)]
    sum((w * g).sum() for w, g in zip(batched.values(), upstream)).backward()
    fast = [r.module_logits.grad.clone() for r in routers]
    for r in routers:
        r.module_logits.grad = None
    sum((w * g).sum() for w, g in zip(expected, upstream)).backward()
    for r, grad in zip(routers, fast):
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grad, r.module_logits.grad, rtol=1e-5, atol=1e-7)


def test_batched_sample_gradcheck():
    torch.manual_seed(0)
    logits = [(torch.randn(4, 6, dtype=torch.float64) * 2).requires_grad_() for _ in range(2)]
    task_ids = torch.tensor([3, 1, 3])

    def fn(*logits):
        torch.manual_seed(5)  # the same noise at every evaluation
        return _SampledRouting.apply(task_ids, 2, 3, 0.7, *logits)

    assert torch.autograd.gradcheck(fn, tuple(logits))


def test_output_grads_may_be_missing():
    """A layer that did not run leaves its sample without gradient: the others still get theirs."""
    routers = _routers(2)
    weights = presample(routers, torch.tensor([1, 2]))
    (weights[id(routers[1])] ** 2).sum().backward()
    assert routers[0].module_logits.grad.abs().sum() == 0
    assert routers[1].module_logits.grad.abs().sum() > 0


def test_training_call_samples_every_layer_in_one_node(monkeypatch, batch_inputs, randomize_, tiny_llama):
    model = get_peft_model(tiny_llama(), PolyConfig(n_tasks=3, n_splits=2, init_weights=False))
    randomize_(model)
    calls = []
    original = _SampledRouting.apply
    monkeypatch.setattr(_SampledRouting, "apply", lambda *a: (calls.append(len(a) - 4), original(*a))[1])
    seen = []
    for module in model.modules():
        if isinstance(module, PolyRouter):
            module.register_forward_hook(lambda m, args, out: seen.append(out))
    model.train()
    inputs = batch_inputs("llama")
    model(**inputs, task_ids=[0, 1, 2, 0]).logits.sum().backward()
    n_layers = len(seen)
    assert n_layers > 1 and calls == [n_layers]  # one node drew the samples of all the routers
    assert all(w.grad_fn is seen[0].grad_fn for w in seen)
    assert all(r.module_logits.grad.abs().sum() > 0 for r in model.modules() if isinstance(r, PolyRouter))
    calls.clear()
    model.eval()
    with torch.no_grad():
        model(**inputs, task_ids=[0, 1, 2, 0])
    assert calls == []  # eval routing is deterministic: nothing drawn


@pytest.mark.parametrize("hard", [False, True])
def test_presample_skips_routers_that_keep_their_own_path(hard, tiny_llama):
    model = get_peft_model(tiny_llama(), PolyConfig(n_tasks=3, hard_routing=hard))
    model.train()
    routers = [m for m in model.modules() if isinstance(m, PolyRouter)]
    assert all(r.batchable != hard for r in routers)
    assert (model._presample(torch.tensor([0, 1, 2, 0])) is None) == hard


def test_presampled_weights_need_the_same_task_ids():
    routers = _routers(1)
    (router,) = routers
    from polytropon.routing import RoutingState

    state = RoutingState()
    router.routing_state = state
    task_ids = torch.tensor([0, 1])
    samples = presample(routers, task_ids)
    with state.route(task_ids, samples):
        assert router(task_ids) is samples[id(router)]
        assert router(torch.tensor([0, 1])) is samples[id(router)]  # equal values: the same call's ids
        other = router(torch.tensor([1, 1]))  # other rows (not this call's): a sample of its own
        assert other is not samples[id(router)] and other.shape == (2, 2, 3) and other.grad_fn is not None
