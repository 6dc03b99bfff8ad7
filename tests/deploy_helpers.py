"""Tiny randomly initialised models with random non-zero Poly/MHR adapters, for the merge/export/speed-path tests."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from polytropon import PolyConfig, PolyModel, get_peft_model

VOCAB = 64


def tiny_llama(seed: int = 0) -> nn.Module:
    """A 2-layer Llama causal LM (nn.Linear projections), hidden 32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """A 2-layer GPT-2 LM (transformers Conv1D projections), hidden 32."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_bert_classifier(seed: int = 0) -> nn.Module:
    """A 2-layer BERT sequence classifier with 3 labels (its ``classifier`` head is a module to save)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, num_labels=3,
    )
    return BertForSequenceClassification(config).eval()


#: (builder, target modules) for the two kinds of base layer.
ARCHS: dict[str, tuple[Callable[[int], nn.Module], list[str]]] = {
    "llama-linear": (tiny_llama, ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
    "gpt2-conv1d": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"]),
}

#: n_splits for Poly (1) and MHR (4).
KINDS = {"poly": 1, "mhr": 4}


def randomise(model: PolyModel, seed: int = 1) -> PolyModel:
    """Give every router logit a standard-normal value (so tasks differ) and every saved head new weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "module_logits" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=g))
    return model


def poly_model(arch: str, kind: str, n_tasks: int = 3, seed: int = 0, **overrides) -> PolyModel:
    """A tiny model of ``arch`` with a random non-zero adapter (``init_weights=False``) of ``kind``."""
    build, targets = ARCHS[arch]
    torch.manual_seed(seed + 100)
    config = PolyConfig(
        r=4, n_tasks=n_tasks, n_skills=3, n_splits=KINDS[kind], init_weights=False, target_modules=targets, **overrides
    )
    return randomise(get_peft_model(build(seed), config)).eval()


def tokens(batch: int = 3, length: int = 7, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|``."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
