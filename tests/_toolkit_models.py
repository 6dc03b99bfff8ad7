"""The research-toolkit tests' tiny models: conftest's builders with a 64-token vocabulary."""

from __future__ import annotations

from functools import partial

import torch

import conftest

VOCAB = 64

tiny_llama = partial(conftest.tiny_llama, vocab=VOCAB, max_positions=64)
tiny_gpt2 = partial(conftest.tiny_gpt2, vocab=VOCAB, max_positions=64)
tiny_t5 = partial(conftest.tiny_t5, vocab=VOCAB)
tiny_bert_cls = partial(conftest.tiny_bert_cls, vocab=VOCAB)

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "t5": tiny_t5, "bert": tiny_bert_cls}


def randomize(model: torch.nn.Module, seed: int = 123, scale: float = 0.5) -> None:
    """Random non-zero values for every adapter tensor (skills and router logits)."""
    conftest.randomize_(model, seed, scale)


def inputs(kind: str, batch: int = 4, length: int = 6, seed: int = 0) -> dict:
    return conftest.batch_inputs(kind, batch, length, seed, vocab=VOCAB, decoder_length=4)


logits = conftest.output_tensor


def routers(model, adapter: str = "default") -> list:
    """The distinct routers of an adapter (shared routers counted once)."""
    from polytropon.variants import unique_routers

    return unique_routers([layer.adapters[adapter].poly_router for _, layer in model.poly_layers()])
