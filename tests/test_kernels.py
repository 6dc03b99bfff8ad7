"""The kernels against naive loop-by-loop references: outputs and gradients on random non-zero tensors, and
``torch.autograd.gradcheck`` of the autograd Functions in float64."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from polytropon.kernels import FEW_ROWS, RoutedLowRank, RoutedPoly, add_low_rank, base_linear, mix_factors, routed_linear_eval

TOL = dict(rtol=1e-5, atol=1e-5)


def rand(*shape: int, seed: int, dtype: torch.dtype = torch.float32, grad: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(grad)


def naive_mix(weights, lora_a, lora_b, scaled=True):
    """``A_k``, ``B_k`` one example and one split at a time: split ``q`` of ``A_k`` (rows ``q*in/q..``) is
    ``sum_s w[k, q, s] lora_a[q, s]``, split ``q`` of ``B_k`` (columns) is ``sum_s w[k, q, s] lora_b[q, s]`` (/ r)."""
    n_splits, n_skills, _, r = lora_a.shape
    a_rows, b_rows = [], []
    for k in range(weights.shape[0]):
        a_parts, b_parts = [], []
        for q in range(n_splits):
            a_parts.append(sum(weights[k, q, s] * lora_a[q, s] for s in range(n_skills)))
            b_parts.append(sum(weights[k, q, s] * lora_b[q, s] for s in range(n_skills)) / (r if scaled else 1))
        a_rows.append(torch.cat(a_parts, dim=0))
        b_rows.append(torch.cat(b_parts, dim=1))
    return torch.stack(a_rows), torch.stack(b_rows)


def naive_low_rank(result, x, a, b):
    """``result[i] + x[i] @ a[i] @ b[i]`` for every example ``i`` (or shared ``a``, ``b`` for a 2-D ``x``)."""
    if x.dim() == 2:
        return result + (x @ a) @ b
    return torch.stack([result[i] + (x[i] @ a[i]) @ b[i] for i in range(x.shape[0])])


def naive_base(x, weight, bias, fan_in_fan_out):
    out = x @ (weight if fan_in_fan_out else weight.T)
    return out if bias is None else out + bias


def factors(n=3, t=5, d_in=8, d_out=12, r=4, seed=0, dtype=torch.float32, grad=False):
    return (rand(n, t, d_out, seed=seed, dtype=dtype, grad=grad), rand(n, t, d_in, seed=seed + 1, dtype=dtype, grad=grad),
            rand(n, d_in, r, seed=seed + 2, dtype=dtype, grad=grad), rand(n, r, d_out, seed=seed + 3, dtype=dtype, grad=grad))


def skills(k=3, q=2, s=3, d_in=8, d_out=12, r=4, seed=10, dtype=torch.float32, grad=False):
    weights = torch.softmax(rand(k, q, s, seed=seed, dtype=dtype), -1).detach().requires_grad_(grad)
    return (weights, rand(q, s, d_in // q, r, seed=seed + 1, dtype=dtype, grad=grad),
            rand(q, s, r, d_out // q, seed=seed + 2, dtype=dtype, grad=grad))


def grads(outs, inputs, seed=99):
    """Gradients of ``sum(g * out)`` for fixed random ``g`` (one per output) with respect to ``inputs``."""
    outs = outs if isinstance(outs, tuple) else (outs,)
    gs = [rand(*out.shape, seed=seed + i, dtype=out.dtype) for i, out in enumerate(outs)]
    return torch.autograd.grad(outs, inputs, gs)


# --------------------------------------------------------------------------- mix_factors


@pytest.mark.parametrize("scaled", [True, False])
@pytest.mark.parametrize("q", [1, 2, 4])
def test_mix_factors_equals_the_per_split_sum(q, scaled):
    weights, lora_a, lora_b = skills(q=q, grad=True)
    a, b = mix_factors(weights, lora_a, lora_b, scaled=scaled)
    ref_a, ref_b = naive_mix(weights, lora_a, lora_b, scaled=scaled)
    assert a.shape == (3, 8, 4) and b.shape == (3, 4, 12)
    torch.testing.assert_close(a, ref_a, **TOL)
    torch.testing.assert_close(b, ref_b, **TOL)
    for got, want in zip(grads((a, b), (weights, lora_a, lora_b)), grads((ref_a, ref_b), (weights, lora_a, lora_b))):
        torch.testing.assert_close(got, want, **TOL)


def test_mix_factors_lays_a_out_r_major():
    """``A``'s transpose, the operand of the transposed products, is contiguous; ``B`` is contiguous."""
    weights, lora_a, lora_b = skills(q=2)
    a, b = mix_factors(weights, lora_a, lora_b)
    assert a.transpose(1, 2).is_contiguous() and b.is_contiguous()
    assert a[torch.tensor([2, 0, 0])].transpose(1, 2).is_contiguous()  # gathered to rows, the layout stays


def test_mix_factors_gradcheck():
    inputs = skills(q=2, d_in=4, d_out=6, r=2, dtype=torch.float64, grad=True)
    assert gradcheck(lambda w, la, lb: mix_factors(w, la, lb), inputs)


# --------------------------------------------------------------------------- base_linear


@pytest.mark.parametrize("own_storage", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
def test_base_linear_is_bit_identical_to_the_modules(with_bias, own_storage):
    from transformers.pytorch_utils import Conv1D

    x = rand(3, 5, 8, seed=1)
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 12, bias=with_bias)
    modules = [(linear, False)] + ([(Conv1D(12, 8), True)] if with_bias else [])  # Conv1D always has a bias
    with torch.no_grad():
        for module, fan_in_fan_out in modules:
            out = base_linear(x, (module.weight, module.bias, fan_in_fan_out), own_storage=own_storage)
            assert out.shape == (3, 5, 12)
            assert torch.equal(out, module(x))
            if own_storage:
                assert out._base is None
            torch.testing.assert_close(out, naive_base(x, module.weight, module.bias, fan_in_fan_out), **TOL)


# --------------------------------------------------------------------------- RoutedLowRank


@pytest.mark.parametrize("as_view", [False, True])
def test_routed_low_rank_outputs_and_gradients(as_view):
    result, x, a, b = factors(grad=True)
    source = result * 1.0  # a non-leaf the Function may write in place
    if as_view:
        source = source.view(-1, 12).view(3, 5, 12)
    out = RoutedLowRank.apply(source, x, a, b)
    ref = naive_low_rank(result, x, a, b)
    torch.testing.assert_close(out, ref, **TOL)
    for got, want in zip(grads(out, (result, x, a, b)), grads(ref, (result, x, a, b))):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("as_view", [False, True])
def test_routed_low_rank_gradcheck(as_view):
    inputs = factors(n=2, t=3, d_in=4, d_out=5, r=2, dtype=torch.float64, grad=True)

    def fn(result, x, a, b):
        source = result.clone()
        return RoutedLowRank.apply(source[:] if as_view else source, x, a, b)

    assert gradcheck(fn, inputs)


# --------------------------------------------------------------------------- RoutedPoly


def test_routed_poly_outputs_and_gradients():
    result, x, _, _ = factors(grad=True)
    weights, lora_a, lora_b = skills(grad=True)
    out = RoutedPoly.apply(result * 1.0, x, weights, lora_a, lora_b)
    a, b = naive_mix(weights, lora_a, lora_b)
    ref = naive_low_rank(result, x, a, b)
    torch.testing.assert_close(out, ref, **TOL)
    inputs = (result, x, weights, lora_a, lora_b)
    for got, want in zip(grads(out, inputs), grads(ref, inputs)):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
def test_routed_poly_with_the_base_layer(with_bias, fan_in_fan_out):
    _, x, _, _ = factors(grad=True)
    weights, lora_a, lora_b = skills(grad=True)
    weight = rand(*((8, 12) if fan_in_fan_out else (12, 8)), seed=20)
    bias = rand(12, seed=21) if with_bias else None
    out = RoutedPoly.apply(None, x, weights, lora_a, lora_b, (weight, bias, fan_in_fan_out))
    a, b = naive_mix(weights, lora_a, lora_b)
    ref = naive_low_rank(naive_base(x, weight, bias, fan_in_fan_out), x, a, b)
    torch.testing.assert_close(out, ref, **TOL)
    inputs = (x, weights, lora_a, lora_b)
    for got, want in zip(grads(out, inputs), grads(ref, inputs)):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("with_base", [False, True])
def test_routed_poly_gradcheck(with_base):
    result, x, _, _ = factors(n=2, t=3, d_in=4, d_out=6, r=2, dtype=torch.float64, grad=True)
    weights, lora_a, lora_b = skills(k=2, q=2, s=3, d_in=4, d_out=6, r=2, dtype=torch.float64, grad=True)
    if with_base:
        base = (rand(6, 4, seed=30, dtype=torch.float64), rand(6, seed=31, dtype=torch.float64), False)
        assert gradcheck(lambda x, w, la, lb: RoutedPoly.apply(None, x, w, la, lb, base), (x, weights, lora_a, lora_b))
    else:
        assert gradcheck(lambda res, x, w, la, lb: RoutedPoly.apply(res.clone(), x, w, la, lb),
                         (result, x, weights, lora_a, lora_b))


# --------------------------------------------------------------------------- add_low_rank


@pytest.mark.parametrize("rows", [1, FEW_ROWS, FEW_ROWS + 9])
@pytest.mark.parametrize("per_row", [True, False])
def test_add_low_rank_without_autograd_writes_in_place(per_row, rows):
    result, x, a, b = factors(t=rows)
    if not per_row:
        x, a, b, result = x.reshape(-1, 8), a[0], b[0], result.reshape(-1, 12)
    ref = naive_low_rank(result.double(), x.double(), a.double(), b.double())
    target = result.clone()
    with torch.no_grad():
        out = add_low_rank(target, x, a, b)
    assert out.data_ptr() == target.data_ptr() and out.shape == result.shape
    torch.testing.assert_close(out, ref.float(), **TOL)


def test_add_low_rank_into_a_flattened_result():
    result, x, a, b = factors()
    flat = result.reshape(-1, 12).clone()  # the layer's output as (rows, out)
    ref = naive_low_rank(result, x, a, b).reshape(-1, 12)
    with torch.no_grad():
        out = add_low_rank(flat.clone(), x, a, b)
    assert out.shape == flat.shape
    torch.testing.assert_close(out, ref, **TOL)
    with torch.enable_grad():
        out = add_low_rank(flat, x, a, b)
    torch.testing.assert_close(out, ref, **TOL)


def test_add_low_rank_keeps_the_result_dtype():
    result, x, a, b = factors()
    low = result.to(torch.bfloat16)
    with torch.no_grad():
        out = add_low_rank(low, x, a, b)
    assert out.dtype == torch.bfloat16
    want = (low.float() + (naive_low_rank(result, x, a, b) - result)).to(torch.bfloat16)
    torch.testing.assert_close(out, want, rtol=1.6e-2, atol=2e-2)  # one bf16 rounding more than the reference


@pytest.mark.parametrize("per_row", [True, False])
def test_add_low_rank_with_autograd(per_row):
    result, x, a, b = factors(grad=True)
    if not per_row:  # shared factors of all rows: x (rows, in), a (in, r), b (r, out)
        a2, b2 = a[0].detach().requires_grad_(), b[0].detach().requires_grad_()
        rows, flat = x.reshape(-1, 8), result.reshape(-1, 12)
        out = add_low_rank(flat * 1.0, rows, a2, b2)
        ref = torch.stack([flat[i] + rows[i] @ a2 @ b2 for i in range(rows.shape[0])])
        inputs = (result, x, a2, b2)
    else:
        out = add_low_rank(result * 1.0, x, a, b)
        ref = naive_low_rank(result, x, a, b)
        inputs = (result, x, a, b)
    torch.testing.assert_close(out, ref, **TOL)
    for got, want in zip(grads(out, inputs), grads(ref, inputs)):
        torch.testing.assert_close(got, want, **TOL)


# --------------------------------------------------------------------------- routed_linear_eval


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
def test_routed_linear_eval_equals_base_plus_routed_update(with_bias, fan_in_fan_out):
    _, x, a, b = factors()
    weight = rand(*((8, 12) if fan_in_fan_out else (12, 8)), seed=40)
    bias = rand(12, seed=41) if with_bias else None
    with torch.no_grad():
        out = routed_linear_eval(x, a, b, (weight, bias, fan_in_fan_out))
    ref = naive_low_rank(naive_base(x, weight, bias, fan_in_fan_out), x, a, b)
    assert out.shape == (3, 5, 12)
    torch.testing.assert_close(out, ref, **TOL)
