"""Low-precision models against float32: bf16 / fp16 base with float32 adapters, and everything in bf16.

The reference is a float32 copy of the same model (``copy.deepcopy(model).float()``): the same rounded weights,
so the differences below come from computing in low precision only. Tolerances (measured on this tiny Llama,
whose logits are about 0.4 and whose adapter changes them by about 0.5, far above every tolerance):

=====================  ==============================  ===================================
                       logits (max abs. difference)    gradients (relative, per tensor)
=====================  ==============================  ===================================
bf16 base, fp32 skills 1e-2  (measured 2.6e-3)          0.1   (measured 0.031)
fp16 base, fp32 skills 2e-3  (measured 2.9e-4)          0.02  (measured 0.003)
all bf16               1.5e-2 (measured 3.7e-3)         0.15 with eval routing (sampling in
                                                        bf16 draws other random numbers)
=====================  ==============================  ===================================

A merged task gives the routed logits to twice the logits tolerance (the merged weight is rounded once more);
unmerging restores a bf16/fp16 weight bit for bit.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from polytropon import PolyConfig, PolyModel, get_peft_model

VOCAB = 96
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODES = {  # name: (base dtype, adapter dtype, logits tolerance, gradient tolerance)
    "bf16-base": (torch.bfloat16, torch.float32, 1e-2, 0.1),
    "fp16-base": (torch.float16, torch.float32, 2e-3, 0.02),
    "bf16-all": (torch.bfloat16, torch.bfloat16, 1.5e-2, 0.15),
}


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def randomize(model, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "poly_lora" in name or "module_logits" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


def build(mode: str):
    """``(model, reference)``: the low-precision model and a float32 copy with the same (rounded) weights."""
    base_dtype, adapter_dtype, _, _ = MODES[mode]
    config = PolyConfig(r=4, n_tasks=4, n_skills=3, n_splits=2, init_weights=False, target_modules=TARGETS)
    model = get_peft_model(tiny_llama().to(base_dtype), config)
    randomize(model)
    model.to(adapter_dtype) if adapter_dtype != torch.float32 else None
    for name, param in model.named_parameters():
        expected = adapter_dtype if ("poly_" in name or "module_logits" in name) else base_dtype
        assert param.dtype == expected, (name, param.dtype)
    return model.eval(), copy.deepcopy(model).float().eval()


def inputs(batch: int = 4, length: int = 9):
    ids = torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def assert_adapter_matters(ref, batch, task_ids, tol):
    """The adapter's effect is far above the tolerance, so agreement cannot come from a skipped adapter."""
    with torch.no_grad():
        routed = ref(**batch, task_ids=task_ids).logits
        with ref.disable_adapter():
            plain = ref(**batch).logits
    assert (routed - plain).abs().max() > 20 * tol


@pytest.mark.parametrize("mode", list(MODES))
def test_forward_matches_float32(mode):
    model, ref = build(mode)
    tol = MODES[mode][2]
    batch = inputs()
    for task_ids in ([0, 3, 3, 1], [2], torch.tensor([1, 1, 1, 1])):
        assert_adapter_matters(ref, batch, task_ids, tol)
        with torch.no_grad():
            expected = ref(**batch, task_ids=task_ids).logits
            got = model(**batch, task_ids=task_ids).logits
            again = model(**batch, task_ids=task_ids).logits  # the cached mixtures
        assert got.dtype == MODES[mode][0]
        torch.testing.assert_close(got.float(), expected, rtol=0, atol=tol)
        torch.testing.assert_close(again, got, rtol=0, atol=0)
        got_autograd = model(**batch, task_ids=task_ids).logits  # eval mode, autograd on
        torch.testing.assert_close(got_autograd.detach().float(), expected, rtol=0, atol=tol)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b).norm() / b.norm())


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", list(MODES))
def test_training_step_matches_float32(mode):
    model, ref = build(mode)
    base_dtype, adapter_dtype, tol, grad_tol = MODES[mode]
    batch = inputs()
    task_ids = [0, 3, 3, 1]
    # float32 routers draw the same relaxed-Bernoulli noise as the reference; bf16 routers draw other
    # numbers, so there the gradients are compared with eval routing (autograd through the same math)
    model.train(adapter_dtype == torch.float32)
    ref.train(adapter_dtype == torch.float32)
    torch.manual_seed(0)
    loss = model(**batch, labels=batch["input_ids"], task_ids=task_ids).loss
    loss.backward()
    torch.manual_seed(0)
    ref_loss = ref(**batch, labels=batch["input_ids"], task_ids=task_ids).loss
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 10 * tol
    grads, ref_grads = _grads(model), _grads(ref)
    assert grads.keys() == ref_grads.keys() and len(grads) == 3 * len(TARGETS) * 2
    for name, grad in grads.items():
        assert grad.dtype == adapter_dtype
        assert _relative(grad, ref_grads[name]) < grad_tol, name

    # and a real training loop in this precision: sampled routing, an optimizer, the loss goes down
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for step in range(8):
        optimizer.zero_grad()
        torch.manual_seed(step)
        loss = model(**batch, labels=batch["input_ids"], task_ids=task_ids).loss
        loss.backward()
        assert all(torch.isfinite(g).all() for g in _grads(model).values())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.03, losses  # about 0.07 in all three modes


@pytest.mark.parametrize("mode", list(MODES))
def test_beam_search_routes_every_beam_to_its_task(mode):
    model, ref = build(mode)
    tol = MODES[mode][2]
    batch = inputs(batch=2, length=6)
    task_ids = [3, 0]
    out = model.generate(**batch, task_ids=task_ids, num_beams=3, num_return_sequences=2, max_new_tokens=4,
                         do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    assert out.sequences.shape == (4, 10)
    # the first step's logits of every beam row are those of its example's task
    with torch.no_grad():
        expected = ref(**batch, task_ids=task_ids).logits[:, -1].repeat_interleave(3, dim=0)
    assert out.logits[0].shape == expected.shape
    torch.testing.assert_close(out.logits[0].float(), expected, rtol=0, atol=tol)
    with torch.no_grad():
        other = ref(**batch, task_ids=[0, 3]).logits[:, -1].repeat_interleave(3, dim=0)
    assert (out.logits[0].float() - other).abs().max() > 10 * tol  # the tasks are told apart


@pytest.mark.parametrize("mode", list(MODES))
def test_merge_and_unmerge(mode):
    model, ref = build(mode)
    tol = MODES[mode][2]
    batch = inputs()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        expected = ref(**batch, task_ids=[2]).logits
        model.merge_adapter(2)
        merged = model(**batch).logits
        model.unmerge_adapter()
    torch.testing.assert_close(merged.float(), expected, rtol=0, atol=2 * tol)
    for cycle in range(20):  # e.g. a server switching the merged task
        model.merge_adapter(cycle % 4)
        model.unmerge_adapter()
    for name, param in model.named_parameters():
        if name in weights:
            assert torch.equal(param, weights[name]), name  # bit for bit


@pytest.mark.parametrize("mode", list(MODES))
def test_export_lora_matches_float32_and_loads_in_peft(mode, tmp_path):
    peft = pytest.importorskip("peft")
    model, ref = build(mode)
    base_dtype, adapter_dtype, tol, _ = MODES[mode]
    model.export_lora(str(tmp_path / "low"), 1)
    ref.export_lora(str(tmp_path / "f32"), 1)
    low, f32 = load_file(str(tmp_path / "low" / "adapter_model.safetensors")), load_file(str(tmp_path / "f32" / "adapter_model.safetensors"))
    assert low.keys() == f32.keys() and len(low) == 2 * len(TARGETS) * 2
    for key, tensor in low.items():
        assert tensor.dtype == adapter_dtype
        if adapter_dtype == torch.float32:
            torch.testing.assert_close(tensor, f32[key], rtol=1e-6, atol=1e-7)  # the same float32 math
        else:
            assert _relative(tensor, f32[key]) < 1e-2, key
    lora = peft.PeftModel.from_pretrained(tiny_llama().to(base_dtype), str(tmp_path / "low")).eval()
    batch = inputs()
    with torch.no_grad():
        expected = ref(**batch, task_ids=[1]).logits
        got = lora(**batch).logits
    # PEFT's LoRA on the same low-precision base (the export's A, B rounded to the adapter dtype)
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=2 * tol)


@pytest.mark.parametrize("mode", list(MODES))
def test_save_in_one_dtype_load_in_another(mode, tmp_path):
    model, ref = build(mode)
    base_dtype, adapter_dtype, tol, _ = MODES[mode]
    batch = inputs()
    task_ids = [0, 3, 3, 1]

    # low precision -> float32: the saved values, exactly, in a float32 model
    model.save_pretrained(str(tmp_path / "low"))
    saved = load_file(str(tmp_path / "low" / "adapter_model.safetensors"))
    assert {t.dtype for t in saved.values()} == {adapter_dtype}
    loaded = PolyModel.from_pretrained(tiny_llama().to(base_dtype).float(), str(tmp_path / "low"))
    for key, tensor in loaded.adapter_state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, saved[key].float()), key
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch, task_ids=task_ids).logits, ref(**batch, task_ids=task_ids).logits,
                                   rtol=1e-5, atol=1e-5)

    # float32 -> low precision: into a low-precision base (float32 adapters), then everything cast
    ref.save_pretrained(str(tmp_path / "f32"))
    with open(tmp_path / "f32" / "adapter_config.json") as fh:
        assert json.load(fh)["peft_type"] == "POLY"
    into_low = PolyModel.from_pretrained(tiny_llama().to(base_dtype), str(tmp_path / "f32"))
    into_low.to(adapter_dtype) if adapter_dtype != torch.float32 else None
    for key, tensor in into_low.adapter_state_dict().items():
        assert tensor.dtype == adapter_dtype and torch.equal(tensor, ref.adapter_state_dict()[key].to(adapter_dtype)), key
    with torch.no_grad():
        got = into_low(**batch, task_ids=task_ids).logits
    torch.testing.assert_close(got.float(), ref(**batch, task_ids=task_ids).logits.detach(), rtol=0, atol=tol)
    assert os.path.isfile(tmp_path / "f32" / "adapter_model.safetensors")
