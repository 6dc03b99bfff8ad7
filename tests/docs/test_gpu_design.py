"""The algebra of the GPU design in docs/deploy.md ("A mixed-task kernel for GPUs"), checked on the CPU.

The design computes a Poly/MHR update either from mixed factors (``x @ A_t @ B_t``, what the layer does) or in
skill space, without forming any mixture: ``H = x_q @ A[q, s]`` for every split and skill (one dense GEMM of
width ``n_skills * r`` per split), ``h = sum_{q,s} w[q, s] H[q, s]`` (rank ``r``), and, per output block ``q``,
``y_q = sum_s (w[q, s] h) @ B[q, s] / r`` (one dense GEMM of inner width ``n_skills * r``). Both must agree,
outputs and gradients, for eval weights (one row of weights per task) and per-example training weights.
"""

from __future__ import annotations

import pytest
import torch

from polytropon.layer import PolyAdapter


def mixed_factor_form(adapter: PolyAdapter, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x_i @ A_i @ B_i`` with ``A_i, B_i = adapter.mix(w_i)``: x ``(n, t, in)``, w ``(n, q, s)``."""
    a, b = adapter.mix(w)
    return torch.bmm(torch.bmm(x, a), b)


def skill_space_form(adapter: PolyAdapter, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The same update without mixtures: two dense products of width ``n_skills * r`` per split."""
    lora_a, lora_b = adapter.poly_lora_A, adapter.poly_lora_B  # (q, s, in/q, r), (q, s, r, out/q)
    q, s, d, r = lora_a.shape
    n, t, _ = x.shape
    xq = x.reshape(n * t, q, d).transpose(0, 1)  # (q, n t, d)
    shrink = torch.bmm(xq, lora_a.permute(0, 2, 1, 3).reshape(q, d, s * r)).view(q, n, t, s, r)
    h = torch.einsum("qntsr,nqs->ntr", shrink, w)  # the rank-r intermediate of every row
    u = torch.einsum("ntr,nqs->qntsr", h, w).reshape(q, n * t, s * r)
    expand = torch.bmm(u, lora_b.reshape(q, s * r, -1)) / r  # (q, n t, out/q)
    return expand.permute(1, 0, 2).reshape(n, t, -1)


@pytest.mark.parametrize("n_splits", [1, 4])
@pytest.mark.parametrize("per_example", [False, True])
def test_skill_space_equals_mixed_factors(n_splits, per_example):
    torch.manual_seed(0)
    adapter = PolyAdapter(32, 48, r=4, n_tasks=10, n_skills=3, n_splits=n_splits, init_weights=False).double()
    with torch.no_grad():
        adapter.poly_router.module_logits.normal_()
    x = torch.randn(5, 7, 32, dtype=torch.float64, requires_grad=True)
    if per_example:  # training: one relaxed-Bernoulli-like route per example
        w = torch.rand(5, n_splits, 3, dtype=torch.float64, requires_grad=True)
    else:  # eval: the task's weights gathered to rows
        w = adapter.poly_router.eval_weights(torch.tensor([3, 1, 3, 9, 0])).double().detach().requires_grad_(True)
    grad = torch.randn(5, 7, 48, dtype=torch.float64)
    outs, grads = [], []
    for form in (mixed_factor_form, skill_space_form):
        y = form(adapter, x, w)
        inputs = (x, w, adapter.poly_lora_A, adapter.poly_lora_B)
        outs.append(y)
        grads.append(torch.autograd.grad(y, inputs, grad))
    assert outs[0].abs().max() > 0.1  # non-trivial weights
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
    for g1, g0 in zip(grads[1], grads[0]):
        torch.testing.assert_close(g1, g0, rtol=1e-11, atol=1e-11)
