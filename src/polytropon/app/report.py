"""What the verbs print and the metric summaries they write: per-task tables, means, the end of a run."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["MEAN_METRICS", "format_table", "means", "collapse_warning", "print_run_summary"]

#: The metrics whose unweighted mean over tasks goes into ``metrics.json`` and ``eval --json``.
MEAN_METRICS = ("accuracy", "exact_match", "loss")

PerTask = dict[str, dict[str, float]]


def format_table(tasks: Sequence[str], columns: Sequence[tuple[str, PerTask]], metric: str) -> str:
    """A plain-text per-task table of ``metric`` for each column, with a mean row.

    With exactly two columns (and a metric other than the loss) a ``delta`` column shows the second
    minus the first.
    """
    width = max([len("task"), len("mean")] + [len(t) for t in tasks])
    names = [name for name, _ in columns]
    head = f"{'task':<{width}}  {'n':>4}  " + "  ".join(f"{n:>10}" for n in names)
    lines = [head, "-" * len(head)]
    show_delta = len(columns) == 2 and metric != "loss"
    if show_delta:
        lines[0] += f"  {'delta':>7}"
        lines[1] = "-" * len(lines[0])
    for task in tasks:
        values = [col.get(task, {}).get(metric) for _, col in columns]
        n = next((int(col[task]["n"]) for _, col in columns if task in col), 0)
        lines.append(_table_row(task, width, f"{n:>4}", values, show_delta))
    lines.append("-" * len(lines[0]))
    column_means = []
    for _, col in columns:
        vals = [col[t][metric] for t in tasks if t in col and metric in col[t]]
        column_means.append(sum(vals) / len(vals) if vals else None)
    lines.append(_table_row("mean", width, f"{'':>4}", column_means, show_delta))
    return "\n".join(lines)


def _table_row(label: str, width: int, n_cell: str, values: list[float | None], show_delta: bool) -> str:
    cells = "  ".join(f"{v:>10.3f}" if v is not None else f"{'-':>10}" for v in values)
    line = f"{label:<{width}}  {n_cell}  {cells}"
    if show_delta and None not in values:
        line += f"  {values[1] - values[0]:>+7.3f}"
    return line


def means(per_task: PerTask) -> dict[str, float]:
    """``{metric: unweighted mean over tasks}`` for each of :data:`MEAN_METRICS` (NaN where no task has it)."""
    from .training import mean_metric

    return {m: mean_metric(per_task, m) for m in MEAN_METRICS}


def collapse_warning(name: str, collapsed: Sequence[str], n_tasks: int) -> str | None:
    """One warning line naming the tasks ``name`` answers the same way for every eval example, or ``None``.

    ``collapsed`` comes from :func:`polytropon.toolkit.diagnostics.collapsed_tasks`; ``n_tasks`` is the number
    of evaluated tasks.
    """
    if not collapsed:
        return None
    return (f"warning: {name} collapsed on {len(collapsed)} of {n_tasks} tasks (every eval example answered the "
            f"same): {', '.join(collapsed)}")


def print_run_summary(
    table: str,
    metric: str,
    n_eval: int,
    poly: PerTask,
    baselines: Sequence[tuple[str, PerTask]],
    paths: dict[str, str],
    seconds: dict[str, float],
    notes: Sequence[str] = (),
    quiet: bool = False,
    warnings: Sequence[str] = (),
) -> None:
    """The end of ``polytropon train``: the per-task table, the means (Poly's difference to each baseline),
    ``warnings`` (e.g. :func:`collapse_warning`; printed even with ``quiet``), ``notes`` (e.g. the routing
    recovery), where the outputs are, the time; with ``quiet`` the table (with its caption), the means and the
    warnings only.

    ``paths`` has ``adapter``, ``metrics`` and ``routing``; ``seconds`` has ``total`` and ``train``
    (and ``lora_train`` when a LoRA baseline trained).
    """
    from .training import mean_metric

    if not quiet:
        print()
    print(f"Per-task {metric} on held-out examples of the training tasks ({n_eval} examples):")
    print(table)
    if not quiet:
        print()
    p = mean_metric(poly, metric)
    parts = [f"{name} {mean_metric(per_task, metric):.3f}" for name, per_task in baselines] + [f"poly {p:.3f}"]
    gains = ", ".join(f"{p - mean_metric(per_task, metric):+.3f} vs {name}" for name, per_task in baselines)
    print(f"mean {metric}: " + "  ".join(parts) + (f"  ({gains})" if gains else ""))
    for warning in warnings:
        print(warning)
    if quiet:
        return
    for note in notes:
        print(note)
    print(f"adapter:  {paths['adapter']}")
    print(f"metrics:  {paths['metrics']}")
    print(f"routing:  {paths['routing']}")
    lora = f", LoRA baseline {seconds['lora_train']:.0f}s" if "lora_train" in seconds else ""
    print(f"time:     {seconds['total']:.0f}s (train {seconds['train']:.0f}s{lora})")
