"""Routing variants of the Poly / MHR papers: fixed-allocation routers and router sharing.

Ponti et al. 2022 ("Combining Modular Skills in Multitask Learning", arXiv 2202.13914) compare learned
routing with two baselines, *private* (one skill per task: independent LoRAs) and *shared* (one skill for
every task: plain multi-task LoRA); Caccia et al. 2022 ("Multi-Head Adapter Routing for Cross-Task
Generalization", arXiv 2211.03831) also study where routers live. This module provides:

* :class:`FixedRouter` -- a router whose task x skill allocation is given, not learned
  (``poly_type="private" | "shared" | "fixed"``);
* :func:`router_groups` / :func:`build_routers` -- one router per adapted module, per transformer block or
  for the whole model (``router_granularity``), shared between the layers of a group;
* :func:`check_tied_router_tensors` -- on load, the copies of a shared router saved under every layer's key
  must agree.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .checkpoint import KEY_PREFIX
from .config import PolyConfig
from .router import PolyRouter
from .routing import RoutingState, with_unknown_rows

Router = Union[PolyRouter, "FixedRouter"]

_NUMERIC = re.compile(r"^\d+$")


class FixedRouter(nn.Module):
    """A router with a fixed task x skill allocation (no trainable parameters).

    Holds the normalised allocation ``weights`` of shape ``(n_tasks, n_splits, n_skills)`` as a non-persistent
    buffer (it is rebuilt from the config, so checkpoints hold no router tensor). For task ids ``t`` (shape
    ``(n,)``) both training and eval return ``weights[t]``, shape ``(n, n_splits, n_skills)``; each split's
    weights sum to 1.

    Args:
        allocation: ``(n_tasks, n_skills)`` non-negative matrix, rows with positive sums; every split uses
            ``allocation[t] / allocation[t].sum()``.
        n_splits: number of MHR splits.
        kind: the ``poly_type`` it implements (``"private"``, ``"shared"`` or ``"fixed"``), for ``repr``.
    """

    def __init__(self, allocation: torch.Tensor, n_splits: int = 1, kind: str = "fixed") -> None:
        super().__init__()
        allocation = torch.as_tensor(allocation, dtype=torch.float32)
        if allocation.dim() != 2:
            raise ValueError(f"allocation must be a (n_tasks, n_skills) matrix, got shape {tuple(allocation.shape)}")
        if bool((allocation < 0).any()) or bool((allocation.sum(-1) <= 0).any()):
            raise ValueError("allocation must be non-negative with a positive sum in every row")
        self.n_tasks, self.n_skills = allocation.shape
        self.n_splits = n_splits
        self.kind = kind
        #: route ids equal to ``UNKNOWN_TASK`` to the average of the skills (``unknown_task="average"``)
        self.unknown_rows = False
        rows = allocation / allocation.sum(dim=-1, keepdim=True)
        self.register_buffer("weights", rows[:, None, :].expand(-1, n_splits, -1).contiguous(), persistent=False)

    @classmethod
    def from_config(cls, config: PolyConfig) -> "FixedRouter":
        """The router of a ``private`` / ``shared`` / ``fixed`` config."""
        if config.poly_type == "private":
            allocation = torch.eye(config.n_tasks)
        elif config.poly_type == "shared":
            allocation = torch.ones(config.n_tasks, 1)
        elif config.poly_type == "fixed":
            allocation = torch.tensor(config.allocation, dtype=torch.float32)
        else:
            raise ValueError(f"poly_type {config.poly_type!r} has a learned router, not a fixed one")
        return cls(allocation, config.n_splits, config.poly_type)

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        """Routing weights for ``task_ids`` (LongTensor ``(n,)``) -> ``(n, n_splits, n_skills)``.

        Ids equal to :data:`~polytropon.routing.UNKNOWN_TASK` get uniform weights (the average of the skills).
        """
        return self.eval_weights(task_ids)

    def eval_weights(self, task_ids: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`forward`: the allocation does not depend on the mode."""
        rows = lambda ids: self.weights[ids.to(self.weights.device)]  # noqa: E731
        if self.unknown_rows:
            return with_unknown_rows(rows, task_ids, self.n_splits, self.n_skills)
        return rows(task_ids)

    def reset(self) -> None:
        """Nothing to draw: the allocation is fixed."""

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, n_tasks={self.n_tasks}, n_skills={self.n_skills}, n_splits={self.n_splits}"


def block_of(path: str) -> Optional[str]:
    """The transformer block a module belongs to: its path up to the first numeric component.

    ``model.layers.3.self_attn.q_proj`` -> ``model.layers.3``; ``transformer.h.0.attn.c_attn`` ->
    ``transformer.h.0``; ``encoder.block.1.layer.0.SelfAttention.q`` -> ``encoder.block.1`` (encoder and
    decoder blocks are distinct). ``None`` for a module outside any numbered block (e.g. ``lm_head``).
    """
    parts = path.split(".")
    for i, part in enumerate(parts):
        if _NUMERIC.match(part):
            return ".".join(parts[: i + 1])
    return None


def router_groups(paths: Sequence[str], granularity: str) -> dict[str, str]:
    """Map every adapted module path to the key of the router it uses.

    ``"module"``: each path is its own group. ``"block"``: paths of one transformer block (see
    :func:`block_of`) share a group; a module outside any block keeps its own. ``"model"``: one group.
    """
    if granularity == "module":
        return {p: p for p in paths}
    if granularity == "block":
        return {p: block_of(p) or p for p in paths}
    if granularity == "model":
        return {p: "<model>" for p in paths}
    raise ValueError(f"router_granularity must be 'module', 'block' or 'model', got {granularity!r}")


def new_router(config: PolyConfig) -> Router:
    """A fresh router for ``config``; a learned router's logits are left undrawn (call ``reset()``)."""
    if config.poly_type == "poly":
        router: Router = PolyRouter(
            config.n_tasks, config.n_skills, config.n_splits, reset=False,
            temperature=config.router_temperature, hard=config.hard_routing,
        )
    else:
        router = FixedRouter.from_config(config)
    router.unknown_rows = config.unknown_task == "average"
    return router


def build_routers(
    config: PolyConfig, paths: Sequence[str], state: Optional[RoutingState] = None
) -> dict[str, tuple[Router, bool]]:
    """One router per group of ``paths`` (see :func:`router_groups`).

    Every learned router gets ``routing_state = state`` (the model's); one shared by several layers also gets
    ``shared = True``, so that it is computed once per call.

    Returns:
        path -> ``(router, first)``, where ``first`` is ``True`` for the first path of its group: the caller
        draws the router's initial logits right after building that layer's skills, so that with
        ``router_granularity="module"`` random numbers are drawn in PEFT's order.
    """
    groups = router_groups(paths, config.router_granularity)
    routers: dict[str, Router] = {}
    out: dict[str, tuple[Router, bool]] = {}
    for path in paths:
        key = groups[path]
        first = key not in routers
        if first:
            routers[key] = new_router(config)
        out[path] = (routers[key], first)
    counts: dict[str, int] = {}
    for key in groups.values():
        counts[key] = counts.get(key, 0) + 1
    for key, router in routers.items():
        if isinstance(router, PolyRouter):
            # layers sharing a learned router compute its weights once per call (see PolyRouter._per_call);
            # the others find their training samples drawn for the whole model (RoutingState.presampled)
            router.shared, router.routing_state = counts[key] > 1, state
    return out


def router_key(path: str) -> str:
    """Checkpoint key of a layer's learned router logits (PEFT's name)."""
    return f"{KEY_PREFIX}{path}.poly_router.module_logits"


def check_tied_router_tensors(
    config: PolyConfig, paths: Sequence[str], tensors: Mapping[str, torch.Tensor], source: str = "<checkpoint>"
) -> None:
    """Check that the per-layer copies of every shared router in a checkpoint are identical.

    A shared router is written once per layer (so PEFT can read the file); loading a file whose copies
    differ (e.g. trained by PEFT with one router per module) into a shared router would silently keep one
    of them, so it is refused.

    Raises:
        ValueError: naming two keys of one group whose tensors differ.
    """
    if config.poly_type != "poly" or config.router_granularity == "module":
        return
    first: dict[str, str] = {}
    for path, group in router_groups(paths, config.router_granularity).items():
        key = router_key(path)
        if group not in first:
            first[group] = key
        elif not torch.equal(tensors[first[group]], tensors[key]):
            raise ValueError(
                f"{source}: router_granularity={config.router_granularity!r} shares one router between "
                f"{first[group]!r} and {key!r}, but the checkpoint holds different values for them"
            )


def unique_routers(routers: Sequence[nn.Module]) -> list[nn.Module]:
    """``routers`` without repeats (shared routers once), in first-seen order."""
    seen: set[int] = set()
    out = []
    for router in routers:
        if id(router) not in seen:
            seen.add(id(router))
            out.append(router)
    return out


@torch.no_grad()
def eval_routing_weights(
    adapters: Sequence[tuple[str, nn.Module]], n_tasks: int, task: Optional[int] = None
) -> dict[str, torch.Tensor]:
    """Eval routing weights of every ``(layer path, PolyAdapter)``: layer path -> float32 CPU tensor.

    ``(n_tasks, n_splits, n_skills)``, or ``(n_splits, n_skills)`` for one ``task`` (an id already checked); each
    split's weights sum to 1. A router shared by several layers is computed once; they return the same tensor.
    """
    ids = torch.arange(n_tasks)
    computed: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for path, adapter in adapters:
        router = adapter.poly_router
        if id(router) not in computed:
            device = next(iter([*router.parameters(), *router.buffers()]), ids).device
            computed[id(router)] = router.eval_weights(ids.to(device)).float().cpu()
        out[path] = computed[id(router)] if task is None else computed[id(router)][task]
    return out
