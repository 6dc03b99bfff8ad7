"""The tests' shared helpers, in one module: tiny transformers models built offline from configs, random non-zero
adapters, tiny model folders with tokenizers and multi-task JSONL data for the CLI, and the small-vocabulary models of
the research-toolkit and deploy tests.

How tests reach these helpers (the rule):

* **take builders as fixtures.** ``tests/conftest.py`` provides every commonly used builder as a fixture of the same
  name that returns the function itself (``tiny_llama``, ``small_llama``, ``batch_inputs``, ``randomize_``,
  ``poly_model``, ``run_cli``, ...): ``def test_x(tiny_llama): model = tiny_llama(seed=1)``. It also provides what
  must be set up once (model folders, data files; ``tests/app/commands/conftest.py``: a trained run).
* **import from here only what pytest needs while collecting**: values in ``parametrize`` lists and decorators
  (``ARCHS``, ``KINDS``, ``MODELS``, ``SMALL_MODELS``, a builder passed as a parameter), and constants such as
  ``VOCAB``. A fixture is not available before the tests exist. Module-level helper functions of a test file that
  build models are the other exception still found in some files: they import the builders they call.
* never ``import conftest``.
"""

from __future__ import annotations

import json
import os
import random
from functools import partial
from typing import Callable

import torch
from torch import nn

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


# --------------------------------------------------------------------------- CLI: model folders and data

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


# --------------------------------------------------------------------------- small-vocabulary models (toolkit, deploy)

SMALL_VOCAB = 64

small_llama = partial(tiny_llama, vocab=SMALL_VOCAB, max_positions=64)
small_gpt2 = partial(tiny_gpt2, vocab=SMALL_VOCAB, max_positions=64)
small_t5 = partial(tiny_t5, vocab=SMALL_VOCAB)
small_bert_cls = partial(tiny_bert_cls, vocab=SMALL_VOCAB)

SMALL_MODELS = {"llama": small_llama, "gpt2": small_gpt2, "t5": small_t5, "bert": small_bert_cls}


def small_inputs(kind: str, batch: int = 4, length: int = 6, seed: int = 0) -> dict:
    """:func:`batch_inputs` over the small vocabulary (decoder inputs of length 4 for T5)."""
    return batch_inputs(kind, batch, length, seed, vocab=SMALL_VOCAB, decoder_length=4)


def routers(model, adapter: str = "default") -> list:
    """The distinct routers of an adapter (shared routers counted once)."""
    from polytropon.variants import unique_routers

    return unique_routers([layer.adapters[adapter].poly_router for _, layer in model.poly_layers()])


# --------------------------------------------------------------------------- deploy: merge, export, fast paths

#: (builder, target modules) for the two kinds of base layer: ``nn.Linear`` (Llama) and transformers ``Conv1D`` (GPT-2).
ARCHS: dict[str, tuple[Callable[[int], nn.Module], list[str]]] = {
    "llama-linear": (small_llama, ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
    "gpt2-conv1d": (small_gpt2, ["c_attn", "c_proj", "c_fc"]),
}

#: n_splits for Poly (1) and MHR (4).
KINDS = {"poly": 1, "mhr": 4}


def randomise_routing(model, seed: int = 1):
    """Give every router logit a standard-normal value (so tasks differ) and every saved head new weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "module_logits" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=g))
    return model


def poly_model(arch: str, kind: str, n_tasks: int = 3, seed: int = 0, **overrides):
    """A tiny model of ``arch`` with a random non-zero adapter (``init_weights=False``) of ``kind``."""
    from polytropon import PolyConfig, get_peft_model

    build, targets = ARCHS[arch]
    torch.manual_seed(seed + 100)
    config = PolyConfig(
        r=4, n_tasks=n_tasks, n_skills=3, n_splits=KINDS[kind], init_weights=False, target_modules=targets, **overrides
    )
    return randomise_routing(get_peft_model(build(seed), config)).eval()


def tokens(batch: int = 3, length: int = 7, seed: int = 5) -> torch.Tensor:
    """Random token ids over the small vocabulary, ``(batch, length)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, SMALL_VOCAB, (batch, length), generator=g)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|``."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def routed_logits(run: str, model_dir: str, batch: dict, task: int) -> torch.Tensor:
    """Logits of the sequence classifier in ``model_dir`` with the adapter of the CLI run ``run``, every row routed to ``task``."""
    from transformers import AutoModelForSequenceClassification

    from polytropon import PolyModel

    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    model = PolyModel.from_pretrained(base, os.path.join(run, "adapter"))
    with torch.no_grad():
        return model(**batch, task_ids=[task] * batch["input_ids"].shape[0]).logits


#: command-line flags of a quick ``polytropon train`` on the tiny data (small rank and skills, quiet)
FAST_TRAIN = ["--batch-size", "16", "--lr", "1e-2", "--router-lr", "5e-2", "--n-skills", "2", "--r", "4", "--quiet",
              "--baseline-epochs", "5"]
