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
        self._cache: Optional[tuple[tuple, torch.Tensor, torch.Tensor]] = None
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
    def mix(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix the skills with routing weights ``(k, n_splits, n_skills)``.

        Returns:
            ``A`` of shape ``(k, in_features, r)`` and ``B`` of shape ``(k, r, out_features)``, B already
            scaled by ``1 / r``, so that a task's update is ``x @ A[i] @ B[i]``.
        """
        k = weights.shape[0]
        weights = weights.to(self.poly_lora_A.dtype)
        a = torch.einsum("kqs,qsdr->kqdr", weights, self.poly_lora_A).reshape(k, self.in_features, self.r)
        b = torch.einsum("kqs,qsrd->krqd", weights / self.r, self.poly_lora_B).reshape(k, self.r, self.out_features)
        return a, b

    def task_factors(self, task_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-routing factors of one task: ``A (in_features, r)``, ``B (r, out_features)`` (B scaled 1/r)."""
        ids = torch.tensor([task_id], device=self.poly_lora_A.device)
        a, b = self.mix(self.poly_router.eval_weights(ids))
        return a[0], b[0]

    def _eval_factors(self, routing: BatchRouting) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed factors of the batch's distinct tasks at eval, cached while weights and tasks are unchanged.

        Generation calls every layer once per token with the same task ids; the cache turns the mixing into
        a lookup. The key holds every parameter's storage and in-place version counter, so any optimizer
        step, ``load_state_dict`` or device move invalidates it. Only used when autograd is off.
        """
        params = (self.poly_lora_A, self.poly_lora_B, *self.poly_router.parameters(), *self.poly_router.buffers())
        key = (routing.key, torch.is_inference_mode_enabled()) + tuple((p.data_ptr(), p._version) for p in params)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1], self._cache[2]
        a, b = self.mix(self.poly_router(routing.unique))
        self._cache = (key, a, b)
        return a, b

    def add_update(self, result: torch.Tensor, x: torch.Tensor, routing: BatchRouting) -> torch.Tensor:
        """Return ``result + x @ A_t @ B_t`` with each row's task ``t``.

        Args:
            result: base layer output ``(batch, ..., out_features)``; updated in place when dtypes allow.
            x: layer input ``(batch, ..., in_features)``.
            routing: the batch's task ids, one per row of ``x``.
        """
        dtype = self.poly_lora_A.dtype
        n = x.shape[0]
        x3 = x.to(dtype).reshape(n, -1, self.in_features)
        if self.training:
            # one relaxed-Bernoulli sample per example, as in the papers and PEFT
            a, b = self.mix(self.poly_router(routing.task_ids))
            shared = False
        else:
            if torch.is_grad_enabled():
                a, b = self.mix(self.poly_router(routing.unique))
            else:
                a, b = self._eval_factors(routing)
            shared = a.shape[0] == 1
            if not shared:
                a, b = a[routing.inverse], b[routing.inverse]
        # accumulate into the base output without extra passes (Linear/Conv1D do not keep it for backward)
        in_place = result.dtype == dtype
        if shared:
            x2 = x3.reshape(-1, self.in_features)
            out2 = result.reshape(-1, self.out_features)
            hidden = x2 @ a[0]
            if in_place and out2.data_ptr() == result.data_ptr():
                out2.addmm_(hidden, b[0])
                return result
            return result + (hidden @ b[0]).view(result.shape).to(result.dtype)
        out3 = result.reshape(n, -1, self.out_features)
        hidden = torch.bmm(x3, a)
        if in_place and out3.data_ptr() == result.data_ptr():
            out3.baddbmm_(hidden, b)
            return result
        return result + torch.bmm(hidden, b).view(result.shape).to(result.dtype)

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

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        state = self.routing
        if state.disabled or state.merged_task is not None or state.active_adapter not in self.adapters:
            return result
        routing = state.for_batch(x.shape[0], x.device, self.name)
        return self.adapters[state.active_adapter].add_update(result, x, routing)

    # ------------------------------------------------------------------ merging
    def delta_weight(self, adapter_name: str, task_id: int) -> torch.Tensor:
        """The task's update in the base weight's own layout: ``(out, in)`` for Linear, ``(in, out)`` for Conv1D."""
        a, b = self.adapters[adapter_name].task_factors(task_id)
        delta = a @ b  # (in, out)
        return delta if self.fan_in_fan_out else delta.T

    @torch.no_grad()
    def merge(self, adapter_name: str, task_id: int) -> None:
        """Add the task's update to the base weight (in float32, then cast to the weight's dtype)."""
        weight = self.base_layer.weight
        weight.copy_((weight.float() + self.delta_weight(adapter_name, task_id).float()).to(weight.dtype))

    @torch.no_grad()
    def unmerge(self, adapter_name: str, task_id: int) -> None:
        """Subtract the task's update from the base weight (exact up to float round-off)."""
        weight = self.base_layer.weight
        weight.copy_((weight.float() - self.delta_weight(adapter_name, task_id).float()).to(weight.dtype))

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
