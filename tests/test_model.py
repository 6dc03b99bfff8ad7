"""PolyModel, the facade: PEFT's adapter management (add / set / delete / disable), attribute fall-through,
parameter counts, saved-module copies, deep copies. Planning and injection: tests/test_injection.py."""

import copy

import pytest
import torch

from polytropon import PolyConfig, PolyLayer, get_peft_model


def test_print_trainable_parameters(capsys, tiny_llama):
    model = get_peft_model(tiny_llama(), PolyConfig())
    model.print_trainable_parameters()
    out = capsys.readouterr().out
    trainable, total = model.get_nb_trainable_parameters()
    assert f"trainable params: {trainable:,d}" in out and f"all params: {total:,d}" in out


def test_attribute_fallthrough_and_base_model(tiny_llama):
    base = tiny_llama()
    model = get_peft_model(base, PolyConfig())
    assert model.config is base.config
    assert model.get_base_model() is base
    with pytest.raises(AttributeError):
        model.no_such_attribute


def test_add_set_delete_disable_adapters(batch_inputs, randomize_, tiny_llama):
    base = tiny_llama()
    inputs = batch_inputs("llama")
    with torch.no_grad():
        base_logits = base(**inputs).logits
    model = get_peft_model(base, PolyConfig(n_tasks=2, init_weights=False))
    model.add_adapter("other", PolyConfig(n_tasks=3, init_weights=False, target_modules=["k_proj"]))
    randomize_(model)
    assert model.active_adapter == "default"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    task_ids = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        out_default = model(**inputs, task_ids=task_ids).logits
        model.set_adapter("other")
        assert all(".other." in n for n, p in model.named_parameters() if p.requires_grad)
        out_other = model(**inputs, task_ids=torch.tensor([2, 1, 0, 2])).logits
        with pytest.raises(ValueError, match="n_tasks=2"):
            model.set_adapter("default")
            model(**inputs, task_ids=torch.tensor([2, 0, 0, 0]))
        with model.disable_adapter():
            disabled = model(**inputs).logits
        model.set_adapter("default")
        again = model(**inputs, task_ids=task_ids).logits
    assert not torch.allclose(out_default, base_logits, atol=1e-3)
    assert not torch.allclose(out_other, out_default, atol=1e-3)
    torch.testing.assert_close(disabled, base_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(again, out_default, rtol=0, atol=0)
    model.delete_adapter("default")
    assert model.active_adapter == "other" and list(model.peft_config) == ["other"]
    assert not any(".default." in n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="unknown adapter 'default'"):
        model.set_adapter("default")
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("other", PolyConfig())


def test_modules_to_save_copy_is_used_and_original_kept(batch_inputs, tiny_llama):
    base = tiny_llama()
    model = get_peft_model(base, PolyConfig(modules_to_save=["lm_head"]))
    head = model.model.lm_head
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(1.0)
    inputs = batch_inputs("llama")
    with torch.no_grad():
        routed = model(**inputs, task_ids=[0, 0, 0, 0]).logits
        with model.disable_adapter():
            plain = model(**inputs).logits
    assert not torch.allclose(routed, plain)
    assert model.model.lm_head.weight is head.modules_to_save["default"].weight


def test_pickle_free_deepcopy_keeps_routing_shared(batch_inputs, tiny_llama):
    model = get_peft_model(tiny_llama(), PolyConfig(n_tasks=2))
    clone = copy.deepcopy(model)
    layers = [m for m in clone.modules() if isinstance(m, PolyLayer)]
    assert all(layer.routing is clone.routing for layer in layers)
    with torch.no_grad():
        clone(**batch_inputs("llama"), task_ids=[0, 1, 0, 1])
