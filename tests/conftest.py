"""Tiny transformers models built offline from configs, helpers for random non-zero adapters,
and (for the CLI tests) tiny model folders with tokenizers plus tiny multi-task JSONL data."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# subprocesses (torchrun, the CLI) also run tiny models single-threaded
os.environ.setdefault("OMP_NUM_THREADS", "1")

# tiny models run fastest single-threaded (and CI runs tests beside nothing else)
torch.set_num_threads(1)

VOCAB = 96


def tiny_llama(seed: int = 0, layers: int = 2, vocab: int = VOCAB, max_positions: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0, vocab: int = VOCAB, max_positions: int = 128):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=max_positions, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


def tiny_t5(seed: int = 0, vocab: int = VOCAB):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    return T5ForConditionalGeneration(cfg).eval()


def tiny_bert_cls(seed: int = 0, num_labels: int = 3, vocab: int = VOCAB):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "t5": tiny_t5, "bert": tiny_bert_cls}


def randomize_(model: torch.nn.Module, seed: int = 123, scale: float = 0.5) -> None:
    """Give every trainable-by-design adapter tensor random non-zero values (B and router logits too)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "poly_lora" in name or "module_logits" in name or "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


def batch_inputs(kind: str, batch: int = 4, length: int = 7, seed: int = 0, vocab: int = VOCAB, decoder_length: int = 5) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "t5":
        inputs["decoder_input_ids"] = torch.randint(3, vocab, (batch, decoder_length), generator=gen)
    return inputs


def output_tensor(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


@pytest.fixture
def tmp_dir(tmp_path):
    return str(tmp_path)


# --------------------------------------------------------------------------- CLI fixtures

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
def tiny_gpt2_dir(tmp_path_factory) -> str:
    return make_tiny_gpt2(str(tmp_path_factory.mktemp("tiny_gpt2")))


def make_tiny_t5(folder: str) -> str:
    """Save a randomly initialised 2+2-layer T5 with the word-level tokenizer of :func:`make_tiny_bert`."""
    import torch
    from transformers import BertTokenizerFast, T5Config, T5ForConditionalGeneration

    os.makedirs(folder, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tokenizer.add_special_tokens({"eos_token": "[SEP]"})
    tokenizer.save_pretrained(folder)
    config = T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=3)
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> str:
    return make_tiny_t5(str(tmp_path_factory.mktemp("tiny_t5")))


# --------------------------------------------------------------------------- CLI call helpers


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``polytropon ARGV`` in this process; ``(exit code, stdout, stderr)``."""
    from polytropon.app.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    """Exit code 2 and one ``polytropon...: error: ...`` line on stderr holding every fragment (no traceback)."""
    assert code == 2, (code, err)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("polytropon"), err
    assert ": error: " in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
