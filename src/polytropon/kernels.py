"""The arithmetic of a Poly layer: mixing skills into per-example factors and the routed low-rank products.

Shapes used throughout: ``x (n, t, in)`` (``n`` examples of ``t`` rows), routing weights ``w (n, q, s)`` for
``q`` splits and ``s`` skills, skill factors ``lora_a (q, s, in/q, r)`` and ``lora_b (q, s, r, out/q)``, mixed
factors ``A (n, in, r)`` and ``B (n, r, out)``. Everything here is a pure function of tensors (or an autograd
``Function``): :class:`~polytropon.layer.PolyAdapter` chooses which one a call runs.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .recompute import Replay

#: torch's check for autocast on any device (a fast global read; ``torch.is_autocast_enabled(x.device.type)`` costs
#: about 1 us per call, mostly reading ``x.device``, and runs in every adapted layer at every generated token)
_ANY_AUTOCAST = getattr(torch._C, "_is_any_autocast_enabled", None)


def autocast_active(x: torch.Tensor) -> bool:
    """Whether a ``torch.autocast`` region is active for ``x``'s device type."""
    if _ANY_AUTOCAST is not None and not _ANY_AUTOCAST():
        return False
    return torch.is_autocast_enabled(x.device.type)


def compute_dtype(x: torch.Tensor, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype an adapter's products with ``x`` run in: the autocast dtype inside an autocast region, else ``param_dtype``.

    Inside ``torch.autocast(device_type, dtype)`` for ``x``'s device the low-rank products run in ``dtype``, as
    the base layer's own GEMM and PEFT's LoRA layers do there, and the layer returns that dtype. The skills are
    still mixed in ``param_dtype`` (:func:`mix_factors`, small), and gradients reach the parameters in it.
    """
    if param_dtype.is_floating_point and autocast_active(x):
        return torch.get_autocast_dtype(x.device.type)
    return param_dtype


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """A context that disables autocast for ``device_type`` if it is on (else does nothing).

    The kernels below choose every operand's dtype themselves (see :func:`compute_dtype`); autocast would recast
    their float32 mixing products and in-place accumulations.
    """
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class RoutedLowRank(torch.autograd.Function):
    """``result + x @ A_i @ B_i`` for every row ``i``, with GEMM operand layouts chosen for skinny products.

    Shapes: ``result (n, t, out)``, ``x (n, t, in)``, ``a (n, in, r)``, ``b (n, r, out)`` (``b`` contiguous,
    ``a`` best as :func:`mix_factors` lays it out: ``A^T`` contiguous). The rank-``r`` intermediate is kept
    transposed, ``h^T (n, r, t)``. Forward::

        h^T = A^T @ x^T                (n, r, t)
        y   = result + (h^T)^T @ B     in place (``baddbmm_``) when ``result`` is not a view, else a new tensor

    Backward, for ``g = dL/dy``::

        dh^T = B @ g^T                 (n, r, t)
        dx   = (dh^T)^T @ A^T          (n, t, in)      A^T made contiguous (no copy when r-major)
        dA   = (dh^T @ x)^T            (n, in, r)      returned as a transposed view
        dB   = h^T @ g                 (n, r, out)
        dresult = g

    On a CPU (MKL), products whose large operand is the transposed ``x``/``g`` and whose small operand is
    ``r``-major run about twice as fast as autograd's default backward of ``result + x @ A @ B`` at r = 8
    (measured on the shapes of ``benchmarks/speed.py``). Only ``h^T`` (``r`` rows) is saved besides the
    inputs. ``x`` must be kept for ``dA`` (as in any LoRA); a frozen base layer alone would not keep it.
    """

    @staticmethod
    def forward(ctx, result: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        hidden_t = torch.bmm(a.transpose(1, 2), x.transpose(1, 2))
        ctx.save_for_backward(x, a, b, hidden_t)
        if result._base is None:
            ctx.mark_dirty(result)
            return result.baddbmm_(hidden_t.transpose(1, 2), b)
        return torch.baddbmm(result, hidden_t.transpose(1, 2), b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, a, b, hidden_t = ctx.saved_tensors
        need_result, need_x, need_a, need_b = ctx.needs_input_grad
        grad_hidden_t = torch.bmm(b, grad.transpose(1, 2))
        grad_x = torch.bmm(grad_hidden_t.transpose(1, 2), a.transpose(1, 2).contiguous()) if need_x else None
        grad_a = torch.bmm(grad_hidden_t, x).transpose(1, 2) if need_a else None
        grad_b = torch.bmm(hidden_t, grad) if need_b else None
        return (grad if need_result else None), grad_x, grad_a, grad_b


def mix_factors(
    weights: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaled: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixed factors ``A (k, in, r)``, ``B (k, r, out)`` of routing weights ``(k, q, s)`` (see :meth:`PolyAdapter.mix`).

    One ``bmm`` over the splits on free views of ``lora_a (q, s, in/q, r)`` and ``lora_b (q, s, r, out/q)``,
    then a reordering copy of the small results. ``B`` carries ``1/r`` when ``scaled``. Runs in the
    parameters' dtype also inside an autocast region (callers cast the small results to the compute dtype).

    ``A`` is laid out ``r``-major: the reordering copy writes a contiguous ``(k, r, in)`` tensor and ``A`` is
    its transposed view, so ``A^T``, the operand of the transposed products (``h^T = A^T x^T``, ``dx = dh A^T``),
    is contiguous without another copy (measured with MKL at r 8: the down-projection ``A^T x^T`` runs
    in about 60% of the time of the same product on a transposed view). ``B`` is contiguous.
    """
    with autocast_off(weights.device.type):
        return _mix(weights, lora_a, lora_b, scaled)


def _mix(weights: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n_splits, n_skills, d_in, r = lora_a.shape
    d_out = lora_b.shape[-1]
    k = weights.shape[0]
    w = weights.transpose(0, 1)  # (q, k, s)
    a = torch.bmm(w, lora_a.reshape(n_splits, n_skills, -1))  # (q, k, d_in * r)
    a = a.view(n_splits, k, d_in, r).permute(1, 3, 0, 2).reshape(k, r, n_splits * d_in).transpose(1, 2)
    b = torch.bmm(w / r if scaled else w, lora_b.reshape(n_splits, n_skills, -1))  # (q, k, r * d_out)
    b = b.view(n_splits, k, r, d_out).permute(1, 2, 0, 3).reshape(k, r, n_splits * d_out)
    return a, b


#: A frozen base layer as the fused training path computes it: ``(weight, bias, fan_in_fan_out)``.
BaseLinear = tuple[torch.Tensor, Optional[torch.Tensor], bool]


def base_linear(x: torch.Tensor, base: BaseLinear, own_storage: bool = False) -> torch.Tensor:
    """``x @ W^T + bias`` (Linear) or ``x @ W + bias`` (Conv1D): ``x (..., in)`` -> ``(..., out)``.

    The same ``addmm``/``mm`` on the flattened rows that ``nn.Linear`` (contiguous input) and ``Conv1D`` run,
    so the values are bit-identical to calling the module. With ``own_storage`` the result is a tensor of its
    own rather than a view of the 2-D product, as an autograd Function's output must be for later in-place
    ops on it (writing through ``out=`` costs a few microseconds, so only the Function asks for it).
    """
    weight, bias, fan_in_fan_out = base
    w_t = weight if fan_in_fan_out else weight.T  # (in, out)
    flat = x.reshape(-1, x.shape[-1])
    if not own_storage:
        out = torch.mm(flat, w_t) if bias is None else torch.addmm(bias, flat, w_t)
        return out.view(x.shape[:-1] + w_t.shape[-1:])
    out = x.new_empty(x.shape[:-1] + w_t.shape[-1:])
    flat_out = out.view(-1, w_t.shape[-1])
    torch.mm(flat, w_t, out=flat_out) if bias is None else torch.addmm(bias, flat, w_t, out=flat_out)
    return out


class RoutedPoly(torch.autograd.Function):
    """Training form of :class:`RoutedLowRank` that also does the mixing (and optionally the base layer).

    Inputs: ``result (n, t, out)``, ``x (n, t, in)``, routing weights ``w (n, q, s)`` (one row per example) and
    the skill parameters ``lora_a (q, s, in/q, r)``, ``lora_b (q, s, r, out/q)``. The forward mixes
    ``A_i, B_i`` (:func:`mix_factors`) and adds ``x @ A_i @ B_i`` as :class:`RoutedLowRank` does; only
    ``x``, ``w``, the parameters (no copies) and ``h^T (n, r, t)`` are saved, and the backward mixes again (two
    small ``bmm``) instead of keeping ``n`` mixtures per layer alive from forward to backward. Gradients
    through the mixing, with ``G_A[q, i] = dA_i``'s split-``q`` block flattened and likewise ``G_B``::

        dlora_a[q] = w[:, q, :]^T @ G_A[q]          dw += G_A[q] @ lora_a[q]^T          (per split q)
        dlora_b[q] = (w/r)[:, q, :]^T @ G_B[q]      dw += (G_B[q] @ lora_b[q]^T) / r

    With ``result=None`` and ``base = (W, bias, fan_in_fan_out)`` of a frozen base layer, the base output is
    computed here too (:func:`base_linear`) and the update added to it in place; the backward then writes
    ``dx = g @ W`` once and adds the adapter's ``dh @ A^T`` into it (``baddbmm_``), instead of autograd
    allocating two ``(n, t, in)`` gradients and summing them. ``W`` and ``bias`` get no gradient: the caller
    uses this form only when they do not require one.

    With ``replay`` (a :class:`~polytropon.recompute.Replay` of ``x``, from
    :func:`~polytropon.recompute.plan_replay`), the tensors the replay reads are saved instead of ``x`` — tensors
    the base model's backward keeps anyway — and ``x`` is recomputed from them in backward with the same bits, so
    outputs and gradients are equal either way and the layer input costs no memory.

    Precision: the mixing (forward and backward) runs in the parameters' dtype; the products with ``x`` in
    ``x``'s dtype, which the caller sets to :func:`compute_dtype` (the autocast dtype inside an autocast region,
    where ``result`` is the base layer's output in that dtype). Autocast itself is off inside: every operand's
    dtype is chosen here. Gradients come back in each input's own dtype.
    """

    @staticmethod
    def forward(ctx, result, x, weights, lora_a, lora_b, base: Optional[BaseLinear] = None, replay: Optional[Replay] = None):
        with autocast_off(x.device.type):
            return RoutedPoly._forward(ctx, result, x, weights, lora_a, lora_b, base, replay)

    @staticmethod
    def _forward(ctx, result, x, weights, lora_a, lora_b, base, replay):
        a, b = mix_factors(weights, lora_a, lora_b)
        a, b = a.to(x.dtype), b.to(x.dtype)  # no-ops unless the products run in an autocast dtype
        hidden_t = torch.bmm(a.transpose(1, 2), x.transpose(1, 2))
        if replay is None:
            ctx.save_for_backward(weights, lora_a, lora_b, hidden_t, x)
            ctx.program = None
        else:  # keep what the base keeps anyway, recompute x from it in backward (see polytropon.recompute)
            ctx.save_for_backward(weights, lora_a, lora_b, hidden_t, *replay.tensors)
            ctx.program, ctx.x_shape = replay.program, x.shape
        ctx.base = base
        if result is None:
            return base_linear(x, base, own_storage=True).baddbmm_(hidden_t.transpose(1, 2), b)
        if result._base is None:
            ctx.mark_dirty(result)
            return result.baddbmm_(hidden_t.transpose(1, 2), b)
        return torch.baddbmm(result, hidden_t.transpose(1, 2), b)

    @staticmethod
    def backward(ctx, grad):
        with autocast_off(grad.device.type):
            return RoutedPoly._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        """The products that read ``g`` one after another while it is in the caches (``dh^T``, ``dB``, ``dx``), then
        ``x`` (recomputed by the replay just before its one use, ``dA``), then the gradients through the mixing."""
        weights, lora_a, lora_b, hidden_t, *kept = ctx.saved_tensors
        need_result, need_x, need_w, need_la, need_lb = ctx.needs_input_grad[:5]
        need_params = need_w or need_la or need_lb
        n_splits, n_skills, d_in, r = lora_a.shape
        d_out = lora_b.shape[-1]
        n = weights.shape[0]
        a, b = mix_factors(weights, lora_a, lora_b)
        dtype = hidden_t.dtype  # the products' dtype (x's in the forward, e.g. an autocast dtype)
        a, b = a.to(dtype), b.to(dtype)
        grad = grad.to(dtype)
        grad_hidden_t = torch.bmm(b, grad.transpose(1, 2))  # (n, r, t)
        grad_b_rows = torch.bmm(hidden_t, grad) if need_params else None  # dB (n, r, out)
        grad_x = None
        if need_x:
            a_t = a.transpose(1, 2).contiguous()  # (n, r, in): no copy, mix_factors lays A out r-major
            if ctx.base is None:
                grad_x = torch.bmm(grad_hidden_t.transpose(1, 2), a_t)
            else:
                weight, _, fan_in_fan_out = ctx.base
                grad_x = torch.mm(grad.reshape(-1, grad.shape[-1]), weight.T if fan_in_fan_out else weight)
                grad_x = grad_x.view(grad.shape[:-1] + (n_splits * d_in,)).baddbmm_(grad_hidden_t.transpose(1, 2), a_t)
        grad_w = grad_la = grad_lb = None
        if need_params:
            x = kept[0] if ctx.program is None else Replay.run(ctx.program, tuple(kept)).reshape(ctx.x_shape)
            w = weights.transpose(0, 1)  # (q, n, s)
            # dA^T (n, r, in) -> per split (q, n, in/q * r); dB (n, r, out) -> (q, n, r * out/q)
            # in the parameters' dtype from here on (the products above ran in x's, e.g. an autocast dtype)
            g_a = torch.bmm(grad_hidden_t, x).to(lora_a.dtype).view(n, r, n_splits, d_in).permute(2, 0, 3, 1).reshape(n_splits, n, -1)
            g_b = grad_b_rows.to(lora_b.dtype).view(n, r, n_splits, d_out).permute(2, 0, 1, 3).reshape(n_splits, n, -1)
            if need_la:
                grad_la = torch.bmm(w.transpose(1, 2), g_a).view_as(lora_a)
            if need_lb:
                grad_lb = torch.bmm(w.transpose(1, 2) / r, g_b).view_as(lora_b)
            if need_w:
                grad_w = torch.bmm(g_a, lora_a.reshape(n_splits, n_skills, -1).transpose(1, 2))
                grad_w = grad_w.add_(torch.bmm(g_b, lora_b.reshape(n_splits, n_skills, -1).transpose(1, 2)), alpha=1.0 / r)
                grad_w = grad_w.transpose(0, 1)
        return (grad if need_result else None), grad_x, grad_w, grad_la, grad_lb, None, None


#: Up to this many rows per GEMM (tokens per example), the rank-r intermediate is computed as ``x @ A`` rather than
#: transposed: measured faster on a CPU (MKL) for one-token generation steps, slower from about 16 rows on.
FEW_ROWS = 8


def add_low_rank(result: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``result + x @ a @ b`` in ``result``'s shape and dtype.

    ``x`` is ``(rows, in)`` with shared factors ``a (in, r)``, ``b (r, out)``, or ``(n, t, in)`` with per-row
    factors ``a (n, in, r)``, ``b (n, r, out)``; ``result`` has as many elements as the update. With autograd
    off the update goes into ``result`` in place (``addmm_``/``baddbmm_``: one pass over the output); with
    autograd on, per-row factors go through :class:`RoutedLowRank` and shared ones through plain ops, never in
    place on a view autograd tracks (its backward would copy the whole output). The rank-``r`` intermediate
    is computed transposed (``a^T @ x^T``), the faster layout on CPU (see :class:`RoutedLowRank`).
    """
    shape = x.shape[:-1] + b.shape[-1:]
    same_dtype = result.dtype == b.dtype
    if not torch.is_grad_enabled() and same_dtype and (result.shape == shape or result.is_contiguous()):
        target = result if result.shape == shape else result.view(shape)
        if x.shape[-2] <= FEW_ROWS:  # e.g. one token per example while generating: plain layouts are faster
            hidden = x @ a if x.dim() == 2 else torch.bmm(x, a)
        elif x.dim() == 2:
            hidden = (a.T @ x.T).T
        else:
            hidden = torch.bmm(a.transpose(1, 2), x.transpose(1, 2)).transpose(1, 2)
        if x.dim() == 2:
            target.addmm_(hidden, b)
        else:
            target.baddbmm_(hidden, b)
        return result
    if not same_dtype:
        update = (x @ a) @ b if x.dim() == 2 else torch.bmm(torch.bmm(x, a), b)
        return result + update.view(result.shape).to(result.dtype)
    source = result if result.shape == shape else result.reshape(shape)
    if x.dim() == 2:
        out = torch.addmm(source, x @ a, b)
    else:
        out = RoutedLowRank.apply(source, x, a, b)
    return out if out.shape == result.shape else out.view(result.shape)


def routed_linear_eval(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, base: BaseLinear) -> torch.Tensor:
    """``x W^T + bias + x A_i B_i`` per row ``i``, autograd off: ``x (n, t, in)``, ``a (n, in, r)``, ``b (n, r, out)``.

    The low-rank term is written first (``bias + h @ B_i``, one ``baddbmm``) and the base product accumulated
    into it by the GEMM itself (``addmm_``), so the full-size output is written once and read back only inside
    the base GEMM, not in an extra pass as when the update is added to a finished base output.
    """
    weight, bias, fan_in_fan_out = base
    hidden = torch.bmm(a.transpose(1, 2), x.transpose(1, 2)).transpose(1, 2)  # (n, t, r)
    if bias is None:
        out = torch.bmm(hidden, b)
    else:
        out = torch.baddbmm(bias.expand(x.shape[0], x.shape[1], -1), hidden, b)
    out.view(-1, out.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), weight if fan_in_fan_out else weight.T)
    return out


def eval_update(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, base: BaseLinear) -> torch.Tensor:
    """``x W^T + bias + x A_i B_i`` with autograd off, ``x`` in the factors' and the weight's dtype, no autocast.

    ``x (n, ..., in)``; ``a (1, in, r)``, ``b (1, r, out)`` for one task shared by every row, else per-row
    ``a (n, in, r)``, ``b (n, r, out)``. The same operations, in the same order and layouts, as the eval paths of
    :class:`~polytropon.layer.PolyAdapter` with a plain base layer (so the values are bit-identical), without
    their per-call checks:

        one task           out = x W^T (+ bias);  out += (x A) B            two GEMMs over all rows
        many rows, mixed   :func:`routed_linear_eval`
        few rows, mixed    out = x W^T (+ bias);  out_i += (x_i A_i) B_i    per example (``bmm``)

    The rank-``r`` intermediate uses the plain layout up to :data:`FEW_ROWS` rows per product, else the
    transposed one (see :func:`add_low_rank`).
    """
    if x.dim() == 3 and a.shape[0] > 1:  # mixed tasks, (n, t, in): the common case, with few Python steps
        n, t, d = x.shape
        if t > FEW_ROWS:
            return routed_linear_eval(x, a, b, base)
        weight, bias, fan_in_fan_out = base
        w_t = weight if fan_in_fan_out else weight.T
        flat = x.reshape(n * t, d)
        out = torch.mm(flat, w_t) if bias is None else torch.addmm(bias, flat, w_t)
        return out.view(n, t, -1).baddbmm_(torch.bmm(x, a), b)
    if a.shape[0] == 1:
        weight, bias, fan_in_fan_out = base
        w_t = weight if fan_in_fan_out else weight.T
        flat, a, b = x.reshape(-1, x.shape[-1]), a[0], b[0]
        out = torch.mm(flat, w_t) if bias is None else torch.addmm(bias, flat, w_t)
        hidden = flat @ a if flat.shape[0] <= FEW_ROWS else (a.T @ flat.T).T
        return out.addmm_(hidden, b).view(x.shape[:-1] + (out.shape[-1],))
    out = base_linear(x, base)
    rows = x.reshape(x.shape[0], -1, x.shape[-1])
    if rows.shape[1] <= FEW_ROWS:
        hidden = torch.bmm(rows, a)
    else:
        hidden = torch.bmm(a.transpose(1, 2), rows.transpose(1, 2)).transpose(1, 2)
    out.view(rows.shape[0], rows.shape[1], -1).baddbmm_(hidden, b)
    return out
