"""The run every command test after ``train`` works on: one short ``polytropon train`` of the tiny BERT."""

from __future__ import annotations

import pytest

from polytropon.app.cli import main
from tests.helpers import FAST_TRAIN



@pytest.fixture(scope="session")
def trained_run(tiny_bert, tiny_data, tmp_path_factory):
    """One short training run shared by the train / eval / inspect / export-lora / merge tests (never modified)."""
    # capsys is function-scoped, so this session-scoped fixture calls main() directly
    train, evaluation = tiny_data
    out = str(tmp_path_factory.mktemp("runs") / "run")
    code = main(["train", "--model", tiny_bert, "--data", train, "--eval-data", evaluation, "--output-dir", out,
                 "--max-steps", "12", "--save-steps", "6", *FAST_TRAIN])
    assert code == 0
    return out
