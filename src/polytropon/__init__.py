"""polytropon: multi-task fine-tuning with Polytropon (Poly) and Multi-Head Routing (MHR) adapters.

A drop-in for PEFT's Poly tuner: ``from polytropon import PolyConfig, get_peft_model``.
"""

from .config import PolyConfig
from .layer import PolyAdapter, PolyLayer
from .model import PolyModel, get_peft_model
from .router import PolyRouter
from .routing import RoutingState

__all__ = ["PolyConfig", "PolyModel", "get_peft_model", "PolyLayer", "PolyAdapter", "PolyRouter", "RoutingState"]
__version__ = "0.1.0"
