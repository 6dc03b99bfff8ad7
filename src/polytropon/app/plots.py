"""The CLI's routing figure: learned task x skill allocation, optionally beside a known structure.

The allocation matrix itself comes from :func:`polytropon.toolkit.analysis.allocation_matrix`; this module
only draws it (with the built-in suite's true task x attribute matrix as a second panel).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

__all__ = ["plot_routing_matrix"]


def plot_routing_matrix(
    matrix: np.ndarray,
    task_names: Sequence[str],
    path: str | os.PathLike[str],
    title: str = "learned routing (mean over layers and splits)",
    skill_names: Sequence[str] | None = None,
    reference: np.ndarray | None = None,
    reference_names: Sequence[str] | None = None,
    reference_title: str = "true task x attribute structure",
) -> str:
    """Save a task x skill heatmap of ``matrix`` as a PNG and return the path.

    With ``reference`` (a ``(n_tasks, n_attributes)`` matrix, e.g. the built-in suite's known
    structure) a second panel shows it beside the learned routing. Learned skills are unordered,
    so compare the patterns of rows, not columns.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_tasks, n_skills = matrix.shape
    if len(task_names) != n_tasks:
        raise ValueError(f"{len(task_names)} task names for {n_tasks} routing rows")
    if reference is not None and reference.shape[0] != n_tasks:
        raise ValueError(f"reference has {reference.shape[0]} rows for {n_tasks} tasks")
    panels = 1 if reference is None else 2
    width = 3.4 + 0.45 * n_skills + (0.45 * reference.shape[1] + 1.0 if reference is not None else 0.0)
    fig, axes = plt.subplots(1, panels, figsize=(width, 1.0 + 0.32 * n_tasks), squeeze=False)
    ax = axes[0][0]
    image = ax.imshow(matrix, aspect="auto", cmap="viridis")
    ax.set_yticks(range(n_tasks), labels=list(task_names), fontsize=8)
    labels = list(skill_names) if skill_names is not None else [f"s{i}" for i in range(n_skills)]
    ax.set_xticks(range(n_skills), labels=labels, fontsize=8, rotation=90)
    ax.set_xlabel("skill")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02, label="routing weight")
    if reference is not None:
        ref_ax = axes[0][1]
        ref_ax.imshow(reference, aspect="auto", cmap="Greys", vmin=0, vmax=1)
        ref_ax.set_yticks(range(n_tasks), labels=[])
        names = list(reference_names) if reference_names is not None else [str(i) for i in range(reference.shape[1])]
        ref_ax.set_xticks(range(reference.shape[1]), labels=names, fontsize=8, rotation=90)
        ref_ax.set_xlabel("attribute")
        ref_ax.set_title(reference_title, fontsize=9)
    fig.tight_layout()
    out = os.fspath(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
