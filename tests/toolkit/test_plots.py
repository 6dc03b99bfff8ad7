"""PNG routing figures: files written, and the numbers behind them are the model's routing weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import SMALL_VOCAB as VOCAB
from polytropon import PolyConfig, get_peft_model
from polytropon.toolkit.plots import plot_allocation, plot_routing, plot_task_hierarchy

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _expected_allocation(model) -> np.ndarray:
    """Average over layers (all distinct here) and splits of normalised sigmoid(logits), computed by hand."""
    per_layer = []
    for _, layer in model.poly_layers():
        router = layer.adapters["default"].poly_router
        probs = torch.sigmoid(router.module_logits.detach()).view(router.n_tasks, router.n_splits, router.n_skills)
        per_layer.append((probs / probs.sum(-1, keepdim=True)).mean(1))
    return torch.stack(per_layer).mean(0).numpy()


def _is_png(path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(8) == PNG_MAGIC


@pytest.mark.parametrize("n_splits", [1, 2], ids=["poly", "mhr"])
def test_plot_routing_writes_pngs_of_the_models_routing(tmp_path, n_splits, randomize_, small_llama):
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    model = get_peft_model(small_llama(), PolyConfig(n_tasks=5, n_skills=4, n_splits=n_splits, task_names=list("abcde")))
    randomize_(model)
    figures = plot_routing(model, tmp_path / "figs")
    for name in ("allocation", "task_hierarchy"):
        path = tmp_path / "figs" / f"{name}.png"
        assert figures[name].path == str(path)
        assert path.stat().st_size > 1000 and _is_png(path)
        np.testing.assert_allclose(figures[name].allocation, _expected_allocation(model), atol=1e-6)
        assert figures[name].labels == list("abcde")
    tree = figures["task_hierarchy"]
    assert sorted(tree.order) == list(range(5))
    # the dendrogram clusters 1 - cosine similarity of the routing weights
    feats = torch.cat([w.flatten(1) for w in _routing_features(model)], dim=1).double()
    unit = feats / feats.norm(dim=1, keepdim=True)
    np.testing.assert_allclose(tree.similarity, (unit @ unit.T).numpy(), atol=1e-6)
    distance = np.clip(1 - tree.similarity, 0, None)
    np.fill_diagonal(distance, 0)
    np.testing.assert_allclose(tree.linkage, linkage(squareform(distance, checks=False), "average"), atol=1e-6)


def _routing_features(model):
    out = []
    for _, layer in model.poly_layers():
        router = layer.adapters["default"].poly_router
        out.append(router.eval_weights(torch.arange(router.n_tasks)).detach())
    return out


def test_hierarchy_groups_tasks_with_the_same_routing(tmp_path, small_t5):
    model = get_peft_model(small_t5(), PolyConfig(n_tasks=4, n_skills=4))
    with torch.no_grad():  # tasks {0, 2} use skills 0-1, tasks {1, 3} use skills 2-3
        for _, layer in model.poly_layers():
            logits = layer.adapters["default"].poly_router.module_logits
            logits.copy_(torch.tensor([[4.0, 4, -4, -4], [-4, -4, 4, 4], [4, 3, -4, -4], [-4, -4, 3, 4]]))
    figure = plot_task_hierarchy(model, tmp_path / "tree.png")
    order = figure.order
    assert {frozenset(order[:2]), frozenset(order[2:])} == {frozenset({0, 2}), frozenset({1, 3})}
    assert figure.linkage[-1, 2] > 5 * figure.linkage[0, 2]  # the last merge joins two distant clusters


def test_hierarchy_of_tasks_routed_alike_draws_without_warnings(tmp_path, small_t5):
    """Every task with the same routing: every merge at distance 0, a flat tree drawn over the full axis."""
    import warnings

    model = get_peft_model(small_t5(), PolyConfig(n_tasks=3, n_skills=4))
    with torch.no_grad():
        for _, layer in model.poly_layers():
            layer.adapters["default"].poly_router.module_logits.copy_(torch.tensor([[2.0, -1, 0.5, 3]] * 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figure = plot_task_hierarchy(model, tmp_path / "flat.png")
    assert np.allclose(figure.linkage[:, 2], 0.0) and _is_png(figure.path)


def test_plot_allocation_of_one_layer_and_fixed_variant(tmp_path, small_llama):
    model = get_peft_model(small_llama(), PolyConfig(poly_type="fixed", n_tasks=2, n_skills=3, allocation=[[1, 1, 0], [0, 0, 1]]))
    path = next(p for p, _ in model.poly_layers())
    figure = plot_allocation(model, tmp_path / "layer.png", layer=path)
    np.testing.assert_allclose(figure.allocation, [[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    assert _is_png(tmp_path / "layer.png") and figure.labels == ["task 0", "task 1"]


def test_plot_errors(tmp_path, small_llama):
    model = get_peft_model(small_llama(), PolyConfig(n_tasks=1))
    with pytest.raises(ValueError, match="at least 2 tasks"):
        plot_task_hierarchy(model, tmp_path / "t.png")
    with pytest.raises(ValueError, match=".png"):
        plot_allocation(model, tmp_path / "t.jpg")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        plot_allocation(model, tmp_path / "missing" / "t.png")
    assert set(plot_routing(model, tmp_path / "one")) == {"allocation"}  # one task: no hierarchy


def test_trained_routing_recovers_the_task_hierarchy(tmp_path, small_llama):
    """The papers' interpretability claim on a synthetic suite: tasks {0, 1} and {2, 3} share a rule."""
    from polytropon import param_groups

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = get_peft_model(
            small_llama(), PolyConfig(n_tasks=4, n_skills=4, r=4, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
        )
        steps = torch.tensor([5, 5, 11, 11])  # task t continues an arithmetic sequence with step steps[t]
        optimizer = torch.optim.AdamW(param_groups(model, lr=5e-2, router_lr=0.3))
        gen = torch.Generator().manual_seed(1)
        model.train()
        for _ in range(80):
            task = torch.randint(0, 4, (16,), generator=gen)
            start = torch.randint(3, VOCAB, (16, 1), generator=gen)
            x = (start - 3 + steps[task][:, None] * torch.arange(8)) % (VOCAB - 3) + 3
            loss = model(input_ids=x, labels=x, task_ids=task).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(previous)
    figure = plot_task_hierarchy(model, tmp_path / "trained.png")
    assert {frozenset(figure.order[:2]), frozenset(figure.order[2:])} == {frozenset({0, 1}), frozenset({2, 3})}
    sim = figure.similarity
    assert min(sim[0, 1], sim[2, 3]) > max(sim[0, 2], sim[0, 3], sim[1, 2], sim[1, 3]) + 0.2  # measured: 0.95+ vs 0.42-


def test_plot_routing_from_a_checkpoint_directory(tmp_path, randomize_, small_llama):
    model = get_peft_model(small_llama(), PolyConfig(n_tasks=3, n_splits=2, router_granularity="block", task_names=["x", "y", "z"]))
    randomize_(model)
    model.save_pretrained(str(tmp_path / "adapter"))
    from_disk = plot_routing(tmp_path / "adapter", tmp_path / "figs")
    live = plot_routing(model, tmp_path / "figs-live")
    assert _is_png(tmp_path / "figs" / "task_hierarchy.png")
    np.testing.assert_allclose(from_disk["allocation"].allocation, live["allocation"].allocation, atol=1e-6)
    np.testing.assert_allclose(from_disk["task_hierarchy"].similarity, live["task_hierarchy"].similarity, atol=1e-6)
    assert from_disk["allocation"].labels == ["x", "y", "z"]
