"""Routing read-outs: per-layer weights, allocation matrices, task similarity."""

from __future__ import annotations

import pytest
import torch

from _toolkit_models import randomize, tiny_llama, tiny_t5
from polytropon import PolyConfig, allocation_matrix, get_peft_model, routing_weights, task_similarity
from polytropon.variants import unique_routers


def _model(**kw):
    kw.setdefault("n_tasks", 3)
    model = get_peft_model(tiny_llama(), PolyConfig(**kw))
    randomize(model)
    return model


def _expected_weights(logits: torch.Tensor, n_splits: int, n_skills: int) -> torch.Tensor:
    probs = torch.sigmoid(logits.detach()).view(-1, n_splits, n_skills)
    return probs / probs.sum(-1, keepdim=True)


def test_routing_weights_are_the_routers_eval_weights():
    model = _model(n_splits=2, n_skills=3, task_names=["a", "b", "c"])
    model.train()  # read-outs are deterministic whatever the mode
    weights = routing_weights(model)
    layers = dict(model._poly_layers())
    assert set(weights) == set(layers)
    for path, w in weights.items():
        expected = _expected_weights(layers[path].adapters["default"].poly_router.module_logits, 2, 3)
        torch.testing.assert_close(w, expected, atol=1e-6, rtol=1e-6)
        assert w.shape == (3, 2, 3)
    one = routing_weights(model, task="b")
    for path, w in one.items():
        torch.testing.assert_close(w, weights[path][1])
    with pytest.raises(ValueError, match="unknown task name"):
        routing_weights(model, task="zz")
    with pytest.raises(ValueError, match="unknown adapter"):
        routing_weights(model, adapter_name="nope")


def test_allocation_matrix_averages_splits_and_distinct_routers():
    model = _model(n_splits=2, n_skills=4, router_granularity="block")
    per_layer = routing_weights(model)
    routers = unique_routers([layer.adapters["default"].poly_router for _, layer in model._poly_layers()])
    per_router = [_expected_weights(r.module_logits, 2, 4) for r in routers]
    expected = torch.stack([w.mean(1) for w in per_router]).mean(0)
    got = allocation_matrix(model)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones(3))
    path = next(iter(per_layer))
    torch.testing.assert_close(allocation_matrix(model, layer=path), per_layer[path].mean(1))
    with pytest.raises(ValueError, match="carries no adapter"):
        allocation_matrix(model, layer="model.embed_tokens")


def test_private_allocation_and_similarity():
    model = get_peft_model(tiny_t5(), PolyConfig(poly_type="private", n_tasks=4, n_skills=4))
    assert torch.equal(allocation_matrix(model), torch.eye(4))
    torch.testing.assert_close(task_similarity(model), torch.eye(4))


def test_task_similarity_is_cosine_of_routing_features():
    model = _model(n_splits=2)
    with torch.no_grad():  # tasks 0 and 2 route identically everywhere
        for _, layer in model._poly_layers():
            logits = layer.adapters["default"].poly_router.module_logits
            logits[2] = logits[0]
    sim = task_similarity(model)
    assert sim.shape == (3, 3)
    torch.testing.assert_close(sim, sim.T)
    torch.testing.assert_close(sim.diagonal(), torch.ones(3))
    assert abs(sim[0, 2].item() - 1.0) < 1e-6 and sim[0, 1] < 1 - 1e-4
    features = torch.cat([w.flatten(1) for w in routing_weights(model).values()], dim=1)
    unit = features / features.norm(dim=1, keepdim=True)
    torch.testing.assert_close(sim, unit @ unit.T, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(task_similarity(torch.tensor([[1.0, 0.0], [1.0, 1.0]])), torch.tensor([[1.0, 0.5**0.5], [0.5**0.5, 1.0]]))
    with pytest.raises(ValueError, match="n_tasks, d"):
        task_similarity(torch.ones(3))
