"""How a :class:`~polytropon.model.PolyModel` is a ``transformers.PreTrainedModel`` and still reads as its wrapped model.

``transformers.Trainer`` calls ``save_pretrained`` only on instances of ``PreTrainedModel`` (or ``peft.PeftModel``)
and writes anything else as one ``model.safetensors`` of its whole state. So ``PolyModel`` subclasses
``PreTrainedModel``, without running its ``__init__`` (which needs a config, builds a generation config and
checks attention implementations on the shared config): ``PolyModel.__init__`` runs ``nn.Module.__init__`` only.

Subclassing brings ``PreTrainedModel``'s class attributes, properties and methods (``main_input_name``,
``_no_split_modules``, ``device``, ``dtype``, ``get_input_embeddings``, ``gradient_checkpointing_enable``,
``tie_weights``, ...), which would shadow the attribute fall-through to the wrapped model that a PolyModel has
always had. :func:`delegate_pretrained_attributes` puts back the behaviour of before, name by name:

* each name ``PreTrainedModel`` (or a mixin) adds to ``nn.Module`` and ``PolyModel`` does not define itself
  becomes a :class:`Delegated` attribute: read on an instance, it is the wrapped model's attribute (a value set
  on the PolyModel instance itself still wins, as before); read on the class, it does not exist, as before.
  A wrapped plain ``nn.Module`` lacking ``tie_weights`` / ``is_activation_checkpointing`` (which the Trainer reads
  from any ``PreTrainedModel``) gets a no-op / ``False`` (:data:`FALLBACKS`);
* each ``nn.Module`` method ``PreTrainedModel`` overrides (``to``, ``cuda``, ``half``, ``float``, ``train``,
  ``eval``) is ``nn.Module``'s again, so moving or casting a PolyModel moves its adapters too;
* ``__init_subclass__`` is ``nn.Module``'s (``PreTrainedModel``'s derives a ``config_class``; FSDP2 subclasses
  the model's class on the fly).
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn
from transformers import PreTrainedModel

__all__ = ["Delegated", "delegate_pretrained_attributes", "pretrained_only_names", "own_names", "MODULE_METHODS_RESTORED",
           "FALLBACKS"]

_MISSING = object()

def _no_op(*args: Any, **kwargs: Any) -> None:
    return None


#: What a few names read when the wrapped model is a plain ``nn.Module`` without them: ``transformers.Trainer``
#: reads them from every ``PreTrainedModel`` (DDP set-up, re-tying weights after loading a checkpoint).
FALLBACKS: dict[str, Any] = {"tie_weights": _no_op, "is_activation_checkpointing": False, "is_gradient_checkpointing": False}

#: ``nn.Module`` methods that ``PreTrainedModel`` overrides and a PolyModel takes from ``nn.Module`` again.
MODULE_METHODS_RESTORED = ("to", "cuda", "half", "float", "train", "eval")


class Delegated:
    """A non-data descriptor: ``instance.<name>`` is ``instance.model.<name>`` (the wrapped model's attribute).

    Non-data, so a value stored on the instance itself takes precedence; on the class it raises AttributeError,
    as a name the class does not define.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __set_name__(self, owner: type, name: str) -> None:  # pragma: no cover - set explicitly
        self.name = name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            raise AttributeError(f"type object {owner.__name__!r} has no attribute {self.name!r}")
        wrapped = instance.get_submodule("model")
        if self.name in FALLBACKS and not hasattr(wrapped, self.name):
            return FALLBACKS[self.name]
        return getattr(wrapped, self.name)


def pretrained_only_names() -> list[str]:
    """Names ``PreTrainedModel`` and its mixins define that ``nn.Module`` does not (dunder names left out)."""
    names = set(dir(PreTrainedModel)) - set(dir(nn.Module))
    return sorted(n for n in names if not (n.startswith("__") and n.endswith("__")))


def delegate_pretrained_attributes(cls: type, own: set[str]) -> type:
    """Install :class:`Delegated` attributes and ``nn.Module``'s methods on ``cls`` (a ``PreTrainedModel`` subclass).

    ``own``: the names ``cls`` defines itself and keeps (``save_pretrained``, ``from_pretrained``, ...).
    """
    for name in pretrained_only_names():
        if name not in own:
            setattr(cls, name, Delegated(name))
    for name in MODULE_METHODS_RESTORED:
        if name not in own:
            setattr(cls, name, inspect.getattr_static(nn.Module, name))
    return cls


def own_names(namespace: dict[str, Any]) -> set[str]:
    """The names a class body defines (``vars(cls)``) that are not copies of ``PreTrainedModel``'s attributes
    (``PreTrainedModel.__init_subclass__`` stores a ``config_class`` in every subclass)."""
    return {n for n, v in namespace.items() if v is not inspect.getattr_static(PreTrainedModel, n, _MISSING)}
