"""polytropon: multi-task fine-tuning with Polytropon (Poly) and Multi-Head Routing (MHR) adapters.

A drop-in for PEFT's Poly tuner: ``from polytropon import PolyConfig, get_peft_model``. Three layers, each
importing only the ones below it (see ``docs/architecture.md``):

* the tuner, in this folder: config, router, routing, layer and kernels, model, checkpoints, export;
* :mod:`polytropon.toolkit`: the research toolkit (task names, few-shot helpers, priors, read-outs, plots);
* :mod:`polytropon.app`: the ``polytropon`` command line, its training loop, data loading and built-in suite.

The toolkit's functions are exported here too (its training API -- ``PolyTrainer``, ``PolySFTTrainer``,
``TaskIdsCollator``, ... -- on first use, since the Trainer needs accelerate); the plots live in :mod:`polytropon.toolkit.plots`, imported
on demand because matplotlib and scipy are optional.
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
    # the PEFT-compatible core
    "PolyConfig", "PolyModel", "get_peft_model", "PolyLayer", "PolyAdapter", "PolyRouter", "RoutingState",
    # the research toolkit
    "FixedRouter", "add_tasks", "set_task_names", "param_groups", "ibp_loss", "freeze_skills", "unfreeze_skills",
    "collapse_to_average", "routing_weights", "allocation_matrix", "task_similarity",
    # training with the Hugging Face Trainer and TRL (polytropon.toolkit.training, imported on first use)
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
