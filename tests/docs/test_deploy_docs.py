"""The examples of docs/deploy.md run as written (their asserts included)."""

from __future__ import annotations

import os
import re

import pytest

pytest.importorskip("peft")

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "deploy.md")


def test_deploy_doc_examples_run(tmp_path):
    with open(DOC, encoding="utf-8") as fh:
        text = fh.read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 4
    code = "\n".join(blocks).replace('"/tmp/', f'"{tmp_path}/')
    exec(compile(code, DOC, "exec"), {"__name__": "deploy_doc"})
    assert (tmp_path / "lora-translate" / "adapter_config.json").is_file()
