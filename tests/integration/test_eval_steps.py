"""Eval steps: a layer's eval update resolved once per call and reused (every generated token) is exact.

References: each example generated alone with its task merged into the weights (``W + A_t B_t``, no routing
at all), and the same call with the per-call steps switched off (the per-layer paths of ``add_update``).
"""

from __future__ import annotations

import pytest
import torch
from tests.helpers import poly_model, rel_diff, tokens

from polytropon.routing import RoutingState

TOL = 1e-5


def with_biases_(model):
    """GPT-2 starts with zero biases: give them values, so a lost bias would show."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)
    return model


def greedy(model, prompt, new_tokens: int = 6, **kwargs):
    return model.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, output_scores=True,
        return_dict_in_generate=True, **kwargs,
    )


def finite(scores: torch.Tensor) -> torch.Tensor:
    """Scores with the ``-inf`` of ``min_new_tokens`` (the end-of-sequence token) set to 0."""
    return scores.masked_fill(torch.isinf(scores), 0.0)


def merged_reference(model, prompt, task_ids, new_tokens: int = 6):
    """Every example generated alone, its task merged into the base weights: (sequences, scores per step)."""
    sequences, scores = [], []
    for row, task in enumerate(task_ids):
        model.merge_adapter(task)
        try:
            out = greedy(model, prompt[row : row + 1], new_tokens)
        finally:
            model.unmerge_adapter()
        sequences.append(out.sequences)
        scores.append(torch.stack(out.scores))
    return torch.cat(sequences), finite(torch.cat(scores, dim=1))


@pytest.fixture
def steps_off(monkeypatch):
    """Switch the per-call steps off: every layer takes its per-layer eval path at every token."""

    def off():
        monkeypatch.setattr(RoutingState, "eval_steps", lambda self: None)

    return off


@pytest.mark.parametrize("arch", ["llama-linear", "gpt2-conv1d"])
@pytest.mark.parametrize("task_ids", [[2, 0, 1], [1, 1, 1]], ids=["mixed", "one-task"])
@pytest.mark.parametrize("kind", ["poly", "mhr"])
def test_generation_with_steps_equals_each_task_merged(arch, task_ids, kind):
    model = with_biases_(poly_model(arch, kind))
    prompt = tokens(batch=3, length=5)
    with torch.no_grad():
        out = greedy(model, prompt, task_ids=task_ids)
        sequences, scores = merged_reference(model, prompt, task_ids)
    assert torch.equal(out.sequences, sequences)
    assert rel_diff(finite(torch.stack(out.scores)), scores) < TOL


@pytest.mark.parametrize("arch", ["llama-linear", "gpt2-conv1d"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_steps_are_bit_identical_to_the_per_layer_paths(arch, mode, steps_off):
    model = with_biases_(poly_model(arch, "mhr"))
    prompt = tokens(batch=3, length=12)  # a prompt longer than FEW_ROWS, then one-token steps
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with context():
        fast = greedy(model, prompt, task_ids=[2, 0, 2])
        beams = model.generate(input_ids=prompt, max_new_tokens=4, num_beams=2, num_return_sequences=2,
                               do_sample=False, pad_token_id=0, task_ids=[2, 0, 1])
        logits = model(input_ids=prompt, task_ids=[1, 0, 2]).logits
        steps_off()
        slow = greedy(model, prompt, task_ids=[2, 0, 2])
        slow_beams = model.generate(input_ids=prompt, max_new_tokens=4, num_beams=2, num_return_sequences=2,
                                    do_sample=False, pad_token_id=0, task_ids=[2, 0, 1])
        slow_logits = model(input_ids=prompt, task_ids=[1, 0, 2]).logits
    assert torch.equal(fast.sequences, slow.sequences)
    assert all(torch.equal(a, b) for a, b in zip(fast.scores, slow.scores))
    assert torch.equal(beams, slow_beams)
    assert torch.equal(logits, slow_logits)


def test_layers_are_resolved_once_per_call(monkeypatch):
    """A layer looks its routing up at its first run in a call; the later tokens of a ``generate`` reuse its step."""
    model = poly_model("llama-linear", "mhr")
    n_layers = len(list(model.poly_layers()))
    lookups = []
    original = RoutingState.for_batch

    def counted(self, *args, **kwargs):
        lookups.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RoutingState, "for_batch", counted)
    with torch.no_grad():
        greedy(model, tokens(batch=3, length=5), new_tokens=6, task_ids=[2, 0, 1])
        assert len(lookups) == n_layers  # the prompt resolves each layer's step; the 5 later tokens reuse it
        greedy(model, tokens(batch=3, length=5), new_tokens=6, task_ids=[2, 0, 1])
        assert len(lookups) == 2 * n_layers  # a new call resolves again
        model(input_ids=tokens(batch=2, length=4), task_ids=[0, 1])
    assert len(lookups) == 3 * n_layers
    model(input_ids=tokens(batch=2, length=4), task_ids=[0, 1])  # autograd on: no steps
    assert len(lookups) == 4 * n_layers


def test_a_new_call_sees_changed_weights_and_tasks():
    """Steps live in one call: weight changes between calls (in place, as optimizer steps) and new tasks apply."""
    model = poly_model("llama-linear", "mhr")
    prompt = tokens(batch=3, length=5)
    with torch.no_grad():
        before = greedy(model, prompt, task_ids=[2, 0, 1])
        for name, param in model.named_parameters():
            if "poly_lora_B" in name:
                param.mul_(3.0)
        after = greedy(model, prompt, task_ids=[2, 0, 1])
        sequences, scores = merged_reference(model, prompt, [2, 0, 1])
        assert rel_diff(finite(torch.stack(after.scores)), scores) < TOL
        assert rel_diff(finite(torch.stack(after.scores)), finite(torch.stack(before.scores))) > 1e-3
        other = greedy(model, prompt, task_ids=[0, 1, 1])
        _, other_scores = merged_reference(model, prompt, [0, 1, 1])
    assert torch.equal(after.sequences, sequences)
    assert rel_diff(finite(torch.stack(other.scores)), other_scores) < TOL


def test_steps_are_not_used_with_autograd_or_disabled_adapters():
    model = poly_model("llama-linear", "mhr")
    ids = tokens(batch=2, length=4)
    with torch.no_grad():
        routed = model(input_ids=ids, task_ids=[0, 1]).logits
        with model.disable_adapter():
            disabled = model(input_ids=ids, task_ids=[0, 1]).logits
        base = model.get_base_model()
        with model.disable_adapter():
            plain = base(input_ids=ids).logits
    assert torch.equal(disabled, plain) and not torch.allclose(routed, plain)
    out = model(input_ids=ids, task_ids=[0, 1]).logits  # autograd on: gradients reach the adapter
    out.sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "poly_lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert rel_diff(out.detach(), routed) < TOL


def test_encoder_decoder_beams_with_steps_equal_the_per_layer_paths(steps_off):
    """T5: encoder rows, decoder rows and cross-attention on the encoder's rows, expanded to beams."""
    from tests.helpers import randomise_routing, tiny_t5

    from polytropon import PolyConfig, get_peft_model

    torch.manual_seed(7)
    config = PolyConfig(r=4, n_tasks=3, n_skills=3, n_splits=2, init_weights=False, target_modules=["q", "k", "v", "o"],
                        task_type="SEQ_2_SEQ_LM")
    model = randomise_routing(get_peft_model(tiny_t5(), config)).eval()
    ids = tokens(batch=3, length=6)
    kwargs = dict(input_ids=ids, max_new_tokens=5, num_beams=2, num_return_sequences=2, do_sample=False,
                  output_scores=True, return_dict_in_generate=True, task_ids=[2, 0, 1])
    with torch.no_grad():
        fast = model.generate(**kwargs)
        steps_off()
        slow = model.generate(**kwargs)
    assert torch.equal(fast.sequences, slow.sequences)
    assert all(torch.equal(a, b) for a, b in zip(fast.scores, slow.scores))
