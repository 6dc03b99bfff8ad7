"""Poly / MHR layers: a frozen base ``Linear`` (or GPT-2 ``Conv1D``) plus routed LoRA skills."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .router import PolyRouter
from .routing import BatchRouting, RoutingState

try:  # transformers' GPT-2 style linear layer, weight stored as (in_features, out_features)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None  # type: ignore[assignment,misc]


def layer_features(module: nn.Module, name: str = "") -> tuple[int, int, bool]:
    """``(in_features, out_features, fan_in_fan_out)`` of a supported base layer.

    ``fan_in_fan_out`` is ``True`` for ``Conv1D``, whose weight is stored transposed, ``(in, out)``.

    Raises:
        TypeError: for any module that is neither ``torch.nn.Linear`` nor transformers' ``Conv1D``.
    """
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if Conv1D is not None and isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape
        return in_features, out_features, True
    raise TypeError(
        f"cannot adapt module {name!r} of type {type(module).__module__}.{type(module).__qualname__}: "
        "Poly supports torch.nn.Linear and transformers' Conv1D"
    )


class _RoutedLowRank(torch.autograd.Function):
    """``result + x @ A_i @ B_i`` per row ``i`` with a backward laid out for fast skinny GEMMs.

    Shapes: ``result (n, t, out)``, ``x (n, t, in)``, ``a_t = A^T (n, r, in)``, ``b_t = B^T (n, out, r)`` (all
    contiguous). Forward::

        h = x @ a_t^T                  (n, t, r)
        y = result + h @ b_t^T         in place (``baddbmm_``) when ``result`` is not a view, else a new tensor

    Backward, for ``g = dL/dy``::

        dh = g @ B                     (B = b_t^T made contiguous: (n, r, out); a (r, out) operand is fast)
        dx = dh @ a_t                  (n, t, in)
        da_t = dh^T @ x                (n, r, in)   = (x^T @ dh)^T, computed in the layout of a_t
        db   = h^T @ g                 (n, r, out), returned as its transpose for b_t
        dresult = g

    With the operands in these layouts every product hands MKL a contraction-contiguous right-hand side; on a
    CPU this makes the six skinny GEMMs of a step about 40% cheaper than autograd's default backward of the
    same expression (measured in ``benchmarks/speed.py``'s configuration). Only ``h`` (``r`` columns) is saved
    besides the inputs; ``x`` is the tensor the base layer saves anyway.
    """

    @staticmethod
    def forward(ctx, result: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
        hidden = torch.bmm(x, a_t.transpose(1, 2))
        ctx.save_for_backward(x, a_t, b_t, hidden)
        if result._base is None:
            ctx.mark_dirty(result)
            return result.baddbmm_(hidden, b_t.transpose(1, 2))
        return torch.baddbmm(result, hidden, b_t.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, a_t, b_t, hidden = ctx.saved_tensors
        need_result, need_x, need_a, need_b = ctx.needs_input_grad
        grad_hidden = torch.bmm(grad, b_t.transpose(1, 2).contiguous().transpose(1, 2))
        grad_x = torch.bmm(grad_hidden, a_t) if need_x else None
        grad_a = torch.bmm(grad_hidden.transpose(1, 2), x) if need_a else None
        grad_b = torch.bmm(hidden.transpose(1, 2), grad).transpose(1, 2) if need_b else None
        return (grad if need_result else None), grad_x, grad_a, grad_b


def _add_low_rank(result: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """``result + x @ a_t^T @ b_t^T`` in ``result``'s shape and dtype.

    ``x`` is ``(rows, in)`` with shared factors ``a_t (r, in)``, ``b_t (out, r)``, or ``(n, t, in)`` with per-row
    factors ``a_t (n, r, in)``, ``b_t (n, out, r)``; ``result`` has as many elements as the update. With autograd
    off the update goes into ``result`` in place (``addmm_``/``baddbmm_``: one pass over the output); with
    autograd on, per-row factors go through :class:`_RoutedLowRank` and shared ones through plain ops, never in
    place on a view autograd tracks (its backward would copy the whole output).
    """
    shape = x.shape[:-1] + b_t.shape[-2:-1]
    same_dtype = result.dtype == b_t.dtype
    if not torch.is_grad_enabled() and same_dtype and (result.shape == shape or result.is_contiguous()):
        target = result if result.shape == shape else result.view(shape)
        if x.dim() == 2:
            target.addmm_(x @ a_t.T, b_t.T)
        else:
            target.baddbmm_(torch.bmm(x, a_t.transpose(1, 2)), b_t.transpose(1, 2))
        return result
    if not same_dtype:
        if x.dim() == 2:
            update = (x @ a_t.T) @ b_t.T
        else:
            update = torch.bmm(torch.bmm(x, a_t.transpose(1, 2)), b_t.transpose(1, 2))
        return result + update.view(result.shape).to(result.dtype)
    source = result if result.shape == shape else result.reshape(shape)
    if x.dim() == 2:
        out = torch.addmm(source, x @ a_t.T, b_t.T)
    else:
        out = _RoutedLowRank.apply(source, x, a_t, b_t)
    return out if out.shape == result.shape else out.view(result.shape)


class PolyAdapter(nn.Module):
    """The skill inventory and router of one adapter in one layer.

    Parameters (names and shapes as in PEFT's checkpoints)::

        poly_lora_A  (n_splits, n_skills, in_features // n_splits, r)
        poly_lora_B  (n_splits, n_skills, r, out_features // n_splits)
        poly_router.module_logits  (n_tasks, n_splits * n_skills)

    Given routing weights ``w`` of shape ``(k, n_splits, n_skills)`` the mixed factors of the ``k`` tasks are::

        A_k = concat over splits q of  sum_s w[k, q, s] * A[q, s]      -> (k, in_features, r)
        B_k = concat over splits q of  sum_s w[k, q, s] * B[q, s] / r  -> (k, r, out_features)

    (the 1/r scaling is folded into the small B_k), and the layer adds ``x @ A_k @ B_k`` to the base output.

    Args:
        in_features: input width of the base layer; divisible by ``n_splits``.
        out_features: output width of the base layer; divisible by ``n_splits``.
        r: rank of every skill.
        n_tasks: number of tasks of the router.
        n_skills: number of skills.
        n_splits: number of MHR blocks per skill (1 for Poly).
        init_weights: zero B (``True``) or Kaiming-uniform B (``False``).
        router: a router to use instead of a new :class:`PolyRouter` (may be shared between layers).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        n_tasks: int,
        n_skills: int,
        n_splits: int = 1,
        init_weights: bool = True,
        router: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.r, self.n_tasks, self.n_skills, self.n_splits = r, n_tasks, n_skills, n_splits
        self.poly_lora_A = nn.Parameter(torch.empty(n_splits, n_skills, in_features // n_splits, r))
        self.poly_lora_B = nn.Parameter(torch.empty(n_splits, n_skills, r, out_features // n_splits))
        self.poly_router = router if router is not None else PolyRouter(n_tasks, n_skills, n_splits, reset=False)
        self._cache: Optional[tuple] = None  # see _eval_factors
        self.reset_parameters(init_weights, reset_router=router is None)

    def reset_parameters(self, init_weights: bool = True, reset_router: bool = True) -> None:
        """Kaiming-uniform (a=sqrt(5)) A per skill and split; B zero or Kaiming-uniform; router re-drawn.

        Draws random numbers in the same order as PEFT, so a seeded model starts from the same weights.
        """
        with torch.no_grad():
            n_splits, n_skills, d_in, r = self.poly_lora_A.shape
            for skill in range(n_skills):
                for split in range(n_splits):
                    weight = torch.empty(r, d_in)
                    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
                    self.poly_lora_A[split, skill] = weight.T
            if init_weights:
                self.poly_lora_B.zero_()
            else:
                d_out = self.poly_lora_B.shape[-1]
                for skill in range(n_skills):
                    for split in range(n_splits):
                        weight = torch.empty(d_out, r)
                        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
                        self.poly_lora_B[split, skill] = weight.T
            if reset_router:
                self.poly_router.reset()

    # ------------------------------------------------------------------ the method
    def _mix_t(self, weights: torch.Tensor, scaled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixed factors transposed, as the GEMMs want them: ``A^T (k, r, in)``, ``B^T (k, out, r)``.

        ``A^T[k, :, q*d:(q+1)*d] = sum_s w[k, q, s] * A[q, s]^T`` and likewise for ``B^T`` (scaled ``1/r``
        when ``scaled``); both contiguous.
        """
        k = weights.shape[0]
        n_splits, n_skills, r = self.n_splits, self.n_skills, self.r
        weights = weights.to(self.poly_lora_A.dtype).transpose(0, 1)  # (q, k, s)
        # one bmm over the splits on free views of the parameters (autograd saves the views, not copies)
        a = torch.bmm(weights, self.poly_lora_A.view(n_splits, n_skills, -1))  # (q, k, d_in * r)
        a_t = a.view(n_splits, k, -1, r).permute(1, 3, 0, 2).reshape(k, r, self.in_features)
        b_weights = weights / r if scaled else weights
        b = torch.bmm(b_weights, self.poly_lora_B.view(n_splits, n_skills, -1))  # (q, k, r * d_out)
        b_t = b.view(n_splits, k, r, -1).permute(1, 0, 3, 2).reshape(k, self.out_features, r)
        return a_t, b_t

    def mix(self, weights: torch.Tensor, scaled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix the skills with routing weights ``(k, n_splits, n_skills)``.

        Returns:
            ``A`` of shape ``(k, in_features, r)`` and ``B`` of shape ``(k, r, out_features)``, B scaled by
            ``1 / r`` when ``scaled`` (the default), so that a task's update is ``x @ A[i] @ B[i]``. (Both are
            transposed views of contiguous ``(k, r, in)`` / ``(k, out, r)`` tensors, see :meth:`_mix_t`.)
        """
        a_t, b_t = self._mix_t(weights, scaled)
        return a_t.transpose(1, 2), b_t.transpose(1, 2)

    def task_factors(self, task_id: int, scaled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-routing factors of one task: ``A (in_features, r)``, ``B (r, out_features)``.

        ``B`` carries the ``1 / r`` scaling when ``scaled``; without it the update is ``x @ A @ B / r``.
        """
        ids = torch.tensor([task_id], device=self.poly_lora_A.device)
        a, b = self.mix(self.poly_router.eval_weights(ids), scaled=scaled)
        return a[0], b[0]

    def _eval_factors(self, routing: BatchRouting) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-routing factors for every row of the batch, cached while weights and tasks are unchanged.

        Returns transposed factors (see :meth:`_mix_t`): ``A^T (1, r, in), B^T (1, out, r)`` when the batch
        holds one task (shared by all rows), else ``A^T (n, r, in), B^T (n, out, r)``, row ``i`` holding the
        factors of its task. The skills are mixed once
        per distinct task (``k`` of them), then gathered to rows.

        Generation calls every layer once per token with the same task ids; the cache turns the mixing (and,
        for the same :class:`BatchRouting`, the gather) into a lookup. Its key holds every parameter's storage
        and in-place version counter, so any optimizer step, ``load_state_dict`` or device move invalidates
        it; the mode is part of the key too. Only used when autograd is off.
        """
        params = (self.poly_lora_A, self.poly_lora_B, self.poly_router.module_logits)
        key = (routing.key, torch.is_inference_mode_enabled()) + tuple((p.data_ptr(), p._version) for p in params)
        cache = self._cache
        if cache is not None and cache[0] == key:
            if cache[3] is routing:
                return cache[4], cache[5]
            a, b = cache[1], cache[2]
        else:
            a, b = self._mix_t(self.poly_router.eval_weights(routing.unique))
        rows_a, rows_b = (a, b) if a.shape[0] == 1 else (a[routing.inverse], b[routing.inverse])
        self._cache = (key, a, b, routing, rows_a, rows_b)
        return rows_a, rows_b

    def add_update(self, result: torch.Tensor, x: torch.Tensor, routing: BatchRouting) -> torch.Tensor:
        """Return ``result + x @ A_t @ B_t`` with each row's task ``t`` (``B_t`` carries the ``1/r``).

        * training: one relaxed-Bernoulli route per example, as in the papers and PEFT (``n`` mixtures);
        * eval: the skills are mixed once per distinct task of the batch; with autograd off the mixtures are
          cached across calls (:meth:`_eval_factors`);
        * a batch of one task uses the shared factors as plain matrices (two GEMMs over all rows).

        The update is accumulated into ``result`` in place (``baddbmm_``/``addmm_``) whenever autograd allows
        it, i.e. without an extra pass over the output; never in place on a view that autograd tracks, which
        would make its backward copy the whole output.

        Args:
            result: base layer output ``(batch, ..., out_features)``.
            x: layer input ``(batch, ..., in_features)``.
            routing: the batch's task ids, one per row of ``x``.
        """
        dtype = self.poly_lora_A.dtype
        if x.dtype != dtype:
            x = x.to(dtype)
        if self.training:
            a_t, b_t = self._mix_t(self.poly_router(routing.task_ids))
        elif torch.is_grad_enabled():
            a_t, b_t = self._mix_t(self.poly_router.eval_weights(routing.unique))
            if a_t.shape[0] > 1:
                a_t, b_t = a_t[routing.inverse], b_t[routing.inverse]
        else:
            a_t, b_t = self._eval_factors(routing)
        if a_t.shape[0] == 1:  # every row has the same task
            return _add_low_rank(result, x.reshape(-1, self.in_features), a_t[0], b_t[0])
        return _add_low_rank(result, x.reshape(x.shape[0], -1, self.in_features), a_t, b_t)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"n_tasks={self.n_tasks}, n_skills={self.n_skills}, n_splits={self.n_splits}"
        )


class PolyLayer(nn.Module):
    """A base ``Linear``/``Conv1D`` with Poly/MHR adapters; reads its task ids from a shared routing state.

    ``forward(x) = base_layer(x) + x @ A_t @ B_t`` for the active adapter (see :class:`PolyAdapter`), where
    ``t`` is each example's task from :attr:`routing`. With adapters disabled, or a task merged into the base
    weights, it is ``base_layer(x)``.

    Args:
        base_layer: the frozen ``torch.nn.Linear`` or ``transformers.pytorch_utils.Conv1D``.
        routing: the model's :class:`RoutingState`.
        name: the module's dotted name in the model (for error messages).

    Shapes:
        ``x``: ``(batch, ..., in_features)`` -> ``(batch, ..., out_features)``.
    """

    def __init__(self, base_layer: nn.Module, routing: RoutingState, name: str = "") -> None:
        super().__init__()
        self.in_features, self.out_features, self.fan_in_fan_out = layer_features(base_layer, name)
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.routing = routing
        self.name = name
        self._merged: Optional[tuple[str, int, torch.Tensor, torch.Tensor]] = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        state = self.routing
        if state.disabled or state.merged_task is not None or state.active_adapter not in self.adapters:
            return result
        routing = state.for_batch(x.shape[0], x.device, self.name)
        return self.adapters[state.active_adapter].add_update(result, x, routing)

    # ------------------------------------------------------------------ merging
    def delta_weight(self, adapter_name: str, task_id: int) -> torch.Tensor:
        """The task's update ``A_t @ B_t`` (eval routing, 1/r included) in the base weight's layout.

        Shape ``(out_features, in_features)`` for Linear, ``(in_features, out_features)`` for Conv1D.
        """
        a, b = self.adapters[adapter_name].task_factors(task_id)
        return self._delta_from_factors(a, b)

    def _delta_from_factors(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        delta = a @ b  # (in, out)
        return delta if self.fan_in_fan_out else delta.T

    @property
    def merged(self) -> Optional[tuple[str, int]]:
        """``(adapter_name, task_id)`` of the task folded into the base weight, or ``None``."""
        return None if self._merged is None else self._merged[:2]

    @torch.no_grad()
    def merge(self, adapter_name: str, task_id: int) -> None:
        """``W <- W + delta_weight(adapter_name, task_id)``, computed in float32 and cast to W's dtype.

        The task's factors ``A_t, B_t`` are kept (they are small), so :meth:`unmerge` subtracts exactly what
        was added even if the adapter's weights change while merged (e.g. an optimizer step).

        Raises:
            ValueError: a task is already merged into this layer.
        """
        if self._merged is not None:
            raise ValueError(f"layer {self.name!r} already has task {self._merged[1]} of adapter {self._merged[0]!r} merged")
        a, b = self.adapters[adapter_name].task_factors(task_id)
        a, b = a.detach().clone(), b.detach().clone()
        weight = self.base_layer.weight
        weight.copy_((weight.float() + self._delta_from_factors(a, b).float()).to(weight.dtype))
        self._merged = (adapter_name, task_id, a, b)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged task's update from the base weight (exact up to float round-off); no-op if none."""
        if self._merged is None:
            return
        _, _, a, b = self._merged
        weight = self.base_layer.weight
        weight.copy_((weight.float() - self._delta_from_factors(a, b).float()).to(weight.dtype))
        self._merged = None

    def __getattr__(self, name: str):
        # model code reads ``layer.weight`` / ``layer.bias`` (dtype checks, weight tying): the base layer's
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"
