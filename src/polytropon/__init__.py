"""polytropon: multi-task fine-tuning with Polytropon (Poly) and Multi-Head Routing (MHR) adapters.

A drop-in for PEFT's Poly tuner: ``from polytropon import PolyConfig, get_peft_model``. Three layers, each
importing only the ones below it (see ``docs/architecture.md``):

* the tuner, in this folder: config, routers, per-call routing, layers and kernels, the model and the modules
  it hands off to (injection, calls, persistence), checkpoint format, export;
* :mod:`polytropon.toolkit`: the research toolkit (task names, few-shot helpers, priors, read-outs, plots);
* :mod:`polytropon.app`: the ``polytropon`` command line, its training loop, data loading and built-in suite.

``__all__`` is chosen in groups, in this order:

1. PEFT's names (``peft.tuners.poly`` and ``peft.get_peft_model``), so code written for PEFT's Poly tuner
   changes only its import: ``PolyConfig``, ``PolyModel``, ``PolyLayer``, ``get_peft_model``. PEFT's
   ``Linear`` has no counterpart: one :class:`PolyLayer` wraps both ``nn.Linear`` and GPT-2's ``Conv1D``.
2. The building blocks a researcher inspects or subclasses: ``PolyAdapter`` (one layer's skills),
   ``PolyRouter`` and ``FixedRouter`` (task -> skill weights), ``RoutingState`` (what the layers read).
3. The research toolkit, as functions of a model: the task axis (``add_tasks``, ``set_task_names``), few-shot
   adaptation (``freeze_skills``, ``unfreeze_skills``, ``collapse_to_average``), training aids
   (``param_groups``, ``ibp_loss``) and read-outs (``routing_weights``, ``allocation_matrix``,
   ``task_similarity``).

4. Training with the Hugging Face ``Trainer`` and TRL (:mod:`polytropon.toolkit.training`): ``PolyTrainer``,
   ``PolySFTTrainer``, ``poly_trainer_class``, ``TaskIdsCollator``, ``PolyDataCollator``, ``JsonlLogCallback``,
   ``load_checkpoint`` -- imported on first use, since the Trainer needs accelerate.

Not exported: the plots (:mod:`polytropon.toolkit.plots`, imported on demand because
matplotlib and scipy are optional), the application (:mod:`polytropon.app`), and helpers for one setting
(:mod:`polytropon.fsdp`, :mod:`polytropon.export`), imported from their modules.
"""

from .config import PolyConfig
from .layer import PolyAdapter, PolyLayer
from .model import PolyModel, get_peft_model
from .router import PolyRouter
from .routing import RoutingState
from .toolkit.analysis import allocation_matrix, routing_weights, task_similarity
from .toolkit.few_shot import collapse_to_average, freeze_skills, unfreeze_skills
from .toolkit.optim import param_groups
from .toolkit.priors import ibp_loss
from .toolkit.tasks import add_tasks, set_task_names
from .variants import FixedRouter

__all__ = [
    # 1. PEFT's names
    "PolyConfig", "PolyModel", "PolyLayer", "get_peft_model",
    # 2. building blocks
    "PolyAdapter", "PolyRouter", "FixedRouter", "RoutingState",
    # 3. the research toolkit: the task axis, few-shot adaptation, training aids, read-outs
    "add_tasks", "set_task_names",
    "freeze_skills", "unfreeze_skills", "collapse_to_average",
    "param_groups", "ibp_loss",
    "routing_weights", "allocation_matrix", "task_similarity",
    # 4. training with the Hugging Face Trainer and TRL (polytropon.toolkit.training, imported on first use)
    "PolyTrainer", "PolySFTTrainer", "poly_trainer_class", "TaskIdsCollator", "PolyDataCollator",
    "JsonlLogCallback", "load_checkpoint",
]
_TRAINING_NAMES = frozenset(__all__[-7:])


def __getattr__(name: str):
    """The training API, imported on first use (the Trainer needs accelerate, an optional dependency)."""
    if name in _TRAINING_NAMES:
        from .toolkit import training

        return getattr(training, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__version__ = "0.1.0"
