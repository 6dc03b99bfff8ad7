"""polytropon: multi-task fine-tuning with Polytropon (Poly) and Multi-Head Routing (MHR) adapters.

A drop-in for PEFT's Poly tuner: ``from polytropon import PolyConfig, get_peft_model``. The research toolkit
(routing variants, task names, few-shot helpers, priors, read-outs) is exported here too; the plots live in
:mod:`polytropon.plots`, imported on demand because matplotlib and scipy are optional.
"""

from .analysis import allocation_matrix, routing_weights, task_similarity
from .config import PolyConfig
from .few_shot import collapse_to_average, freeze_skills, unfreeze_skills
from .layer import PolyAdapter, PolyLayer
from .model import PolyModel, get_peft_model
from .optim import param_groups
from .priors import ibp_loss
from .router import PolyRouter
from .routing import RoutingState
from .tasks import add_tasks, set_task_names
from .variants import FixedRouter

__all__ = [
    # the PEFT-compatible core
    "PolyConfig", "PolyModel", "get_peft_model", "PolyLayer", "PolyAdapter", "PolyRouter", "RoutingState",
    # the research toolkit
    "FixedRouter", "add_tasks", "set_task_names", "param_groups", "ibp_loss", "freeze_skills", "unfreeze_skills",
    "collapse_to_average", "routing_weights", "allocation_matrix", "task_similarity",
]
__version__ = "0.1.0"
