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

from tests.helpers import VOCAB, batch_inputs, randomize_, tiny_llama
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


@pytest.mark.parametrize("precision", DTYPES)
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_eval_and_generate_under_autocast(precision, kind):
    """Eval logits close to float32 and in the base model's autocast dtype; generation routes every example."""
    dtype = DTYPES[precision]
    model = poly_model(kind, 2).eval()
    inputs = batch_inputs(kind, batch=3)
    task_ids = [0, 2, 1]
    with torch.no_grad():
        reference = model(**inputs, task_ids=task_ids).logits
        with autocast(dtype):
            logits = model(**inputs, task_ids=task_ids).logits
            with model.disable_adapter():
                base_logits = model(**inputs).logits
    assert logits.dtype == base_logits.dtype
    assert (reference - base_logits.float()).abs().max() > 0.1  # the adapter matters far above the tolerance
    torch.testing.assert_close(logits.float(), reference, rtol=0, atol=LAYER_TOL[precision][0] * 2)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    prompt = inputs["input_ids"][:, :4]
    with autocast(dtype):
        for beams in (1, 2):
            together = model.generate(input_ids=prompt, task_ids=task_ids, num_beams=beams, **kwargs)
            for row, task in enumerate(task_ids):
                alone = model.generate(input_ids=prompt[row:row + 1], task_ids=[task], num_beams=beams, **kwargs)
                assert torch.equal(together[row], alone[0]), (beams, row)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_compiled_training_step_under_autocast(kind):
    """``torch.compile`` (the traced path) under bf16 autocast: loss and gradients close to the float32 step."""
    import torch._dynamo

    torch._dynamo.reset()
    loss_tol, grad_tol = MODEL_TOL["bf16"]
    model = poly_model(kind, 2).train()
    inputs = batch_inputs(kind)
    loss32, grads32 = train_step(model, inputs, [0, 1, 2, 0], None)
    grads32 = {n: g.clone() for n, g in grads32.items()}
    compiled = torch.compile(model, backend="aot_eager")
    for step, task_ids in enumerate(([0, 1, 2, 0], [2, 2, 1, 0])):
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            loss, grads = train_step(compiled, inputs, task_ids, torch.bfloat16)
    loss, grads = train_step(compiled, inputs, [0, 1, 2, 0], torch.bfloat16)
    assert abs(loss.item() - loss32.item()) / loss32.item() < loss_tol
    assert_grads_close({n.replace("_orig_mod.", ""): g for n, g in grads.items()}, grads32, grad_tol)
    torch._dynamo.reset()


class _Rows(torch.utils.data.Dataset):
    """Token rows with a ``task_ids`` column (task = row index mod 3)."""

    def __init__(self, n: int = 8):
        self.ids = torch.randint(3, VOCAB, (n, 7), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "task_ids": i % 3}


def _collate(rows: list[dict]) -> dict:
    ids = torch.stack([r["input_ids"] for r in rows])
    return {"input_ids": ids, "labels": ids, "task_ids": torch.tensor([r["task_ids"] for r in rows])}


def _trainer_run(tmp_path, bf16: bool):
    from transformers import Trainer, TrainingArguments

    model = poly_model("llama", 2)
    seen = set()
    model.model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, out: seen.add(out.dtype))
    args = TrainingArguments(
        str(tmp_path / ("bf16" if bf16 else "fp32")), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
        bf16=bf16, use_cpu=True, optim="sgd", remove_unused_columns=False, report_to=[], save_strategy="no", logging_steps=1, seed=0,
    )
    Trainer(model=model, args=args, train_dataset=_Rows(), data_collator=_collate).train()
    return model, seen


def test_trainer_bf16_trains_like_float32(tmp_path):
    """``transformers.Trainer(bf16=True)`` (autocast on CPU) trains; two SGD steps end close to the float32 run's."""
    before = {n: p.detach().clone() for n, p in poly_model("llama", 2).named_parameters() if p.requires_grad}
    fp32, seen32 = _trainer_run(tmp_path, bf16=False)
    bf16, seen16 = _trainer_run(tmp_path, bf16=True)
    assert seen32 == {torch.float32} and seen16 == {torch.bfloat16}  # the adapted layers really ran in bf16
    reference = dict(fp32.named_parameters())
    trained = {n: p for n, p in bf16.named_parameters() if p.requires_grad}
    assert set(trained) == set(before)
    # with SGD each run's update is lr times its gradients: compared as the gradients are (MODEL_TOL)
    updates = {n: (p - before[n]).detach() for n, p in trained.items()}
    reference_updates = {n: (reference[n] - before[n]).detach() for n in trained}
    assert all(u.norm() > 0 for u in updates.values())
    assert_grads_close(updates, reference_updates, MODEL_TOL["bf16"][1])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_activation_checkpointing_under_autocast_gives_the_same_step(kind):
    """Checkpointed segments re-run in backward under the forward's autocast state: the very same gradients."""
    model = poly_model(kind, 2).train()
    inputs = batch_inputs(kind)
    loss, grads = train_step(model, inputs, [0, 1, 2, 0], torch.bfloat16)
    grads = {n: g.clone() for n, g in grads.items()}
    model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.model.config.use_cache = False
    layer = next(layer for _, layer in model.poly_layers())
    calls = []
    layer.register_forward_hook(lambda module, args, out: calls.append(out.dtype))
    again, grads_again = train_step(model, inputs, [0, 1, 2, 0], torch.bfloat16)
    assert calls == [torch.bfloat16, torch.bfloat16]  # run in forward and again in backward, both under autocast
    assert torch.equal(again, loss)
    for name, grad in grads.items():
        assert torch.equal(grads_again[name], grad), name
