"""Training and evaluation helpers behind ``polytropon train`` / ``eval``.

* :func:`infer_head` and :func:`load_base_model` pick and load the right transformers head.
* :func:`make_trainer` builds the library's :class:`~polytropon.toolkit.training.PolyTrainer` (two-speed optimizer,
  adapter-only checkpoints it can resume from) from the CLI's flags.
* :func:`evaluate_per_task` computes per-task accuracy / exact match (and loss for language models).
* :func:`head_only_baseline` trains just the classification head of a frozen base model.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .data import HeadType, PolyDataCollator, Row

__all__ = [
    "ModelLoadError",
    "TASK_TYPE_OF_HEAD",
    "infer_head",
    "load_base_model",
    "PolyTrainer",
    "JsonlLogCallback",
    "make_trainer",
    "TRAINABLE_STATE_NAME",
    "trainable_state",
    "state_digest",
    "evaluate_per_task",
    "head_only_baseline",
    "find_head_module",
]

#: PEFT task type written to the adapter config for each head.
TASK_TYPE_OF_HEAD: dict[str, str] = {
    "classification": "SEQ_CLS",
    "causal-lm": "CAUSAL_LM",
    "seq2seq": "SEQ_2_SEQ_LM",
}


class ModelLoadError(RuntimeError):
    """The model folder or hub id does not load."""


def _load_kwargs(model: str, revision: str | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if os.path.isdir(model):
        kwargs["local_files_only"] = True
    if revision:
        kwargs["revision"] = revision
    return kwargs


def _check_model_reference(model: str) -> None:
    """Reject things that are clearly meant as local paths but do not exist (never ask the hub for them)."""
    if os.path.isdir(model):
        return
    if os.path.exists(model):
        raise ModelLoadError(f"{model}: not a model folder")
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1 or os.sep != "/" and os.sep in model
    if looks_local:
        raise ModelLoadError(f"{model}: no such model folder")


def load_model_config(model: str, revision: str | None = None) -> Any:
    """The transformers config of ``model``, or :class:`ModelLoadError`."""
    from transformers import AutoConfig

    _check_model_reference(model)
    try:
        return AutoConfig.from_pretrained(model, **_load_kwargs(model, revision))
    except Exception as err:  # transformers raises many types here (OSError, ValueError, KeyError...)
        raise ModelLoadError(f"{model}: cannot load the model config ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def infer_head(config: Any) -> HeadType:
    """Which head to train for a model config: seq2seq, causal LM, or sequence classification.

    Encoder-decoder models are ``seq2seq``; models whose ``architectures`` name a causal LM
    (``*ForCausalLM``, ``*LMHeadModel``) are ``causal-lm``; everything else, including bare encoders
    such as ``BertModel``, gets a sequence-classification head.
    """
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    for arch in getattr(config, "architectures", None) or []:
        if arch.endswith("ForSequenceClassification"):
            return "classification"
        if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
            return "causal-lm"
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    # No telling architecture: masked-LM families (BERT, RoBERTa, ...) are encoders -> classification.
    model_type = getattr(config, "model_type", None)
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "classification"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal-lm"
    return "classification"


def load_base_model(
    model: str,
    head: HeadType,
    labels: Sequence[str] | None = None,
    revision: str | None = None,
    torch_dtype: torch.dtype | None = None,
) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` with the head for ``head``; raises :class:`ModelLoadError`.

    For classification ``labels`` name the classes; a head of another size is re-initialised.
    The tokenizer gets a pad token (EOS) when it has none.
    """
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    _check_model_reference(model)
    kwargs = _load_kwargs(model, revision)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, **_load_kwargs(model, revision))
    except Exception as err:
        raise ModelLoadError(f"{model}: cannot load the tokenizer ({_first_line(err)})") from None
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        if head == "classification":
            if not labels:
                raise ValueError("classification needs labels")
            net = AutoModelForSequenceClassification.from_pretrained(
                model,
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={label: i for i, label in enumerate(labels)},
                ignore_mismatched_sizes=True,
                **kwargs,
            )
            if net.config.pad_token_id is None:
                net.config.pad_token_id = tokenizer.pad_token_id
        elif head == "causal-lm":
            net = AutoModelForCausalLM.from_pretrained(model, **kwargs)
        elif head == "seq2seq":
            net = AutoModelForSeq2SeqLM.from_pretrained(model, **kwargs)
        else:
            raise ValueError(f"unknown head {head!r}")
    except ModelLoadError:
        raise
    except Exception as err:
        raise ModelLoadError(f"{model}: cannot load the model as {head} ({_first_line(err)})") from None
    return net, tokenizer


# --------------------------------------------------------------------------- the library's trainer, re-exported
from ..toolkit.training import (  # noqa: E402  (the CLI's names for the library's training API)
    TRAINABLE_STATE_NAME,
    JsonlLogCallback,
    PolyTrainer,
    state_digest,
    trainable_state,
)


def make_trainer(
    args: Any,
    checkpoint_dir: str,
    model: nn.Module,
    tokenizer: Any,
    train_set: Any,
    log_path: str | None = None,
    save_checkpoints: bool = True,
    ibp_weight: float = 0.0,
) -> PolyTrainer:
    """A :class:`PolyTrainer` for the CLI's flags (``args``: epochs, max_steps, lr, router_lr, batch_size, ...).

    Checkpoints go to ``checkpoint_dir`` every ``args.save_steps`` (with ``save_checkpoints``); the log dicts
    to ``log_path`` as JSON lines (:class:`JsonlLogCallback`); with ``args.quiet`` nothing is printed.
    ``args.ibp_alpha`` (if set) turns the IBP prior on with weight ``ibp_weight``.
    """
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from .console import CliError, is_main_process, world_size

    use_cpu = not torch.cuda.is_available()
    try:
        training_args = TrainingArguments(
            output_dir=checkpoint_dir,
            num_train_epochs=args.epochs,
            max_steps=args.max_steps or -1,
            learning_rate=args.lr,
            weight_decay=args.weight_decay,
            warmup_steps=args.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum,
            lr_scheduler_type="linear",
            logging_steps=args.logging_steps,
            save_strategy="steps" if save_checkpoints else "no",
            save_steps=args.save_steps,
            save_total_limit=2,
            seed=args.seed,
            bf16=args.bf16,
            use_cpu=use_cpu,
            ddp_backend="gloo" if use_cpu and world_size() > 1 else None,
            ddp_find_unused_parameters=False,
            remove_unused_columns=False,
            label_names=["labels"],
            report_to=[],
            disable_tqdm=args.quiet or not is_main_process(),
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
        head_lr=getattr(args, "head_lr", None),
        ibp_alpha=getattr(args, "ibp_alpha", None),
        ibp_weight=ibp_weight,
    )
    # the CLI's loss scaling: never hand num_items_in_batch to the model (per-micro-batch mean losses)
    trainer.model_accepts_loss_kwargs = False
    if args.quiet:
        trainer.remove_callback(PrinterCallback)
    if log_path is not None:
        trainer.add_callback(JsonlLogCallback(log_path))
    return trainer


# --------------------------------------------------------------------------- evaluation


def _batches(items: Sequence[Any], size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _with_progress(chunks: list, progress: bool, desc: str) -> Any:
    """``chunks``, wrapped in a tqdm bar when ``progress``."""
    if not progress:
        return chunks
    from tqdm.auto import tqdm

    return tqdm(chunks, desc=desc, leave=False)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class _PerTaskTally:
    """Sums of per-example metrics by task; :meth:`means` divides by each task's example count."""

    def __init__(self) -> None:
        self.sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))

    def add(self, task: str, **values: float) -> None:
        s = self.sums[task]
        for key, value in values.items():
            s[key] += value
        s["n"] += 1

    def means(self, tasks: Iterable[str]) -> dict[str, dict[str, float]]:
        """``{task: {metric: mean, "n": count}}`` in the order of ``tasks``, for the tasks seen."""
        result: dict[str, dict[str, float]] = {}
        for task in tasks:
            if task not in self.sums:
                continue
            s = dict(self.sums[task])
            n = s.pop("n")
            result[task] = {k: v / n for k, v in s.items()} | {"n": int(n)}
        return result


@torch.no_grad()
def evaluate_per_task(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[Row],
    head: HeadType,
    task_to_id: dict[str, int],
    label_to_id: dict[str, int] | None = None,
    max_length: int = 128,
    batch_size: int = 64,
    use_task_ids: bool = True,
    max_new_tokens: int | None = None,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Per-task metrics of ``model`` on ``rows``.

    Classification: ``accuracy`` and ``loss``. Language models: ``loss`` (mean token cross-entropy
    of the target) and ``exact_match`` of the greedy continuation against ``target`` (whitespace
    stripped). With ``use_task_ids=False`` the model is called without ``task_ids`` (for a base model).
    Returns ``{task: {metric: value, "n": count}}``.
    """
    from .data import encode_rows

    was_training = model.training
    model.eval()
    device = _model_device(model)
    collate = PolyDataCollator(tokenizer)
    tally = _PerTaskTally()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input))  # less padding
    chunks = list(_batches([rows[i] for i in order], batch_size))
    for chunk in _with_progress(chunks, progress, "eval"):
        features = encode_rows(chunk, tokenizer, head, task_to_id, label_to_id, max_length)
        batch = {k: v.to(device) for k, v in collate(features).items()}
        task_ids = batch.pop("task_ids")
        extra = {"task_ids": task_ids} if use_task_ids else {}
        logits = model(**batch, **extra).logits.float()
        if head == "classification":
            losses = nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
            correct = (logits.argmax(-1) == batch["labels"]).float()
            for row, loss, ok in zip(chunk, losses.tolist(), correct.tolist()):
                tally.add(row.task, loss=loss, accuracy=ok)
        else:
            per_example = _target_token_loss(logits, batch["labels"], head)
            matches = _exact_matches(model, tokenizer, chunk, head, task_ids, use_task_ids, max_length, max_new_tokens)
            for row, loss, ok in zip(chunk, per_example.tolist(), matches):
                tally.add(row.task, loss=loss, exact_match=float(ok))
    model.train(was_training)
    return tally.means(task_to_id)


def _target_token_loss(logits: torch.Tensor, labels: torch.Tensor, head: HeadType) -> torch.Tensor:
    """Per-example mean cross-entropy over the target tokens (labels != -100), shape ``(batch,)``.

    For a causal LM the logits at position ``t`` predict the token at ``t + 1``.
    """
    if head == "causal-lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    token_loss = nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    mask = (labels != -100).float()
    return (token_loss * mask).sum(1) / mask.sum(1).clamp_min(1)


def _exact_matches(
    model: nn.Module,
    tokenizer: Any,
    chunk: Sequence[Row],
    head: HeadType,
    task_ids: torch.Tensor,
    use_task_ids: bool,
    max_length: int,
    max_new_tokens: int | None,
) -> list[bool]:
    device = _model_device(model)
    if max_new_tokens is None:
        longest = max(len(tokenizer(" " + r.target, add_special_tokens=False)["input_ids"]) for r in chunk)
        max_new_tokens = longest + 2
    side = tokenizer.padding_side
    if head == "causal-lm":
        tokenizer.padding_side = "left"
    try:
        enc = tokenizer(
            [r.input for r in chunk], return_tensors="pt", padding=True, truncation=True, max_length=max_length
        ).to(device)
    finally:
        tokenizer.padding_side = side
    extra = {"task_ids": task_ids} if use_task_ids else {}
    generated = model.generate(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )
    if head == "causal-lm":
        generated = generated[:, enc["input_ids"].shape[1] :]
    texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    return [text.strip() == row.target.strip() for text, row in zip(texts, chunk)]


def mean_metric(per_task: dict[str, dict[str, float]], metric: str) -> float:
    """Unweighted mean of ``metric`` over tasks (NaN when no task has it)."""
    values = [m[metric] for m in per_task.values() if metric in m]
    return sum(values) / len(values) if values else math.nan


# --------------------------------------------------------------------------- head-only baseline


def find_head_module(model: nn.Module) -> tuple[str, nn.Module]:
    """The classification head of a transformers model (``classifier`` or ``score``)."""
    for name in ("classifier", "score"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return name, module
    raise ValueError(f"{type(model).__name__} has no 'classifier' or 'score' head")


def head_only_baseline(
    model: nn.Module,
    tokenizer: Any,
    train_rows: Sequence[Row],
    eval_rows: Sequence[Row],
    task_to_id: dict[str, int],
    label_to_id: dict[str, int],
    max_length: int = 128,
    batch_size: int = 64,
    epochs: int = 100,
    lr: float = 1e-2,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Train only the classification head of a frozen ``model`` and return its per-task eval metrics.

    The encoder runs once over the data (the head's inputs are cached), then the head is trained
    with AdamW on the cached features. The model's own head is trained in place.
    """
    _, head = find_head_module(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    encode = dict(tokenizer=tokenizer, task_to_id=task_to_id, label_to_id=label_to_id, max_length=max_length,
                  batch_size=batch_size, progress=progress)
    train_feats = _head_inputs(model, head, train_rows, **encode)
    eval_feats = _head_inputs(model, head, eval_rows, **encode)
    _train_head(head, train_feats, epochs, lr, seed)
    tally = _PerTaskTally()
    with torch.no_grad():
        for x, y, tasks in eval_feats:
            logits = head(x).float()
            losses = nn.functional.cross_entropy(logits, y, reduction="none").tolist()
            correct = (logits.argmax(-1) == y).float().tolist()
            for task, loss, ok in zip(tasks, losses, correct):
                tally.add(task, loss=loss, accuracy=ok)
    return tally.means(task_to_id)


def _head_inputs(
    model: nn.Module,
    head: nn.Module,
    rows: Sequence[Row],
    tokenizer: Any,
    task_to_id: dict[str, int],
    label_to_id: dict[str, int],
    max_length: int,
    batch_size: int,
    progress: bool,
) -> list[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """``[(head input, labels, task names)]`` per batch of ``rows``: the frozen model run once, its head's input kept."""
    from .data import encode_rows

    device = _model_device(model)
    collate = PolyDataCollator(tokenizer)
    captured: list[torch.Tensor] = []

    def grab(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
        captured.append(inputs[0].detach())

    out = []
    chunks = list(_batches(list(rows), batch_size))
    handle = head.register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            for chunk in _with_progress(chunks, progress, "baseline features"):
                batch = collate(encode_rows(chunk, tokenizer, "classification", task_to_id, label_to_id, max_length))
                batch.pop("task_ids")
                labels = batch.pop("labels")
                captured.clear()
                model(**{k: v.to(device) for k, v in batch.items()})
                out.append((captured[-1], labels.to(device), [r.task for r in chunk]))
    finally:
        handle.remove()
    return out


def _train_head(head: nn.Module, feats: list[tuple[torch.Tensor, torch.Tensor, list[str]]], epochs: int, lr: float, seed: int) -> None:
    """AdamW on the cross-entropy of ``head`` over cached ``feats`` (batches in a seeded random order per
    epoch); the head ends frozen and in eval mode."""
    for p in head.parameters():
        p.requires_grad_(True)
    head.train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(epochs):
            for i in torch.randperm(len(feats), generator=generator).tolist():
                x, y, _tasks = feats[i]
                loss = nn.functional.cross_entropy(head(x).float(), y)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
    head.eval()
    for p in head.parameters():
        p.requires_grad_(False)
