"""Read-outs of the learned routing: per-layer weights, task x skill allocation matrices, task similarity.

Ponti et al. 2022 (arXiv 2202.13914) and Caccia et al. 2022 (arXiv 2211.03831) read the learned
allocation as an account of which tasks share which skills, and cluster tasks by it. All read-outs use the
deterministic eval weights (``router.eval_weights``: ``sigmoid(logits)`` normalised per split, or the
binary modes for hard routing, or the fixed allocation), whatever the model's train/eval mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Union

import torch

from .tasks import _adapter_name, adapters_of, task_index, task_names_of
from .variants import unique_routers

if TYPE_CHECKING:  # pragma: no cover
    from .model import PolyModel


@torch.no_grad()
def routing_weights(
    model: "PolyModel", task: Optional[Union[int, str]] = None, adapter_name: Optional[str] = None
) -> dict[str, torch.Tensor]:
    """Eval routing weights of every adapted layer.

    Args:
        model: the :class:`~polytropon.model.PolyModel`.
        task: a task id or name: return that task's weights only.
        adapter_name: the adapter to read (default: active).

    Returns:
        layer path -> float32 CPU tensor of shape ``(n_tasks, n_splits, n_skills)`` (or ``(n_splits, n_skills)``
        for one ``task``); each split's weights sum to 1. Layers sharing a router return equal tensors.

    Raises:
        ValueError / TypeError: unknown adapter or task.
    """
    adapter_name = _adapter_name(model, adapter_name)
    config = model.peft_config[adapter_name]
    if task is not None:
        ids = torch.tensor([model._resolve_task_id(task, adapter_name)])
    else:
        ids = torch.arange(config.n_tasks)
    out: dict[str, torch.Tensor] = {}
    computed: dict[int, torch.Tensor] = {}
    for path, adapter in adapters_of(model, adapter_name):
        router = adapter.poly_router
        if id(router) not in computed:
            computed[id(router)] = router.eval_weights(ids).float().cpu()
        weights = computed[id(router)]
        out[path] = weights[0] if task is not None else weights
    return out


def _router_weights(model: "PolyModel", adapter_name: str) -> list[torch.Tensor]:
    """``(n_tasks, n_splits, n_skills)`` eval weights of every distinct router of the adapter."""
    config = model.peft_config[adapter_name]
    ids = torch.arange(config.n_tasks)
    routers = unique_routers([a.poly_router for _, a in adapters_of(model, adapter_name)])
    with torch.no_grad():
        return [r.eval_weights(ids).float().cpu() for r in routers]


def allocation_matrix(
    model: "PolyModel", adapter_name: Optional[str] = None, layer: Optional[str] = None
) -> torch.Tensor:
    """The task x skill allocation matrix, ``(n_tasks, n_skills)``; each row sums to 1.

    ``M[t, s]`` is the weight task ``t`` gives skill ``s``, averaged over MHR splits and, unless ``layer``
    names one adapted layer, over the adapter's distinct routers (a router shared by several layers counts
    once).

    Raises:
        ValueError: unknown adapter, or ``layer`` is not an adapted layer of it.
    """
    adapter_name = _adapter_name(model, adapter_name)
    if layer is not None:
        per_layer = routing_weights(model, adapter_name=adapter_name)
        if layer not in per_layer:
            raise ValueError(f"layer {layer!r} carries no adapter {adapter_name!r}; adapted layers: {sorted(per_layer)}")
        return per_layer[layer].mean(dim=1)
    return torch.stack([w.mean(dim=1) for w in _router_weights(model, adapter_name)]).mean(dim=0)


def task_similarity(
    model_or_features: Union["PolyModel", torch.Tensor], adapter_name: Optional[str] = None
) -> torch.Tensor:
    """Cosine similarity of tasks' routing, ``(n_tasks, n_tasks)``, in ``[0, 1]`` for routing weights.

    A task's feature vector is the concatenation of its eval weights over every distinct router and split
    (``n_routers * n_splits * n_skills`` numbers), so two tasks are similar when they use the same skills in
    the same layers. ``model_or_features`` may also be any ``(n_tasks, d)`` matrix (e.g. an
    :func:`allocation_matrix`).

    ``S[i, j] = <f_i, f_j> / (|f_i| |f_j|)``.
    """
    if isinstance(model_or_features, torch.Tensor):
        features = model_or_features.detach().float().cpu()
        if features.dim() != 2:
            raise ValueError(f"features must be a (n_tasks, d) matrix, got shape {tuple(features.shape)}")
    else:
        adapter_name = _adapter_name(model_or_features, adapter_name)
        weights = _router_weights(model_or_features, adapter_name)
        features = torch.cat([w.flatten(1) for w in weights], dim=1)
    unit = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (unit @ unit.T).clamp(-1.0, 1.0)


def task_labels(model: "PolyModel", adapter_name: Optional[str] = None) -> list[str]:
    """The adapter's task names, or ``"task 0"``, ``"task 1"``, ... when it has none."""
    return task_names_of(model.peft_config[_adapter_name(model, adapter_name)])


__all__ = ["routing_weights", "allocation_matrix", "task_similarity", "task_labels", "task_index"]
