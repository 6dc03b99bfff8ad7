"""``ModulesToSave``: one trainable copy of a module per adapter, the copy of the active adapter runs (the original
with adapters disabled or for an adapter without a copy), and every adapter saves its own copy."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from polytropon import PolyConfig, PolyModel, get_peft_model
from polytropon.modules_to_save import ModulesToSave
from polytropon.routing import RoutingState


def randomised(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))
    return module


def wrapper(*adapters: str, active: str | None = None) -> ModulesToSave:
    """A ``Linear(6, 3)`` wrapped, with a copy of distinct random weights for each adapter."""
    torch.manual_seed(0)
    wrapped = ModulesToSave(nn.Linear(6, 3), RoutingState(active_adapter=active))
    for i, name in enumerate(adapters):
        wrapped.add_copy(name)
        randomised(wrapped.modules_to_save[name], seed=10 + i)
    return wrapped


def test_each_adapter_gets_its_own_copy_of_the_original():
    torch.manual_seed(0)
    original = nn.Linear(6, 3)
    wrapped = ModulesToSave(original, RoutingState(active_adapter="a"))
    wrapped.add_copy("a")
    wrapped.add_copy("b")
    a, b = wrapped.modules_to_save["a"], wrapped.modules_to_save["b"]
    for copy in (a, b):
        assert copy is not original and torch.equal(copy.weight, original.weight) and torch.equal(copy.bias, original.bias)
        assert copy.weight.data_ptr() != original.weight.data_ptr()
    assert a.weight.data_ptr() != b.weight.data_ptr()
    with torch.no_grad():
        a.weight.add_(1.0)
    assert not torch.equal(a.weight, original.weight) and torch.equal(b.weight, original.weight)


def test_the_active_adapter_s_copy_runs():
    wrapped = wrapper("a", "b", active="a")
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = {name: wrapped.modules_to_save[name](x) for name in ("a", "b")}
        original = wrapped.original_module(x)
        assert torch.equal(wrapped(x), expected["a"])
        wrapped.routing.active_adapter = "b"
        assert torch.equal(wrapped(x), expected["b"])
        assert not torch.allclose(expected["a"], expected["b"]) and not torch.allclose(expected["b"], original)


def test_the_original_runs_when_disabled_or_for_an_adapter_without_a_copy():
    wrapped = wrapper("a", active="a")
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        original = wrapped.original_module(x)
        wrapped.routing.disabled = True
        assert wrapped.active_module() is wrapped.original_module and torch.equal(wrapped(x), original)
        wrapped.routing.disabled = False
        assert wrapped.active_module() is wrapped.modules_to_save["a"]
        for adapter in ("other", None):
            wrapped.routing.active_adapter = adapter
            assert wrapped.active_module() is wrapped.original_module and torch.equal(wrapped(x), original)


def test_attribute_reads_see_the_module_that_runs():
    wrapped = wrapper("a", "b", active="b")
    assert wrapped.out_features == 3 and wrapped.in_features == 6
    assert wrapped.weight is wrapped.modules_to_save["b"].weight
    wrapped.routing.active_adapter = "missing"
    assert wrapped.weight is wrapped.original_module.weight


def test_only_the_copies_train(tiny_bert_cls):
    model = get_peft_model(tiny_bert_cls(), PolyConfig(n_tasks=2, n_skills=2, r=2))
    head = model.get_base_model().classifier
    assert isinstance(head, ModulesToSave)
    assert all(p.requires_grad for p in head.modules_to_save["default"].parameters())
    assert not any(p.requires_grad for p in head.original_module.parameters())


@pytest.fixture
def two_adapter_classifier(tiny_bert_cls):
    """A factory of the model below."""

    def two_adapter_classifier() -> PolyModel:
        """A BERT classifier (SEQ_CLS: ``classifier`` is saved) with adapters ``default`` and ``other``, each with
        random non-zero skills, routers and head copy."""
        config = dict(n_tasks=2, n_skills=2, r=2, init_weights=False)
        model = get_peft_model(tiny_bert_cls(), PolyConfig(**config))
        model.add_adapter("other", PolyConfig(**config))
        head = model.get_base_model().classifier
        for i, name in enumerate(("default", "other")):
            randomised(head.modules_to_save[name], seed=20 + i)
        return model.eval()

    return two_adapter_classifier


def test_switching_adapters_switches_the_head(batch_inputs, two_adapter_classifier):
    model = two_adapter_classifier()
    head = model.get_base_model().classifier
    inputs = batch_inputs("bert", batch=3)
    task_ids = torch.tensor([0, 1, 0])
    with torch.no_grad():
        model.set_adapter("default")
        logits_default = model(**inputs, task_ids=task_ids).logits
        model.set_adapter("other")
        logits_other = model(**inputs, task_ids=task_ids).logits
        with model.disable_adapter():
            plain = model(**inputs).logits
            hidden = model.get_base_model().bert(**inputs).pooler_output
        assert torch.allclose(plain, head.original_module(hidden))
    assert not torch.allclose(logits_default, logits_other)
    assert not torch.allclose(plain, logits_other)


def test_each_adapter_saves_its_own_copy(tmp_path, batch_inputs, tiny_bert_cls, two_adapter_classifier):
    model = two_adapter_classifier()
    head = model.get_base_model().classifier
    model.save_pretrained(str(tmp_path))
    for name, folder in (("default", tmp_path), ("other", tmp_path / "other")):
        tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
        copy = head.modules_to_save[name]
        assert torch.equal(tensors["base_model.model.classifier.weight"], copy.weight)
        assert torch.equal(tensors["base_model.model.classifier.bias"], copy.bias)
    # reloaded, each adapter runs its own head again
    inputs = batch_inputs("bert", batch=3)
    for name, folder in (("default", tmp_path), ("other", tmp_path / "other")):
        model.set_adapter(name)
        reloaded = PolyModel.from_pretrained(tiny_bert_cls(), str(folder)).eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**inputs, task_ids=[0, 1, 1]).logits, model(**inputs, task_ids=[0, 1, 1]).logits,
                                       rtol=1e-6, atol=1e-6)
