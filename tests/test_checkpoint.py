"""save_pretrained / from_pretrained / load_adapter: round trips, file layout, rejected checkpoints, atomicity."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from polytropon import PolyConfig, PolyModel, get_peft_model
from polytropon import checkpoint as ckpt


@pytest.fixture
def trained(randomize_, tiny_llama):
    """The factory ``trained(...)`` below, built from the shared builders (fixtures)."""

    def trained(seed=1, **kw):
        cfg = dict(n_tasks=3, n_skills=3, n_splits=2, init_weights=False, modules_to_save=["lm_head"])
        cfg.update(kw)
        model = get_peft_model(tiny_llama(), PolyConfig(**cfg))
        randomize_(model, seed)
        with torch.no_grad():
            model.model.lm_head.modules_to_save["default"].weight.normal_()
        return model.eval()

    return trained


@pytest.fixture
def logits(batch_inputs):
    """The factory ``logits(...)`` below, built from the shared builders (fixtures)."""

    def logits(model, task_ids=(0, 2, 1, 1)):
        with torch.no_grad():
            return model(**batch_inputs("llama"), task_ids=list(task_ids)).logits

    return logits


def test_round_trip_restores_outputs_and_modules_to_save(tmp_dir, logits, trained, tiny_llama):
    model = trained()
    model.save_pretrained(tmp_dir)
    assert sorted(os.listdir(tmp_dir)) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = set(load_file(os.path.join(tmp_dir, "adapter_model.safetensors")))
    assert "base_model.model.lm_head.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.poly_router.module_logits" in keys
    loaded = PolyModel.from_pretrained(tiny_llama(), tmp_dir)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    torch.testing.assert_close(loaded.model.lm_head.weight, model.model.lm_head.weight)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert not loaded.training
    trainable = PolyModel.from_pretrained(tiny_llama(), tmp_dir, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_config_records_resolved_fields(tmp_dir, trained):
    trained().save_pretrained(tmp_dir)
    data = json.loads(open(os.path.join(tmp_dir, "adapter_config.json")).read())
    assert data["peft_type"] == "POLY" and data["task_type"] == "CAUSAL_LM"
    assert data["target_modules"] == ["q_proj", "v_proj"]


def test_non_default_adapters_go_to_subfolders_and_load_adapter(tmp_dir, logits, trained, randomize_, tiny_llama):
    model = trained()
    model.add_adapter("second", PolyConfig(n_tasks=2, init_weights=False, target_modules=["o_proj"]))
    randomize_(model, 7)
    model.save_pretrained(tmp_dir)
    assert os.path.isfile(os.path.join(tmp_dir, "second", "adapter_model.safetensors"))
    loaded = PolyModel.from_pretrained(tiny_llama(), tmp_dir)
    loaded.load_adapter(os.path.join(tmp_dir, "second"), "second")
    assert loaded.active_adapter == "default"
    loaded.set_adapter("second")
    model.set_adapter("second")
    torch.testing.assert_close(logits(loaded, (1, 0, 1, 0)), logits(model, (1, 0, 1, 0)), rtol=0, atol=0)


def test_sequence_classification_round_trip_keeps_head(tmp_dir, batch_inputs, randomize_, tiny_bert_cls):
    model = get_peft_model(tiny_bert_cls(), PolyConfig(n_tasks=2, init_weights=False))
    randomize_(model)
    with torch.no_grad():
        model.model.classifier.modules_to_save["default"].weight.normal_()
    model.save_pretrained(tmp_dir)
    loaded = PolyModel.from_pretrained(tiny_bert_cls(), tmp_dir)
    inputs = batch_inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs, task_ids=[0, 1, 1, 0]).logits, model(**inputs, task_ids=[0, 1, 1, 0]).logits)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize(
    "damage,error,pattern",
    [
        ("no_weights", FileNotFoundError, "adapter_model.safetensors"),
        ("no_config", FileNotFoundError, "adapter_config.json"),
        ("truncated", ValueError, "adapter_model.safetensors.*not a readable safetensors"),
        ("garbage", ValueError, "not a readable safetensors"),
        ("shape", ValueError, r"poly_lora_A.*shape \(2, 3, 16, 9\).*\(2, 3, 16, 8\)"),
        ("missing_key", ValueError, "missing tensor"),
        ("extra_key", ValueError, "unexpected tensor"),
        ("lora_type", ValueError, "peft_type.*LORA"),
        ("bin_only", FileNotFoundError, "pickled weights are never loaded"),
    ],
)
def test_bad_checkpoints_raise_and_leave_model_unchanged(tmp_dir, damage, error, pattern, trained, tiny_llama):
    trained().save_pretrained(tmp_dir)
    weights = os.path.join(tmp_dir, "adapter_model.safetensors")
    config = os.path.join(tmp_dir, "adapter_config.json")
    if damage == "no_weights":
        os.remove(weights)
    elif damage == "no_config":
        os.remove(config)
    elif damage == "truncated":
        data = open(weights, "rb").read()
        open(weights, "wb").write(data[: len(data) // 2])
    elif damage == "garbage":
        open(weights, "wb").write(b"\x00" * 100)
    elif damage in ("shape", "missing_key", "extra_key"):
        tensors = load_file(weights)
        key = "base_model.model.model.layers.0.self_attn.q_proj.poly_lora_A"
        if damage == "shape":
            tensors[key] = torch.zeros(2, 3, 16, 9)
        elif damage == "missing_key":
            del tensors[key]
        else:
            tensors["base_model.model.something.else"] = torch.zeros(1)
        save_file(tensors, weights)
    elif damage == "lora_type":
        data = json.load(open(config))
        data["peft_type"] = "LORA"
        json.dump(data, open(config, "w"))
    elif damage == "bin_only":
        os.rename(weights, os.path.join(tmp_dir, "adapter_model.bin"))

    base = tiny_llama()
    before = snapshot(base)
    names = [n for n, _ in base.named_modules()]
    with pytest.raises(error, match=pattern):
        PolyModel.from_pretrained(base, tmp_dir)
    assert [n for n, _ in base.named_modules()] == names
    assert_unchanged(base, before)

    host = trained(seed=3)
    before = snapshot(host)
    with pytest.raises(error, match=pattern):
        host.load_adapter(tmp_dir, "other")
    assert list(host.peft_config) == ["default"]
    assert_unchanged(host, before)


def test_checkpoint_for_another_model_is_rejected(tmp_dir, trained):
    from transformers import LlamaConfig, LlamaForCausalLM

    trained().save_pretrained(tmp_dir)
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="shape"):
        PolyModel.from_pretrained(wider, tmp_dir)


def test_missing_directory(tmp_dir, tiny_llama):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        PolyModel.from_pretrained(tiny_llama(), os.path.join(tmp_dir, "nowhere"))


def test_interrupted_save_keeps_previous_checkpoint(tmp_dir, monkeypatch, trained, randomize_, tiny_llama):
    model = trained()
    model.save_pretrained(tmp_dir)
    good = {name: open(os.path.join(tmp_dir, name), "rb").read() for name in os.listdir(tmp_dir)}

    randomize_(model, 99)

    def crash(fd, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_dir)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_dir)) == sorted(good)  # no temporary files left behind
    for name, data in good.items():
        assert open(os.path.join(tmp_dir, name), "rb").read() == data
    PolyModel.from_pretrained(tiny_llama(), tmp_dir)  # still loads


def test_save_into_a_file_path_is_rejected(tmp_dir, trained):
    path = os.path.join(tmp_dir, "file")
    open(path, "w").write("x")
    with pytest.raises(ValueError, match="expected a directory"):
        trained().save_pretrained(path)
