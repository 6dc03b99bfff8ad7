"""Every Python snippet of docs/training.md runs, in order, in one namespace (offline, tiny models)."""

from __future__ import annotations

import os
import re

import pytest

pytest.importorskip("datasets")
pytest.importorskip("trl")
pytest.importorskip("accelerate")
pytest.importorskip("torchao")

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs", "training.md")


def snippets() -> list[str]:
    with open(DOC, encoding="utf-8") as fh:
        return re.findall(r"```python\n(.*?)```", fh.read(), flags=re.S)


def test_the_doc_has_a_snippet_per_section():
    blocks = snippets()
    assert len(blocks) >= 10
    for needle in ("Trainer(model=model", "PolyTrainer(", "resume_from_checkpoint", "PolySFTTrainer(", "packing=True",
                   "Accelerator(", "bf16=True", "quantize_("):
        assert any(needle in block for block in blocks), needle


def test_every_snippet_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__training_doc__"}
    for index, block in enumerate(snippets()):
        exec(compile(block, f"{DOC}:snippet{index}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "adapter_model.safetensors" in printed
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter" / "model.safetensors"))  # the Trainer's resume file: adapter only
    assert saved and all(".adapters." in key for key in saved), sorted(saved)
    assert "no 'task_ids' column" in printed  # the collator's error, printed by its snippet
    assert "SFTConfig(packing=False)" in printed  # packing refused, naming the fix
