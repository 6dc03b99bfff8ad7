"""calls.py: a call's task ids checked (names, dtype, range, one per example or one for the batch, a merged
task) and its training routes drawn for every learned router at once, with the random numbers of per-layer
draws; the traced twin (:func:`traced_call`)."""

from __future__ import annotations

import pytest
import torch

from polytropon import PolyConfig, get_peft_model
from polytropon.calls import CallPreparation, find_learned_routers, traced_call
from polytropon.router import PolyRouter


@pytest.fixture
def model(tiny_llama, randomize_):
    model = get_peft_model(
        tiny_llama(), PolyConfig(n_tasks=3, n_skills=3, n_splits=2, init_weights=False, task_names=["a", "b", "c"])
    )
    randomize_(model)
    return model


def prepare(model) -> CallPreparation:
    return CallPreparation(model.routing, model.peft_config)


# --------------------------------------------------------------------------- task ids


@pytest.mark.parametrize("training", [False, True])
def test_ids_names_and_tensors_give_the_same_long_tensor(model, training):
    calls = prepare(model)
    for given in ([0, 2, 1], torch.tensor([0, 2, 1]), torch.tensor([0, 2, 1], dtype=torch.int32), ["a", "c", "b"], ["a", 2, "b"]):
        ids = calls.task_ids(given, 3, training)
        assert ids.dtype == torch.long and ids.tolist() == [0, 2, 1], given


@pytest.mark.parametrize(
    "task_ids,error,pattern",
    [
        (torch.tensor([0.0, 1.0, 1.0]), TypeError, "integer dtype.*float32"),
        (torch.tensor([True, False, True]), TypeError, "integer dtype.*bool"),
        ([0, 1.0, 1], TypeError, "element 1.0"),
        ("a", TypeError, "got str"),
        ([0, 3, 1], ValueError, r"task id 3 is out of range.*n_tasks=3"),
        ([0, -1, 1], ValueError, "got task id -1"),
        ([0, 1], ValueError, r"got 2 task_ids for a batch of 3.*one per example.*whole batch"),
        (torch.tensor([[0, 1, 2]]), ValueError, r"1-D.*shape \(1, 3\)"),
        (["a", "z", "b"], ValueError, "'z'"),
    ],
)
def test_bad_ids_are_refused_naming_the_value(model, task_ids, error, pattern):
    with pytest.raises(error, match=pattern):
        prepare(model).task_ids(task_ids, 3, False)


def test_one_id_for_the_batch_is_expanded_and_any_length_passes_without_a_batch_size(model):
    calls = prepare(model)
    assert calls.task_ids([2], 4, True).tolist() == [2, 2, 2, 2]
    assert calls.task_ids(torch.tensor([1]), 1, False).tolist() == [1]
    assert calls.task_ids([0, 1, 2, 2, 0], None, False).tolist() == [0, 1, 2, 2, 0]


def test_no_ids_raise_while_an_adapter_routes_and_are_none_otherwise(model):
    calls = prepare(model)
    with pytest.raises(ValueError, match="task_ids are required while adapter 'default' is active"):
        calls.task_ids(None, 2, False)
    with model.disable_adapter():
        assert calls.task_ids(None, 2, False) is None
    model.merge_adapter(1)
    assert calls.task_ids(None, 2, False) is None
    assert calls.task_ids([1, 1], 2, False).tolist() == [1, 1]
    with pytest.raises(ValueError, match="task 1 is merged.*task id 0"):
        calls.task_ids([1, 0], 2, False)
    model.unmerge_adapter()


def test_ids_of_the_enclosing_task_context_are_used_and_named_in_errors(model):
    calls = prepare(model)
    with model.task_context(2):
        assert calls.task_ids(None, 3, False).tolist() == [2, 2, 2]
        assert calls.task_ids([0, 1, 0], 3, False).tolist() == [0, 1, 0]  # given ids win
    with model.task_context([0, 1]):
        with pytest.raises(ValueError, match=r"got 2 task_ids.*\(task ids of the enclosing model.task_context"):
            calls.task_ids(None, 3, False)


def test_ids_without_an_active_adapter_are_refused(model):
    model.delete_adapter("default")
    with pytest.raises(ValueError, match="no active adapter"):
        prepare(model).check([0], 1, False)


# --------------------------------------------------------------------------- training routes


def per_layer_draws(routers, ids):
    """What each layer would draw on its own, router after router (the routers' own forward in training)."""
    return [router(ids) for router in routers]


def test_routes_of_every_learned_router_are_drawn_at_once_with_the_per_layer_random_numbers(model):
    model.train()
    calls = prepare(model)
    ids = calls.task_ids([2, 0, 1, 2], 4, True)
    routers = find_learned_routers(model.poly_layers(), "default")
    assert len(routers) == 4 and all(isinstance(r, PolyRouter) for r in routers)
    torch.manual_seed(11)
    routes = calls.routes(ids, True, model.poly_layers)
    torch.manual_seed(11)
    expected = per_layer_draws(routers, ids)
    assert list(routes) == [id(r) for r in routers]  # every router, in the order of the layers
    for router, weights in zip(routers, expected):
        assert routes[id(router)].shape == (4, 2, 3)
        # the same random numbers; elementwise ops over tensors of other lengths may round in the last bit
        torch.testing.assert_close(routes[id(router)], weights, rtol=1e-6, atol=0)
        torch.testing.assert_close(routes[id(router)].sum(-1), torch.ones(4, 2), rtol=0, atol=1e-6)
    torch.manual_seed(12)
    assert not torch.equal(calls.routes(ids, True, model.poly_layers)[id(routers[0])], routes[id(routers[0])])


def test_the_model_uses_the_drawn_routes(model, batch_inputs):
    model.train()
    inputs = batch_inputs("llama")
    calls = prepare(model)
    ids = calls.task_ids([2, 0, 1, 2], 4, True)
    torch.manual_seed(3)
    routes = calls.routes(ids, True, model.poly_layers)
    with torch.no_grad(), model.routing.route(ids, routes):
        drawn = model.get_base_model()(**inputs).logits
    torch.manual_seed(3)
    with torch.no_grad():
        called = model(**inputs, task_ids=[2, 0, 1, 2]).logits
    torch.testing.assert_close(drawn, called, rtol=1e-5, atol=1e-6)


def test_no_routes_in_eval_without_ids_disabled_or_merged(model):
    calls = prepare(model)
    ids = torch.tensor([0, 1])
    model.eval()
    assert calls.routes(ids, False, model.poly_layers) is None
    model.train()
    assert calls.routes(None, True, model.poly_layers) is None
    with model.disable_adapter():
        assert calls.routes(ids, True, model.poly_layers) is None
    assert calls.routes(ids, True, model.poly_layers) is not None


def test_routers_are_found_once_per_adapter_and_afresh_after_forget(model):
    calls = prepare(model)
    first = calls.learned_routers(model.poly_layers)
    assert calls.learned_routers(model.poly_layers) is first
    model.add_adapter("other", PolyConfig(n_tasks=2, target_modules=["k_proj"]))
    model.set_adapter("other")
    other = calls.learned_routers(model.poly_layers)
    assert len(other) == 2 and not set(map(id, other)) & set(map(id, first))
    calls.forget_routers()
    assert calls.learned_routers(model.poly_layers) is not other


def test_a_shared_router_is_found_once(tiny_llama):
    model = get_peft_model(tiny_llama(), PolyConfig(n_tasks=2, router_granularity="model"))
    routers = find_learned_routers(model.poly_layers(), "default")
    assert len(routers) == 1
    assert find_learned_routers(model.poly_layers(), "absent") == []


def test_traced_call_checks_the_ids_and_draws_every_router_with_plain_ops(model):
    calls = prepare(model)
    model.train()
    ids, routes = traced_call(calls, [1, "c"], 2, True, model.poly_layers)
    assert ids.tolist() == [1, 2]
    routers = find_learned_routers(model.poly_layers(), "default")
    assert list(routes) == [id(r) for r in routers]
    torch.manual_seed(4)
    _, routes = traced_call(calls, [1, 2], 2, True, model.poly_layers)
    torch.manual_seed(4)
    expected = [r.traced_sample(ids) for r in routers]
    for router, weights in zip(routers, expected):
        torch.testing.assert_close(routes[id(router)], weights, rtol=0, atol=0)
    with pytest.raises(ValueError, match="task id 3 is out of range"):
        traced_call(calls, [1, 3], 2, True, model.poly_layers)
    model.eval()
    ids, routes = traced_call(calls, [1, 2], 2, False, model.poly_layers)
    assert ids.tolist() == [1, 2] and routes is None
