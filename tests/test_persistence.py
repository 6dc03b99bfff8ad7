"""persistence.py: an adapter's tensors under PEFT's keys, the checkpoint read and checked in full before anything
changes (missing / unexpected / misshapen tensors named), loading, and saves that check first and write each file
atomically."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from polytropon import PolyConfig, get_peft_model
from polytropon import checkpoint as ckpt
from polytropon import persistence
from polytropon.injection import plan_injection

LAYER = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture
def make_model(tiny_llama, randomize_):
    """A tiny Llama with a random non-zero adapter (and a saved ``lm_head`` copy); ``seed`` picks the values."""

    def make(seed: int = 1, **overrides):
        config = dict(n_tasks=3, n_skills=3, n_splits=2, init_weights=False, modules_to_save=["lm_head"])
        config.update(overrides)
        model = get_peft_model(tiny_llama(), PolyConfig(**config))
        randomize_(model, seed)
        with torch.no_grad():
            model.model.lm_head.modules_to_save["default"].weight.normal_(generator=torch.Generator().manual_seed(seed))
        return model.eval()

    return make


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_unchanged(model, before):
    now = dict(model.named_parameters())
    assert set(now) == set(before)
    for name, value in before.items():
        torch.testing.assert_close(now[name].detach(), value, rtol=0, atol=0)


def logits(model, batch_inputs, task_ids=(0, 2, 1, 1)):
    with torch.no_grad():
        return model(**batch_inputs("llama"), task_ids=list(task_ids)).logits


# --------------------------------------------------------------------------- state dict and shapes


def test_adapter_state_dict_holds_the_live_tensors_under_peft_keys(make_model):
    model = make_model()
    tensors = persistence.adapter_state_dict(model.model, "default")
    adapter = model.model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert tensors[f"{LAYER}.poly_lora_A"] is adapter.poly_lora_A
    assert tensors[f"{LAYER}.poly_lora_B"] is adapter.poly_lora_B
    assert tensors[f"{LAYER}.poly_router.module_logits"] is adapter.poly_router.module_logits
    assert "base_model.model.lm_head.weight" in tensors
    assert len(tensors) == 4 * 3 + 1  # q_proj, v_proj of 2 layers: A, B, logits; the head copy
    assert persistence.adapter_state_dict(model.model, "absent") == {}


def test_expected_shapes_are_those_of_the_built_adapter(make_model):
    model = make_model()
    plan = plan_injection(model.get_base_model(), model.peft_config["default"])
    shapes = persistence.expected_shapes(plan)
    assert shapes == {k: tuple(v.shape) for k, v in persistence.adapter_state_dict(model.model, "default").items()}
    assert shapes[f"{LAYER}.poly_lora_A"] == (2, 3, 16, 8)


def test_a_shared_router_is_written_under_every_layer_and_fixed_routers_not_at_all(make_model):
    model = make_model(router_granularity="model")
    tensors = persistence.adapter_state_dict(model.model, "default")
    logits_keys = [k for k in tensors if k.endswith("module_logits")]
    assert len(logits_keys) == 4 and len({id(tensors[k]) for k in logits_keys}) == 1
    fixed = make_model(poly_type="private", n_skills=3)
    assert not any(k.endswith("module_logits") for k in persistence.adapter_state_dict(fixed.model, "default"))


# --------------------------------------------------------------------------- reading


def damaged(tmp_dir, model, change):
    model.save_pretrained(tmp_dir)
    weights = os.path.join(tmp_dir, "adapter_model.safetensors")
    tensors = load_file(weights)
    change(tensors)
    save_file(tensors, weights)
    return tmp_dir


@pytest.mark.parametrize(
    "change,pattern",
    [
        (lambda t: t.pop(f"{LAYER}.poly_lora_B"), rf"1 missing tensor\(s\), e.g. '{LAYER}.poly_lora_B'"),
        (lambda t: t.update({"base_model.model.extra.weight": torch.zeros(2)}),
         r"1 unexpected tensor\(s\), e.g. 'base_model.model.extra.weight'"),
        (lambda t: t.update({f"{LAYER}.poly_router.module_logits": torch.zeros(4, 6)}),
         rf"tensor '{LAYER}.poly_router.module_logits' has shape \(4, 6\), the model expects \(3, 6\)"),
    ],
)
def test_read_checkpoint_refuses_tensors_that_do_not_fit_naming_them(tmp_dir, make_model, tiny_llama, change, pattern):
    directory = damaged(tmp_dir, make_model(), change)
    base = tiny_llama()
    before = snapshot(base)
    modules = [n for n, _ in base.named_modules()]
    with pytest.raises(ValueError, match=pattern):
        persistence.read_checkpoint(base, directory)
    assert [n for n, _ in base.named_modules()] == modules
    assert_unchanged(base, before)


def test_read_checkpoint_names_both_missing_and_unexpected(tmp_dir, make_model, tiny_llama):
    def change(tensors):
        tensors["base_model.model.extra.weight"] = tensors.pop(f"{LAYER}.poly_lora_A")

    directory = damaged(tmp_dir, make_model(), change)
    with pytest.raises(ValueError, match=r"missing tensor.*poly_lora_A.*; 1 unexpected tensor.*extra.weight"):
        persistence.read_checkpoint(tiny_llama(), directory)


def test_read_checkpoint_of_a_config_that_does_not_fit_the_model(tmp_dir, make_model, tiny_llama):
    make_model().save_pretrained(tmp_dir)
    config = json.load(open(os.path.join(tmp_dir, "adapter_config.json")))
    config["target_modules"] = ["no_such_module"]
    json.dump(config, open(os.path.join(tmp_dir, "adapter_config.json"), "w"))
    with pytest.raises(ValueError, match="does not fit this model.*no_such_module"):
        persistence.read_checkpoint(tiny_llama(), tmp_dir)
    with pytest.raises(FileNotFoundError, match="no such adapter directory"):
        persistence.read_checkpoint(tiny_llama(), os.path.join(tmp_dir, "nowhere"))


def test_read_then_load_reproduces_the_saved_adapter(tmp_dir, make_model, batch_inputs):
    saved = make_model(seed=1)
    saved.save_pretrained(tmp_dir)
    host = make_model(seed=2)
    assert not torch.allclose(logits(host, batch_inputs), logits(saved, batch_inputs))
    plan, tensors = persistence.read_checkpoint(host.get_base_model(), tmp_dir)
    assert plan.config.n_tasks == 3 and set(tensors) == set(persistence.expected_shapes(plan))
    persistence.load_adapter_tensors(host.model, "default", tensors)
    torch.testing.assert_close(logits(host, batch_inputs), logits(saved, batch_inputs), rtol=0, atol=0)


# --------------------------------------------------------------------------- saving


def test_save_adapters_writes_each_adapter_in_its_folder_as_peft_does(tmp_dir, make_model):
    model = make_model()
    model.add_adapter("other", PolyConfig(n_tasks=2, target_modules=["k_proj"]))
    persistence.save_adapters(model, tmp_dir, model.peft_config)
    assert sorted(os.listdir(tmp_dir)) == ["adapter_config.json", "adapter_model.safetensors", "other"]
    assert sorted(os.listdir(os.path.join(tmp_dir, "other"))) == ["adapter_config.json", "adapter_model.safetensors"]
    for name, folder in (("default", tmp_dir), ("other", os.path.join(tmp_dir, "other"))):
        written = load_file(os.path.join(folder, "adapter_model.safetensors"))
        live = persistence.adapter_state_dict(model.model, name)
        assert set(written) == set(live)
        for key, tensor in live.items():
            torch.testing.assert_close(written[key], tensor.detach(), rtol=0, atol=0)
        assert json.load(open(os.path.join(folder, "adapter_config.json")))["inference_mode"] is True
    assert model.peft_config["default"].inference_mode is False  # the model's own config is not changed


def test_save_adapters_with_is_main_process_false_writes_nothing(tmp_dir, make_model):
    model = make_model()
    persistence.save_adapters(model, os.path.join(tmp_dir, "out"), model.peft_config, is_main_process=False)
    assert os.listdir(tmp_dir) == []


def test_save_adapters_from_a_state_dict_checks_it_before_writing(tmp_dir, make_model):
    model = make_model()
    state = {k: v.detach() + 1 for k, v in model.state_dict().items()}
    persistence.save_adapters(model, os.path.join(tmp_dir, "full"), model.peft_config, state_dict=state)
    written = load_file(os.path.join(tmp_dir, "full", "adapter_model.safetensors"))
    torch.testing.assert_close(
        written[f"{LAYER}.poly_lora_A"], model.model.model.layers[0].self_attn.q_proj.adapters["default"].poly_lora_A.detach() + 1
    )
    del state["model.model.layers.1.self_attn.v_proj.adapters.default.poly_lora_B"]
    with pytest.raises(ValueError, match="poly_lora_B"):
        persistence.save_adapters(model, os.path.join(tmp_dir, "partial"), model.peft_config, state_dict=state)
    assert not os.path.exists(os.path.join(tmp_dir, "partial"))


def test_save_adapters_writes_each_file_atomically(tmp_dir, make_model, monkeypatch):
    model = make_model()
    persistence.save_adapters(model, tmp_dir, model.peft_config)
    good = {name: open(os.path.join(tmp_dir, name), "rb").read() for name in os.listdir(tmp_dir)}
    changed = make_model(seed=7)
    real_replace = ckpt.os.replace

    def interrupted(src, dst):  # the process dies after the data is written, before it replaces the file
        raise OSError("killed")

    monkeypatch.setattr(ckpt.os, "replace", interrupted)
    with pytest.raises(OSError, match="killed"):
        persistence.save_adapters(changed, tmp_dir, changed.peft_config)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert sorted(os.listdir(tmp_dir)) == sorted(good)  # no temporary file left behind
    for name, data in good.items():
        assert open(os.path.join(tmp_dir, name), "rb").read() == data


def test_check_save_directory_refuses_a_file(tmp_dir):
    path = os.path.join(tmp_dir, "file")
    open(path, "w").write("x")
    with pytest.raises(ValueError, match="expected a directory, found a file"):
        persistence.check_save_directory(path)
    assert persistence.check_save_directory(os.path.join(tmp_dir, "new")) == os.path.join(tmp_dir, "new")
