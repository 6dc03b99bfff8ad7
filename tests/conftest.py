"""Shared fixtures: a tiny offline BERT model folder and tiny multi-task JSONL data."""

from __future__ import annotations

import json
import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models run fastest on one thread; more threads only contend on a busy CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

WORDS = [
    "the", "a", "cat", "dog", "bird", "red", "blue", "green", "big", "small", "runs", "sleeps", "sings",
    "today", "now", "yes", "no", "is", "it", "animal", "color", "?", ".", ",",
]


def make_tiny_bert(folder: str, with_head: bool = False) -> str:
    """Save a randomly initialised 2-layer BERT and a word-level tokenizer to ``folder``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

    os.makedirs(folder, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    vocab_file = os.path.join(folder, "vocab.txt")
    with open(vocab_file, "w", encoding="utf-8") as fh:
        fh.write("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config) if with_head else BertModel(config)
    model.save_pretrained(folder)
    return folder


def make_rows(n_per_task: int, seed: int) -> list[dict[str, str]]:
    """Two tasks over the same kind of sentence: "is the animal a cat?" and "is the colour red?"."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_per_task):
        for task in ("animal", "color"):
            want = i % 2 == 0
            animal = rng.choice(["dog", "bird"]) if task == "animal" and not want else "cat"
            if task == "color":
                animal = rng.choice(["cat", "dog", "bird"])
            color = rng.choice(["blue", "green"]) if task == "color" and not want else "red"
            if task == "animal":
                color = rng.choice(["red", "blue", "green"])
            words = ["the", rng.choice(["big", "small"]), color, animal, rng.choice(["runs", "sleeps", "sings"])]
            rows.append({"task": task, "input": " ".join(words), "target": "yes" if want else "no"})
    return rows


def write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    return make_tiny_bert(str(tmp_path_factory.mktemp("tiny_bert")))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("data")
    train = write_jsonl(str(folder / "train.jsonl"), make_rows(24, seed=1))
    evaluation = write_jsonl(str(folder / "eval.jsonl"), make_rows(8, seed=2))
    return train, evaluation


def make_tiny_gpt2(folder: str) -> str:
    """Save a randomly initialised 2-layer GPT-2 with the word-level tokenizer of :func:`make_tiny_bert`."""
    import torch
    from transformers import BertTokenizerFast, GPT2Config, GPT2LMHeadModel

    os.makedirs(folder, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tokenizer.add_special_tokens({"eos_token": "[SEP]", "bos_token": "[CLS]"})
    tokenizer.save_pretrained(folder)
    config = GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=2, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> str:
    return make_tiny_gpt2(str(tmp_path_factory.mktemp("tiny_gpt2")))
