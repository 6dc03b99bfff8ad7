"""The task axis of the tuner (``polytropon.tasks``): names to ids, the unknown-task mapping, and growing an
adapter's routers by new tasks (the toolkit's ``add_tasks`` and the model's methods are tested in
``tests/toolkit/test_tasks.py``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from polytropon import PolyConfig, get_peft_model
from polytropon.routing import UNKNOWN_TASK
from polytropon.tasks import grow_tasks, resolve_task_names, task_index, task_names_of


NAMED = PolyConfig(n_tasks=3, task_names=["qa", "nli", "sum"])


def test_task_index_and_names():
    assert [task_index(name, NAMED) for name in ("qa", "nli", "sum")] == [0, 1, 2]
    assert task_names_of(NAMED) == ["qa", "nli", "sum"]
    assert task_names_of(PolyConfig(n_tasks=2)) == ["task 0", "task 1"]
    with pytest.raises(ValueError, match=r"unknown task name 'mt'; known tasks: \['qa', 'nli', 'sum'\]"):
        task_index("mt", NAMED)
    with pytest.raises(TypeError, match="the adapter has no task_names"):
        task_index("qa", PolyConfig(n_tasks=3))


def test_resolve_task_names_maps_names_and_leaves_the_rest():
    assert resolve_task_names(["sum", 0, "nli"], NAMED) == [2, 0, 1]
    assert resolve_task_names(("qa",), NAMED) == [0]
    ids = torch.tensor([0, 5])
    assert resolve_task_names(ids, NAMED) is ids  # tensors are checked elsewhere
    assert resolve_task_names(7, NAMED) == 7
    with pytest.raises(ValueError, match="'mt'"):
        resolve_task_names(["qa", "mt"], NAMED)


def test_unknown_tasks_map_to_the_unknown_id_only_when_allowed():
    assert resolve_task_names(["mt", 1, 3, "qa"], NAMED, allow_unknown=True) == [UNKNOWN_TASK, 1, UNKNOWN_TASK, 0]
    got = resolve_task_names(torch.tensor([0, 3, 2, 9]), NAMED, allow_unknown=True)
    assert got.tolist() == [0, UNKNOWN_TASK, 2, UNKNOWN_TASK]
    assert resolve_task_names([3], NAMED) == [3]  # out-of-range ids are rejected later, by check_task_ids


@pytest.fixture
def adapted(randomize_, tiny_llama):
    """``adapted(poly_type="poly", n_tasks=3) -> (config, [(path, adapter)])``: a tiny Llama's random non-zero adapter."""

    def adapted(poly_type: str = "poly", n_tasks: int = 3):
        n_skills = n_tasks if poly_type == "private" else 2
        model = get_peft_model(tiny_llama(), PolyConfig(n_tasks=n_tasks, n_skills=n_skills, n_splits=2, r=2, init_weights=False,
                                                        poly_type=poly_type))
        randomize_(model)
        config = model.peft_config["default"]
        return config, [(path, layer.adapters["default"]) for path, layer in model.poly_layers()]

    return adapted


@pytest.mark.parametrize("init", ["uniform", "average", 1])
def test_grow_tasks_keeps_trained_rows_and_starts_new_ones_as_asked(init, adapted):
    config, adapters = adapted()
    before = [adapter.poly_router.module_logits.detach().clone() for _, adapter in adapters]
    new_config = grow_tasks(config, adapters, 2, init=init)
    assert new_config.n_tasks == 5 and config.n_tasks == 3
    for old, (_, adapter) in zip(before, adapters):
        logits = adapter.poly_router.module_logits
        assert logits.shape == (5, old.shape[1])
        assert torch.equal(logits[:3], old)
        want = {"uniform": torch.zeros_like(old[0]), "average": old.mean(0), 1: old[1]}[init]
        for row in logits[3:]:
            torch.testing.assert_close(row, want, rtol=0, atol=1e-7)


def test_grow_tasks_by_name_extends_the_names(adapted):
    config, adapters = adapted()
    config = dataclasses.replace(config, task_names=["qa", "nli", "sum"])
    new_config = grow_tasks(config, adapters, ["mt"], init="nli")
    assert new_config.task_names == ["qa", "nli", "sum", "mt"] and new_config.n_tasks == 4
    for _, adapter in adapters:
        assert torch.equal(adapter.poly_router.module_logits[3], adapter.poly_router.module_logits[1])


def test_grow_tasks_of_a_private_adapter_adds_one_skill_per_task(adapted):
    config, adapters = adapted(poly_type="private")
    skills_before = [adapter.poly_lora_A.detach().clone() for _, adapter in adapters]
    new_config = grow_tasks(config, adapters, 1, init=0)
    assert new_config.n_skills == config.n_skills + 1
    for old, (_, adapter) in zip(skills_before, adapters):
        assert torch.equal(adapter.poly_lora_A[:, : old.shape[1]], old)
        assert torch.equal(adapter.poly_lora_A[:, -1], old[:, 0])  # a copy of task 0's skill


@pytest.mark.parametrize(
    "tasks, init, exc, match",
    [(True, "uniform", TypeError, "True"), (0, "uniform", ValueError, "0"), (1, "zebra", ValueError, "zebra"),
     (["mt"], "uniform", ValueError, "task_names")],
)
def test_bad_growth_changes_nothing(tasks, init, exc, match, adapted):
    config, adapters = adapted()
    before = [adapter.poly_router.module_logits for _, adapter in adapters]
    with pytest.raises(exc, match=match):
        grow_tasks(config, adapters, tasks, init=init)
    assert all(adapter.poly_router.module_logits is old for old, (_, adapter) in zip(before, adapters))
    assert config.n_tasks == 3
