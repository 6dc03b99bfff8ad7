"""Seeded experiments on the built-in suite: one method, one seed, trained through the library's trainer.

This is the one place where the project trains a method for a measurement: the default ``polytropon train``
run (:mod:`polytropon.app.claims`), ``benchmarks/claims.py`` and ``benchmarks/recipe_search.py`` all call it, and
it trains with :func:`polytropon.app.training.make_trainer` -- the :class:`~polytropon.toolkit.training.PolyTrainer`
every ``polytropon train`` uses (AdamW with the router logits at their own rate, linear warm-up and decay,
gradient-norm clipping at 1.0, the Trainer's seeded sampler). There is no second training loop.

::

    base model (loaded once) ──fresh(seed)──> copy with a seeded head ──method_config──> PolyModel
         │                                                                   │ make_trainer(...).train()
         │                                                                   v
         │                                               per-task accuracy, collapsed tasks, routing recovery
         └── few-shot: the trained multi-task model (or the base) + new tasks ──train──> held-out accuracy

Methods (multi-task, trained on the suite's 20 tasks):

* ``lora-rank``   one LoRA shared by every task, of the rank of one Poly skill;
* ``lora-params`` one shared LoRA with Poly's trainable budget (rank ``r * n_skills``);
* ``private``     one LoRA per task;
* ``poly``        learned task -> skill routing (Ponti et al. 2022);
* ``mhr``         the skills split in ``mhr_splits`` blocks, each routed on its own (Caccia et al. 2022);
* ``poly-hard``   Poly with binary (straight-through) routing;
* ``poly-ibp``    Poly with the Indian Buffet Process prior on the allocation added to the loss.

Few-shot methods (trained on ``shots`` examples of each held-out task): ``lora`` (a new shared LoRA and head on
the base model), ``shared-ft`` (the ``lora-params`` model fine-tuned), ``poly-full`` / ``mhr-full`` (new router
rows, everything trained), ``poly-z`` / ``mhr-z`` (new router rows only: the skills and the head frozen),
``poly-mu`` / ``mhr-mu`` (the skills averaged into one LoRA, fine-tuned with the head).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..config import PolyConfig
from ..model import get_peft_model
from ..toolkit.diagnostics import collapsed_tasks
from ..toolkit.few_shot import collapse_to_average, freeze_skills
from ..toolkit.tasks import add_tasks
from .comparison import routing_recovery
from .data import PolyDataCollator, PolyDataset, Row, encode_rows, rows_from_dicts
from .suite import build_suite
from .training import load_base_model, make_trainer

__all__ = [
    "LABELS",
    "LABEL_TO_ID",
    "MULTITASK_METHODS",
    "LEARNED_ROUTING",
    "FEW_SHOT_METHODS",
    "FEW_SHOT_SOURCE",
    "Recipe",
    "SuiteData",
    "load_suite_data",
    "balanced_shots",
    "BaseModel",
    "method_config",
    "train_features",
    "predict",
    "score",
    "eval_examples",
    "family_means",
    "trainable_count",
    "train_multitask",
    "few_shot",
]

LABELS = ["no", "yes"]
LABEL_TO_ID = {label: i for i, label in enumerate(LABELS)}

MULTITASK_METHODS = ("lora-rank", "lora-params", "private", "poly", "mhr", "poly-hard", "poly-ibp")
LEARNED_ROUTING = ("poly", "mhr", "poly-hard", "poly-ibp")
FEW_SHOT_METHODS = ("lora", "shared-ft", "poly-full", "poly-z", "poly-mu", "mhr-full", "mhr-z", "mhr-mu")
#: The multi-task model a few-shot method starts from (``None``: the base model).
FEW_SHOT_SOURCE: dict[str, str | None] = {
    "lora": None, "shared-ft": "lora-params", "poly-full": "poly", "poly-z": "poly", "poly-mu": "poly",
    "mhr-full": "mhr", "mhr-z": "mhr", "mhr-mu": "mhr",
}
#: IBP settings of ``poly-ibp`` when the recipe has none.
IBP_DEFAULT = {"ibp_weight": 0.05, "ibp_alpha": 1.0}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that defines one training run of a method (adapter shape and optimisation)."""

    target_modules: tuple[str, ...] = ("query", "value")
    r: int = 8
    n_skills: int = 8
    mhr_splits: int = 4
    lr: float = 1e-2
    router_lr: float = 3e-1
    head_lr: float | None = None  # the classification head's rate (None: lr)
    steps: int = 300
    batch_size: int = 16
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    router_temperature: float = 1.0
    router_granularity: str = "module"
    train_pooler: bool = False  # train the (shared) pooler dense layer with the head
    ibp_weight: float = 0.0  # loss += ibp_weight * ibp_loss (poly-ibp uses IBP_DEFAULT when this is 0)
    ibp_alpha: float = 1.0
    hard_routing: bool = False
    max_length: int = 48

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        """A recipe from a dict of its fields; unknown fields raise ``ValueError`` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown recipe field(s) {unknown}; known: {sorted(names)}")
        if "target_modules" in data:
            data = {**data, "target_modules": tuple(data["target_modules"])}
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "target_modules": list(self.target_modules)}


# --------------------------------------------------------------------------- data


@dataclasses.dataclass
class SuiteData:
    """The built-in suite's rows: training (as features), evaluation, and the held-out tasks' splits."""

    suite: Any
    tokenizer: Any
    tasks: list[str]
    heldout_tasks: list[str]
    train: list  # encoded training features
    train_rows: list[Row]
    eval_rows: list[Row]
    heldout_train_rows: list[Row]
    heldout_eval_rows: list[Row]


def load_suite_data(
    tokenizer: Any,
    suite_seed: int,
    n_train: int,
    n_eval: int,
    n_shots: int,
    n_heldout_eval: int,
    validation: int = 0,
    max_length: int = 48,
) -> SuiteData:
    """The suite's splits as rows, and the training rows as features.

    With ``validation > 0`` the measurement is a recipe search that never reads a reported split: the last
    ``validation`` training examples of every task replace the eval split, and the held-out tasks are scored
    on the suite's ``heldout_validation`` split (``n_heldout_eval`` examples per task) instead of
    ``heldout_eval``.
    """
    suite = build_suite(seed=suite_seed, n_train_per_task=n_train, n_eval_per_task=n_eval, n_heldout_shots=n_shots,
                        n_heldout_eval_per_task=n_heldout_eval,
                        n_heldout_validation_per_task=n_heldout_eval if validation else 0)
    train_rows = rows_from_dicts(suite.rows("train"), "<suite:train>")
    eval_rows = rows_from_dicts(suite.rows("eval"), "<suite:eval>")
    heldout_eval = rows_from_dicts(suite.rows("heldout_eval"), "<suite:heldout_eval>")
    if validation:
        by_task: dict[str, list[Row]] = {}
        for row in train_rows:
            by_task.setdefault(row.task, []).append(row)
        held = {id(r) for rows in by_task.values() for r in rows[-validation:]}
        eval_rows = [r for r in train_rows if id(r) in held]
        train_rows = [r for r in train_rows if id(r) not in held]
        heldout_eval = rows_from_dicts(suite.rows("heldout_validation"), "<suite:heldout_validation>")
    task_to_id = {t: i for i, t in enumerate(suite.task_names)}
    features = encode_rows(train_rows, tokenizer, "classification", task_to_id, LABEL_TO_ID, max_length)
    return SuiteData(
        suite=suite, tokenizer=tokenizer, tasks=suite.task_names, heldout_tasks=suite.heldout_task_names,
        train=features, train_rows=train_rows, eval_rows=eval_rows,
        heldout_train_rows=rows_from_dicts(suite.rows("heldout_train"), "<suite:heldout_train>"),
        heldout_eval_rows=heldout_eval,
    )


def balanced_shots(rows: Sequence[Row], tasks: Sequence[str], shots: int) -> list[Row]:
    """``shots`` rows per task (half ``yes``, half ``no``), the first ones in file order."""
    out = []
    for task in tasks:
        for label in LABELS:
            picked = [r for r in rows if r.task == task and r.target == label][: shots // 2]
            if len(picked) < shots // 2:
                raise ValueError(f"task {task!r} has only {len(picked)} {label!r} shots, {shots // 2} needed")
            out.extend(picked)
    return out


# --------------------------------------------------------------------------- models


class BaseModel:
    """The base classifier loaded once; :meth:`fresh` returns an independent copy with a head drawn from a seed."""

    def __init__(self, path: str):
        self.path = path
        self.model, self.tokenizer = load_base_model(path, "classification", LABELS)

    def fresh(self, seed: int) -> torch.nn.Module:
        model = copy.deepcopy(self.model)
        torch.manual_seed(seed)
        model._init_weights(model.classifier)
        return model


def method_config(method: str, recipe: Recipe, n_tasks: int, task_names: Sequence[str]) -> tuple[PolyConfig, dict]:
    """The adapter config of a multi-task method, and its loss extras (``ibp_weight``, ``ibp_alpha``)."""
    extras = {"ibp_weight": recipe.ibp_weight, "ibp_alpha": recipe.ibp_alpha}
    common = dict(
        r=recipe.r, target_modules=list(recipe.target_modules), n_tasks=n_tasks, task_type="SEQ_CLS",
        task_names=list(task_names), modules_to_save=["classifier", "pooler.dense"] if recipe.train_pooler else None,
    )
    learned = dict(router_temperature=recipe.router_temperature, router_granularity=recipe.router_granularity,
                   hard_routing=recipe.hard_routing)
    if method == "lora-rank":
        return PolyConfig(poly_type="shared", n_skills=1, **common), {**extras, "ibp_weight": 0.0}
    if method == "lora-params":
        shared = {**common, "r": recipe.r * recipe.n_skills}
        return PolyConfig(poly_type="shared", n_skills=1, **shared), {**extras, "ibp_weight": 0.0}
    if method == "private":
        return PolyConfig(poly_type="private", n_skills=n_tasks, **common), {**extras, "ibp_weight": 0.0}
    if method == "poly":
        return PolyConfig(n_skills=recipe.n_skills, **common, **learned), extras
    if method == "mhr":
        return PolyConfig(n_skills=recipe.n_skills, n_splits=recipe.mhr_splits, **common, **learned), extras
    if method == "poly-hard":
        return PolyConfig(n_skills=recipe.n_skills, **common, **{**learned, "hard_routing": True}), extras
    if method == "poly-ibp":
        config = PolyConfig(n_skills=recipe.n_skills, **common, **learned)
        return config, extras if recipe.ibp_weight > 0 else {**extras, **IBP_DEFAULT}
    raise ValueError(f"unknown multi-task method {method!r}; known: {', '.join(MULTITASK_METHODS)}")


# --------------------------------------------------------------------------- training and scoring


def train_features(
    model: torch.nn.Module,
    features: Sequence[dict[str, Any]],
    tokenizer: Any,
    recipe: Recipe,
    seed: int,
    steps: int | None = None,
    ibp_weight: float = 0.0,
    ibp_alpha: float | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``features`` for ``steps`` (default ``recipe.steps``) optimizer steps of
    ``recipe.batch_size`` with :func:`~polytropon.app.training.make_trainer`, the trainer of ``polytropon train``.

    Returns ``{"losses": [mean loss of every 10 steps (of every step below 10 steps)], "seconds": wall time}``;
    the model is left in eval mode.
    """
    args = argparse.Namespace(
        epochs=1.0, max_steps=steps or recipe.steps, lr=recipe.lr, router_lr=recipe.router_lr, head_lr=recipe.head_lr,
        weight_decay=recipe.weight_decay, warmup_ratio=recipe.warmup_ratio, batch_size=recipe.batch_size, grad_accum=1,
        logging_steps=10 if (steps or recipe.steps) >= 10 else 1, save_steps=10**9, seed=seed, bf16=False, quiet=True,
        ibp_alpha=ibp_alpha if ibp_weight > 0 else None,
    )
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="polytropon-") as scratch:
        trainer = make_trainer(args, scratch, model, tokenizer, PolyDataset(features), save_checkpoints=False,
                               ibp_weight=ibp_weight)
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    model.eval()
    return {"losses": losses, "seconds": time.time() - started}


@torch.no_grad()
def predict(model: torch.nn.Module, tokenizer: Any, rows: Sequence[Row], task_to_id: dict[str, int],
            max_length: int, batch_size: int = 64) -> list[int]:
    """The predicted class id of every row (eval mode), in the order of ``rows``."""
    was_training = model.training
    model.eval()
    collate = PolyDataCollator(tokenizer)
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input))  # batches of similar length: less padding
    answers = [0] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        features = encode_rows([rows[i] for i in chunk], tokenizer, "classification", task_to_id, LABEL_TO_ID, max_length)
        batch = collate(features)
        batch.pop("labels")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        for i, answer in zip(chunk, logits.argmax(-1).tolist()):
            answers[i] = answer
    model.train(was_training)
    return answers


def eval_examples(rows: Sequence[Row]) -> dict[str, int]:
    """How many rows each task has, in first-seen order."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.task] = counts.get(row.task, 0) + 1
    return counts


def score(answers: Sequence[int], rows: Sequence[Row], order: Sequence[str]) -> tuple[dict[str, float], list[str]]:
    """``(per_task_accuracy, collapsed_tasks)`` of the predicted class ids ``answers`` of ``rows``: the accuracy of
    every task of ``order`` that has rows, in that order, and the tasks every example of which got the same answer
    (:func:`polytropon.toolkit.diagnostics.collapsed_tasks`), also in that order."""
    gold = [LABEL_TO_ID[r.target] for r in rows]
    tasks = [r.task for r in rows]
    hits: dict[str, list[bool]] = {}
    for task, answer, label in zip(tasks, answers, gold):
        hits.setdefault(task, []).append(answer == label)
    accuracy = {task: float(np.mean(hits[task])) for task in order if task in hits}
    collapsed = set(collapsed_tasks(list(answers), tasks, gold))
    return accuracy, [task for task in order if task in collapsed]


def family_means(per_task: dict[str, float], specs: Sequence[Any]) -> dict[str, float]:
    """Mean accuracy per task family (``single`` / ``and`` / ``or`` / ``xor``, those present) and over all tasks
    (``mean``)."""
    out: dict[str, float] = {}
    for op in ("single", "and", "or", "xor"):
        values = [per_task[t.name] for t in specs if t.op == op and t.name in per_task]
        if values:
            out[op] = float(np.mean(values))
    out["mean"] = float(np.mean(list(per_task.values())))
    return out


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_multitask(method: str, recipe: Recipe, data: SuiteData, base: BaseModel, seed: int) -> tuple[Any, dict]:
    """Train one multi-task method at ``seed``; returns the model and its record (accuracy per task and family,
    collapsed tasks, losses, seconds, trainable parameters, and for learned routing the routing recovery)."""
    task_to_id = {t: i for i, t in enumerate(data.tasks)}
    config, extras = method_config(method, recipe, len(data.tasks), data.tasks)
    model = get_peft_model(base.fresh(seed), config)
    trace = train_features(model, data.train, data.tokenizer, recipe, seed, ibp_weight=extras["ibp_weight"],
                           ibp_alpha=extras["ibp_alpha"])
    started = time.time()
    per_task, collapsed = score(predict(model, data.tokenizer, data.eval_rows, task_to_id, recipe.max_length),
                                data.eval_rows, data.tasks)
    record: dict[str, Any] = {
        "method": method,
        "seed": seed,
        "recipe": recipe.to_dict(),
        "accuracy": family_means(per_task, data.suite.tasks),
        "per_task": per_task,
        "eval_examples": eval_examples(data.eval_rows),
        "collapsed": collapsed,
        "trainable_parameters": trainable_count(model),
        "train_seconds": trace["seconds"],
        "eval_seconds": time.time() - started,
        "losses": trace["losses"],
    }
    if method in LEARNED_ROUTING:
        scores, aligned = routing_recovery(model, data.suite.skill_matrix(), seed=seed)
        record["recovery"] = {**scores, "aligned": np.asarray(aligned).tolist()}
    return model, record


def few_shot(method: str, source: Any, recipe: Recipe, data: SuiteData, base: BaseModel, seed: int, shots: int,
             steps: int) -> dict[str, Any]:
    """Adapt to the held-out tasks with ``shots`` examples each and score them; ``source`` is the trained
    multi-task model the method starts from (:data:`FEW_SHOT_SOURCE`; ``None`` for ``lora``), left unchanged."""
    if method not in FEW_SHOT_SOURCE:
        raise ValueError(f"unknown few-shot method {method!r}; known: {', '.join(FEW_SHOT_METHODS)}")
    names = list(data.heldout_tasks)
    if method == "lora":
        config, _ = method_config("lora-rank", recipe, len(names), names)
        model = get_peft_model(base.fresh(seed), config)
        task_to_id = {t: i for i, t in enumerate(names)}
    else:
        model = copy.deepcopy(source)
        if method.endswith("-mu"):
            collapse_to_average(model, new_adapter_name="mu")
            task_to_id = {t: 0 for t in names}
        else:
            add_tasks(model, names, init="uniform")
            known = model.peft_config[model.active_adapter].task_names
            task_to_id = {t: known.index(t) for t in names}
            if method.endswith("-z"):
                freeze_skills(model)
    model.zero_grad(set_to_none=True)
    rows = balanced_shots(data.heldout_train_rows, names, shots)
    features = encode_rows(rows, data.tokenizer, "classification", task_to_id, LABEL_TO_ID, recipe.max_length)
    trace = train_features(model, features, data.tokenizer, recipe, seed, steps=steps)
    per_task, collapsed = score(predict(model, data.tokenizer, data.heldout_eval_rows, task_to_id, recipe.max_length),
                                data.heldout_eval_rows, names)
    trainable = trainable_count(model)
    if method.endswith("-z"):  # only the new tasks' rows of the router logits receive gradients
        trainable = trainable * len(names) // model.peft_config[model.active_adapter].n_tasks
    return {
        "method": method,
        "seed": seed,
        "shots": shots,
        "recipe": recipe.to_dict(),
        "accuracy": family_means(per_task, data.suite.heldout_tasks),
        "per_task": per_task,
        "eval_examples": eval_examples(data.heldout_eval_rows),
        "collapsed": collapsed,
        "trainable_parameters": trainable,
        "train_seconds": trace["seconds"],
        "final_loss": trace["losses"][-1] if trace["losses"] else math.nan,
    }
