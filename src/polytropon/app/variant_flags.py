"""The routing-variant flags of ``polytropon train``: which :class:`~polytropon.PolyConfig` variant, and the IBP prior.

* ``--poly-type poly`` learns the task x skill routing (Poly; MHR with ``--n-splits > 1``); ``private`` gives
  every task its own skill (``n_skills = n_tasks``), ``shared`` one skill for all tasks (a plain multi-task
  LoRA), ``fixed`` the allocation read from ``--allocation FILE`` (:func:`read_allocation`).
* ``--hard-routing``, ``--router-temperature``, ``--router-granularity``, ``--ibp-alpha`` / ``--ibp-weight``
  shape learned routing only; with a fixed-allocation ``--poly-type`` they are an error.
* ``--unknown-task average`` lets the saved adapter route tasks it does not know to the average of the skills.

:func:`check_variant_flags` rejects bad combinations from the flags alone, before any data or model is
read; :func:`variant_fields` turns the flags into ``PolyConfig`` fields once the tasks are known.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from .arguments import positive_float
from .console import CliError

__all__ = ["POLY_TYPES", "add_variant_arguments", "check_variant_flags", "read_allocation", "variant_fields"]

POLY_TYPES = ("poly", "private", "shared", "fixed")
#: Flags that shape learned routing; each is an error with a fixed allocation.
LEARNED_ONLY = {
    "hard_routing": "--hard-routing",
    "router_temperature": "--router-temperature",
    "router_granularity": "--router-granularity",
    "ibp_alpha": "--ibp-alpha",
}


def add_variant_arguments(poly: Any) -> None:
    """The variant flags, in the ``adapter (PolyConfig)`` group of ``train``."""
    poly.add_argument("--poly-type", default="poly", choices=POLY_TYPES,
                      help="routing variant: learned (poly), one skill per task (private), one skill for all "
                           "(shared), or --allocation (fixed)")
    poly.add_argument("--allocation", metavar="FILE",
                      help="JSON task x skill allocation for --poly-type fixed: a matrix (one row per task, in "
                           "the data's task order) or {task: [skill indices]}")
    poly.add_argument("--hard-routing", action="store_true",
                      help="binary task-skill allocation in the forward pass (straight-through gradients)")
    poly.add_argument("--router-temperature", type=positive_float,
                      help="temperature of the relaxed Bernoulli routing sample in training (default 1)")
    poly.add_argument("--router-granularity", choices=["module", "block", "model"],
                      help="one router per adapted layer (module, default), per transformer block, or for the model")
    poly.add_argument("--ibp-alpha", type=positive_float,
                      help="add the Indian Buffet Process prior on the allocation, with this concentration")
    poly.add_argument("--ibp-weight", type=positive_float,
                      help="weight of the IBP prior in the loss (default: 1 / training examples, i.e. the prior "
                           "counted once per pass over the data)")
    poly.add_argument("--unknown-task", choices=["error", "average"],
                      help="what the saved adapter does with an unknown task at eval: raise (default) or route "
                           "it to the average of the skills")


def check_variant_flags(args: argparse.Namespace) -> None:
    """Reject bad flag combinations (a :class:`CliError`) before anything is read; fix ``n_skills`` of ``shared``."""
    kind = args.poly_type
    if args.allocation is not None and kind != "fixed":
        raise CliError(f"--allocation needs --poly-type fixed, got --poly-type {kind}")
    if kind == "fixed" and args.allocation is None:
        raise CliError("--poly-type fixed needs --allocation FILE (a JSON task x skill allocation)")
    if args.ibp_weight is not None and args.ibp_alpha is None:
        raise CliError("--ibp-weight needs --ibp-alpha")
    if kind != "poly":
        for name, flag in LEARNED_ONLY.items():
            if getattr(args, name) not in (None, False):
                raise CliError(f"{flag} applies to learned routing (--poly-type poly), not --poly-type {kind}")
    if kind == "shared":
        if args.n_skills not in (None, 1):
            raise CliError(f"--poly-type shared has exactly one skill, got --n-skills {args.n_skills}")
        args.n_skills = 1


def read_allocation(path: str, tasks: Sequence[str], n_tasks: int, n_skills: int | None) -> list[list[float]]:
    """The ``(n_tasks, n_skills)`` allocation in ``path``, rows in router (task) order.

    Two JSON forms:

    * a matrix ``[[w, ...], ...]``: ``n_tasks`` rows of ``n_skills`` non-negative weights, row ``i`` for the
      ``i``-th task of the data (the order of ``run.json``'s ``tasks``);
    * an object ``{"task": [skill index, ...], ...}``: every task of the data with the skills it uses (a binary
      allocation); ``n_skills`` is ``--n-skills`` or one more than the largest index.

    Raises:
        CliError: unreadable file, another shape, unknown or missing tasks, bad indices or weights.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
    except FileNotFoundError:
        raise CliError(f"{path}: no such file (--allocation)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CliError(f"{path}: not a readable JSON file ({err})") from None
    if isinstance(value, dict):
        matrix = _matrix_from_mapping(path, value, tasks, n_tasks, n_skills)
    elif isinstance(value, list):
        matrix = value
    else:
        raise CliError(f"{path}: expected a JSON matrix or a {{task: [skill indices]}} object, got {type(value).__name__}")
    return _checked_matrix(path, matrix, n_tasks, n_skills)


def _matrix_from_mapping(path: str, value: dict, tasks: Sequence[str], n_tasks: int, n_skills: int | None) -> list[list[float]]:
    unknown = [name for name in value if name not in tasks]
    if unknown:
        raise CliError(f"{path}: unknown task {unknown[0]!r}; the data's tasks are {', '.join(tasks)}")
    missing = [name for name in tasks if name not in value]
    if missing:
        raise CliError(f"{path}: no skills for task {missing[0]!r}; give every task of the data")
    if n_tasks != len(tasks):
        raise CliError(f"{path}: a {{task: skills}} allocation needs --n-tasks equal to the {len(tasks)} tasks; give a matrix")
    for name, skills in value.items():
        if not isinstance(skills, list) or not skills or not all(_is_index(s) for s in skills):
            raise CliError(f"{path}: task {name!r} needs a non-empty list of skill indices, got {skills!r}")
    width = n_skills or 1 + max(max(skills) for skills in value.values())
    for name, skills in value.items():
        if max(skills) >= width:
            raise CliError(f"{path}: task {name!r} uses skill {max(skills)}, but there are {width} skills (0..{width - 1})")
    return [[1.0 if k in value[name] else 0.0 for k in range(width)] for name in tasks]


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _checked_matrix(path: str, matrix: list, n_tasks: int, n_skills: int | None) -> list[list[float]]:
    if not matrix or not all(isinstance(row, list) for row in matrix):
        raise CliError(f"{path}: expected a matrix (a list of rows of numbers)")
    widths = sorted({len(row) for row in matrix})
    if len(matrix) != n_tasks or len(widths) != 1:
        raise CliError(f"{path}: expected {n_tasks} rows (one per task) of equal length, got {len(matrix)} rows of lengths {widths}")
    if n_skills is not None and widths[0] != n_skills:
        raise CliError(f"{path}: rows have {widths[0]} skills but --n-skills is {n_skills}")
    for t, row in enumerate(matrix):
        if not all(_is_weight(v) for v in row):
            raise CliError(f"{path}: row {t} must hold finite non-negative numbers, got {row!r}")
        if sum(row) <= 0:
            raise CliError(f"{path}: row {t} is all zeros; every task needs at least one skill")
    return [[float(v) for v in row] for row in matrix]


def _is_weight(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def variant_fields(args: argparse.Namespace, tasks: Sequence[str], n_tasks: int) -> dict[str, Any]:
    """The ``PolyConfig`` fields of the variant flags, with ``n_skills`` resolved (sets ``args.n_skills``).

    ``private`` has one skill per router row (``n_skills = n_tasks``); ``fixed`` takes the allocation's width.
    """
    kind = args.poly_type
    allocation = None
    if kind == "private":
        if args.n_skills is not None and args.n_skills != n_tasks:
            raise CliError(f"--poly-type private has one skill per task: --n-skills must be {n_tasks}, got {args.n_skills}")
        args.n_skills = n_tasks
    elif kind == "fixed":
        allocation = read_allocation(os.fspath(args.allocation), tasks, n_tasks, args.n_skills)
        args.n_skills = len(allocation[0])
    return {
        "poly_type": kind,
        "n_skills": args.n_skills,
        "allocation": allocation,
        "hard_routing": bool(args.hard_routing),
        "router_temperature": args.router_temperature or 1.0,
        "router_granularity": args.router_granularity or "module",
        "unknown_task": args.unknown_task or "error",
    }
