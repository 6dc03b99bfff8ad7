"""merge_adapter / unmerge_adapter / merge_and_unload / unload on random non-zero Poly and MHR adapters.

The merge API of whole models, across the two kinds of base layer: what the facade checks (task ids, the merged
task, adapters changed while merged), what ``merge_and_unload`` / ``unload`` hand back (the saved heads too) and
``generate`` while merged. One layer's ``PolyLayer.merge`` / ``unmerge`` against the loop reference is tested in
tests/test_layer.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.helpers import ARCHS, KINDS

from polytropon import PolyConfig, PolyLayer, get_peft_model
from polytropon.modules_to_save import ModulesToSave

CASES = [(arch, kind) for arch in ARCHS for kind in KINDS]
TOL = 1e-5


def base_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "base_layer" in name}


def logits(model, ids, task_ids=None):
    with torch.no_grad():
        kwargs = {} if task_ids is None else {"task_ids": task_ids}
        return model(input_ids=ids, **kwargs).logits


@pytest.mark.parametrize("arch,kind", CASES)
def test_merged_output_equals_routed_output(arch, kind, poly_model, rel_diff, tokens):
    model = poly_model(arch, kind)
    ids = tokens()
    with model.disable_adapter():
        base = logits(model, ids)
    routed_by_task = [logits(model, ids, [task] * 3) for task in range(3)]
    for task, routed in enumerate(routed_by_task):
        assert rel_diff(routed, base) > 1e-3, "the adapter must change the output for the test to mean anything"
        model.merge_adapter(task)
        assert model.merged_task == task
        assert rel_diff(logits(model, ids), routed) < TOL
        assert rel_diff(logits(model, ids, [task] * 3), routed) < TOL
    model.unmerge_adapter()
    assert model.merged_task is None


@pytest.mark.parametrize("arch,kind", CASES)
def test_unmerge_restores_weights_and_routing(arch, kind, poly_model, rel_diff, tokens):
    model = poly_model(arch, kind)
    ids = tokens()
    before = base_weights(model)
    mixed = logits(model, ids, [0, 2, 1])
    model.merge_adapter(1)
    changed = base_weights(model)
    assert max((changed[k] - before[k]).abs().max().item() for k in before) > 1e-3
    model.unmerge_adapter()
    for key, value in base_weights(model).items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6)
    assert rel_diff(logits(model, ids, [0, 2, 1]), mixed) < TOL
    model.unmerge_adapter()  # no task merged: nothing happens
    for key, value in base_weights(model).items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6)


def test_unmerge_restores_weights_after_adapter_changes_while_merged(poly_model):
    model = poly_model("llama-linear", "mhr")
    before = base_weights(model)
    model.merge_adapter(2)
    with torch.no_grad():  # e.g. an optimizer step taken while merged
        for name, param in model.named_parameters():
            if "poly_" in name:
                param.add_(0.5)
    model.unmerge_adapter()
    for key, value in base_weights(model).items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch,kind", CASES)
def test_merge_and_unload_returns_plain_model_with_task(arch, kind, poly_model, rel_diff, tokens):
    model = poly_model(arch, kind)
    ids = tokens()
    routed = logits(model, ids, [2, 2, 2])
    base_class = type(model.get_base_model())
    plain = model.merge_and_unload(2)
    assert type(plain) is base_class
    assert not any(isinstance(m, (PolyLayer, ModulesToSave)) for m in plain.modules())
    assert not any("poly_" in name or "base_layer" in name for name, _ in plain.named_parameters())
    assert rel_diff(logits(plain, ids), routed) < TOL


@pytest.mark.parametrize("arch", list(ARCHS))
def test_unload_returns_the_base_model(arch, poly_model, tokens):
    build, _ = ARCHS[arch]
    reference = build(0)
    model = poly_model(arch, "mhr")
    ids = tokens()
    model.merge_adapter(1)  # unload subtracts a merged task
    plain = model.unload()
    assert type(plain) is type(reference)
    assert not any(isinstance(m, (PolyLayer, ModulesToSave)) for m in plain.modules())
    torch.testing.assert_close(logits(plain, ids), logits(reference, ids), rtol=0, atol=1e-5)


def test_merge_and_unload_keeps_the_trained_head(randomise_routing, rel_diff, small_bert_cls, tokens):
    torch.manual_seed(0)
    config = PolyConfig(r=4, n_tasks=2, n_skills=2, n_splits=2, init_weights=False)
    model = randomise_routing(get_peft_model(small_bert_cls(), config)).eval()
    ids = tokens()
    with torch.no_grad():
        routed = model(input_ids=ids, task_ids=[1, 1, 1]).logits
        head = model.get_base_model().classifier.modules_to_save["default"].weight.clone()
        plain = model.merge_and_unload(1)
        assert torch.equal(plain.classifier.weight, head)
        assert rel_diff(plain(input_ids=ids).logits, routed) < TOL


@pytest.mark.parametrize("bad", [3, 7, -1])
def test_out_of_range_task_id_raises_without_change(bad, poly_model):
    model = poly_model("gpt2-conv1d", "poly")
    before = base_weights(model)
    with pytest.raises(ValueError, match=f"task_id {bad} is out of range"):
        model.merge_adapter(bad)
    assert model.merged_task is None
    with pytest.raises(ValueError, match="out of range"):
        model.merge_and_unload(bad)
    assert model.merged_task is None
    assert all(isinstance(m, PolyLayer) for _, m in model.poly_layers())
    for key, value in base_weights(model).items():
        assert torch.equal(value, before[key])


@pytest.mark.parametrize("bad", [1.0, "1", True, None, torch.tensor([1, 2]), torch.tensor(1.0)])
def test_non_integer_task_id_raises_type_error_without_change(bad, poly_model):
    model = poly_model("llama-linear", "poly")
    before = base_weights(model)
    with pytest.raises(TypeError, match="task_id must be an int"):
        model.merge_adapter(bad)
    assert model.merged_task is None
    for key, value in base_weights(model).items():
        assert torch.equal(value, before[key])


def test_bad_task_id_while_merged_keeps_the_merged_task(poly_model):
    model = poly_model("llama-linear", "mhr")
    model.merge_adapter(0)
    merged = base_weights(model)
    with pytest.raises(ValueError, match="out of range"):
        model.merge_adapter(9)
    assert model.merged_task == 0
    for key, value in base_weights(model).items():
        assert torch.equal(value, merged[key])


@pytest.mark.parametrize("task_id", [np.int64(1), torch.tensor(1)])
def test_integer_like_task_ids_are_accepted(task_id, poly_model, rel_diff, tokens):
    model = poly_model("llama-linear", "poly")
    ids = tokens()
    routed = logits(model, ids, [1, 1, 1])
    model.merge_adapter(task_id)
    assert model.merged_task == 1 and type(model.merged_task) is int
    assert rel_diff(logits(model, ids), routed) < TOL


def test_task_ids_of_another_task_raise_while_merged(poly_model, tokens):
    model = poly_model("gpt2-conv1d", "mhr")
    ids = tokens()
    model.merge_adapter(1)
    with pytest.raises(ValueError, match="task 1 is merged"):
        logits(model, ids, [1, 0, 1])
    with pytest.raises(ValueError, match="task 1 is merged"):
        model.generate(input_ids=ids, task_ids=[2, 2, 2], max_new_tokens=2)
    assert model.merged_task == 1


def test_merging_another_task_replaces_the_merged_one(poly_model, rel_diff, tokens):
    model = poly_model("llama-linear", "mhr")
    ids = tokens()
    routed2 = logits(model, ids, [2, 2, 2])
    before = base_weights(model)
    model.merge_adapter(0)
    model.merge_adapter(2)
    assert model.merged_task == 2
    assert rel_diff(logits(model, ids), routed2) < TOL
    model.merge_adapter(2)  # the same task again: nothing changes
    assert rel_diff(logits(model, ids), routed2) < TOL
    model.unmerge_adapter()
    for key, value in base_weights(model).items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_disable_adapter_while_merged_gives_base_outputs(arch, poly_model, rel_diff, tokens):
    build, _ = ARCHS[arch]
    reference = build(0)
    model = poly_model(arch, "mhr")
    ids = tokens()
    routed = logits(model, ids, [1, 1, 1])
    model.merge_adapter(1)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=0, atol=1e-5)
    assert model.merged_task == 1
    assert rel_diff(logits(model, ids), routed) < TOL


@pytest.mark.parametrize("arch,kind", CASES)
def test_generate_while_merged_equals_routed_generate(arch, kind, poly_model, tokens):
    model = poly_model(arch, kind)
    prompt = tokens(batch=2, length=5)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    routed = model.generate(input_ids=prompt, task_ids=[1, 1], **kwargs)
    model.merge_adapter(1)
    merged = model.generate(input_ids=prompt, **kwargs)
    assert torch.equal(merged, routed)
    assert torch.equal(model.generate(input_ids=prompt, task_ids=[1, 1], **kwargs), routed)


def test_merge_uses_eval_routing_in_training_mode(poly_model, rel_diff, tokens):
    model = poly_model("llama-linear", "mhr")
    ids = tokens()
    routed = logits(model, ids, [0, 0, 0])  # eval mode
    model.train()
    model.merge_adapter(0)
    model.eval()
    assert rel_diff(logits(model, ids), routed) < TOL


def test_adapter_added_to_an_eval_model_routes_deterministically(poly_model, rel_diff, tokens):
    # regression: a new adapter used to start in training mode and sample its routes at inference
    model = poly_model("llama-linear", "poly")
    model.add_adapter("other", PolyConfig(r=2, n_tasks=2, n_skills=2, init_weights=False, target_modules=["q_proj"]))
    model.set_adapter("other")
    assert not any(m.training for m in model.modules())
    ids = tokens()
    first = logits(model, ids, [1, 1, 1])
    assert torch.equal(logits(model, ids, [1, 1, 1]), first)
    routed = first
    model.merge_adapter(1)
    assert rel_diff(logits(model, ids), routed) < TOL


def test_merge_by_task_name(poly_model, rel_diff, tokens):
    model = poly_model("llama-linear", "mhr", task_names=["qa", "sum", "tr"])
    ids = tokens()
    routed = logits(model, ids, [2, 2, 2])
    model.merge_adapter("tr")
    assert model.merged_task == 2
    assert rel_diff(logits(model, ids), routed) < TOL
    with pytest.raises(ValueError, match="unknown task name 'nope'"):
        model.merge_adapter("nope")
    assert model.merged_task == 2
