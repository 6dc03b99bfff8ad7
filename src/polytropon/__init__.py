"""polytropon: multi-task fine-tuning with Polytropon (Poly) and Multi-Head Routing (MHR) adapters.

A drop-in for PEFT's Poly tuner: ``from polytropon import PolyConfig, get_peft_model``.
"""

from .config import PolyConfig
from .layer import PolyAdapter, PolyLayer
from .model import PolyModel, get_peft_model
from .router import PolyRouter
from .routing import RoutingState

__all__ = ["PolyConfig", "PolyModel", "get_peft_model", "PolyLayer", "PolyAdapter", "PolyRouter", "RoutingState"]

# --- research toolkit (issue 4): routing variants, tasks, training helpers, read-outs; plots live in
# polytropon.plots (imported on demand: matplotlib/scipy are optional)
from .analysis import allocation_matrix, routing_weights, task_similarity
from .tasks import add_tasks, set_task_names
from .few_shot import collapse_to_average, freeze_skills, unfreeze_skills
from .optim import param_groups
from .priors import ibp_loss
from .variants import FixedRouter

__all__ += [
    "FixedRouter", "add_tasks", "set_task_names", "param_groups", "ibp_loss", "freeze_skills", "unfreeze_skills",
    "collapse_to_average", "routing_weights", "allocation_matrix", "task_similarity",
]
# --- end research toolkit
__version__ = "0.1.0"
