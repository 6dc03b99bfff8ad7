"""Task -> skill routers."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .routing import RoutingState, in_backward, with_unknown_rows

#: Added to the per-split sum of routing weights before normalising (as PEFT and the papers' code do).
EPS = 1e-12


def relaxed_bernoulli_rsample(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """One reparameterised sample of ``RelaxedBernoulli(temperature, logits=logits)``, shaped like ``logits``.

    The same operations, in the same order and with the same single ``torch.rand`` draw, as
    ``torch.distributions.RelaxedBernoulli(temperature, logits=logits).rsample()``, so the sample (and its
    gradient) is bit-identical under the same seed, without building a distribution object and validating
    its arguments in every adapted layer of every training step::

        p = clamp(sigmoid(logits), eps, 1 - eps)
        u = clamp(U(0, 1), eps, 1 - eps)
        y = clamp(sigmoid((log u - log(1 - u) + log p - log(1 - p)) / temperature), tiny, 1 - eps)
    """
    finfo = torch.finfo(logits.dtype)
    probs = torch.sigmoid(logits).clamp(min=finfo.eps, max=1 - finfo.eps)
    uniforms = torch.rand(logits.shape, dtype=logits.dtype, device=logits.device).clamp(min=finfo.eps, max=1 - finfo.eps)
    noisy = (uniforms.log() - (-uniforms).log1p() + probs.log() - (-probs).log1p()) / temperature
    return torch.sigmoid(noisy).clamp(min=finfo.tiny, max=1.0 - finfo.eps)


class _SampledRouting(torch.autograd.Function):
    """Training routing weights of ``m`` routers in one autograd node: gather, relaxed-Bernoulli sample, normalise.

    Inputs: ``task_ids (n,)`` and the ``m`` routers' logits, each ``(n_tasks, q * s)``. Outputs: ``m`` weight
    tensors ``(n, q, s)``. Per router, the values equal ``relaxed_bernoulli_rsample`` followed by the per-split
    normalisation: one ``torch.rand`` of shape ``(m, n, q, s)`` gives the numbers that ``m`` consecutive
    per-router draws give, and the elementwise ops are the same (they may round differently in the last bit,
    as torch's vectorised and scalar kernels do on tensors of different lengths)::

        z = logits[task_ids].view(n, q, s)
        p = clamp(sigmoid(z), eps, 1 - eps)
        y = clamp(sigmoid(v), tiny, 1 - eps),   v = (log u - log(1 - u) + log p - log(1 - p)) / temperature
        w = y / S,                              S = sum_s y + EPS

    Backward, for ``g = dL/dw`` (each clamp passes the gradient where its input lies inside its bounds)::

        dy = (g - sum_s g * w) / S
        dv = dy * sigmoid(v) * (1 - sigmoid(v))
        dz = dv / temperature * (1 / p + 1 / (1 - p)) * sigmoid(z) * (1 - sigmoid(z))
        dlogits = zeros.index_add(0, task_ids, dz.view(n, q * s))

    A sample per layer costs a dozen tiny ops plus autograd's bookkeeping for each; done for all the layers of
    a model at once (:func:`presample`) it costs that once. The intermediates are kept on ``ctx`` rather than
    saved with ``save_for_backward`` so that the node can be traversed by several backward passes (reentrant
    activation checkpointing runs one per checkpointed segment); none of them is an input or an output.
    """

    @staticmethod
    def forward(ctx, task_ids, n_splits: int, n_skills: int, temperature: float, *logits):
        stacked = logits[0].unsqueeze(0) if len(logits) == 1 else torch.stack(logits)  # (m, n_tasks, q * s)
        finfo = torch.finfo(stacked.dtype)
        sig_z = torch.sigmoid(stacked.index_select(1, task_ids).view(len(logits), -1, n_splits, n_skills))
        probs = sig_z.clamp(min=finfo.eps, max=1 - finfo.eps)
        uniforms = torch.rand(sig_z.shape, dtype=sig_z.dtype, device=sig_z.device).clamp_(min=finfo.eps, max=1 - finfo.eps)
        noisy = uniforms.log().sub_((-uniforms).log1p_()).add_(probs.log()).sub_((-probs).log1p()).div_(temperature)
        sig_v = torch.sigmoid(noisy)
        sample = sig_v.clamp(min=finfo.tiny, max=1.0 - finfo.eps)
        total = sample.sum(dim=-1, keepdim=True).add_(EPS)
        weights = sample.div_(total)
        ctx.task_ids, ctx.sig_z, ctx.probs, ctx.sig_v, ctx.total = task_ids, sig_z, probs, sig_v, total
        ctx.n_tasks, ctx.temperature = stacked.shape[1], temperature
        return weights.unbind(0)

    @staticmethod
    def backward(ctx, *grads):
        sig_z, probs, sig_v, total = ctx.sig_z, ctx.probs, ctx.sig_v, ctx.total
        finfo = torch.finfo(sig_z.dtype)
        grad = torch.stack(grads)  # (m, n, q, s)
        weights = sig_v.clamp(min=finfo.tiny, max=1.0 - finfo.eps).div_(total)
        grad_sample = (grad - (grad * weights).sum(dim=-1, keepdim=True)).div_(total)
        grad_sample.masked_fill_((sig_v < finfo.tiny) | (sig_v > 1.0 - finfo.eps), 0.0)
        grad_noisy = grad_sample.mul_(sig_v * (1 - sig_v)).div_(ctx.temperature)
        grad_probs = grad_noisy * probs.reciprocal() + grad_noisy * (1 - probs).reciprocal()
        grad_probs.masked_fill_((sig_z < finfo.eps) | (sig_z > 1 - finfo.eps), 0.0)
        grad_z = grad_probs.mul_(sig_z * (1 - sig_z)).reshape(grad.shape[0], grad.shape[1], -1)
        grad_logits = grad_z.new_zeros(grad.shape[0], ctx.n_tasks, grad_z.shape[-1]).index_add_(1, ctx.task_ids, grad_z)
        return (None, None, None, None) + tuple(g.clone() for g in grad_logits.unbind(0))


def presample(routers: Sequence["PolyRouter"], task_ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Training samples of many routers at once: ``{id(router): weights (n, n_splits, n_skills)}``.

    Routers with the same shapes, temperature, dtype and device share one :class:`_SampledRouting` call; the
    random numbers are drawn in the order of ``routers``. Only soft routers are accepted (hard routing keeps
    its per-layer path).
    """
    groups: dict[tuple, list[PolyRouter]] = {}
    for router in routers:
        logits = router.module_logits
        key = (logits.shape, router.n_splits, router.n_skills, router.temperature, logits.dtype, logits.device)
        groups.setdefault(key, []).append(router)
    out: dict[int, torch.Tensor] = {}
    for (_, n_splits, n_skills, temperature, _, device), group in groups.items():
        ids = task_ids.to(device)
        weights = _SampledRouting.apply(ids, n_splits, n_skills, temperature, *(r.module_logits for r in group))
        out.update((id(router), w) for router, w in zip(group, weights))
    return out


class PolyRouter(nn.Module):
    """Learned task -> skill allocation of one adapted layer (Ponti et al. 2022; Caccia et al. 2022).

    Holds ``module_logits`` of shape ``(n_tasks, n_splits * n_skills)``, initialised uniform(-1e-3, 1e-3).
    For task ids ``t`` (shape ``(n,)``) it returns routing weights ``w`` of shape ``(n, n_splits, n_skills)``::

        z = logits[t].view(n, n_splits, n_skills)
        p = RelaxedBernoulli(temperature, logits=z).rsample()     # training (one sample per row)
        p = sigmoid(z)                                            # eval
        w = p / (p.sum(-1, keepdim=True) + EPS)                   # each split's weights sum to 1

    With ``hard=True`` the forward pass uses a binary allocation instead (Ponti et al. 2022: a task's
    module is the average of its active skills)::

        h = 1[p >= 0.5]                                           # 0/1, shape (n, n_splits, n_skills)
        h[argmax p] = 1 where a split has no active skill          # every task keeps at least one skill
        w = h / h.sum(-1) + (soft - soft.detach())                # straight-through: value h/|h|, gradient of soft

    where ``soft = p / (p.sum(-1) + EPS)``: the forward value is exactly ``h / h.sum(-1)`` and the gradient is
    the soft weights' gradient.

    Args:
        n_tasks: number of tasks (rows).
        n_skills: number of skills per split.
        n_splits: number of splits (MHR heads); 1 for Poly.
        reset: draw the initial logits now (``False`` leaves them for the owner to draw with :meth:`reset`).
        temperature: relaxed-Bernoulli temperature used in training (positive).
        hard: binary forward allocation with straight-through gradients.
    """

    def __init__(
        self,
        n_tasks: int,
        n_skills: int,
        n_splits: int = 1,
        reset: bool = True,
        temperature: float = 1.0,
        hard: bool = False,
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"PolyRouter temperature must be positive, got {temperature}")
        self.n_tasks = n_tasks
        self.n_skills = n_skills
        self.n_splits = n_splits
        self.temperature = float(temperature)
        self.hard = bool(hard)
        #: set by :func:`polytropon.variants.build_routers` when several layers share this router, with the
        #: model's routing state (whose per-call store caches the shared weights)
        self.shared = False
        self.routing_state: Optional[RoutingState] = None
        #: route ids equal to ``UNKNOWN_TASK`` to the average of the skills (``unknown_task="average"``)
        self.unknown_rows = False
        self.module_logits = nn.Parameter(torch.empty(n_tasks, n_splits * n_skills))
        if reset:
            self.reset()

    def reset(self) -> None:
        """Re-draw the logits from uniform(-1e-3, 1e-3)."""
        with torch.no_grad():
            nn.init.uniform_(self.module_logits, -1e-3, 1e-3)

    def _logits(self, task_ids: torch.Tensor) -> torch.Tensor:
        logits = self.module_logits[task_ids.to(self.module_logits.device)]
        return logits.view(-1, self.n_splits, self.n_skills)

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        """Routing weights for ``task_ids`` (LongTensor ``(n,)``) -> ``(n, n_splits, n_skills)``.

        Ids equal to :data:`~polytropon.routing.UNKNOWN_TASK` get uniform weights (the average of the skills).
        """
        if not self.training:
            return self.eval_weights(task_ids)
        return self._per_call("sample", task_ids, self._sample)

    def eval_weights(self, task_ids: torch.Tensor) -> torch.Tensor:
        """The deterministic (eval) routing weights, whatever the mode: ``(n, n_splits, n_skills)``.

        Soft routing: ``sigmoid(z)`` normalised per split. Hard routing: the Bernoulli modes
        ``1[sigmoid(z) >= 0.5]`` (at least one skill per split), averaged.
        """
        return self._per_call("eval", task_ids, self._eval)

    @property
    def batchable(self) -> bool:
        """Whether :func:`presample` may draw this router's training samples together with other layers'."""
        return type(self) is PolyRouter and self.training and not (self.shared or self.hard or self.unknown_rows)

    def _sample(self, task_ids: torch.Tensor) -> torch.Tensor:
        state = self.routing_state
        if state is not None:
            presampled = state.presampled(self, task_ids)
            if presampled is not None:
                return presampled
        if not self.hard:
            ids = task_ids.to(self.module_logits.device)
            return _SampledRouting.apply(ids, self.n_splits, self.n_skills, self.temperature, self.module_logits)[0]
        probs = relaxed_bernoulli_rsample(self._logits(task_ids), self.temperature)
        return self._normalise(probs)

    def traced_sample(self, task_ids: torch.Tensor) -> torch.Tensor:
        """Training weights for ``task_ids`` ``(n,)`` in plain differentiable ops -> ``(n, n_splits, n_skills)``.

        ``w = normalise(RelaxedBernoulli(T, logits=z).rsample())`` (with ``hard``, the binary allocation carrying
        the soft weights' gradient), the values :meth:`forward` samples, without its custom autograd node and
        per-call cache: what a model traced by ``torch.compile`` draws once per call for each router.
        """
        return self._normalise(relaxed_bernoulli_rsample(self._logits(task_ids), self.temperature))

    def _eval(self, task_ids: torch.Tensor) -> torch.Tensor:
        return self._normalise(torch.sigmoid(self._logits(task_ids)))

    def _per_call(self, kind: str, task_ids: torch.Tensor, compute) -> torch.Tensor:
        """``compute(task_ids)`` (unknown-task rows uniform), computed once per call for a shared router.

        A router shared by several layers (``shared = True``, ``router_granularity`` "block"/"model") is
        given the very same task-id tensor by all its layers during one model call (the call's
        :class:`~polytropon.routing.BatchRouting`); the result is kept in the call's
        scratch space (``RoutingState.call_store()``), which lives for that call only. So the layers of a group share one
        computation and, in training, one relaxed-Bernoulli sample per example. A router of a single layer
        computes at every call, as in PEFT.
        """
        state = self.routing_state
        if self.shared and state is not None and state.task_ids is None and in_backward():
            # activation checkpointing re-running layers in backward(): the call's shared computation is gone,
            # so the recomputed layers would each recompute (or re-sample) the weights -- not what the forward
            # pass did, and torch's checkpoint would fail on the mismatch or, with sampling, get wrong gradients
            raise RuntimeError(
                "activation (gradient) checkpointing is not supported with a router shared by several layers "
                "(router_granularity='block' or 'model'): use router_granularity='module', or disable checkpointing"
            )
        store = None if not self.shared or state is None or torch.compiler.is_compiling() else state.call_store()
        if store is None:
            # (traced by torch.compile: eval weights are recomputed per layer, the same values; training
            # samples of shared routers are drawn once per call by PolyModel.forward, found by presampled())
            return self._compute(compute, task_ids)
        key = (id(self), kind, id(task_ids), torch.is_grad_enabled())
        entry = store.get(key)
        if entry is not None and entry[0] is task_ids:
            return entry[1]
        out = self._compute(compute, task_ids)
        store[key] = (task_ids, out)  # holding task_ids keeps its id unique during the call
        return out

    def _compute(self, compute, task_ids: torch.Tensor) -> torch.Tensor:
        # looking for unknown-task ids costs a device sync: only adapters with unknown_task="average" do
        if self.unknown_rows:
            return with_unknown_rows(compute, task_ids, self.n_splits, self.n_skills)
        return compute(task_ids)

    def _normalise(self, probs: torch.Tensor) -> torch.Tensor:
        soft = probs / (probs.sum(dim=-1, keepdim=True) + EPS)
        if not self.hard:
            return soft
        with torch.no_grad():
            mask = probs >= 0.5
            empty = ~mask.any(dim=-1, keepdim=True)
            top = torch.zeros_like(mask).scatter_(-1, probs.argmax(dim=-1, keepdim=True), True)
            mask = mask | (empty & top)
            hard = mask.to(probs.dtype)
            hard = hard / hard.sum(dim=-1, keepdim=True)
        return hard + (soft - soft.detach())

    def extra_repr(self) -> str:
        extra = f", temperature={self.temperature}" if self.temperature != 1.0 else ""
        extra += ", hard=True" if self.hard else ""
        return f"n_tasks={self.n_tasks}, n_skills={self.n_skills}, n_splits={self.n_splits}{extra}"
