"""Tiny transformers models built offline from configs, and helpers for random non-zero adapters."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

VOCAB = 96


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


def tiny_t5(seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    return T5ForConditionalGeneration(cfg).eval()


def tiny_bert_cls(seed: int = 0, num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "t5": tiny_t5, "bert": tiny_bert_cls}


def randomize_(model: torch.nn.Module, seed: int = 123) -> None:
    """Give every trainable-by-design adapter tensor random non-zero values (B and router logits too)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "poly_lora" in name or "module_logits" in name or "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


def batch_inputs(kind: str, batch: int = 4, length: int = 7, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "t5":
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 5), generator=gen)
    return inputs


def output_tensor(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


@pytest.fixture
def tmp_dir(tmp_path):
    return str(tmp_path)
