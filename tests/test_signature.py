"""signature.py: the ``forward`` signature a PolyModel shows (the wrapped model's plus ``task_ids``), bound per
model, surviving pickle and deepcopy."""

from __future__ import annotations

import copy
import inspect
import pickle

import pytest
import torch
from torch import nn

from polytropon import PolyConfig, PolyModel, get_peft_model
from polytropon.signature import TASK_IDS_PARAMETER, bind_forward, forward_signature, forward_state

KEYWORD_ONLY = inspect.Parameter.KEYWORD_ONLY


class Explicit(nn.Module):
    def forward(self, input_ids, attention_mask=None, *, scale: float = 1.0):
        return input_ids * scale


class OwnTaskIds(nn.Module):
    def forward(self, input_ids, task_ids=0, **kwargs):
        return input_ids + task_ids


class Unreadable(nn.Module):
    def __init__(self) -> None:
        super().__init__()

        def forward(*args, **kwargs):
            return args

        forward.__signature__ = "not a signature"  # inspect.signature raises TypeError
        self.forward = forward


class Wrapper(nn.Module):
    """The protocol PolyModel follows: a per-instance forward, left out of pickles and rebuilt."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.forward = bind_forward(self, type(self).forward)

    def forward(self, *args, task_ids=None, **kwargs):
        return self.model(*args, **kwargs), task_ids

    def __getstate__(self):
        return forward_state(self.__dict__)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.forward = bind_forward(self, type(self).forward)


# --------------------------------------------------------------------------- forward_signature


def test_task_ids_goes_before_kwargs_of_a_transformers_model(tiny_llama):
    base = tiny_llama()
    params = list(forward_signature(base).parameters.values())
    own = list(inspect.signature(base.forward).parameters.values())
    assert own[-1].kind is inspect.Parameter.VAR_KEYWORD
    assert params == own[:-1] + [TASK_IDS_PARAMETER, own[-1]]
    assert params[-2].kind is KEYWORD_ONLY and params[-2].default is None


def test_task_ids_goes_last_without_kwargs():
    params = list(forward_signature(Explicit()).parameters.values())
    assert [p.name for p in params] == ["input_ids", "attention_mask", "scale", "task_ids"]
    assert params[-1] == TASK_IDS_PARAMETER


def test_a_models_own_task_ids_is_kept():
    signature = forward_signature(OwnTaskIds())
    assert signature == inspect.signature(OwnTaskIds().forward)
    assert signature.parameters["task_ids"].default == 0
    assert [p.name for p in signature.parameters.values()].count("task_ids") == 1


def test_an_unreadable_signature_falls_back_to_args_task_ids_kwargs():
    with pytest.raises(TypeError):
        inspect.signature(Unreadable().forward)
    assert str(forward_signature(Unreadable())) == "(*args, task_ids=None, **kwargs)"


# --------------------------------------------------------------------------- bind_forward, forward_state


def test_bind_forward_gives_each_model_its_own_signature_and_leaves_the_class_alone():
    explicit, own = Wrapper(Explicit()), Wrapper(OwnTaskIds())
    assert str(inspect.signature(explicit.forward)) == "(input_ids, attention_mask=None, *, scale: 'float' = 1.0, task_ids=None)"
    assert str(inspect.signature(own.forward)) == "(input_ids, task_ids=0, **kwargs)"
    assert str(inspect.signature(Wrapper.forward)) == "(self, *args, task_ids=None, **kwargs)"
    assert explicit.forward.__func__ is not own.forward.__func__
    assert explicit.forward.__func__.__code__ is Wrapper.forward.__code__  # the class's code, run as is
    x = torch.tensor([1.0, 2.0])
    out, ids = explicit(x, scale=3.0, task_ids=[1])
    torch.testing.assert_close(out, x * 3.0)
    assert ids == [1]


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))], ids=["deepcopy", "pickle"])
def test_the_bound_forward_survives_copies(clone):
    model = Wrapper(Explicit())
    assert "forward" in model.__dict__ and "forward" not in forward_state(model.__dict__)
    assert forward_state({"forward": print, "x": 1}) == {"forward": print, "x": 1}  # only the bound forward goes
    copied = clone(model)
    assert copied.forward.__self__ is copied
    assert inspect.signature(copied.forward) == inspect.signature(model.forward)
    x = torch.tensor([2.0])
    torch.testing.assert_close(copied(x, scale=2.0)[0], x * 2.0)


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))], ids=["deepcopy", "pickle"])
def test_a_poly_model_survives_copies_with_its_signature_and_outputs(tiny_llama, batch_inputs, randomize_, clone):
    model = get_peft_model(tiny_llama(), PolyConfig(n_tasks=2, init_weights=False))
    randomize_(model)
    copied = clone(model)
    assert isinstance(copied, PolyModel) and copied.forward.__self__ is copied
    assert "task_ids" in inspect.signature(copied.forward).parameters
    assert inspect.signature(copied.forward) == inspect.signature(model.forward)
    inputs = batch_inputs("llama")
    with torch.no_grad():
        expected = model(**inputs, task_ids=[0, 1, 1, 0]).logits
        torch.testing.assert_close(copied(**inputs, task_ids=[0, 1, 1, 0]).logits, expected, rtol=0, atol=0)
