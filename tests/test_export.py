"""export_lora: one task of a Poly/MHR adapter served by PEFT's plain LoRA."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tests.helpers import ARCHS, KINDS

from polytropon import PolyConfig, get_peft_model

peft = pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

CASES = [(arch, kind) for arch in ARCHS for kind in KINDS]
TOL = 1e-5


def routed_logits(model, ids, task):
    with torch.no_grad():
        return model(input_ids=ids, task_ids=[task] * ids.shape[0]).logits


def peft_logits(directory, fresh_base, ids):
    lora = peft.PeftModel.from_pretrained(fresh_base, directory).eval()
    with torch.no_grad():
        return lora(input_ids=ids).logits


@pytest.mark.parametrize("arch,kind", CASES)
def test_peft_lora_reproduces_each_task(tmp_path, arch, kind, poly_model, rel_diff, tokens):
    build, _ = ARCHS[arch]
    model = poly_model(arch, kind)
    ids = tokens()
    with model.disable_adapter(), torch.no_grad():
        base = model(input_ids=ids).logits
    for task in range(3):
        directory = tmp_path / f"task{task}"
        model.export_lora(directory, task)
        ours = routed_logits(model, ids, task)
        assert rel_diff(ours, base) > 1e-3  # the task's update is not negligible
        assert rel_diff(peft_logits(directory, build(0), ids), ours) < TOL


@pytest.mark.parametrize("arch", list(ARCHS))
def test_exported_files_follow_peft_lora_format(tmp_path, arch, poly_model):
    build, targets = ARCHS[arch]
    model = poly_model(arch, "mhr")
    model.export_lora(tmp_path, 1)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["lora_alpha"] == 1 and config["use_rslora"] is False
    assert config["fan_in_fan_out"] is (arch == "gpt2-conv1d")
    # the same key names and shapes as an adapter PEFT itself builds for those modules
    reference = peft.get_peft_model(
        build(0), peft.LoraConfig(r=4, target_modules=targets, fan_in_fan_out=config["fan_in_fan_out"])
    )
    expected = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(reference).items()}
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    parsed = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(parsed, peft.LoraConfig) and parsed.r == 4


def test_classifier_exports_with_its_head(tmp_path, randomise_routing, rel_diff, small_bert_cls, tokens):
    torch.manual_seed(0)
    config = PolyConfig(r=4, n_tasks=3, n_skills=2, n_splits=2, init_weights=False)
    model = randomise_routing(get_peft_model(small_bert_cls(), config)).eval()
    ids = tokens()
    model.export_lora(tmp_path, 2)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and saved["modules_to_save"] == ["classifier"]
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert torch.equal(tensors["base_model.model.classifier.weight"], model.classifier.modules_to_save["default"].weight)
    lora = peft.PeftModel.from_pretrained(small_bert_cls(), str(tmp_path)).eval()
    with torch.no_grad():
        ours = model(input_ids=ids, task_ids=[2, 2, 2]).logits
        theirs = lora(input_ids=ids).logits
    assert rel_diff(theirs, ours) < TOL


def test_export_while_merged_and_of_a_named_adapter(tmp_path, poly_model, randomise_routing, rel_diff, tokens):
    build, _ = ARCHS["llama-linear"]
    model = poly_model("llama-linear", "poly")
    model.add_adapter("other", PolyConfig(r=2, n_tasks=2, n_skills=2, init_weights=False, target_modules=["q_proj"]))
    randomise_routing(model, seed=7)
    ids = tokens()
    model.merge_adapter(0)  # the export is a delta: merging does not change it
    model.export_lora(tmp_path / "default0", 0)
    model.unmerge_adapter()
    model.export_lora(tmp_path / "other1", 1, adapter_name="other")
    assert model.active_adapter == "default"
    assert rel_diff(peft_logits(tmp_path / "default0", build(0), ids), routed_logits(model, ids, 0)) < TOL
    model.set_adapter("other")
    assert rel_diff(peft_logits(tmp_path / "other1", build(0), ids), routed_logits(model, ids, 1)) < TOL


@pytest.mark.parametrize("bad,error", [(3, ValueError), (-1, ValueError), (1.5, TypeError), ("0", TypeError)])
def test_bad_task_id_writes_nothing(tmp_path, bad, error, poly_model):
    model = poly_model("gpt2-conv1d", "poly")
    target = tmp_path / "out"
    with pytest.raises(error, match="task_id"):
        model.export_lora(target, bad)
    assert not target.exists()


def test_unknown_adapter_and_file_target_raise(tmp_path, poly_model):
    model = poly_model("gpt2-conv1d", "poly")
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        model.export_lora(tmp_path / "x", 0, adapter_name="nope")
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(ValueError, match="found a file"):
        model.export_lora(path, 0)
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_export_by_task_name(tmp_path, poly_model, rel_diff, tokens):
    build, _ = ARCHS["gpt2-conv1d"]
    model = poly_model("gpt2-conv1d", "mhr", task_names=["a", "b", "c"])
    ids = tokens()
    model.export_lora(tmp_path, "b")
    assert rel_diff(peft_logits(tmp_path, build(0), ids), routed_logits(model, ids, 1)) < TOL
    with pytest.raises(ValueError, match="unknown task name"):
        model.export_lora(tmp_path / "x", "z")
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------- every task at once
@pytest.mark.parametrize("arch,kind", CASES)
def test_export_all_tasks_each_equals_the_routed_task(tmp_path, arch, kind, poly_model, rel_diff, tokens):
    build, _ = ARCHS[arch]
    model = poly_model(arch, kind, n_tasks=4)
    ids = tokens()
    out = tmp_path / "loras"
    manifest = model.export_lora_all(out)
    assert sorted(os.listdir(out)) == ["lora_modules.json", "lora_modules.txt", "task_0", "task_1", "task_2", "task_3"]
    assert [e["name"] for e in manifest["adapters"]] == [f"task_{t}" for t in range(4)]
    assert json.loads((out / "lora_modules.json").read_text())["adapters"] == manifest["adapters"]
    outputs = []
    for entry in manifest["adapters"]:
        assert entry["path"] == str(out / entry["name"]) and entry["r"] == 4
        ours = routed_logits(model, ids, entry["task_id"])
        assert rel_diff(peft_logits(entry["path"], build(0), ids), ours) < TOL
        outputs.append(ours)
    assert min(rel_diff(outputs[i], outputs[j]) for i in range(4) for j in range(i)) > 1e-3  # the tasks differ


def test_export_all_names_and_lora_modules_argument(tmp_path, poly_model):
    model = poly_model("llama-linear", "poly", task_names=["qa", "sum.v2", "mt"])
    model.peft_config["default"].base_model_name_or_path = "org/tiny-llama"
    out = tmp_path / "my loras"  # a space: the argument quotes each name=path
    manifest = model.export_lora_all(out, tasks=["mt", 0])
    assert [(e["name"], e["task_id"], e["base_model_name"]) for e in manifest["adapters"]] == [
        ("mt", 2, "org/tiny-llama"), ("qa", 0, "org/tiny-llama")]
    text = (out / "lora_modules.txt").read_text().strip()
    assert text == manifest["lora_modules"] == f"--lora-modules 'mt={out}/mt' 'qa={out}/qa'"
    import shlex

    assert shlex.split(text)[1:] == [f"mt={out}/mt", f"qa={out}/qa"]  # what a shell hands to vLLM
    assert json.loads((out / "mt" / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny-llama"
    # names= overrides the task names
    other = model.export_lora_all(tmp_path / "renamed", names=["a", "b", "c"], tasks=[1])
    assert [e["name"] for e in other["adapters"]] == ["b"]


@pytest.mark.parametrize("call, error, message", [
    (dict(tasks=[]), ValueError, "tasks must be a non-empty list of task ids or names, got []"),
    (dict(tasks="qa"), ValueError, "tasks must be a non-empty list of task ids or names, got 'qa'"),
    (dict(tasks=[0, 0]), ValueError, "tasks to export repeat: ['task_0']"),
    (dict(tasks=[7]), ValueError, "task_id 7 is out of range"),
    (dict(tasks=[1.5]), TypeError, "task_id must be an int"),
    (dict(names=["a", "b"]), ValueError, "names must be a list of 3 names"),
    (dict(names=["a", "b c", "d"]), ValueError, "task 1 is named 'b c', which cannot name an exported adapter"),
    (dict(names=["a", "..", "d"]), ValueError, "task 1 is named '..'"),
    (dict(adapter_name="other"), ValueError, "unknown adapter 'other'"),
])
def test_export_all_bad_input_writes_nothing(tmp_path, call, error, message, poly_model):
    model = poly_model("llama-linear", "poly")
    with pytest.raises(error) as info:
        model.export_lora_all(tmp_path / "out", **call)
    assert message in str(info.value)
    assert os.listdir(tmp_path) == []


def test_export_all_refuses_a_non_empty_directory_and_fails_atomically(tmp_path, monkeypatch, poly_model):
    import polytropon.export as export

    model = poly_model("llama-linear", "mhr")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="exists and is not an empty directory"):
        model.export_lora_all(tmp_path / "full")
    assert os.listdir(tmp_path / "full") == ["keep.txt"]
    # a failure while writing the third task leaves no directory and no temporary files
    real, calls = export.write_lora, []

    def failing(directory, tensors, config):
        calls.append(directory)
        if len(calls) == 3:
            raise OSError("disk full")
        real(directory, tensors, config)

    monkeypatch.setattr(export, "write_lora", failing)
    with pytest.raises(OSError, match="disk full"):
        model.export_lora_all(tmp_path / "new")
    assert sorted(os.listdir(tmp_path)) == ["full"]
    (tmp_path / "empty").mkdir()  # an empty directory is taken
    monkeypatch.setattr(export, "write_lora", real)
    model.export_lora_all(tmp_path / "empty")
    assert sorted(os.listdir(tmp_path / "empty"))[:2] == ["lora_modules.json", "lora_modules.txt"]
