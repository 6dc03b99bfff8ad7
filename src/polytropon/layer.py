"""Poly / MHR layers: a frozen base ``Linear`` (or GPT-2 ``Conv1D``) plus routed LoRA skills."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import nn

from .kernels import (
    FEW_ROWS, BaseLinear, RoutedPoly, add_low_rank, autocast_active, base_linear, compute_dtype, eval_update,
    mix_factors, routed_linear_eval,
)
from .recompute import plan_replay
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


#: torch's registries of hooks that run around every module call (mutated in place, so these stay current)
_GLOBAL_FORWARD_HOOKS = nn.modules.module._global_forward_hooks
_GLOBAL_FORWARD_PRE_HOOKS = nn.modules.module._global_forward_pre_hooks

def _kaiming_per_block_(param: torch.Tensor) -> None:
    """Fill each ``(d_1, d_2)`` block of ``param (n_splits, n_skills, d_1, d_2)`` like a Linear weight.

    Every block is drawn as a ``(d_2, d_1)`` Kaiming-uniform (a=sqrt(5)) matrix and stored transposed, skill by
    skill and split by split: the order of PEFT's initialisation, so a seeded model starts from its weights.
    """
    n_splits, n_skills, d_1, d_2 = param.shape
    for skill in range(n_skills):
        for split in range(n_splits):
            block = torch.empty(d_2, d_1)
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
            param[split, skill] = block.T


class EvalFactors(NamedTuple):
    """A :class:`PolyAdapter`'s eval cache: one immutable entry, replaced whole (never mutated).

    Attributes:
        key: the batch's distinct tasks, the inference-mode flag and every parameter's storage and version.
        a, b: the mixed factors of the distinct tasks, ``(k, in, r)`` and ``(k, r, out)``.
        inverse: the row -> task layout (``BatchRouting.inverse``) that ``rows_a``/``rows_b`` were gathered for.
        rows_a, rows_b: the factors of every row, ``(n, in, r)``, ``(n, r, out)`` (``a``, ``b`` when ``k = 1``).
    """

    key: tuple
    a: torch.Tensor
    b: torch.Tensor
    inverse: torch.Tensor
    rows_a: torch.Tensor
    rows_b: torch.Tensor


class EvalStep(NamedTuple):
    """What one adapted layer's eval update needs within one call, resolved once (kept in the call's routing).

    With autograd off a layer's update depends on the call (its task ids), the active adapter, and the adapter's
    parameters, which do not change while a call runs (changes to the model are not supported during calls:
    docs/deploy.md, "Concurrency"). ``generate`` runs every layer once per token in one call, so the routing
    lookups, the base layer's checks and the eval cache's key are done at the layer's first run of the call and
    the later ones run :func:`~polytropon.kernels.eval_update` directly. Immutable; lives in
    :attr:`CallRouting.eval_steps <polytropon.routing.CallRouting.eval_steps>`, one per layer, so concurrent
    calls never share one.

    Attributes:
        adapter_name: the active adapter the step was resolved for.
        rows: the number of rows (``x.shape[0]``) the factors were gathered for.
        dtype: the input dtype (the adapter's and the base weight's).
        inference: whether it was resolved in ``torch.inference_mode`` (its tensors are inference tensors then).
        a, b: the mixed factors, ``(1, in, r)``/``(1, r, out)`` for one task, else ``(rows, in, r)``/``(rows, r, out)``.
        base: the plain base layer as ``(W^T (in, out), bias, True)``: the weight in the layout of the product
            (a transposed view for ``nn.Linear``, taken once per call).
    """

    adapter_name: str
    rows: int
    dtype: torch.dtype
    inference: bool
    a: torch.Tensor
    b: torch.Tensor
    base: BaseLinear

    def fits(self, x: torch.Tensor, adapter_name: Optional[str]) -> bool:
        """Whether this step computes the layer's eval update of ``x`` (autograd off, checked by the caller)."""
        return (
            x.shape[0] == self.rows and x.dtype == self.dtype and adapter_name == self.adapter_name
            and torch.is_inference_mode_enabled() == self.inference and not autocast_active(x)
        )


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
        self._cache: Optional[EvalFactors] = None  # see _eval_factors
        self.reset_parameters(init_weights, reset_router=router is None)

    def reset_parameters(self, init_weights: bool = True, reset_router: bool = True) -> None:
        """Kaiming-uniform (a=sqrt(5)) A per skill and split; B zero or Kaiming-uniform; router re-drawn.

        Draws random numbers in the same order as PEFT, so a seeded model starts from the same weights.
        """
        with torch.no_grad():
            _kaiming_per_block_(self.poly_lora_A)
            if init_weights:
                self.poly_lora_B.zero_()
            else:
                _kaiming_per_block_(self.poly_lora_B)
            if reset_router:
                self.poly_router.reset()

    # ------------------------------------------------------------------ the method
    def mix(self, weights: torch.Tensor, scaled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix the skills with routing weights ``w`` of shape ``(k, n_splits, n_skills)``::

            A_k[:, q*d:(q+1)*d block of rows] = sum_s w[k, q, s] * A[q, s]       -> A (k, in_features, r)
            B_k[:, q-th block of columns]     = sum_s w[k, q, s] * B[q, s] / r   -> B (k, r, out_features)

        Returns:
            ``A`` and ``B``, ``B`` scaled by ``1 / r`` when ``scaled`` (the default), so that a task's update is
            ``x @ A[i] @ B[i]``. ``B`` is contiguous; ``A`` is the transposed view of a contiguous
            ``(k, r, in_features)`` tensor (the layout of the faster products, see :func:`mix_factors`).
        """
        weights = weights.to(self.poly_lora_A.dtype)
        return mix_factors(weights, self.poly_lora_A, self.poly_lora_B, scaled)

    def task_factors(self, task_id: int, scaled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-routing factors of one task: ``A (in_features, r)``, ``B (r, out_features)``.

        ``B`` carries the ``1 / r`` scaling when ``scaled``; without it the update is ``x @ A @ B / r``.
        """
        ids = torch.tensor([task_id], device=self.poly_lora_A.device)
        a, b = self.mix(self.poly_router.eval_weights(ids), scaled=scaled)
        return a[0], b[0]

    # ------------------------------------------------------------------ the routed update, path by path
    def add_update(
        self, result: Optional[torch.Tensor], x: torch.Tensor, batch: BatchRouting, base: Optional[BaseLinear] = None,
        recompute_inputs: bool = True,
    ) -> torch.Tensor:
        """Return ``result + x @ A_t @ B_t`` with each row's task ``t`` (``B_t`` carries the ``1/r``).

        A flat dispatch over four named paths::

            training                    one relaxed-Bernoulli route per example; mixing, low rank (and base) in
                                        one autograd node                          -> _training_update
            one task in the batch       shared factors, two plain GEMMs over all rows -> _one_task_update
            mixed tasks, many rows      per-row factors (bmm); the base GEMM accumulates into the update
                                                                                   -> _mixed_tasks_update
            mixed tasks, decoding       per-row factors, the layouts fastest for a few rows per example
                                                                                   -> _decoding_update

        In eval the skills are mixed once per distinct task of the batch; with autograd off the mixtures are
        cached across calls (:meth:`_eval_factors`). The update is accumulated into ``result`` in place
        (``baddbmm_``/``addmm_``) whenever autograd allows it; never in place on a view that autograd tracks,
        which would make its backward copy the whole output. A model traced by ``torch.compile`` runs
        :meth:`traced_update` instead, one path for all of these. Inside ``torch.autocast`` the products with
        ``x`` run in the autocast dtype and the result has the base output's dtype, as for a plain Linear there;
        the skills are mixed in the parameters' dtype (:func:`~polytropon.kernels.compute_dtype`).

        Args:
            result: base layer output ``(batch, ..., out_features)``, or ``None`` with ``base`` given.
            x: layer input ``(batch, ..., in_features)``.
            batch: the batch's task ids, one per row of ``x`` (:class:`~polytropon.routing.BatchRouting`).
            base: ``(weight, bias, fan_in_fan_out)`` of a frozen base layer whose output is to be computed here
                (``result=None``): in training the base product and the update then run in one autograd
                Function (:class:`RoutedPoly`), which saves a full-size gradient and a pass over it.
            recompute_inputs: in training, recompute ``x`` in backward from what the base keeps where it can,
                instead of keeping it (exact; see :meth:`_training_update`).
        """
        dtype = compute_dtype(x, self.poly_lora_A.dtype)  # the autocast dtype inside an autocast region
        if x.dtype != dtype:
            x = x.to(dtype)
        if self.training:
            return self._training_update(result, x, batch, base, recompute_inputs)
        a, b = self._eval_factors(batch) if not torch.is_grad_enabled() else self._row_factors(batch)
        if a.dtype != dtype:
            a, b = a.to(dtype), b.to(dtype)
        if a.shape[0] == 1:
            return self._one_task_update(result, x, a[0], b[0], base)
        if x.dim() == 3 and x.shape[1] > FEW_ROWS:
            return self._mixed_tasks_update(result, x, a, b, base)
        return self._decoding_update(result, x, a, b, base)

    def _training_update(
        self, result: Optional[torch.Tensor], x: torch.Tensor, batch: BatchRouting, base: Optional[BaseLinear],
        recompute_inputs: bool = True,
    ) -> torch.Tensor:
        """Training: ``w = router(task_ids)`` ``(n, q, s)`` (presampled for the call), then :class:`RoutedPoly`.

        With ``recompute_inputs``, :class:`RoutedPoly` keeps for ``dA`` not ``x`` but the tensors the base's own
        backward keeps and recomputes ``x`` from them bit for bit, when ``x`` is made that way
        (:func:`~polytropon.recompute.plan_replay`; else it keeps ``x``). One example, autograd off or a result
        in another dtype: the mixtures ``A_i, B_i = mix(w)`` go through the one-task or per-row path instead.
        """
        dtype = x.dtype  # the parameters' dtype, or the autocast dtype inside an autocast region
        weights = self.poly_router(batch.task_ids).to(self.poly_lora_A.dtype)
        if torch.is_grad_enabled() and weights.shape[0] > 1 and (result is None or result.dtype == dtype):
            rows = x.reshape(x.shape[0], -1, self.in_features)
            replay = plan_replay(x) if recompute_inputs else None
            if result is None:
                out = RoutedPoly.apply(None, rows, weights, self.poly_lora_A, self.poly_lora_B, base, replay)
                return out.view(x.shape[:-1] + (self.out_features,))
            shape = rows.shape[:-1] + (self.out_features,)
            source = result if result.shape == shape else result.reshape(shape)
            out = RoutedPoly.apply(source, rows, weights, self.poly_lora_A, self.poly_lora_B, None, replay)
            return out if out.shape == result.shape else out.view(result.shape)
        a, b = self.mix(weights)
        if a.dtype != dtype:
            a, b = a.to(dtype), b.to(dtype)
        if a.shape[0] == 1:
            return self._one_task_update(result, x, a[0], b[0], base)
        return self._decoding_update(result, x, a, b, base)

    def _one_task_update(
        self, result: Optional[torch.Tensor], x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, base: Optional[BaseLinear]
    ) -> torch.Tensor:
        """Every row has the same task: ``result + x @ a @ b`` with ``a (in, r)``, ``b (r, out)`` over all rows."""
        if result is None:
            result = base_linear(x, base)
        return add_low_rank(result, x.reshape(-1, self.in_features), a, b)

    def _mixed_tasks_update(
        self, result: Optional[torch.Tensor], x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, base: Optional[BaseLinear]
    ) -> torch.Tensor:
        """Mixed tasks, many rows per example: ``x (n, t, in)``, per-row ``a (n, in, r)``, ``b (n, r, out)``.

        In inference with the base layer given, :func:`routed_linear_eval` writes the update and lets the base
        GEMM accumulate into it (one pass over the output); otherwise as :meth:`_decoding_update`.
        """
        if result is None and not torch.is_grad_enabled():
            return routed_linear_eval(x, a, b, base)
        return self._decoding_update(result, x, a, b, base)

    def _decoding_update(
        self, result: Optional[torch.Tensor], x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, base: Optional[BaseLinear]
    ) -> torch.Tensor:
        """Mixed tasks, per-row factors ``a (n, in, r)``, ``b (n, r, out)``: e.g. one token per example while decoding.

        :func:`add_low_rank` picks the layouts (plain ``x @ a`` up to ``FEW_ROWS`` rows per example).
        """
        if result is None:
            result = base_linear(x, base)
        return add_low_rank(result, x.reshape(x.shape[0], -1, self.in_features), a, b)

    def traced_update(self, result: torch.Tensor, x: torch.Tensor, batch: BatchRouting) -> torch.Tensor:
        """:meth:`add_update` as ``torch.compile`` traces it, every path in one: a mixture per row, plain ops.

        ``w = router(task_ids)`` ``(n, q, s)``, ``A_i, B_i = mix(w)``, ``y = result + (x_i A_i) B_i``. No eval
        cache, no distinct-task grouping and no custom autograd functions: nothing whose guards would depend on
        the task ids' values or number of distinct tasks, so a compiled model is not recompiled when only they
        change. The compiler fuses what the eager paths fuse by hand. In training the router returns the route
        drawn for the whole call (:func:`polytropon.calls.traced_call`).
        """
        dtype = compute_dtype(x, self.poly_lora_A.dtype)
        ids = batch.task_ids
        weights = self.poly_router(ids) if self.training else self.poly_router.eval_weights(ids)
        a, b = self.mix(weights)
        a, b = a.to(dtype), b.to(dtype)
        rows = x.to(dtype).reshape(x.shape[0], -1, self.in_features)
        update = torch.bmm(torch.bmm(rows, a), b)
        return result + update.view(result.shape).to(result.dtype)

    # ------------------------------------------------------------------ eval mixtures
    def _row_factors(self, batch: BatchRouting) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval factors mixed afresh (autograd on): ``(1, in, r), (1, r, out)`` for one task, else one per row."""
        a, b = self.mix(self.poly_router.eval_weights(batch.unique))
        if a.shape[0] > 1:
            a, b = a[batch.inverse], b[batch.inverse]
        return a, b

    def _eval_factors(self, batch: BatchRouting) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-routing factors for every row of the batch, cached while weights and tasks are unchanged.

        Returns ``A (1, in, r), B (1, r, out)`` when the batch holds one task (shared by all rows), else
        ``A (n, in, r), B (n, r, out)``, row ``i`` holding the factors of its task. The skills are mixed once
        per distinct task (``k`` of them), then gathered to rows.

        Generation calls every layer once per token with the same task ids; the cache (one :class:`EvalFactors`,
        replaced whole) turns the mixing (and, while the rows keep their tasks, the gather to rows) into a
        lookup. Its key holds every parameter's storage and in-place version counter, so any optimizer step,
        ``load_state_dict`` or device move invalidates it; the mode is part of the key too. Only used when
        autograd is off.
        """
        # the module dictionaries directly (routers keep their tensors themselves, no submodules): this runs in
        # every layer at every generated token, where ``parameters()`` alone cost more than the update
        router = self.poly_router
        params = (*self._parameters.values(), *router._parameters.values(), *router._buffers.values())
        key = (batch.key, torch.is_inference_mode_enabled(), *[(p.data_ptr(), p._version) for p in params if p is not None])
        cache = self._cache
        if cache is not None and cache.key == key:
            # same tasks: the same rows if this is the same call, or a call with the same row -> task layout
            if cache.inverse is batch.inverse:
                return cache.rows_a, cache.rows_b
            if torch.equal(cache.inverse, batch.inverse):  # a new call with the same layout: hold its tensor from now on
                self._cache = EvalFactors(key, cache.a, cache.b, batch.inverse, cache.rows_a, cache.rows_b)
                return cache.rows_a, cache.rows_b
            a, b = cache.a, cache.b
        else:
            a, b = self.mix(self.poly_router.eval_weights(batch.unique))
        rows_a, rows_b = (a, b) if a.shape[0] == 1 else (a[batch.inverse], b[batch.inverse])
        self._cache = EvalFactors(key, a, b, batch.inverse, rows_a, rows_b)
        return rows_a, rows_b

    def clear_cache(self) -> None:
        """Forget the cached eval mixtures (needed only after changing tensors without an in-place op)."""
        self._cache = None

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
        #: (adapter, task, A_t, B_t, the weight before merging if it is kept: see merge)
        self._merged: Optional[tuple[str, int, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        state = self.routing
        # autograd off inside a routed call: the layer's EvalStep of this call, once resolved (see EvalStep)
        steps = None if args or kwargs or self.training or torch.is_grad_enabled() else state.eval_steps()
        if steps is not None:
            step = steps.get(self)
            if step is not None and step.fits(x, state.active_adapter):
                return eval_update(x, step.a, step.b, step.base)
        adapter = None
        if not (state.disabled or state.merged_task is not None):
            adapter = self.adapters._modules.get(state.active_adapter)
        if adapter is None:
            return self.base_layer(x, *args, **kwargs)
        if torch.compiler.is_compiling():  # traced by torch.compile: see PolyAdapter.traced_update
            batch = state.for_batch(x.shape[0], x.device, self.name, cache=False)
            return adapter.traced_update(self.base_layer(x, *args, **kwargs), x, batch)
        batch = state.for_batch(x.shape[0], x.device, self.name)
        base = None if args or kwargs else self._plain_base(x, adapter)
        if base is None:
            return adapter.add_update(self.base_layer(x, *args, **kwargs), x, batch, None, state.recompute_inputs)
        if steps is not None and not adapter.training:
            a, b = adapter._eval_factors(batch)
            weight, bias, fan_in_fan_out = base
            base = (weight if fan_in_fan_out else weight.T, bias, True)  # the transposed view taken once per call
            steps[self] = EvalStep(state.active_adapter, x.shape[0], x.dtype, torch.is_inference_mode_enabled(), a, b, base)
            return eval_update(x, a, b, base)
        return adapter.add_update(None, x, batch, base, state.recompute_inputs)

    def _plain_base(self, x: torch.Tensor, adapter: PolyAdapter) -> Optional[BaseLinear]:
        """The base layer as ``(weight, bias, fan_in_fan_out)`` when the adapter may compute its product itself.

        Only for a plain ``nn.Linear`` or ``Conv1D`` (exact types, no hooks, a dense weight in the adapter's and
        the input's dtype) whose weight and bias need no gradient in this call: then a training step runs the
        base product inside the adapter's autograd Function, and inference skips a module call per layer (and,
        for mixed tasks, lets the base GEMM accumulate into the update: :func:`routed_linear_eval`). Anything
        else (quantised or hooked layers, accelerate's offloading, a base weight being trained) calls the module.
        """
        module = self._modules["base_layer"]  # this runs in every layer at every generated token: no __getattr__
        if type(module) is not nn.Linear and (Conv1D is None or type(module) is not Conv1D):
            return None
        if module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__:
            return None
        if _GLOBAL_FORWARD_HOOKS or _GLOBAL_FORWARD_PRE_HOOKS:
            return None
        weight, bias = module._parameters["weight"], module._parameters.get("bias")
        if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
            return None
        if not (weight.dtype == x.dtype == adapter.poly_lora_A.dtype) or type(weight) not in (torch.Tensor, nn.Parameter):
            return None
        if autocast_active(x):  # the module's own call runs (and casts) as autocast says
            return None
        return weight, bias, self.fan_in_fan_out

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

        A weight of less than float32 precision (bfloat16, float16) is also kept as it was, and :meth:`unmerge`
        puts it back bit for bit: subtracting the update again would round twice in the weight's own precision,
        about one unit in the last place per merge/unmerge, and always in the same direction for the same task
        (measured on bfloat16: 0.9% of the largest weight after one cycle, 71% after 200). The copy costs the
        size of the adapted weights while a task is merged.

        Raises:
            ValueError: a task is already merged into this layer.
        """
        if self._merged is not None:
            raise ValueError(f"layer {self.name!r} already has task {self._merged[1]} of adapter {self._merged[0]!r} merged")
        a, b = self.adapters[adapter_name].task_factors(task_id)
        a, b = a.detach().clone(), b.detach().clone()
        weight = self.base_layer.weight
        exact = weight.dtype in (torch.float32, torch.float64)
        original = None if exact else weight.detach().clone()
        weight.copy_((weight.float() + self._delta_from_factors(a, b).float()).to(weight.dtype))
        self._merged = (adapter_name, task_id, a, b, original)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged task's update from the base weight (exact up to float32 round-off); no-op if none.

        A bfloat16/float16 weight is restored exactly from the copy :meth:`merge` kept.
        """
        if self._merged is None:
            return
        _, _, a, b, original = self._merged
        weight = self.base_layer.weight
        if original is not None:
            weight.copy_(original)
        else:
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
