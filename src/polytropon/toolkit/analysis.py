"""Read-outs of the learned routing: per-layer weights, task x skill allocation matrices, task similarity.

Ponti et al. 2022 (arXiv 2202.13914) and Caccia et al. 2022 (arXiv 2211.03831) read the learned
allocation as an account of which tasks share which skills, and cluster tasks by it. All read-outs use the
deterministic eval weights (``router.eval_weights``: ``sigmoid(logits)`` normalised per split, or the
binary modes for hard routing, or the fixed allocation), whatever the model's train/eval mode.

The read-outs take a :class:`~polytropon.model.PolyModel` or a :class:`RoutingSnapshot`; :func:`load_snapshot`
builds one from a saved adapter directory alone, without the base model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

import torch

from ..tasks import task_index, task_names_of

if TYPE_CHECKING:  # pragma: no cover
    from ..config import PolyConfig
    from ..model import PolyModel


@dataclass
class RoutingSnapshot:
    """The eval routing of one adapter, detached from any model.

    Attributes:
        weights: layer path -> float32 CPU tensor ``(n_tasks, n_splits, n_skills)``; each split sums to 1.
        router_of: layer path -> key of the router it uses (layers sharing a router share the key).
        task_names: the tasks' names, or ``"task 0"``, ``"task 1"``, ... when the adapter has none.
        config: the adapter's config.
    """

    weights: dict[str, torch.Tensor]
    router_of: dict[str, str]
    task_names: list[str]
    config: "PolyConfig"

    def per_router(self) -> list[torch.Tensor]:
        """One ``(n_tasks, n_splits, n_skills)`` tensor per distinct router, in layer order."""
        seen: dict[str, torch.Tensor] = {}
        for path, weights in self.weights.items():
            seen.setdefault(self.router_of[path], weights)
        return list(seen.values())


@torch.no_grad()
def snapshot(model: "PolyModel", adapter_name: Optional[str] = None) -> RoutingSnapshot:
    """The eval routing of an adapter of ``model`` (default: the active one)."""
    adapter_name = model.resolve_adapter(adapter_name)
    router_of = {path: f"router-{id(adapter.poly_router)}" for path, adapter in model.named_adapters(adapter_name)}
    weights = model.routing_weights(adapter_name=adapter_name)
    return RoutingSnapshot(weights, router_of, task_names_of(model.peft_config[adapter_name]), model.peft_config[adapter_name])


@torch.no_grad()
def load_snapshot(directory: Union[str, "os.PathLike[str]"]) -> RoutingSnapshot:
    """The eval routing of a saved adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

    Reads the router logits (or, for fixed-allocation variants, the config's allocation) straight from the
    files: no base model is needed. Works for checkpoints written by PEFT too.

    Raises:
        FileNotFoundError, ValueError: missing or unreadable files, or no Poly layer in the weights.
    """
    from ..checkpoint import KEY_PREFIX, load_tensors
    from ..config import PolyConfig
    from ..variants import new_router, router_groups, router_key

    directory = os.fspath(directory)
    config = PolyConfig.from_pretrained(directory)
    path, tensors = load_tensors(directory)
    suffix = ".poly_lora_A"
    layers = [k[len(KEY_PREFIX) : -len(suffix)] for k in tensors if k.startswith(KEY_PREFIX) and k.endswith(suffix)]
    if not layers:
        raise ValueError(f"{path}: no Poly layer (no '*{suffix}' tensor) in the checkpoint")
    groups = router_groups(layers, config.router_granularity)
    ids = torch.arange(config.n_tasks)
    weights: dict[str, torch.Tensor] = {}
    for layer in layers:
        router = new_router(config)
        if config.poly_type == "poly":
            key = router_key(layer)
            if key not in tensors:
                raise ValueError(f"{path}: missing router tensor {key!r}")
            logits = tensors[key].float()
            if tuple(logits.shape) != tuple(router.module_logits.shape):
                raise ValueError(
                    f"{path}: tensor {key!r} has shape {tuple(logits.shape)}, the config implies "
                    f"{tuple(router.module_logits.shape)}"
                )
            router.module_logits.copy_(logits)
        weights[layer] = router.eval_weights(ids).float()
    return RoutingSnapshot(weights, groups, task_names_of(config), config)


Source = Union["PolyModel", RoutingSnapshot]


def as_snapshot(source: Source, adapter_name: Optional[str] = None) -> RoutingSnapshot:
    """``source`` itself if it is a :class:`RoutingSnapshot`, else the :func:`snapshot` of the model's adapter.

    Raises:
        TypeError: ``source`` is neither a PolyModel nor a RoutingSnapshot.
    """
    if isinstance(source, RoutingSnapshot):
        return source
    if not hasattr(source, "peft_config"):
        raise TypeError(f"expected a PolyModel or a RoutingSnapshot, got {type(source).__name__}")
    return snapshot(source, adapter_name)


def routing_weights(
    model: "PolyModel", task: Optional[Union[int, str]] = None, adapter_name: Optional[str] = None
) -> dict[str, torch.Tensor]:
    """Eval routing weights of every adapted layer: the function form of :meth:`PolyModel.routing_weights`.

    Returns:
        layer path -> float32 CPU tensor of shape ``(n_tasks, n_splits, n_skills)`` (or ``(n_splits, n_skills)``
        for one ``task``); each split's weights sum to 1. Layers sharing a router return equal tensors.

    Raises:
        ValueError / TypeError: unknown adapter or task.
    """
    return model.routing_weights(task, adapter_name)


def allocation_matrix(source: Source, adapter_name: Optional[str] = None, layer: Optional[str] = None) -> torch.Tensor:
    """The task x skill allocation matrix, ``(n_tasks, n_skills)``; each row sums to 1.

    ``M[t, s]`` is the weight task ``t`` gives skill ``s``, averaged over MHR splits and, unless ``layer``
    names one adapted layer, over the adapter's distinct routers (a router shared by several layers counts
    once).

    Args:
        source: a :class:`~polytropon.model.PolyModel` or a :class:`RoutingSnapshot` (e.g. :func:`load_snapshot`).
        adapter_name: the model's adapter to read (default: active); ignored for a snapshot.
        layer: one adapted layer's path.

    Raises:
        ValueError: unknown adapter, or ``layer`` is not an adapted layer of it.
    """
    snap = as_snapshot(source, adapter_name)
    if layer is not None:
        if layer not in snap.weights:
            raise ValueError(f"layer {layer!r} carries no adapter; adapted layers: {sorted(snap.weights)}")
        return snap.weights[layer].mean(dim=1)
    return torch.stack([w.mean(dim=1) for w in snap.per_router()]).mean(dim=0)


def task_similarity(source: Union[Source, torch.Tensor], adapter_name: Optional[str] = None) -> torch.Tensor:
    """Cosine similarity of tasks' routing, ``(n_tasks, n_tasks)``, in ``[0, 1]`` for routing weights.

    A task's feature vector is the concatenation of its eval weights over every distinct router and split
    (``n_routers * n_splits * n_skills`` numbers), so two tasks are similar when they use the same skills in
    the same layers. ``source`` may also be any ``(n_tasks, d)`` matrix (e.g. an :func:`allocation_matrix`).

    ``S[i, j] = <f_i, f_j> / (|f_i| |f_j|)``.
    """
    if isinstance(source, torch.Tensor):
        features = source.detach().float().cpu()
        if features.dim() != 2:
            raise ValueError(f"features must be a (n_tasks, d) matrix, got shape {tuple(features.shape)}")
    else:
        features = torch.cat([w.flatten(1) for w in as_snapshot(source, adapter_name).per_router()], dim=1)
    unit = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (unit @ unit.T).clamp(-1.0, 1.0)


def task_labels(source: Source, adapter_name: Optional[str] = None) -> list[str]:
    """The adapter's task names, or ``"task 0"``, ``"task 1"``, ... when it has none."""
    if isinstance(source, RoutingSnapshot):
        return list(source.task_names)
    return task_names_of(source.peft_config[source.resolve_adapter(adapter_name)])


__all__ = [
    "RoutingSnapshot", "snapshot", "as_snapshot", "load_snapshot", "routing_weights", "allocation_matrix", "task_similarity",
    "task_labels", "task_index",
]
