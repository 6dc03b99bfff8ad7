"""Configuration of a Poly / MHR adapter.

:class:`PolyConfig` carries the same fields, with the same defaults and meanings, as PEFT's ``PolyConfig``,
and serialises to the same ``adapter_config.json`` schema (``"peft_type": "POLY"``), so a checkpoint written
by either library is read by the other.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

CONFIG_NAME = "adapter_config.json"
PEFT_TYPE = "POLY"

#: Task types understood by PEFT (``peft.TaskType``); ``None`` means "infer from the model class".
TASK_TYPES = (
    "SEQ_CLS",
    "SEQ_2_SEQ_LM",
    "CAUSAL_LM",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
)

POLY_TYPES = ("poly",)


@dataclass
class PolyConfig:
    """Configuration of a Polytropon (Poly) or Multi-Head Routing (MHR) adapter.

    Every adapted layer ``W`` (``in_features -> out_features``) gets an inventory of ``n_skills`` LoRA
    skills, each split into ``n_splits`` blocks, and a router with one logit per (task, split, skill).
    For an example of task ``t`` the layer computes::

        w[t, q, :] = normalise(sigmoid(logits[t, q, :]))          # eval; relaxed Bernoulli in training
        A_t = concat_q( sum_s w[t, q, s] * A[q, s] )               # (in_features, r)
        B_t = concat_q( sum_s w[t, q, s] * B[q, s] )               # (r, out_features)
        y   = W x + (x A_t B_t) / r

    ``n_splits == 1`` is Poly (Ponti et al. 2022); ``n_splits > 1`` is MHR (Caccia et al. 2022).

    Attributes:
        r: Rank of every LoRA skill. Must be positive.
        target_modules: Modules to adapt. A list of names is matched against the last component(s) of each
            module's dotted name (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``); a string is a
            regular expression matched against the full name. ``None`` picks the defaults for the model's
            architecture (see :mod:`polytropon.targets`).
        exclude_modules: Modules never adapted, with the same matching rules as ``target_modules``.
        modules_to_save: Modules besides the adapters that are trained and saved in the checkpoint (for
            example a classification head). Each is replaced by a trainable copy per adapter.
        init_weights: If ``True`` the B matrices start at zero, so the adapted model starts equal to the base
            model; if ``False`` they get the same Kaiming-uniform init as A (useful for tests).
        poly_type: Routing variant. ``"poly"`` is the learned task -> skill routing of the papers.
        n_tasks: Number of tasks, i.e. rows of every router. Task ids range over ``0 .. n_tasks - 1``.
        n_skills: Number of LoRA skills in every adapted layer.
        n_splits: Number of blocks every skill is split into (MHR heads). Must divide the ``in_features``
            and ``out_features`` of every adapted layer.
        task_type: PEFT task type (``"CAUSAL_LM"``, ``"SEQ_2_SEQ_LM"``, ``"SEQ_CLS"``, ``"TOKEN_CLS"``,
            ``"QUESTION_ANS"``, ``"FEATURE_EXTRACTION"``). Inferred from the model class when ``None`` and
            written to the checkpoint, since PEFT needs it to route task ids.
        base_model_name_or_path: Name or path of the base model, recorded in the checkpoint.
        revision: Revision of the base model, recorded in the checkpoint.
        inference_mode: ``True`` once loaded for inference only (adapter weights frozen).
    """

    r: int = 8
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None
    init_weights: bool = True
    poly_type: Literal["poly"] = "poly"
    n_tasks: int = 1
    n_skills: int = 4
    n_splits: int = 1
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    peft_type: str = field(default=PEFT_TYPE, init=False)

    def __post_init__(self) -> None:
        for name in ("r", "n_tasks", "n_skills", "n_splits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"PolyConfig.{name} must be an int, got {value!r} ({type(value).__name__})")
            if value <= 0:
                raise ValueError(f"PolyConfig.{name} must be a positive integer, got {value}")
        if self.poly_type not in POLY_TYPES:
            raise ValueError(f"PolyConfig.poly_type must be one of {list(POLY_TYPES)}, got {self.poly_type!r}")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"PolyConfig.task_type must be None or one of {list(TASK_TYPES)}, got {self.task_type!r}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is None or isinstance(value, str):
                continue
            if isinstance(value, (set, tuple)):
                value = sorted(value)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise TypeError(f"PolyConfig.{name} must be None, a regex string or a list of names, got {value!r}")
            setattr(self, name, list(value))
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(isinstance(v, str) for v in self.modules_to_save):
                raise TypeError(f"PolyConfig.modules_to_save must be a list of names, got {self.modules_to_save!r}")
            self.modules_to_save = list(self.modules_to_save)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict in PEFT's ``adapter_config.json`` schema."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("target_modules", "exclude_modules"):
            if isinstance(out[name], list):
                out[name] = sorted(out[name])
        out["auto_mapping"] = None
        return out

    def save_pretrained(self, save_directory: str) -> None:
        """Write ``adapter_config.json`` into ``save_directory`` (created if missing)."""
        from .checkpoint import atomic_write_bytes

        os.makedirs(save_directory, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        atomic_write_bytes(os.path.join(save_directory, CONFIG_NAME), text.encode("utf-8"))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "PolyConfig":
        """Build a config from a parsed ``adapter_config.json``; unknown PEFT bookkeeping keys are ignored.

        Raises:
            ValueError: if the dict describes another PEFT method (``peft_type`` other than ``"POLY"``).
        """
        peft_type = data.get("peft_type", PEFT_TYPE)
        if peft_type != PEFT_TYPE:
            raise ValueError(f"{source}: peft_type is {peft_type!r}, expected {PEFT_TYPE!r}")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_pretrained(cls, directory: str) -> "PolyConfig":
        """Read ``adapter_config.json`` from ``directory``.

        Raises:
            FileNotFoundError: if the file does not exist.
            ValueError: if it is not valid JSON or not a Poly config.
        """
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no adapter config found")
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not a valid JSON adapter config ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data, source=path)
        except (TypeError, ValueError) as exc:
            msg = str(exc)
            raise ValueError(msg if msg.startswith(path) else f"{path}: {msg}") from None
