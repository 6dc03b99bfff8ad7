"""Fixtures shared by every test folder, built from :mod:`tests.helpers`: tiny model folders with tokenizers and
tiny multi-task JSONL data (session-scoped: built once), and a temporary directory as a string."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# subprocesses (torchrun, the CLI) also run tiny models single-threaded
os.environ.setdefault("OMP_NUM_THREADS", "1")

# tiny models run fastest single-threaded (and CI runs tests beside nothing else)
torch.set_num_threads(1)

from tests.helpers import make_rows, make_tiny_bert, make_tiny_gpt2, make_tiny_t5, write_jsonl  # noqa: E402


@pytest.fixture
def tmp_dir(tmp_path) -> str:
    return str(tmp_path)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A saved 2-layer BERT (no head) with a word-level tokenizer."""
    return make_tiny_bert(str(tmp_path_factory.mktemp("tiny_bert")))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> tuple[str, str]:
    """``(train.jsonl, eval.jsonl)`` of two tiny tasks, ``animal`` and ``color``."""
    folder = tmp_path_factory.mktemp("data")
    train = write_jsonl(str(folder / "train.jsonl"), make_rows(24, seed=1))
    evaluation = write_jsonl(str(folder / "eval.jsonl"), make_rows(8, seed=2))
    return train, evaluation


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> str:
    """A saved 2-layer GPT-2 with the tokenizer of :func:`tiny_bert`."""
    return make_tiny_gpt2(str(tmp_path_factory.mktemp("tiny_gpt2")))


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> str:
    """A saved 2+2-layer T5 with the tokenizer of :func:`tiny_bert`."""
    return make_tiny_t5(str(tmp_path_factory.mktemp("tiny_t5")))
