"""Training a :class:`~polytropon.model.PolyModel` with the Hugging Face ``Trainer`` family and TRL.

* :class:`PolyTrainer` -- a :class:`transformers.Trainer` with a two-speed optimizer (router logits get their own
  learning rate, :func:`~polytropon.toolkit.optim.param_groups`), the optional IBP prior
  (:func:`~polytropon.toolkit.priors.ibp_loss`); adapter-only checkpoints and exact resume as with the plain Trainer.
* :func:`poly_trainer_class` -- the same behaviour on any ``Trainer`` subclass (``Seq2SeqTrainer``, TRL's
  ``SFTTrainer``); :func:`PolySFTTrainer` is TRL's ``SFTTrainer`` with it.
* :class:`TaskIdsCollator` -- wraps any data collator so that each batch carries the examples' ``task_ids``;
  :class:`PolyDataCollator` pads token features and batches ``task_ids`` itself.
* :class:`JsonlLogCallback` -- the Trainer's log dicts as JSON lines.

A plain ``transformers.Trainer`` already keeps the ``task_ids`` column (``PolyModel.forward`` shows the wrapped
model's parameters plus ``task_ids``), writes adapter-only checkpoints (``PolyModel`` is a ``PreTrainedModel``, so
the Trainer calls its ``save_pretrained``) and resumes from them exactly; the trainers here add the two-speed
optimizer, the IBP prior and the ``task_ids`` plumbing TRL needs (see ``docs/training.md``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import operator
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import Trainer, TrainerCallback

from ..checkpoint import TRAINER_STATE_NAME, WEIGHTS_NAME, load_tensors
from ..fsdp import copy_full_, gathered, is_sharded
from ..signature import bind_forward

__all__ = [
    "PolyTrainer",
    "PolySFTTrainer",
    "poly_trainer_class",
    "TaskIdsCollator",
    "PolyDataCollator",
    "JsonlLogCallback",
    "TRAINABLE_STATE_NAME",
    "TASK_IDS_COLUMN",
    "trainable_state",
    "state_digest",
    "load_checkpoint",
]

#: File with every trainable tensor in a checkpoint (beside the adapter; what resuming reads), under the model's
#: own parameter names: ``model.safetensors``, which ``PolyModel.save_pretrained`` writes when a trainer calls it.
TRAINABLE_STATE_NAME = TRAINER_STATE_NAME
#: The dataset column / batch key holding one task id per example.
TASK_IDS_COLUMN = "task_ids"


# --------------------------------------------------------------------------- collators
def _task_id_of(feature: Mapping[str, Any], index: int) -> int:
    if not isinstance(feature, Mapping) or TASK_IDS_COLUMN not in feature:
        keys = sorted(feature) if isinstance(feature, Mapping) else type(feature).__name__
        raise ValueError(
            f"example {index} of the batch has no {TASK_IDS_COLUMN!r} column (it has {keys}): give the dataset a "
            f"{TASK_IDS_COLUMN!r} column with one task id (an int) per example, e.g. "
            f"dataset.map(lambda ex: {{'{TASK_IDS_COLUMN}': task_to_id[ex['task']]}})"
        )
    value = feature[TASK_IDS_COLUMN]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (list, tuple)) or (isinstance(value, torch.Tensor) and value.numel() != 1):
        raise ValueError(
            f"example {index} of the batch has {len(value)} task ids in one row: rows packed from several examples "
            "would route every token of the row to one task. Train without packing (SFTConfig(packing=False), "
            "padding_free=False), or give each row the examples of a single task"
        )
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):  # ints and NumPy ints, not floats or names
        raise TypeError(f"example {index}: {TASK_IDS_COLUMN!r} must be an int, got {feature[TASK_IDS_COLUMN]!r}")
    return operator.index(value)


@dataclass
class TaskIdsCollator:
    """Wrap a data collator so that every batch carries ``task_ids``: a LongTensor ``(batch,)``.

    Each feature's ``task_ids`` (an int) is checked before ``collator`` runs; ``collator`` gets the features
    unchanged (a collator that reads ``task_ids`` itself keeps working) and the batch it returns gets
    ``task_ids`` as a LongTensor, whether it dropped the key (TRL's collator keeps only the token columns) or
    kept it in another form.

    Args:
        collator: any callable ``list[dict] -> dict`` (``DataCollatorWithPadding``, ``DataCollatorForSeq2Seq``,
            TRL's ``DataCollatorForLanguageModeling``, ...).

    Raises:
        ValueError: a feature without ``task_ids`` (naming the example and the fix), or several task ids in
            one row (packed rows: naming the fix). TypeError: a task id that is not an integer.
    """

    collator: Callable[[list[dict[str, Any]]], Mapping[str, Any]]

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not features:
            raise ValueError("empty batch")
        _refuse_packed(features)
        ids = [_task_id_of(feature, i) for i, feature in enumerate(features)]  # all checked before collating
        batch = dict(self.collator(list(features)))
        rows = batch.get("input_ids")
        if isinstance(rows, torch.Tensor) and rows.dim() >= 2 and rows.shape[0] != len(ids):
            raise ValueError(
                f"the collator made {rows.shape[0]} row(s) of {len(ids)} examples (padding-free batching puts "
                "the examples of a batch into one row): one task id per example needs one example per row; "
                "train with padding_free=False"
            )
        batch[TASK_IDS_COLUMN] = torch.tensor(ids, dtype=torch.long)
        return batch


def _refuse_packed(features: Sequence[Mapping[str, Any]]) -> None:
    """Rows that TRL packed from several examples (``seq_lengths`` with more than one entry) are refused."""
    for index, feature in enumerate(features):
        lengths = feature.get("seq_lengths") if isinstance(feature, Mapping) else None
        if lengths is not None and (len(lengths) > 1 or TASK_IDS_COLUMN not in feature):
            raise ValueError(
                f"example {index} of the batch is a packed row ({len(lengths)} sequence(s), "
                f"{TASK_IDS_COLUMN!r} {'dropped' if TASK_IDS_COLUMN not in feature else 'kept once'}): packing "
                "puts examples of different tasks into one row, whose tokens would all be routed to one task. "
                "Train without packing: SFTConfig(packing=False)"
            )


@dataclass
class PolyDataCollator:
    """Pad ``input_ids``/``attention_mask``/``labels`` and batch ``task_ids``.

    Args:
        tokenizer: supplies the pad token id and padding side.
        label_pad_id: padding for token-level labels (ignored by the loss).
        pad_to_multiple_of: optional rounding of the padded length.

    Features are dicts with ``input_ids``, ``attention_mask``, ``task_ids`` (an int), and ``labels`` (an int for
    classification, a list of token ids otherwise). Unknown keys are dropped. The output holds ``torch.long``
    tensors: ``input_ids``/``attention_mask`` ``(batch, length)``, ``task_ids`` ``(batch,)``, ``labels``
    ``(batch,)`` or ``(batch, label length)``.

    Raises:
        ValueError: an empty batch, or a feature without ``task_ids``.
    """

    tokenizer: Any
    label_pad_id: int = -100
    pad_to_multiple_of: Optional[int] = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("empty batch")
        ids = [_task_id_of(feature, i) for i, feature in enumerate(features)]
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        left = getattr(self.tokenizer, "padding_side", "right") == "left"

        def pad(seq: Sequence[int], value: int, length: int) -> list[int]:
            filler = [value] * (length - len(seq))
            return filler + list(seq) if left else list(seq) + filler

        batch = {
            "input_ids": torch.tensor([pad(f["input_ids"], pad_id, longest) for f in features], dtype=torch.long),
            "attention_mask": torch.tensor(
                [pad(f.get("attention_mask", [1] * len(f["input_ids"])), 0, longest) for f in features],
                dtype=torch.long,
            ),
            TASK_IDS_COLUMN: torch.tensor(ids, dtype=torch.long),
        }
        if "labels" in features[0]:
            first = features[0]["labels"]
            if isinstance(first, (list, tuple)):
                # token labels: pad on the right for seq2seq targets, like the inputs for causal LMs
                same_as_inputs = all(len(f["labels"]) == len(f["input_ids"]) for f in features)
                length = longest if same_as_inputs else max(len(f["labels"]) for f in features)
                if same_as_inputs:
                    labels = [pad(f["labels"], self.label_pad_id, length) for f in features]
                else:
                    labels = [list(f["labels"]) + [self.label_pad_id] * (length - len(f["labels"])) for f in features]
                batch["labels"] = torch.tensor(labels, dtype=torch.long)
            else:
                batch["labels"] = torch.tensor([int(f["labels"]) for f in features], dtype=torch.long)
        return batch


# --------------------------------------------------------------------------- checkpoints
def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor of ``model`` by parameter name (detached, contiguous, on CPU).

    Tensors sharded by FSDP2 are gathered in full: then every rank must call it (a collective call).
    """
    state = gathered({n: p for n, p in model.named_parameters() if p.requires_grad})
    return {n: t.detach().cpu().contiguous() for n, t in state.items()}


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names and float32 bytes of ``state``; equal digests mean identical tensors."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].float().numpy().tobytes())
    return h.hexdigest()


def load_checkpoint(model: nn.Module, checkpoint: str) -> None:
    """Load a Trainer checkpoint of a PolyModel into ``model`` (a PolyModel), checking it fully first.

    Reads :data:`TRAINABLE_STATE_NAME` (every trainable tensor) when present, else the active adapter's
    ``adapter_model.safetensors`` (as PEFT writes it). Tensors are copied in place, so an optimizer holding the
    parameters keeps them; a parameter sharded by FSDP2 takes its own shard.

    Raises:
        ValueError: no such checkpoint files, or tensors missing or not fitting the model (nothing is changed).
    """
    state_path = os.path.join(checkpoint, TRAINABLE_STATE_NAME)
    if os.path.isfile(state_path):
        saved = load_file(state_path)
        params = dict(model.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
        if missing:
            raise ValueError(f"{checkpoint}: checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
        for name, tensor in saved.items():
            if name not in params or params[name].shape != tensor.shape:
                raise ValueError(f"{checkpoint}: tensor {name} does not fit the model")
        targets = {name: params[name] for name in saved}
    elif os.path.isfile(os.path.join(checkpoint, WEIGHTS_NAME)) and hasattr(model, "adapter_state_dict"):
        _, saved = load_tensors(checkpoint)
        targets = model.adapter_state_dict()
        missing = sorted(set(targets) - set(saved))
        if missing:
            raise ValueError(f"{checkpoint}: checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
        for name, target in targets.items():
            if tuple(saved[name].shape) != tuple(target.shape):
                raise ValueError(f"{checkpoint}: tensor {name} does not fit the model")
    else:
        raise ValueError(
            f"{checkpoint}: not a polytropon checkpoint (neither {TRAINABLE_STATE_NAME} nor {WEIGHTS_NAME})"
        )
    with torch.no_grad():
        for name, target in targets.items():
            copy_full_(target, saved[name])


# --------------------------------------------------------------------------- trainers
class _PolyTrainerMixin:
    """What :class:`PolyTrainer` adds to a ``transformers.Trainer`` class (see :func:`poly_trainer_class`)."""

    def __init__(
        self,
        *args: Any,
        router_lr: Optional[float] = None,
        ibp_alpha: Optional[float] = None,
        ibp_weight: float = 0.0,
        head_lr: Optional[float] = None,
        **kwargs: Any,
    ) -> None:
        for name, value in (("router_lr", router_lr), ("ibp_alpha", ibp_alpha), ("head_lr", head_lr)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ValueError(f"{name} must be a non-negative number or None, got {value!r}")
        if isinstance(ibp_weight, bool) or not isinstance(ibp_weight, (int, float)):
            raise ValueError(f"ibp_weight must be a number, got {ibp_weight!r}")
        super().__init__(*args, **kwargs)
        self.router_lr = router_lr
        self.head_lr = head_lr
        self.ibp_alpha = ibp_alpha
        self.ibp_weight = ibp_weight
        if self.data_collator is not None and not isinstance(self.data_collator, (TaskIdsCollator, PolyDataCollator)):
            self.data_collator = TaskIdsCollator(self.data_collator)
        _route_fused_lm_head(self.model)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and TASK_IDS_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, TASK_IDS_COLUMN]  # TRL names its columns itself

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """The trainer's loss, plus ``ibp_weight * ibp_loss(model, ibp_alpha)`` when the prior is on."""
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self.ibp_alpha is None or not self.ibp_weight:
            return result
        from .priors import ibp_loss

        prior = self.ibp_weight * ibp_loss(self.accelerator.unwrap_model(model), alpha=self.ibp_alpha)
        if return_outputs:
            loss, outputs = result
            return loss + prior, outputs
        return result + prior

    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        """AdamW over :func:`~polytropon.toolkit.optim.param_groups`: skills at ``args.learning_rate``, router
        logits at ``router_lr`` (default: the same) without weight decay, ``modules_to_save`` copies at
        ``head_lr`` (default: with the skills)."""
        if self.optimizer is None:
            from .optim import param_groups

            lr = self.args.learning_rate
            router_lr = lr if self.router_lr is None else self.router_lr
            groups = param_groups(self.model, lr, router_lr, self.args.weight_decay, head_lr=self.head_lr)
            self.optimizer = torch.optim.AdamW(groups, betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon)
        return self.optimizer

    # Checkpoints: the Trainer's own path (PolyModel.save_pretrained, model.load_state_dict) does the job, except
    # for a model sharded by FSDP2, where the Trainer hands rank 0 a state dict still holding DTensor shards: then
    # every rank gathers the adapter itself (a collective call) and resuming copies each tensor into its shards.
    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if not is_sharded(model):
            super()._save(output_dir, state_dict=state_dict)
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model.save_pretrained(output_dir, is_main_process=self.args.should_save)  # every rank gathers
        if not self.args.should_save:
            return
        if self.processing_class is not None and hasattr(self.processing_class, "save_pretrained"):
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        if not is_sharded(target):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        load_checkpoint(target, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        target = self.accelerator.unwrap_model(self.model)
        if not is_sharded(target):
            super()._load_best_model()
            return
        load_checkpoint(target, self.state.best_model_checkpoint)


def _route_fused_lm_head(model: nn.Module) -> None:
    """Keep a PolyModel's own ``forward`` when TRL put its fused LM head on the PolyModel itself.

    TRL treats a model that is not a ``peft.PeftModel`` as the transformers model and replaces its ``forward``
    with one that calls ``model.base_model`` directly, bypassing the PolyModel's routing. The head is moved to
    the wrapped transformers model (where TRL puts it for PEFT models) and the PolyModel's routed ``forward``
    restored, so ``task_ids`` route every call.
    """
    forward = model.__dict__.get("forward")
    if forward is None or not hasattr(model, "get_base_model") or not hasattr(model, "peft_config"):
        return
    function = getattr(forward, "__func__", None)
    if getattr(forward, "__self__", None) is not model or getattr(function, "__polytropon_forward__", False):
        return
    if getattr(function, "__wrapped__", None) is not type(model).forward:  # not a wrapper of PolyModel.forward
        return
    from trl.trainer.utils import add_fused_lm_head

    model.forward = bind_forward(model, type(model).forward)
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))


def poly_trainer_class(base: type) -> type:
    """A subclass of the ``transformers.Trainer`` subclass ``base`` with :class:`PolyTrainer`'s behaviour.

    Raises:
        TypeError: ``base`` is not a ``transformers.Trainer`` subclass.
    """
    if not isinstance(base, type) or not issubclass(base, Trainer):
        raise TypeError(f"base must be a transformers.Trainer subclass, got {base!r}")
    if issubclass(base, _PolyTrainerMixin):
        return base
    return _subclass(base)


@functools.lru_cache(maxsize=None)
def _subclass(base: type) -> type:
    return type(f"Poly{base.__name__}", (_PolyTrainerMixin, base), {"__module__": __name__, "__doc__": _DOC.format(base=base.__name__)})


_DOC = """``{base}`` for a PolyModel: two-speed optimizer, IBP prior, adapter-only checkpoints, exact resume.

    Takes ``{base}``'s arguments plus ``router_lr`` (learning rate of the router logits; default
    ``args.learning_rate``), ``head_lr`` (of the ``modules_to_save`` copies; default: the skills' rate), ``ibp_alpha``
    and ``ibp_weight`` (``loss += ibp_weight * ibp_loss(model, ibp_alpha)``).
    """


class PolyTrainer(_PolyTrainerMixin, Trainer):
    """A :class:`transformers.Trainer` for a :class:`~polytropon.model.PolyModel`.

    * Optimizer: AdamW over :func:`~polytropon.toolkit.optim.param_groups`; router logits use ``router_lr`` (default
      ``args.learning_rate``) and no weight decay, skills ``args.learning_rate`` and ``args.weight_decay``, saved
      modules (a head) ``head_lr`` (default ``args.learning_rate``) and ``args.weight_decay``. The scheduler scales
      every group.
    * Loss: the model's loss, plus ``ibp_weight * ibp_loss(model, ibp_alpha)`` with ``ibp_alpha`` set (the
      Indian Buffet Process prior of the learned allocations, :func:`~polytropon.toolkit.priors.ibp_loss`).
    * Checkpoints and ``save_model()``, as with the plain ``Trainer`` (``PolyModel.save_pretrained``, called by the
      Trainer): ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's names, loadable by
      ``PolyModel.from_pretrained`` and ``peft.PeftModel.from_pretrained``) and :data:`TRAINABLE_STATE_NAME` (the
      trainable tensors only); never the frozen base model. ``train(resume_from_checkpoint=...)`` and
      ``load_best_model_at_end`` load them back in place; a resumed run ends where an uninterrupted one does.
    * Batches: the data collator is wrapped in :class:`TaskIdsCollator` (unless it is one, or a
      :class:`PolyDataCollator`), so ``task_ids`` reach the model and a batch without them is a ValueError.

    Args:
        *args, **kwargs: :class:`transformers.Trainer`'s arguments.
        router_lr: learning rate of the router logits (``None``: ``args.learning_rate``).
        head_lr: learning rate of the ``modules_to_save`` copies (``None``: ``args.learning_rate``).
        ibp_alpha: concentration of the IBP prior (``None``: no prior).
        ibp_weight: weight of the prior in the loss.

    Raises:
        ValueError: a negative ``router_lr``, ``head_lr`` or ``ibp_alpha``, or a non-numeric ``ibp_weight``.
    """


@functools.lru_cache(maxsize=None)
def _sft_trainer_class() -> type:
    try:
        from trl import SFTTrainer
    except ImportError:  # pragma: no cover - trl is in the test extras
        raise ImportError("PolySFTTrainer needs TRL: pip install trl") from None
    cls = poly_trainer_class(SFTTrainer)
    cls.__name__ = cls.__qualname__ = "PolySFTTrainer"
    cls.__doc__ = (
        "TRL's ``SFTTrainer`` with :class:`PolyTrainer`'s behaviour: the ``task_ids`` column survives TRL's column "
        "selection and collator, TRL's fused LM head runs inside the PolyModel's routing, checkpoints are "
        "adapter-only, packed rows are refused. Same arguments as ``SFTTrainer`` plus ``router_lr``, "
        "``head_lr``, ``ibp_alpha``, ``ibp_weight``."
    )
    return cls


def __getattr__(name: str) -> Any:
    """``PolySFTTrainer`` is made on first use, so that TRL is imported only by those who use it."""
    if name == "PolySFTTrainer":
        return _sft_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class JsonlLogCallback(TrainerCallback):
    """Append every log dict of the main process (loss, learning rate, step, ...) as one JSON line to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_log(self, args: Any, state: Any, control: Any, logs: Optional[dict[str, Any]] = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        entry = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float, str))}}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
