"""Adapter names are identifiers, checked wherever an adapter is added or loaded, before anything changes; and the
files the library writes stay inside the directory the caller chose."""

from __future__ import annotations

import os

import pytest
import torch

from polytropon import PolyConfig, PolyModel, collapse_to_average, get_peft_model
from polytropon.checkpoint import check_adapter_name
from polytropon.layer import PolyLayer

GOOD = ["default", "task-1", "lora_v2", "_private", "A1", "x" * 128]
BAD = [
    ("..", ValueError, "not a valid adapter name"),
    (".", ValueError, "not a valid adapter name"),
    (".hidden", ValueError, "not a valid adapter name"),
    ("a/b", ValueError, "not a valid adapter name"),
    ("a\\b", ValueError, "not a valid adapter name"),
    ("../up", ValueError, "not a valid adapter name"),
    ("lora.v2", ValueError, "not a valid adapter name"),  # torch refuses dots in module names
    ("with space", ValueError, "not a valid adapter name"),
    ("naïve", ValueError, "not a valid adapter name"),
    ("-flag", ValueError, "not a valid adapter name"),
    ("", ValueError, "not a valid adapter name"),
    ("x" * 129, ValueError, "not a valid adapter name"),
    ("train", ValueError, "reserved"),
    ("keys", ValueError, "reserved"),
    (None, TypeError, "must be a string"),
    (3, TypeError, "must be a string"),
]


def config(**overrides):
    return PolyConfig(**{"r": 2, "n_tasks": 2, "n_skills": 2, "init_weights": False, **overrides})


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, before) -> bool:
    after = model.state_dict()
    return list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


def files_under(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


@pytest.fixture
def saved(tmp_path, randomize_, tiny_llama):
    model = get_peft_model(tiny_llama(), config())
    randomize_(model)
    model.save_pretrained(tmp_path / "ckpt")
    return str(tmp_path / "ckpt")


def test_the_rule_names_what_is_allowed():
    for name in GOOD:
        assert check_adapter_name(name) == name
    with pytest.raises(ValueError, match=r"'\.\.' is not a valid adapter name: use ASCII letters, digits, '_' and '-'"):
        check_adapter_name("..")


@pytest.mark.parametrize("name,error,pattern", BAD + [("/abs/path", ValueError, "not a valid adapter name")])
def test_invalid_names_are_refused_everywhere_before_any_change(name, error, pattern, saved, tmp_path, batch_inputs, randomize_, tiny_llama):
    base = tiny_llama()
    with pytest.raises(error, match=pattern):
        get_peft_model(base, config(), adapter_name=name)
    with pytest.raises(error, match=pattern):
        PolyModel.from_pretrained(base, saved, adapter_name=name)
    assert not any(isinstance(m, PolyLayer) for m in base.modules())  # the base model was not touched

    model = get_peft_model(tiny_llama(), config())
    randomize_(model)
    before = snapshot(model)
    with pytest.raises(error, match=pattern):
        model.add_adapter(name, config())
    with pytest.raises(error, match=pattern):
        model.load_adapter(saved, adapter_name=name)
    with pytest.raises(error, match=pattern):
        collapse_to_average(model, new_adapter_name=name)
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    assert unchanged(model, before)
    with torch.no_grad():  # and it still runs
        model(**batch_inputs("llama"), task_ids=[0, 1, 0, 1])


def test_valid_names_save_into_their_own_folder_and_load_back(tmp_path, batch_inputs, randomize_, tiny_llama):
    model = get_peft_model(tiny_llama(), config())
    for name in ("task-1", "lora_v2"):
        model.add_adapter(name, config(n_tasks=3))
    randomize_(model)
    model.save_pretrained(tmp_path / "out")
    assert files_under(tmp_path) == {
        os.path.join("out", *parts)
        for parts in [
            ("adapter_config.json",), ("adapter_model.safetensors",),
            ("task-1", "adapter_config.json"), ("task-1", "adapter_model.safetensors"),
            ("lora_v2", "adapter_config.json"), ("lora_v2", "adapter_model.safetensors"),
        ]
    }
    fresh = get_peft_model(tiny_llama(), config())
    fresh.load_adapter(tmp_path / "out" / "task-1", adapter_name="task-1")
    fresh.set_adapter("task-1")
    model.set_adapter("task-1")
    inputs = batch_inputs("llama", batch=3)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs, task_ids=[2, 0, 1]).logits, model(**inputs, task_ids=[2, 0, 1]).logits, rtol=0, atol=0)


def test_an_absolute_path_as_name_writes_nothing_outside(tmp_path, tiny_llama):
    outside = tmp_path / "outside"
    outside.mkdir()
    model = get_peft_model(tiny_llama(), config())
    with pytest.raises(ValueError, match="not a valid adapter name"):
        model.add_adapter(str(outside / "evil"), config())
    with pytest.raises(ValueError, match="not a valid adapter name"):
        model.add_adapter("../outside", config())
    model.save_pretrained(tmp_path / "save")
    assert files_under(outside) == set()
    assert files_under(tmp_path) == {os.path.join("save", "adapter_config.json"), os.path.join("save", "adapter_model.safetensors")}


def test_an_adapter_folder_linking_outside_is_refused_before_writing(tmp_path, tiny_llama):
    outside = tmp_path / "outside"
    outside.mkdir()
    save = tmp_path / "save"
    save.mkdir()
    try:
        os.symlink(outside, save / "other", target_is_directory=True)
    except (OSError, NotImplementedError):
        pytest.skip("symbolic links are not available here")
    model = get_peft_model(tiny_llama(), config())
    model.add_adapter("other", config())
    with pytest.raises(ValueError, match=r"adapter 'other' resolves to .*outside the save directory"):
        model.save_pretrained(save)
    assert files_under(outside) == set() and files_under(save) == set()  # nothing written, not even "default"
    model.save_pretrained(save, selected_adapters=["default"])
    assert files_under(save) == {"adapter_config.json", "adapter_model.safetensors"} and files_under(outside) == set()


def test_written_files_replace_links_instead_of_following_them(tmp_path, randomize_, tiny_llama):
    """A file in the target directory that links elsewhere is replaced by the new file; its target is untouched."""
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_bytes(b"keep me")
    model = get_peft_model(tiny_llama(), config())
    randomize_(model)
    for kind, write in (("save", lambda d: model.save_pretrained(d)), ("export", lambda d: model.export_lora(d, 1))):
        target = tmp_path / kind
        target.mkdir()
        try:
            os.symlink(victim, target / "adapter_model.safetensors")
            os.symlink(victim, target / "adapter_config.json")
        except (OSError, NotImplementedError):
            pytest.skip("symbolic links are not available here")
        write(target)
        assert victim.read_bytes() == b"keep me"
        assert not os.path.islink(target / "adapter_model.safetensors") and not os.path.islink(target / "adapter_config.json")
    assert files_under(outside) == {"victim"}
