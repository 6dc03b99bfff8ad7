"""``polytropon adapt RUN``: few-shot adaptation of a trained run to new tasks, into a new run directory.

The modes (Caccia et al. 2022, arXiv 2211.03831, section on few-shot adaptation):

* ``mhr-z`` -- the run's adapter gets one routing row per new task (:meth:`PolyModel.add_tasks`), its skills
  and head are frozen (:meth:`PolyModel.freeze_skills`): only the new tasks' routing trains.
* ``mhr-mu`` -- the run's skills averaged into one LoRA (:func:`polytropon.toolkit.few_shot.collapse_to_average`,
  routing dropped); every new task fine-tunes its own copy of it (a ``private`` adapter: task ``i`` uses skill
  ``i``, initialised to the average), with the run's head as the start of a shared head.
* ``full`` -- new routing rows as ``mhr-z``, and everything trains: skills, routing and head.
* ``lora`` -- the baseline without the run: a fresh LoRA of the run's rank per new task (a ``private`` adapter
  from scratch) on the bare base model, with a fresh head.

Data: without ``--data``, a run trained on the built-in suite adapts to the suite's held-out tasks
(``--shots`` training examples per task, 16 by default, balanced over the labels; evaluated on the held-out eval
split); ``--data`` (and ``--eval-data`` or ``--eval-fraction``) take any file. The new run directory holds
``run.json``, ``adapter/`` (loadable by ``eval``, ``inspect``, ``export-lora`` and ``merge``), ``metrics.json``
and ``train_log.jsonl``; the source run is only read.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Any

from ..adapters import check_labels
from ..arguments import DATA_HELP, add_column_arguments, non_negative_float, positive_int, read_train_and_eval
from ..console import CliError, quiet_transformers, say
from ..defaults import ADAPT_RUN, DEFAULT_RUN
from ..report import format_table, means
from ..runs import ADAPTER_SUBDIR, LOG_FILE, METRICS_FILE, RUN_FILE, TASKS_FILE, json_ready, mark_run_complete
from ..runs import new_run_record, read_run, require_empty_dir, write_json

__all__ = ["VERB", "HELP", "DESCRIPTION", "MODES", "add_arguments", "run", "take_shots"]

VERB = "adapt"
HELP = "few-shot adaptation of a trained run to new tasks (mhr-z, mhr-mu, full, lora)"
DESCRIPTION = (
    "Adapt a trained run to new tasks from a few examples each, into a new run directory. Without --data, a run "
    "on the built-in suite adapts to the suite's held-out tasks."
)
MODES = ("mhr-z", "mhr-mu", "full", "lora")
#: Held-out training examples generated per task on the built-in suite; ``--shots`` takes the first of them,
#: so the held-out eval split is the same whatever ``--shots``.
SUITE_SHOT_POOL = 128


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``adapt``: the source run, the mode, the data and a few training knobs."""
    parser.add_argument("run", help="the trained run (a run directory or an adapter directory); only read")
    parser.add_argument("--mode", choices=MODES, default="mhr-z",
                        help="mhr-z: new routing rows only; mhr-mu: the averaged skills as one LoRA per task; "
                             "full: new rows and all skills; lora: a fresh LoRA per task (default mhr-z)")
    parser.add_argument("--shots", type=positive_int,
                        help=f"training examples per new task, balanced over the targets (default {ADAPT_RUN['shots']} "
                             "on the built-in suite; all of --data otherwise)")
    parser.add_argument("--data", help=f"new tasks' training data: {DATA_HELP} (default: the suite's held-out tasks)")
    parser.add_argument("--eval-data", help="new tasks' evaluation data (default: --eval-fraction of --data)")
    parser.add_argument("--eval-fraction", type=float, default=0.5, help="held out per task when --data has no --eval-data")
    add_column_arguments(parser)
    parser.add_argument("--output-dir", help="the new run directory (default: runs/<timestamp>-<mode>); never the source")
    parser.add_argument("--model", help="base model (default: the one recorded in the run)")
    parser.add_argument("--max-steps", type=positive_int, default=ADAPT_RUN["max_steps"])
    parser.add_argument("--lr", type=non_negative_float, default=ADAPT_RUN["lr"], help="learning rate of skills and head")
    parser.add_argument("--router-lr", type=non_negative_float, default=ADAPT_RUN["router_lr"],
                        help="learning rate of the routing")
    parser.add_argument("--batch-size", type=positive_int, default=ADAPT_RUN["batch_size"])
    parser.add_argument("--eval-batch-size", type=positive_int, default=64)
    parser.add_argument("--max-length", type=positive_int, help="default: the run's")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=positive_int, help="CPU threads (default: PyTorch's choice)")
    parser.add_argument("--quiet", action="store_true", help="print only errors and the final table")
    # fixed Trainer settings (make_trainer reads them from args)
    parser.set_defaults(epochs=1.0, weight_decay=0.0, warmup_ratio=0.06, grad_accum=1, logging_steps=10,
                        save_steps=10**9, bf16=False, ibp_alpha=None)


@dataclasses.dataclass
class Source:
    """The run being adapted, as read from disk (never written)."""

    adapter_dir: str
    run_dir: str
    info: dict[str, Any]
    config: Any
    record: dict[str, Any] | None

    @property
    def tasks(self) -> list[str]:
        return list(self.info["tasks"])


@dataclasses.dataclass
class AdaptData:
    """The new tasks' few-shot training rows and evaluation rows."""

    train: list
    eval: list
    tasks: list[str]
    source: str
    shots: int | None = None


def run(args: argparse.Namespace) -> int:
    """Read the source run and the data, check everything, build the mode's model, train, evaluate, write."""
    started = time.time()
    source = read_source(args.run)
    output_dir = choose_output_dir(args, source)
    data = adapt_data(args, source)
    head = source.info.get("head", "classification")
    label_to_id = check_targets(data, head, source.info.get("labels"))
    check_mode(args.mode, source, data)
    quiet_transformers()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, tokenizer, tasks = build_adapted_model(args, source, data)
    task_to_id = {name: tasks.index(name) for name in data.tasks}
    trainable, total = model.get_nb_trainable_parameters()
    say(f"polytropon: {args.mode} on {len(data.tasks)} new tasks, {len(data.train)} train / {len(data.eval)} eval "
        f"examples from {data.source}; trainable {trainable:,d} of {total:,d} parameters")
    os.makedirs(output_dir, exist_ok=True)
    max_length = args.max_length or int(source.info.get("max_length", 128))
    t_train = time.time()
    train_model(args, model, tokenizer, data, head, task_to_id, label_to_id, max_length, output_dir)
    seconds = {"train": time.time() - t_train}
    from ..training import evaluate_per_task

    per_task = evaluate_per_task(model, tokenizer, data.eval, head, task_to_id, label_to_id, max_length,
                                 args.eval_batch_size)
    seconds["total"] = time.time() - started
    write_outputs(args, output_dir, source, data, model, tasks, head, max_length, per_task, trainable, seconds)
    metric = "accuracy" if head == "classification" else "exact_match"
    print(format_table(data.tasks, [(args.mode, per_task)], metric))
    if not args.quiet:
        print(f"adapted run: {output_dir} (train {seconds['train']:.0f}s, total {seconds['total']:.0f}s)")
    return 0


# --------------------------------------------------------------------------- source, output, data


def read_source(path: str) -> Source:
    """The source run's adapter directory, tasks file, config and (if any) run record."""
    from ..adapters import read_adapter_config, read_tasks_file, resolve_adapter_dir

    adapter_dir = resolve_adapter_dir(path)
    run_dir = os.path.dirname(adapter_dir) if os.path.basename(adapter_dir) == ADAPTER_SUBDIR else adapter_dir
    record = read_run(run_dir) if os.path.isfile(os.path.join(run_dir, RUN_FILE)) else None
    return Source(adapter_dir, run_dir, read_tasks_file(adapter_dir), read_adapter_config(adapter_dir), record)


def choose_output_dir(args: argparse.Namespace, source: Source) -> str:
    """``--output-dir`` (or ``runs/<timestamp>-<mode>``): new or empty, and neither the source nor inside it."""
    output_dir = args.output_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + f"-{args.mode}")
    out, src = os.path.realpath(output_dir), os.path.realpath(source.run_dir)
    if out == src or out.startswith(src + os.sep):
        raise CliError(f"{output_dir}: inside the source run {source.run_dir}; adapt writes a new run elsewhere")
    require_empty_dir(output_dir, "choose a new --output-dir")
    return output_dir


def adapt_data(args: argparse.Namespace, source: Source) -> AdaptData:
    """``--data`` (with ``--eval-data`` or ``--eval-fraction``), or the suite's held-out tasks; ``--shots`` per task."""
    if args.data is None:
        if args.eval_data is not None:
            raise CliError("--eval-data needs --data")
        return suite_heldout(args, source)
    train, evaluation, tasks = read_train_and_eval(args)
    if args.shots is not None:
        train = take_shots(train, args.shots)
    return AdaptData(train, evaluation, tasks, args.data, args.shots)


def suite_heldout(args: argparse.Namespace, source: Source) -> AdaptData:
    """The built-in suite's held-out tasks (the suite seed of the source run): ``--shots`` train rows per task."""
    from ..data import rows_from_dicts
    from ..suite import TRAIN_TASKS, build_suite

    if source.tasks != [t.name for t in TRAIN_TASKS]:
        raise CliError(f"{source.run_dir} was not trained on the built-in suite: give the new tasks with --data")
    shots = args.shots or ADAPT_RUN["shots"]
    if shots > SUITE_SHOT_POOL:
        raise CliError(f"--shots {shots}: the built-in suite has {SUITE_SHOT_POOL} held-out examples per task; use --data")
    seed = int(((source.record or {}).get("args") or {}).get("suite_seed") or 0)
    suite = build_suite(seed=seed, n_train_per_task=DEFAULT_RUN["n_train_per_task"],
                        n_eval_per_task=DEFAULT_RUN["n_eval_per_task"], n_heldout_shots=SUITE_SHOT_POOL)
    train = take_shots(rows_from_dicts(suite.rows("heldout_train"), "<suite:heldout_train>"), shots)
    evaluation = rows_from_dicts(suite.rows("heldout_eval"), "<suite:heldout_eval>")
    return AdaptData(train, evaluation, suite.heldout_task_names, f"built-in suite held-out tasks (seed {seed})", shots)


def take_shots(rows: list, shots: int) -> list:
    """At most ``shots`` rows per task, taken in file order round-robin over the task's targets (balanced labels)."""
    by_task: dict[str, dict[str, list]] = {}
    for row in rows:
        by_task.setdefault(row.task, {}).setdefault(row.target, []).append(row)
    keep = set()
    for buckets in by_task.values():
        queues = [list(bucket) for bucket in buckets.values()]
        taken = 0
        while taken < shots and any(queues):
            for queue in queues:
                if queue and taken < shots:
                    keep.add(id(queue.pop(0)))
                    taken += 1
    return [row for row in rows if id(row) in keep]


def check_targets(data: AdaptData, head: str, labels: list[str] | None) -> dict[str, int] | None:
    """For a classifier every target must be one of the run's labels; ``{label: class id}`` (``None`` for LMs)."""
    check_labels(data.train, head, labels)
    return check_labels(data.eval, head, labels)


def check_mode(mode: str, source: Source, data: AdaptData) -> None:
    """Modes that add routing rows need new task names; ``mhr-z`` needs learned routing."""
    if mode in ("mhr-z", "full"):
        clash = [t for t in data.tasks if t in source.tasks]
        if clash:
            raise CliError(f"task {clash[0]!r} is already a task of {source.run_dir}; adapt learns new tasks")
    if mode == "mhr-z" and source.config.poly_type != "poly":
        raise CliError(f"--mode mhr-z trains routing only, but the run's allocation is fixed (poly_type {source.config.poly_type})")


# --------------------------------------------------------------------------- the model of each mode


def build_adapted_model(args: argparse.Namespace, source: Source, data: AdaptData) -> tuple[Any, Any, list[str]]:
    """``(PolyModel, tokenizer, the adapter's task names in id order)`` for ``args.mode``."""
    from transformers import set_seed

    set_seed(args.seed)
    if args.mode in ("mhr-z", "full"):
        return with_new_rows(args, source, data)
    return per_task_lora(args, source, data)


def load_source_model(args: argparse.Namespace, source: Source) -> tuple[Any, Any]:
    """The source adapter on its base model, trainable."""
    from ...model import PolyModel

    base, tokenizer = load_base(args, source)
    try:
        model = PolyModel.from_pretrained(base, source.adapter_dir, is_trainable=True)
    except (OSError, ValueError, TypeError) as err:
        raise CliError(f"{source.adapter_dir}: adapter does not fit its base model ({err})") from None
    return model, tokenizer


def load_base(args: argparse.Namespace, source: Source) -> tuple[Any, Any]:
    """A fresh base model (with the run's head and labels) and its tokenizer."""
    from ..defaults import model_path
    from ..training import load_base_model

    ref = args.model or source.info.get("model") or source.config.base_model_name_or_path
    if not ref:
        raise CliError(f"{source.adapter_dir}: no base model recorded; pass --model")
    return load_base_model(model_path(ref), source.info.get("head", "classification"), source.info.get("labels"),
                           source.config.revision)


def with_new_rows(args: argparse.Namespace, source: Source, data: AdaptData) -> tuple[Any, Any, list[str]]:
    """``mhr-z`` / ``full``: the run's adapter with a uniform routing row per new task; ``mhr-z`` freezes the rest."""
    model, tokenizer = load_source_model(args, source)
    config = source.config
    old = list(config.task_names) if config.task_names else [f"task {i}" for i in range(config.n_tasks)]
    old[: len(source.tasks)] = source.tasks
    try:
        model.add_tasks(list(data.tasks) if config.task_names else len(data.tasks), init="uniform")
        if args.mode == "mhr-z":
            model.freeze_skills()
    except (TypeError, ValueError) as err:
        raise CliError(f"{args.mode}: {err}") from None
    if not config.task_names:  # name the rows, so that the saved adapter maps names to ids
        model.peft_config[model.resolve_adapter()] = dataclasses.replace(
            model.peft_config[model.resolve_adapter()], task_names=old + list(data.tasks))
    return model, tokenizer, old + list(data.tasks)


def per_task_lora(args: argparse.Namespace, source: Source, data: AdaptData) -> tuple[Any, Any, list[str]]:
    """``mhr-mu`` / ``lora``: a ``private`` adapter (task ``i`` uses skill ``i``) of the run's rank on the run's layers.

    ``mhr-mu`` starts every skill from the average of the run's skills and the head from the run's; ``lora``
    starts from scratch (``B = 0``, a fresh head).
    """
    from ...config import PolyConfig
    from ...model import get_peft_model

    averaged, heads, layers = None, None, None
    if args.mode == "mhr-mu":
        averaged, heads, layers = averaged_skills(args, source)
    base, tokenizer = load_base(args, source)
    src = source.config
    config = PolyConfig(
        r=src.r, target_modules=layers or src.target_modules, exclude_modules=None if layers else src.exclude_modules,
        modules_to_save=src.modules_to_save, poly_type="private", n_tasks=len(data.tasks), n_skills=len(data.tasks),
        task_type=src.task_type, task_names=list(data.tasks), base_model_name_or_path=src.base_model_name_or_path,
        revision=src.revision,
    )
    model = get_peft_model(base, config)
    if averaged is not None:
        load_average(model, averaged, heads)
    return model, tokenizer, list(data.tasks)


def averaged_skills(args: argparse.Namespace, source: Source) -> tuple[dict, dict, list[str]]:
    """MHR-mu's starting point: per layer ``(A_mu, B_mu)`` from :func:`collapse_to_average`, the heads' states, the layers."""
    from ...toolkit.few_shot import collapse_to_average

    model, _ = load_source_model(args, source)
    name = collapse_to_average(model, new_adapter_name="average")
    averaged = {path: (a.poly_lora_A.detach().clone(), a.poly_lora_B.detach().clone()) for path, a in model.named_adapters(name)}
    heads = {path: {k: v.clone() for k, v in wrapper.modules_to_save[name].state_dict().items()}
             for path, wrapper in model.saved_modules() if name in wrapper.modules_to_save}
    return averaged, heads, list(averaged)


def load_average(model: Any, averaged: dict, heads: dict) -> None:
    """Copy the averaged LoRA into every skill of ``model``'s adapter, and the run's head into its saved modules."""
    import torch

    name = model.resolve_adapter()
    with torch.no_grad():
        for path, adapter in model.named_adapters(name):
            a_mu, b_mu = averaged[path]  # (1, 1, in, r), (1, 1, r, out)
            adapter.poly_lora_A.copy_(a_mu.expand_as(adapter.poly_lora_A))
            adapter.poly_lora_B.copy_(b_mu.expand_as(adapter.poly_lora_B))
        for path, wrapper in model.saved_modules():
            if path in heads and name in wrapper.modules_to_save:
                wrapper.modules_to_save[name].load_state_dict(heads[path])


# --------------------------------------------------------------------------- train and write


def train_model(
    args: argparse.Namespace, model: Any, tokenizer: Any, data: AdaptData, head: str, task_to_id: dict[str, int],
    label_to_id: dict[str, int] | None, max_length: int, output_dir: str,
) -> None:
    """Train ``model`` on the few-shot rows for ``--max-steps`` (no checkpoints; the log in ``train_log.jsonl``)."""
    from ..data import PolyDataset, encode_rows
    from ..training import make_trainer

    train_set = PolyDataset(encode_rows(data.train, tokenizer, head, task_to_id, label_to_id, max_length))
    scratch = os.path.join(output_dir, "checkpoints")
    trainer = make_trainer(args, scratch, model, tokenizer, train_set, os.path.join(output_dir, LOG_FILE),
                           save_checkpoints=False)
    trainer.train()
    if os.path.isdir(scratch) and not os.listdir(scratch):  # the Trainer makes its output folder; nothing is saved there
        os.rmdir(scratch)


def write_outputs(
    args: argparse.Namespace, output_dir: str, source: Source, data: AdaptData, model: Any, tasks: list[str],
    head: str, max_length: int, per_task: dict, trainable: int, seconds: dict[str, float],
) -> None:
    """``run.json`` (complete), ``adapter/`` with its tasks file, and ``metrics.json`` of the new tasks."""
    from ..defaults import portable_model_ref

    model_ref = portable_model_ref(args.model or source.info.get("model") or source.config.base_model_name_or_path)
    record = new_run_record(args, tasks, source.info.get("labels"), head, model_ref)
    record["adapted_from"] = {"run": os.path.abspath(source.run_dir), "mode": args.mode}
    write_json(os.path.join(output_dir, RUN_FILE), record)
    adapter_dir = os.path.join(output_dir, ADAPTER_SUBDIR)
    model.save_pretrained(adapter_dir)
    write_json(os.path.join(adapter_dir, TASKS_FILE), {"tasks": tasks, "labels": source.info.get("labels"),
                                                      "head": head, "max_length": max_length, "model": model_ref})
    metrics = {
        "mode": args.mode, "source_run": os.path.abspath(source.run_dir), "data": data.source, "tasks": data.tasks,
        "shots": data.shots, "train_examples": len(data.train), "eval_examples": len(data.eval),
        "per_task": per_task, "mean": means(per_task), "trainable_parameters": trainable,
        "steps": args.max_steps, "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    write_json(os.path.join(output_dir, METRICS_FILE), json_ready(metrics))
    mark_run_complete(output_dir)
