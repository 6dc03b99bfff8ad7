"""``polytropon export-lora``: one task of a saved run as a plain PEFT LoRA adapter, equal to the routed task."""

from __future__ import annotations

import json
import os


def test_export_lora_reproduces_the_routed_task(trained_run, tiny_bert, capsys, tmp_path, routed_logits, run_cli):
    import peft
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    batch = tok(["the big red cat runs", "the small blue dog sleeps"], return_tensors="pt", padding=True)
    expected = routed_logits(trained_run, tiny_bert, batch, task=1)

    lora_dir = str(tmp_path / "lora")
    code, out, err = run_cli(capsys, "export-lora", trained_run, "--task", "color", "--output", lora_dir)
    assert code == 0, err
    assert json.load(open(os.path.join(lora_dir, "adapter_config.json")))["peft_type"] == "LORA"
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    served = peft.PeftModel.from_pretrained(base, lora_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(served(**batch).logits, expected, rtol=1e-5, atol=1e-5)


def test_export_lora_rejects_bad_input(trained_run, capsys, tmp_path, assert_one_line_error, run_cli):
    out_dir = str(tmp_path / "out")
    code, _, err = run_cli(capsys, "export-lora", trained_run, "--task", "zebra", "--output", out_dir)
    assert_one_line_error(code, err, "unknown task 'zebra'", "animal, color")
    code, _, err = run_cli(capsys, "export-lora", trained_run, "--task", "7", "--output", out_dir)
    assert_one_line_error(code, err, "task id 7 is out of range")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "export-lora", trained_run, "--task", "animal", "--output", str(occupied))
    assert_one_line_error(code, err, "refusing to overwrite")
    assert (occupied / "keep.txt").read_text() == "mine"
    assert not os.path.exists(out_dir)


def test_export_lora_all_tasks_writes_one_lora_per_task_and_the_vllm_argument(trained_run, tiny_bert, capsys, tmp_path, assert_one_line_error, routed_logits, run_cli):
    import peft
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    batch = tok(["the big red cat runs", "the small blue dog sleeps"], return_tensors="pt", padding=True)
    out_dir = tmp_path / "loras"
    code, out, err = run_cli(capsys, "export-lora", trained_run, "--all-tasks", "--output", str(out_dir))
    assert code == 0, err
    manifest = json.load(open(out_dir / "lora_modules.json"))
    assert [(e["name"], e["task_id"]) for e in manifest["adapters"]] == [("animal", 0), ("color", 1)]
    argument = f"--lora-modules animal={out_dir}/animal color={out_dir}/color"
    assert (out_dir / "lora_modules.txt").read_text().strip() == argument
    assert out.splitlines()[-1].endswith(f"--enable-lora --max-lora-rank 8 --max-loras 2 {argument}")
    for entry in manifest["adapters"]:
        base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
        served = peft.PeftModel.from_pretrained(base, entry["path"]).eval()
        with torch.no_grad():
            torch.testing.assert_close(served(**batch).logits, routed_logits(trained_run, tiny_bert, batch, entry["task_id"]),
                                       rtol=1e-5, atol=1e-5)
    # --task and --all-tasks exclude each other; an occupied --output is refused before anything is loaded
    code, _, err = run_cli(capsys, "export-lora", trained_run, "--all-tasks", "--task", "color", "--output", str(tmp_path / "x"))
    assert code == 2 and "not allowed with argument" in err
    code, _, err = run_cli(capsys, "export-lora", trained_run, "--all-tasks", "--output", str(out_dir))
    assert_one_line_error(code, err, "refusing to overwrite")
