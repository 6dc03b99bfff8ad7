"""Layer inputs recomputed in backward from what the base keeps (``polytropon.recompute``): exact, and free.

The claim: where a layer input ``x`` is an elementwise product of tensors the base model's backward keeps (a
Llama RMSNorm output ``w * (h * rsqrt(mean(h^2) + eps))``, a gated product ``silu(g) * u``), the training
function keeps those tensors instead of ``x`` and recomputes ``x`` in backward with the same bits, so outputs and
gradients are *equal* (``torch.equal``, not a tolerance) to keeping ``x``, on adapters with random non-zero weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from polytropon import PolyConfig, get_peft_model
from polytropon.kernels import RoutedPoly
from polytropon.recompute import Replay, plan_replay

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rms_norm(dtype: torch.dtype = torch.float32, width: int = 16):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(width).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    norm.weight.requires_grad_(False)
    return norm


def replayed(x: torch.Tensor) -> torch.Tensor:
    plan = plan_replay(x)
    assert plan is not None
    return Replay.run(plan.program, plan.tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rms_norm_output_is_recomputed_bit_for_bit(dtype):
    """``w * (h * rsqrt(...))``, with the float32 round trip of a bfloat16 norm: the same bits."""
    h = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True) * 1.0
    x = rms_norm(dtype)(h)
    got = replayed(x)
    assert got.dtype == x.dtype and got.shape == x.shape and torch.equal(got, x)


def test_gated_product_and_casts_are_recomputed_bit_for_bit():
    g = torch.randn(2, 7, 24, requires_grad=True)
    u = torch.randn(2, 7, 24, requires_grad=True) * 3.0
    x = F.silu(g) * u
    assert torch.equal(replayed(x), x)
    y = x.to(torch.bfloat16)  # what an adapter does inside autocast
    assert torch.equal(replayed(y), y)
    z = u * 0.5  # a Python number is kept as a 0-dim float64 tensor: the product stays float32
    assert torch.equal(replayed(z), z)


def test_activations_are_referenced_and_small_tensors_copied():
    """``h`` (as large as ``x``) is the very storage the norm keeps; the weight and ``rsqrt`` are copied."""
    norm = rms_norm()
    h = torch.randn(3, 5, 16, requires_grad=True) * 1.0
    x = norm(h)
    plan = plan_replay(x)
    large = [t for t in plan.tensors if t.numel() == x.numel()]
    small = [t for t in plan.tensors if t.numel() < x.numel()]
    assert [t.untyped_storage().data_ptr() for t in large] == [h.untyped_storage().data_ptr()]
    assert len(small) == 2 and all(t.data_ptr() != norm.weight.data_ptr() for t in small)


def test_no_plan_where_x_is_not_a_replayable_product():
    h = torch.randn(3, 4, 16, requires_grad=True) * 1.0
    u = torch.randn(3, 4, 16, requires_grad=True)
    assert plan_replay(torch.randn(3, 4, 16)) is None  # no graph
    assert plan_replay(u) is None  # a leaf: no node
    assert plan_replay(h + 1.0) is None  # another operation
    assert plan_replay((h * u).view(12, 16)) is None  # a view
    assert plan_replay(F.layer_norm(h, (16,))) is None  # a fused norm
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # checkpointing, offloading
        assert plan_replay(h * u) is None
    released = torch.nn.Parameter(torch.randn(16), requires_grad=False)
    x = released * h
    released.data = torch.empty(0)  # as ZeRO-3 releases a parameter after its module's forward
    assert plan_replay(x) is None


def test_a_plan_is_refused_when_a_kept_tensor_was_modified_in_place():
    h = torch.randn(3, 4, 16, requires_grad=True) * 1.0
    u = torch.randn(3, 4, 16, requires_grad=True) * 1.0
    x = h * u
    with torch.no_grad():
        h.add_(1.0)
    assert plan_replay(x) is None


@pytest.mark.parametrize("fused", [True, False], ids=["base-inside", "base-output-given"])
def test_routed_poly_with_replay_equals_keeping_x(fused):
    """:class:`RoutedPoly` keeping ``(h, w, rsqrt)`` instead of ``x``: equal outputs and gradients."""
    torch.manual_seed(0)
    n, t, d_in, d_out, q, s, r = 4, 6, 16, 12, 2, 3, 4
    weight, bias = torch.randn(d_out, d_in), torch.randn(d_out)
    norm = rms_norm(width=d_in)
    results = []
    for replay in (False, True):
        h = torch.randn(n, t, d_in, generator=torch.Generator().manual_seed(1)).requires_grad_()
        w = torch.rand(n, q, s, generator=torch.Generator().manual_seed(2)).requires_grad_()
        la = torch.randn(q, s, d_in // q, r, generator=torch.Generator().manual_seed(3)).requires_grad_()
        lb = torch.randn(q, s, r, d_out // q, generator=torch.Generator().manual_seed(4)).requires_grad_()
        x = norm(h)
        plan = plan_replay(x) if replay else None
        assert (plan is not None) == replay
        if fused:
            out = RoutedPoly.apply(None, x, w, la, lb, (weight, bias, False), plan)
        else:
            out = RoutedPoly.apply(F.linear(x, weight, bias), x, w, la, lb, None, plan)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
        out.backward(g)
        results.append([out.detach(), h.grad, w.grad, la.grad, lb.grad])
    for kept, recomputed in zip(*results):
        assert torch.equal(kept, recomputed)


def graph_nodes(loss: torch.Tensor):
    """Every node of ``loss``'s autograd graph, once each."""
    seen, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(n for n, _ in node.next_functions)
        yield node


def training_nodes(loss: torch.Tensor) -> list:
    """The adapters' training nodes (``RoutedPoly``'s backward objects, i.e. their ``ctx``) in ``loss``'s graph."""
    return [node for node in graph_nodes(loss) if type(node).__name__ == "RoutedPolyBackward"]


def model_gradients(model, ids, task_ids, autocast: bool = False):
    """Loss, every gradient, and how many adapted layers recompute their input."""
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids, task_ids=task_ids).loss
    replaying = sum(node.program is not None for node in training_nodes(loss))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, replaying


@pytest.mark.parametrize("mode", ["float32", "autocast-bf16", "bfloat16"])
def test_model_gradients_equal_with_and_without_recompute(mode, small_llama, randomize_, tokens):
    """A Llama with every projection adapted: loss and every gradient equal bit for bit, on or off."""
    config = PolyConfig(r=4, n_tasks=3, n_skills=3, n_splits=2, init_weights=False, target_modules=TARGETS)
    model = get_peft_model(small_llama(), config).train()
    randomize_(model)
    if mode == "bfloat16":  # base and adapters: the norm computes in float32 and casts back (a cast to replay)
        model = model.to(torch.bfloat16)
    ids, task_ids = tokens(batch=4, length=9), [0, 2, 1, 2]
    assert model.recompute_inputs is True  # the default
    on = model_gradients(model, ids, task_ids, autocast=mode == "autocast-bf16")
    model.recompute_inputs = False
    off = model_gradients(model, ids, task_ids, autocast=mode == "autocast-bf16")
    # every layer but the first layer's q/k/v (no graph) and o_proj (a view) recomputes: 3 in layer 0, 6 in layer 1
    assert (on[2], off[2]) == (3 + 6, 0)
    assert torch.equal(on[0], off[0])
    assert set(on[1]) == set(off[1]) and len(on[1]) == 2 * len(TARGETS) * 3  # A, B, router logits per layer
    for name in on[1]:
        assert torch.equal(on[1][name], off[1][name]), name


def kept_beyond_base(loss: torch.Tensor) -> set[int]:
    """Storages the adapters' training nodes keep that no node of the base model keeps."""
    base_kept, ours = set(), []
    for node in graph_nodes(loss):
        if type(node).__name__ == "RoutedPolyBackward":
            ours.extend(node.saved_tensors[4:])  # after the routing weights, skills and h^T: x or what replays it
            continue
        for attr in dir(node):  # the tensors a built-in node keeps: grad_fn._saved_self, ._saved_other, ...
            if attr.startswith("_saved_"):
                value = getattr(node, attr)
                if isinstance(value, torch.Tensor):
                    base_kept.add(value.untyped_storage().data_ptr())
    return {t.untyped_storage().data_ptr() for t in ours if t.numel() >= 1024} - base_kept


def test_recomputing_keeps_no_layer_input_beyond_the_first(small_llama, randomize_, tokens):
    """With recompute on, only the first layer's input (no graph: the frozen embeddings) is kept beside the base."""
    config = PolyConfig(r=4, n_tasks=3, n_skills=3, init_weights=False, target_modules=TARGETS)
    model = get_peft_model(small_llama(layers=3), config).train()
    randomize_(model)
    ids = tokens(batch=4, length=64)
    off_model = copy.deepcopy(model)
    off_model.recompute_inputs = False
    assert off_model.recompute_inputs is False and model.recompute_inputs is True
    on = kept_beyond_base(model(input_ids=ids, labels=ids, task_ids=[0, 1, 2, 0]).loss)
    off = kept_beyond_base(off_model(input_ids=ids, labels=ids, task_ids=[0, 1, 2, 0]).loss)
    assert len(on) == 1
    assert len(off) == 1 + 2 * 3 + 2  # + the MLP's two inputs in each layer, the attention input after the first


@pytest.mark.parametrize("value", [1, "yes", None])
def test_recompute_inputs_takes_a_bool_only(value, small_llama):
    model = get_peft_model(small_llama(), PolyConfig(r=2, n_tasks=2, n_skills=2, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="recompute_inputs must be a bool"):
        model.recompute_inputs = value
    assert model.recompute_inputs is True


def test_shapes_broadcast_as_torch_broadcasts_them():
    """The planner's shape check agrees with ``torch.broadcast_shapes``, refusals included."""
    import itertools

    from polytropon.recompute import _broadcast

    shapes = [(1,), (3,), (2, 1), (2, 3), (1, 3), (4, 1, 3), (4, 2, 1), (5,), (2, 5), (0,), (0, 1)]
    for left, right in itertools.product(shapes, shapes):
        try:
            want = torch.broadcast_shapes(left, right)
        except RuntimeError:
            with pytest.raises(RuntimeError):
                _broadcast(torch.Size(left), torch.Size(right))
            continue
        assert _broadcast(torch.Size(left), torch.Size(right)) == want
