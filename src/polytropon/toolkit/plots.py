"""PNG figures of the learned routing: the task x skill heatmap and the task hierarchy (dendrogram).

The papers' interpretability claim (Ponti et al. 2022, arXiv 2202.13914; Caccia et al. 2022,
arXiv 2211.03831) is that tasks that share skills are related; these plots show the allocation and the
hierarchical clustering of tasks by it. matplotlib (Agg backend, no display needed) and scipy are imported
only when a plot is drawn (``pip install polytropon[plot]``).

Every function takes a :class:`~polytropon.model.PolyModel` or a :class:`~polytropon.toolkit.analysis.RoutingSnapshot`
(:func:`~polytropon.toolkit.analysis.load_snapshot` reads one from a saved adapter, without the base model), and
returns the numbers it drew, so what is on the figure can be checked against the model.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

import numpy as np

from .analysis import RoutingSnapshot, as_snapshot, allocation_matrix, task_labels, task_similarity

if TYPE_CHECKING:  # pragma: no cover
    from ..model import PolyModel

PathLike = Union[str, "os.PathLike[str]"]
Source = Union["PolyModel", RoutingSnapshot]


@dataclass
class RoutingFigure:
    """What a routing figure shows.

    Attributes:
        path: the PNG written.
        allocation: ``(n_tasks, n_skills)`` allocation matrix drawn (rows in the model's task order).
        similarity: ``(n_tasks, n_tasks)`` cosine similarity of tasks' routing (``None`` for a heatmap only).
        linkage: scipy linkage matrix ``(n_tasks - 1, 4)`` of the dendrogram (``None`` for a heatmap only).
        order: task ids in the order drawn top to bottom / left to right.
        labels: task labels in the model's order.
    """

    path: str
    allocation: np.ndarray
    similarity: Optional[np.ndarray]
    linkage: Optional[np.ndarray]
    order: list[int]
    labels: list[str]


def _figure(width: float, height: float):
    """A matplotlib Figure drawn by the Agg canvas: no pyplot, no global backend change, no display."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - optional dependency
        raise ImportError("plots need matplotlib: pip install 'polytropon[plot]'") from None
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _check_path(path: PathLike) -> str:
    path = os.fspath(path)
    if not path.lower().endswith(".png"):
        raise ValueError(f"path must name a .png file, got {path!r}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such directory for {path!r}")
    return path


def _linkage(similarity: np.ndarray, method: str) -> np.ndarray:
    try:
        from scipy.cluster.hierarchy import linkage
        from scipy.spatial.distance import squareform
    except ImportError:  # pragma: no cover - optional dependency
        raise ImportError("the task hierarchy needs scipy: pip install 'polytropon[plot]'") from None
    distance = np.clip(1.0 - similarity, 0.0, None)
    distance = (distance + distance.T) / 2.0
    np.fill_diagonal(distance, 0.0)
    return linkage(squareform(distance, checks=False), method=method)


def _heatmap(ax, allocation: np.ndarray, labels: list[str], order: list[int], title: str):
    image = ax.imshow(allocation[order], aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
    ax.set_yticks(range(len(order)), [labels[i] for i in order])
    n_skills = allocation.shape[1]
    step = max(1, n_skills // 16)
    ax.set_xticks(range(0, n_skills, step), [str(s) for s in range(0, n_skills, step)])
    ax.set_xlabel("skill")
    ax.set_ylabel("task")
    ax.set_title(title)
    return image


def plot_allocation(
    model: Source,
    path: PathLike,
    adapter_name: Optional[str] = None,
    layer: Optional[str] = None,
    title: Optional[str] = None,
) -> RoutingFigure:
    """Write a heatmap of the task x skill allocation matrix (:func:`~polytropon.toolkit.analysis.allocation_matrix`).

    Args:
        model: a :class:`~polytropon.model.PolyModel` or a :class:`~polytropon.toolkit.analysis.RoutingSnapshot`.
        path: the ``.png`` file to write.
        adapter_name: the model's adapter to plot (default: active).
        layer: one adapted layer's allocation instead of the average over routers.
        title: figure title.
    """
    path = _check_path(path)
    snap = as_snapshot(model, adapter_name)
    allocation = allocation_matrix(snap, layer=layer).numpy()
    labels = task_labels(snap)
    order = list(range(allocation.shape[0]))
    fig = _figure(2.5 + 0.45 * allocation.shape[1], 1.5 + 0.35 * len(labels))
    ax = fig.subplots()
    image = _heatmap(ax, allocation, labels, order, title or ("allocation" + (f" of {layer}" if layer else "")))
    fig.colorbar(image, ax=ax, label="routing weight")
    fig.savefig(path, dpi=100)
    return RoutingFigure(path, allocation, None, None, order, labels)


def plot_task_hierarchy(
    model: Source,
    path: PathLike,
    adapter_name: Optional[str] = None,
    method: str = "average",
    title: Optional[str] = None,
) -> RoutingFigure:
    """Write the task hierarchy next to the allocation heatmap (rows in dendrogram order).

    Tasks are clustered hierarchically (scipy ``linkage`` with ``method``) on the distance
    ``1 - task_similarity`` (:func:`~polytropon.toolkit.analysis.task_similarity`: cosine similarity of the tasks'
    routing over all routers and splits).

    Raises:
        ValueError: fewer than 2 tasks, or a path that is not ``.png``.
    """
    path = _check_path(path)
    snap = as_snapshot(model, adapter_name)
    allocation = allocation_matrix(snap).numpy()
    labels = task_labels(snap)
    if len(labels) < 2:
        raise ValueError(f"a task hierarchy needs at least 2 tasks, the adapter has {len(labels)}")
    similarity = task_similarity(snap).double().numpy()
    links = _linkage(similarity, method)
    from scipy.cluster.hierarchy import dendrogram

    fig = _figure(5.0 + 0.45 * allocation.shape[1], 1.5 + 0.35 * len(labels))
    ax_tree, ax_map = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.0, max(1.0, 0.25 * allocation.shape[1])]})
    with warnings.catch_warnings():
        if not links[:, 2].max() > 0:  # every task routed alike: a flat tree, which scipy draws with an empty x-range
            warnings.filterwarnings("ignore", message="Attempting to set identical low and high xlims")
        tree = dendrogram(links, orientation="left", labels=labels, ax=ax_tree, no_labels=True, color_threshold=0)
    if not links[:, 2].max() > 0:
        ax_tree.set_xlim(1.0, 0.0)  # the distance axis's full range, with every merge at 0
    # the dendrogram lists its leaves bottom-up; heatmap rows are drawn top-down
    order = [int(i) for i in tree["leaves"]][::-1]
    ax_tree.set_xlabel("1 - cosine similarity")
    ax_tree.set_title("task hierarchy")
    image = _heatmap(ax_map, allocation, labels, order, title or "allocation")
    fig.colorbar(image, ax=ax_map, label="routing weight")
    fig.savefig(path, dpi=100)
    return RoutingFigure(path, allocation, similarity, links, order, labels)


def plot_routing(
    model: Union[Source, PathLike], directory: PathLike, adapter_name: Optional[str] = None
) -> dict[str, RoutingFigure]:
    """Write ``allocation.png`` and (with at least 2 tasks) ``task_hierarchy.png`` into ``directory``.

    ``model`` may also be a saved adapter's directory (read with :func:`~polytropon.toolkit.analysis.load_snapshot`).
    """
    from .analysis import load_snapshot

    if isinstance(model, (str, os.PathLike)):
        model = load_snapshot(model)
    snap = as_snapshot(model, adapter_name)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    figures = {"allocation": plot_allocation(snap, os.path.join(directory, "allocation.png"))}
    if len(snap.task_names) >= 2:
        figures["task_hierarchy"] = plot_task_hierarchy(snap, os.path.join(directory, "task_hierarchy.png"))
    return figures
