"""Routing read-outs: per-layer weights, allocation matrices, task similarity."""

from __future__ import annotations

import pytest
import torch

from polytropon import PolyConfig, allocation_matrix, get_peft_model, routing_weights, task_similarity
from polytropon.variants import unique_routers


@pytest.fixture
def _model(randomize_, small_llama):
    """The factory ``_model(...)`` below, built from the shared builders (fixtures)."""

    def _model(**kw):
        kw.setdefault("n_tasks", 3)
        model = get_peft_model(small_llama(), PolyConfig(**kw))
        randomize_(model)
        return model

    return _model


def _expected_weights(logits: torch.Tensor, n_splits: int, n_skills: int) -> torch.Tensor:
    probs = torch.sigmoid(logits.detach()).view(-1, n_splits, n_skills)
    return probs / probs.sum(-1, keepdim=True)


def test_routing_weights_are_the_routers_eval_weights(_model):
    model = _model(n_splits=2, n_skills=3, task_names=["a", "b", "c"])
    model.train()  # read-outs are deterministic whatever the mode
    weights = routing_weights(model)
    layers = dict(model.poly_layers())
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


def test_allocation_matrix_averages_splits_and_distinct_routers(_model):
    model = _model(n_splits=2, n_skills=4, router_granularity="block")
    per_layer = routing_weights(model)
    routers = unique_routers([layer.adapters["default"].poly_router for _, layer in model.poly_layers()])
    per_router = [_expected_weights(r.module_logits, 2, 4) for r in routers]
    expected = torch.stack([w.mean(1) for w in per_router]).mean(0)
    got = allocation_matrix(model)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones(3))
    path = next(iter(per_layer))
    torch.testing.assert_close(allocation_matrix(model, layer=path), per_layer[path].mean(1))
    with pytest.raises(ValueError, match="carries no adapter"):
        allocation_matrix(model, layer="model.embed_tokens")


def test_private_allocation_and_similarity(small_t5):
    model = get_peft_model(small_t5(), PolyConfig(poly_type="private", n_tasks=4, n_skills=4))
    assert torch.equal(allocation_matrix(model), torch.eye(4))
    torch.testing.assert_close(task_similarity(model), torch.eye(4))


def test_task_similarity_is_cosine_of_routing_features(_model):
    model = _model(n_splits=2)
    with torch.no_grad():  # tasks 0 and 2 route identically everywhere
        for _, layer in model.poly_layers():
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


@pytest.mark.parametrize(
    "extra",
    [dict(), dict(router_granularity="block", n_splits=2), dict(hard_routing=True), dict(poly_type="fixed", allocation=[[1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 1, 1]])],
)
def test_load_snapshot_reads_a_checkpoint_without_the_base_model(tmp_path, extra, _model):
    from polytropon.toolkit.analysis import load_snapshot, snapshot

    model = _model(**extra)
    model.save_pretrained(str(tmp_path))
    snap, live = load_snapshot(tmp_path), snapshot(model)
    assert set(snap.weights) == set(live.weights)
    for path in live.weights:
        torch.testing.assert_close(snap.weights[path], live.weights[path], atol=1e-6, rtol=1e-6)
    assert len(snap.per_router()) == len(live.per_router())
    torch.testing.assert_close(allocation_matrix(snap), allocation_matrix(model), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(task_similarity(snap), task_similarity(model), atol=1e-6, rtol=1e-6)


def test_load_snapshot_of_a_peft_checkpoint(tmp_path, small_llama):
    from peft import PolyConfig as PeftPolyConfig
    from peft import get_peft_model as peft_get_peft_model

    from polytropon.toolkit.analysis import load_snapshot

    theirs = peft_get_peft_model(small_llama(), PeftPolyConfig(task_type="CAUSAL_LM", n_tasks=3, n_splits=2))
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "module_logits" in name:
                param.normal_()
    theirs.save_pretrained(str(tmp_path))
    snap = load_snapshot(tmp_path)
    logits = {n: p for n, p in theirs.named_parameters() if "module_logits" in n}
    assert len(snap.weights) == len(logits) == 4
    for name, param in logits.items():
        path = name.replace("base_model.model.", "").replace(".poly_router.default.module_logits", "")
        torch.testing.assert_close(snap.weights[path], _expected_weights(param, 2, 4), atol=1e-6, rtol=1e-6)


def test_load_snapshot_errors(tmp_path):
    from polytropon.toolkit.analysis import load_snapshot

    with pytest.raises(FileNotFoundError):
        load_snapshot(tmp_path)
    with pytest.raises(TypeError, match="PolyModel or a RoutingSnapshot"):
        allocation_matrix(torch.nn.Linear(2, 2))
