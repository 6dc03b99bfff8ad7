"""Fixtures shared by every test folder, built from :mod:`tests.helpers`.

Two kinds:

* things set up once (session-scoped): tiny model folders with tokenizers, tiny multi-task JSONL data;
  and a temporary directory as a string;
* the helpers' builders themselves, each a fixture of the same name returning the helper callable (a factory):
  a test asks for ``tiny_llama`` and calls ``tiny_llama(seed=1)``. Tests take builders this way; they import
  from :mod:`tests.helpers` only values pytest needs while collecting (``ARCHS``, ``KINDS``, ``MODELS``,
  ``SMALL_MODELS`` in ``parametrize`` lists).
"""

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

from tests import helpers  # noqa: E402
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


# --------------------------------------------------------------------------- the helpers' builders, as fixtures

#: helper name -> what its fixture provides (the callable itself; see tests/helpers.py for arguments).
BUILDERS = {
    "tiny_llama": "a 2-layer Llama (hidden 32, vocab 96), eval mode: ``tiny_llama(seed=0, layers=2, ...)``",
    "tiny_gpt2": "a 2-layer GPT-2 (hidden 32, vocab 96), eval mode",
    "tiny_t5": "a 2+2-layer T5 (d_model 32, vocab 96), eval mode",
    "tiny_bert_cls": "a 2-layer BERT sequence classifier (hidden 32, vocab 96), eval mode",
    "small_llama": "``tiny_llama`` over the 64-token vocabulary",
    "small_gpt2": "``tiny_gpt2`` over the 64-token vocabulary",
    "small_t5": "``tiny_t5`` over the 64-token vocabulary",
    "small_bert_cls": "``tiny_bert_cls`` over the 64-token vocabulary",
    "batch_inputs": "random model inputs of a model kind: ``batch_inputs(kind, batch=4, length=7, seed=0)``",
    "small_inputs": "``batch_inputs`` over the 64-token vocabulary",
    "output_tensor": "the logits (or first output) of a model's output",
    "randomize_": "random non-zero adapter tensors, in place: ``randomize_(model, seed=123, scale=0.5)``",
    "randomise_routing": "standard-normal router logits and saved-head weights, in place",
    "poly_model": "a small model with a random non-zero adapter: ``poly_model(arch, kind, n_tasks=3, seed=0)``",
    "tokens": "random token ids over the 64-token vocabulary, ``(batch, length)``",
    "rel_diff": "``max|a - b| / max|b|``",
    "routers": "the distinct routers of an adapter of a model",
    "make_rows": "rows of the two tiny tasks ``animal`` and ``color``",
    "write_jsonl": "rows written to a JSONL file",
    "run_cli": "``polytropon ARGV`` run in this process: ``run_cli(capsys, *argv) -> (code, out, err)``",
    "assert_one_line_error": "the CLI's one-line error check",
    "routed_logits": "the logits of a saved CLI run's adapter, every row routed to one task",
}


def _builder_fixture(name: str, doc: str):
    def fixture():
        return getattr(helpers, name)

    fixture.__name__ = name
    fixture.__doc__ = f"tests.helpers.{name}: {doc}."
    return pytest.fixture(scope="session", name=name)(fixture)


for _name, _doc in BUILDERS.items():
    globals()[f"_{_name}_fixture"] = _builder_fixture(_name, _doc)
