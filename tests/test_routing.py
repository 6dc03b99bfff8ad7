"""Task ids: accepted forms, every rejected form (before any state changes), expansion for generation."""

import pytest
import torch

from polytropon import PolyConfig, get_peft_model
from polytropon.routing import RoutingState, check_task_ids


@pytest.fixture
def model(randomize_, tiny_llama):
    m = get_peft_model(tiny_llama(), PolyConfig(n_tasks=3, init_weights=False))
    randomize_(m)
    return m


def test_list_and_tensor_task_ids_are_equivalent(model, batch_inputs):
    inputs = batch_inputs("llama")
    with torch.no_grad():
        a = model(**inputs, task_ids=[0, 2, 1, 2]).logits
        b = model(**inputs, task_ids=torch.tensor([0, 2, 1, 2])).logits
        c = model(**inputs, task_ids=torch.tensor([0, 2, 1, 2], dtype=torch.int32)).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize(
    "task_ids,error,pattern",
    [
        (None, ValueError, "task_ids are required"),
        ([0, -1, 0, 0], ValueError, "-1"),
        ([0, 3, 0, 0], ValueError, r"task id 3 .*n_tasks=3"),
        (torch.tensor([0, 7, 0, 0]), ValueError, r"task id 7"),
        (torch.tensor([0.0, 1.0, 0.0, 0.0]), TypeError, "float32"),
        (torch.tensor([True, False, True, False]), TypeError, "bool"),
        ([0, 1.5, 0, 0], TypeError, "1.5"),
        (["a", 0, 0, 0], TypeError, "'a'"),
        (torch.tensor([[0, 1], [1, 0]]), ValueError, r"1-D.*\(2, 2\)"),
        (torch.tensor([0, 1, 2]), ValueError, r"3 task_ids for a batch of 4"),
        ([], ValueError, "empty"),
        ("0", TypeError, "str"),
    ],
)
def test_bad_task_ids_are_rejected(model, task_ids, error, pattern, batch_inputs):
    inputs = batch_inputs("llama")
    with pytest.raises(error, match=pattern):
        model(**inputs, task_ids=task_ids)
    assert model.routing.task_ids is None  # nothing left behind
    with torch.no_grad():  # and the model still works
        model(**inputs, task_ids=[0, 1, 2, 0])


def test_bad_task_ids_rejected_in_generate(model, batch_inputs):
    with pytest.raises(ValueError, match="task id 5"):
        model.generate(input_ids=batch_inputs("llama")["input_ids"], task_ids=[0, 5, 0, 0], max_new_tokens=2)


@pytest.mark.parametrize("n_ids", [2, 3, 5, 8])
def test_a_length_other_than_the_batch_or_one_is_an_error(model, n_ids, batch_inputs):
    inputs = batch_inputs("llama", batch=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"got {n_ids} task_ids for a batch of 4 examples"):
        model(**inputs, task_ids=list(range(n_ids)) if n_ids <= 3 else [0] * n_ids)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_single_id_routes_the_whole_batch(model, batch_inputs):
    inputs = batch_inputs("llama", batch=4)
    with torch.no_grad():
        single = model(**inputs, task_ids=[2]).logits
        scalar_tensor = model(**inputs, task_ids=torch.tensor([2])).logits
        full = model(**inputs, task_ids=[2, 2, 2, 2]).logits
    torch.testing.assert_close(single, full, rtol=0, atol=0)
    torch.testing.assert_close(scalar_tensor, full, rtol=0, atol=0)


def test_each_example_uses_its_own_task(model, batch_inputs):
    inputs = batch_inputs("llama", batch=3)
    with torch.no_grad():
        mixed = model(**inputs, task_ids=[2, 0, 1]).logits
        for i, t in enumerate([2, 0, 1]):
            alone = model(**{k: v[i : i + 1] for k, v in inputs.items()}, task_ids=[t]).logits
            torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)
        # and tasks really differ
        other = model(**inputs, task_ids=[0, 0, 0]).logits
    assert not torch.allclose(mixed[0], other[0], atol=1e-3)


def test_routing_state_expansion_and_errors():
    state = RoutingState(active_adapter="a")
    with pytest.raises(ValueError, match="task_ids are required"):
        state.for_batch(4, torch.device("cpu"))
    with state.route(torch.tensor([3, 1])):
        r = state.for_batch(6, torch.device("cpu"))
        assert r.task_ids.tolist() == [3, 3, 3, 1, 1, 1]
        assert r.unique.tolist() == [1, 3] and r.inverse.tolist() == [1, 1, 1, 0, 0, 0]
        assert state.for_batch(6, torch.device("cpu")) is r  # computed once per call
        with pytest.raises(ValueError, match="batch of 5 rows"):
            state.for_batch(5, torch.device("cpu"), "layer.x")
    assert state.task_ids is None


def test_check_task_ids_returns_long():
    out = check_task_ids([1, 0], n_tasks=2)
    assert out.dtype == torch.long and out.tolist() == [1, 0]
