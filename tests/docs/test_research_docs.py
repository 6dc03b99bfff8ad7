"""The code blocks of docs/research.md run, in order, as one script."""

from __future__ import annotations

import pathlib
import re

import torch

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "research.md"


def test_research_doc_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 10
    namespace: dict = {}
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f"{DOC.name}[block {i}]", "exec"), namespace)
    finally:
        torch.set_num_threads(previous)
    printed = capsys.readouterr().out
    assert "module router parameters: 128" in printed and "model router parameters: 32" in printed
    assert "trainable: 64" in printed
