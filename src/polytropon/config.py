"""Configuration of a Poly / MHR adapter.

:class:`PolyConfig` carries the same fields, with the same defaults and meanings, as PEFT's ``PolyConfig``,
and serialises to the same ``adapter_config.json`` schema (``"peft_type": "POLY"``), so a checkpoint written
by either library is read by the other.
"""

from __future__ import annotations

import dataclasses
import json
import math
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

#: Routing variants. ``"poly"`` is learned routing (PEFT's only variant); ``"private"``, ``"shared"`` and
#: ``"fixed"`` are the papers' fixed-allocation baselines (see :mod:`polytropon.variants`).
POLY_TYPES = ("poly", "private", "shared", "fixed")
#: Which adapted layers share one router (see :func:`polytropon.variants.router_groups`).
ROUTER_GRANULARITIES = ("module", "block", "model")
#: What an unknown task name (or an id ``>= n_tasks``) does: raise, or use the average of the skills at eval.
UNKNOWN_TASK_MODES = ("error", "average")

#: Fields PEFT's ``PolyConfig`` does not have, with their defaults. They are written to ``adapter_config.json``
#: only when they differ from these defaults, so a default config stays a plain PEFT config.
EXTENSION_DEFAULTS: dict[str, Any] = {
    "router_temperature": 1.0,
    "hard_routing": False,
    "router_granularity": "module",
    "allocation": None,
    "task_names": None,
    "unknown_task": "error",
}


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
        poly_type: Routing variant. ``"poly"`` is the learned task -> skill routing of the papers (and PEFT's
            only variant). The papers' baselines: ``"private"`` (task ``i`` uses skill ``i`` only; needs
            ``n_skills == n_tasks``), ``"shared"`` (one skill used by every task; needs ``n_skills == 1``) and
            ``"fixed"`` (the user-given ``allocation`` matrix). Only ``"poly"`` learns its routing.
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
        router_temperature: Temperature of the relaxed Bernoulli sampled by learned routers in training
            (positive; 1.0 as in PEFT). Lower is closer to binary samples.
        hard_routing: Learned routers use a binary allocation ``z in {0, 1}`` (each split's active skills
            averaged) in the forward pass, with straight-through gradients of the relaxed sample in training.
        router_granularity: ``"module"``: one router per adapted layer (PEFT); ``"block"``: one per
            transformer block (layers sharing the module-path prefix up to the first numeric component,
            e.g. ``model.layers.3``); ``"model"``: one router for the whole model.
        allocation: For ``poly_type="fixed"`` only: the task x skill matrix, ``n_tasks`` rows of ``n_skills``
            non-negative numbers (binary or soft), each row with a positive sum. Every split of every layer
            routes task ``t`` with ``allocation[t] / sum(allocation[t])``.
        task_names: Optional unique names of the tasks, in id order (``len == n_tasks``); ``task_ids`` may
            then mix names and ids.
        unknown_task: ``"error"`` (default): an unknown task name or an id ``>= n_tasks`` raises ValueError.
            ``"average"``: at eval such examples are routed to the average of the skills (uniform weights,
            as MHR-mu); in training they still raise.

    Fields from ``router_temperature`` on are polytropon's own: they are written to ``adapter_config.json``
    only when they differ from their defaults, so a config that leaves them alone is a plain PEFT config.
    """

    r: int = 8
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None
    init_weights: bool = True
    poly_type: Literal["poly", "private", "shared", "fixed"] = "poly"
    n_tasks: int = 1
    n_skills: int = 4
    n_splits: int = 1
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    router_temperature: float = 1.0
    hard_routing: bool = False
    router_granularity: Literal["module", "block", "model"] = "module"
    allocation: Optional[list[list[float]]] = None
    task_names: Optional[list[str]] = None
    unknown_task: Literal["error", "average"] = "error"
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
        self._check_extensions()

    def _check_extensions(self) -> None:
        """Validate polytropon's own fields (see the class docstring); raises before anything is used."""
        temp = self.router_temperature
        if isinstance(temp, bool) or not isinstance(temp, (int, float)):
            raise TypeError(f"PolyConfig.router_temperature must be a float, got {temp!r} ({type(temp).__name__})")
        if not math.isfinite(temp) or temp <= 0:
            raise ValueError(f"PolyConfig.router_temperature must be a positive finite number, got {temp}")
        self.router_temperature = float(temp)
        if not isinstance(self.hard_routing, bool):
            raise TypeError(f"PolyConfig.hard_routing must be a bool, got {self.hard_routing!r}")
        if self.router_granularity not in ROUTER_GRANULARITIES:
            raise ValueError(
                f"PolyConfig.router_granularity must be one of {list(ROUTER_GRANULARITIES)}, "
                f"got {self.router_granularity!r}"
            )
        if self.unknown_task not in UNKNOWN_TASK_MODES:
            raise ValueError(f"PolyConfig.unknown_task must be one of {list(UNKNOWN_TASK_MODES)}, got {self.unknown_task!r}")
        if self.poly_type != "poly" and (self.hard_routing or self.router_temperature != 1.0):
            raise ValueError(
                f"PolyConfig.hard_routing / router_temperature apply to learned routing only, "
                f"but poly_type={self.poly_type!r} has a fixed allocation"
            )
        if self.poly_type == "private" and self.n_skills != self.n_tasks:
            raise ValueError(
                f"PolyConfig.n_skills must equal n_tasks for poly_type='private' (one skill per task), "
                f"got n_skills={self.n_skills}, n_tasks={self.n_tasks}"
            )
        if self.poly_type == "shared" and self.n_skills != 1:
            raise ValueError(f"PolyConfig.n_skills must be 1 for poly_type='shared', got {self.n_skills}")
        if self.poly_type == "fixed":
            self.allocation = _check_allocation(self.allocation, self.n_tasks, self.n_skills)
        elif self.allocation is not None:
            raise ValueError(f"PolyConfig.allocation is only used with poly_type='fixed', got poly_type={self.poly_type!r}")
        if self.task_names is not None:
            names = self.task_names
            if isinstance(names, str) or not isinstance(names, (list, tuple)):
                raise TypeError(f"PolyConfig.task_names must be a list of strings, got {names!r}")
            for name in names:
                if not isinstance(name, str) or not name:
                    raise TypeError(f"PolyConfig.task_names must hold non-empty strings, got {name!r}")
            if len(names) != self.n_tasks:
                raise ValueError(
                    f"PolyConfig.task_names has {len(names)} names but n_tasks={self.n_tasks}: give one name per task"
                )
            duplicates = sorted({n for n in names if list(names).count(n) > 1})
            if duplicates:
                raise ValueError(f"PolyConfig.task_names must be unique, got duplicates {duplicates}")
            self.task_names = list(names)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict in PEFT's ``adapter_config.json`` schema."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("target_modules", "exclude_modules"):
            if isinstance(out[name], list):
                out[name] = sorted(out[name])
        for name, default in EXTENSION_DEFAULTS.items():
            if out[name] == default:
                del out[name]  # keep default configs byte-compatible with PEFT's schema
        out["auto_mapping"] = None
        return out

    @property
    def peft_compatible(self) -> bool:
        """Whether PEFT computes this adapter's outputs exactly from the saved files (see ``docs/research.md``).

        True for learned soft routing (``poly_type="poly"``, ``hard_routing=False``), whatever the router
        granularity, temperature, task names or unknown-task mode: PEFT drops those keys with a warning,
        loads every layer's copy of a shared router and computes the same eval outputs (it would train with
        untied routers at temperature 1). False for the fixed-allocation variants and hard routing.
        """
        return self.poly_type == "poly" and not self.hard_routing

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


def _check_allocation(allocation: Any, n_tasks: int, n_skills: int) -> list[list[float]]:
    """Validate a fixed task x skill allocation; returns it as a list of ``n_tasks`` lists of floats."""
    if allocation is None:
        raise ValueError("PolyConfig.allocation is required for poly_type='fixed': an n_tasks x n_skills matrix")
    if hasattr(allocation, "tolist"):  # torch / numpy arrays
        allocation = allocation.tolist()
    if not isinstance(allocation, (list, tuple)) or not all(isinstance(row, (list, tuple)) for row in allocation):
        raise TypeError(f"PolyConfig.allocation must be a matrix (list of lists of numbers), got {allocation!r}")
    if len(allocation) != n_tasks or any(len(row) != n_skills for row in allocation):
        shape = (len(allocation), sorted({len(row) for row in allocation}))
        raise ValueError(
            f"PolyConfig.allocation must have shape (n_tasks, n_skills) = ({n_tasks}, {n_skills}), "
            f"got {shape[0]} rows of lengths {shape[1]}"
        )
    rows = []
    for t, row in enumerate(allocation):
        values = []
        for v in row:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TypeError(f"PolyConfig.allocation[{t}] must hold finite numbers, got {v!r}")
            if v < 0:
                raise ValueError(f"PolyConfig.allocation[{t}] has a negative entry {v}")
            values.append(float(v))
        if sum(values) <= 0:
            raise ValueError(f"PolyConfig.allocation[{t}] is all zeros: every task needs at least one skill")
        rows.append(values)
    return rows
