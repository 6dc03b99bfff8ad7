"""A PolyModel is a ``transformers.PreTrainedModel`` whose ``PreTrainedModel`` attributes read the wrapped model's."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import PreTrainedModel

from polytropon import PolyConfig, PolyModel, get_peft_model
from polytropon.pretrained import FALLBACKS, MODULE_METHODS_RESTORED, pretrained_only_names
from tests.helpers import randomize_, tiny_gpt2, tiny_llama

OWN = {"save_pretrained", "from_pretrained", "load_adapter", "add_adapter", "set_adapter", "delete_adapter",
       "active_adapters", "_keys_to_ignore_on_save"}


def _model(base=None):
    config = PolyConfig(task_type="CAUSAL_LM", r=2, n_tasks=3, n_skills=2, n_splits=1, init_weights=False)
    return get_peft_model(base if base is not None else tiny_llama(), config)


def _read(obj, name):
    try:
        return getattr(obj, name), None
    except Exception as exc:  # noqa: BLE001 - comparing what each side raises
        return None, type(exc)


@pytest.mark.parametrize("make_base", [tiny_llama, tiny_gpt2])
def test_every_pretrained_attribute_reads_the_wrapped_models(make_base):
    base = make_base()
    model = _model(base)
    assert isinstance(model, PreTrainedModel)
    names = pretrained_only_names()
    assert len(names) > 100 and OWN <= set(names)
    for name in sorted(set(names) - OWN):
        ours, our_error = _read(model, name)
        theirs, their_error = _read(base, name)
        assert our_error is their_error, name
        if hasattr(ours, "__self__"):  # a bound method (a classmethod: bound to the class): the wrapped model's own
            assert ours.__self__ is theirs.__self__ and ours.__func__ is theirs.__func__, name
            assert ours.__self__ in (base, type(base)), name
        elif isinstance(ours, torch.Tensor):
            assert ours is theirs, name
        else:
            assert ours is theirs or repr(ours) == repr(theirs), name


def test_polymodels_own_methods_and_module_methods_are_kept():
    model = _model()
    assert model.save_pretrained.__func__ is PolyModel.save_pretrained
    assert PolyModel.from_pretrained.__func__ is PolyModel.__dict__["from_pretrained"].__func__
    assert model.active_adapters == ["default"]
    for name in MODULE_METHODS_RESTORED:
        assert getattr(PolyModel, name) is getattr(nn.Module, name), name
    randomize_(model)
    model.to(torch.float64)  # nn.Module.to: the adapters are cast too
    assert all(p.dtype == torch.float64 for p in model.parameters())
    model.float()
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_class_reads_and_instance_values_behave_as_the_fall_through_did():
    model = _model()
    with pytest.raises(AttributeError, match="main_input_name"):
        PolyModel.main_input_name  # noqa: B018 - not a class attribute of PolyModel, as before
    assert model.main_input_name == "input_ids"
    model.main_input_name = "inputs_embeds"  # a value on the instance wins
    assert model.main_input_name == "inputs_embeds" and model.get_base_model().main_input_name == "input_ids"


def test_a_wrapped_plain_module_reads_the_fallbacks():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            return self.lin(x)

    model = get_peft_model(Tiny(), PolyConfig(r=2, n_tasks=2, n_skills=2, n_splits=1, target_modules=["lin"]))
    assert model.tie_weights() is None and model.is_activation_checkpointing is False
    assert set(FALLBACKS) == {"tie_weights", "is_activation_checkpointing", "is_gradient_checkpointing"}
    with pytest.raises(AttributeError):
        model.main_input_name  # noqa: B018 - neither PolyModel nor the wrapped module has it


def test_keys_left_out_of_the_trainer_file_are_the_frozen_ones():
    model = _model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(model._keys_to_ignore_on_save) == set(model.state_dict()) - trainable
    assert not set(model._keys_to_ignore_on_save) & trainable
