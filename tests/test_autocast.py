"""Training and inference under ``torch.autocast`` (bf16 and fp16 on CPU; CUDA autocast takes the same code path).

Inside an autocast region the adapter's products with the layer input run in the autocast dtype, as the base
layer's own GEMM does, and a Poly layer returns the dtype its base layer returns there; the skills are mixed in
the parameters' dtype (float32) and gradients reach the float32 parameters. The reference of every comparison
is the same model and batch without autocast (float32), with the same random routing samples (seeded).

Tolerances (measured on these tiny models with random non-zero adapters, max over every configuration). A
gradient tensor whose entries nearly cancel (a router's logits: each split's weights are normalised) is compared
at no less than 5% of the largest gradient tensor's norm; its own relative error is large in any low precision.

==========================  ==============================  ===============================
                            bf16                            fp16
==========================  ==============================  ===============================
one layer: output           1e-2 relative (measured 4.2e-3) 1.5e-3 (measured 5.7e-4)
one layer: each gradient    5e-2 (measured 2.3e-2)          5e-3 (measured 2.7e-3)
model: loss                 1e-3 relative (measured 1.3e-4) 1e-4 (measured 1.4e-5)
model: each gradient        0.15 (measured 0.116, GPT-2;    0.02 (measured 0.011)
                            Llama 0.017)
==========================  ==============================  ===============================

Whole-model gradients go through every base layer in low precision, so they differ more than one layer's. For
comparison, PEFT's Poly on the same Llama under bf16 autocast: gradient errors up to 0.051 by the same measure.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import VOCAB, batch_inputs, randomize_, tiny_llama
from polytropon import PolyConfig, get_peft_model
from polytropon.layer import PolyAdapter, PolyLayer
from polytropon.routing import RoutingState

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
LAYER_TOL = {"bf16": (1e-2, 5e-2), "fp16": (1.5e-3, 5e-3)}  # (output, gradient), relative
MODEL_TOL = {"bf16": (1e-3, 0.15), "fp16": (1e-4, 0.02)}  # (loss, gradient)
FLOOR = 0.05  # gradients are compared at no less than this fraction of the largest gradient tensor's norm


def tiny_gpt2():
    """GPT-2 (``Conv1D`` layers) without dropout, so that both runs draw the same random numbers."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


TARGETS = {"llama": ["q_proj", "v_proj", "o_proj", "down_proj"], "gpt2": ["c_attn", "c_proj", "c_fc"]}
BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def poly_model(kind: str, n_splits: int):
    config = PolyConfig(r=4, n_tasks=3, n_skills=2, n_splits=n_splits, init_weights=False, target_modules=TARGETS[kind])
    model = get_peft_model(BUILD[kind](), config)
    randomize_(model)
    return model


def autocast(dtype):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else torch.autocast("cpu", enabled=False)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def train_step(model, batch, task_ids, dtype, seed: int = 0):
    """``(loss, {name: grad})`` of one training forward/backward, under autocast in ``dtype`` (None: float32)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with autocast(dtype):
        out = model(**batch, labels=batch["input_ids"], task_ids=task_ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_grads_close(grads, reference, tol):
    assert set(grads) == set(reference) and len(reference) > 0
    largest = max(g.norm().item() for g in reference.values())
    assert largest > 0
    for name, ref in reference.items():
        got = grads[name]
        assert got is not None and got.dtype == ref.dtype == torch.float32, name
        scale = max(ref.norm().item(), FLOOR * largest)
        error = (got - ref).norm().item() / scale
        assert error < tol, f"{name}: gradient error {error:.3g} >= {tol}"


# ----------------------------------------------------------------------------- one layer
def one_layer(kind: str, n_splits: int):
    torch.manual_seed(0)
    if kind == "linear":
        base = nn.Linear(16, 24)
    else:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(24, 16)
    base.requires_grad_(False)
    layer = PolyLayer(base, RoutingState("default"), "layer")
    layer.adapters["default"] = PolyAdapter(16, 24, r=4, n_tasks=3, n_skills=2, n_splits=n_splits, init_weights=False)
    randomize_(layer)
    return layer


@pytest.mark.parametrize("precision", DTYPES)
@pytest.mark.parametrize("n_splits", [1, 2])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("mode, task_ids", [("train", [0, 1, 2, 0]), ("train", [1, 1, 1, 1]), ("eval", [0, 1, 2, 0]), ("eval", [2, 2, 2, 2])])
def test_layer_under_autocast_matches_float32(precision, n_splits, kind, mode, task_ids):
    """Output in the dtype the base layer gives under autocast, close to float32; every gradient in float32."""
    dtype = DTYPES[precision]
    out_tol, grad_tol = LAYER_TOL[precision]
    layer = one_layer(kind, n_splits).train(mode == "train")
    x = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(1))
    results = {}
    for run in (None, dtype):
        xr = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        with autocast(run), layer.routing.route(torch.tensor(task_ids)):
            y = layer(xr)
            expected_dtype = layer.base_layer(xr).dtype
        assert y.dtype == expected_dtype == (run or torch.float32)
        (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
        grads["x"] = xr.grad
        results[run] = (y.detach(), grads)
    y32, g32 = results[None]
    y, g = results[dtype]
    assert rel(y, y32) < out_tol
    assert len(g32) == 4 and all(v.norm() > 0 for v in g32.values())
    assert_grads_close(g, g32, grad_tol)


# ----------------------------------------------------------------------------- whole models
@pytest.mark.parametrize("precision", DTYPES)
@pytest.mark.parametrize("n_splits", [1, 2], ids=["poly", "mhr"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("task_ids, batch", [([0, 1, 2, 0], 4), ([2, 2, 2, 2], 4), ([1], 1)], ids=["mixed", "one-task", "one-example"])
def test_training_step_under_autocast_matches_float32(precision, n_splits, kind, task_ids, batch):
    """Loss and every adapter gradient of a training step under autocast close to the float32 step."""
    loss_tol, grad_tol = MODEL_TOL[precision]
    model = poly_model(kind, n_splits).train()
    inputs = batch_inputs(kind, batch=batch)
    loss32, grads32 = train_step(model, inputs, task_ids, None)
    grads32 = {n: g.clone() for n, g in grads32.items()}
    loss, grads = train_step(model, inputs, task_ids, DTYPES[precision])
    assert abs(loss.item() - loss32.item()) / loss32.item() < loss_tol
    assert_grads_close(grads, grads32, grad_tol)
