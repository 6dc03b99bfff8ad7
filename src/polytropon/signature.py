"""The call signature a :class:`~polytropon.model.PolyModel` shows to code that inspects ``forward``.

Trainers decide which batch columns reach the model by reading ``inspect.signature(model.forward)``:
``transformers.Trainer`` keeps only the dataset columns named like its parameters (with the default
``remove_unused_columns=True``) and decides from a ``**kwargs`` parameter whether the model takes loss
arguments. ``PolyModel.forward`` is written ``(*args, task_ids=None, **kwargs)``, which names no input column at
all. Every PolyModel therefore gets its own bound ``forward`` whose signature is the wrapped model's
``forward`` signature plus a keyword-only ``task_ids``: the very function of the class (same code, so
``torch.compile`` traces what it always traced), bound to the instance, with ``__signature__`` set. It is an
ordinary attribute of the instance, the way accelerate and transformers replace a model's ``forward``, so it
pickles and deep-copies through :func:`forward_state` / :func:`bind_forward`.
"""

from __future__ import annotations

import inspect
import types
from typing import Any, Callable

from torch import nn

__all__ = ["forward_signature", "bind_forward", "forward_state", "TASK_IDS_PARAMETER"]

#: The parameter added to the wrapped model's signature.
TASK_IDS_PARAMETER = inspect.Parameter("task_ids", inspect.Parameter.KEYWORD_ONLY, default=None)


def forward_signature(wrapped: nn.Module) -> inspect.Signature:
    """The wrapped model's ``forward`` signature with a keyword-only ``task_ids=None`` added.

    ``task_ids`` goes before a ``**kwargs`` parameter (where Python requires keyword-only parameters to be) or
    at the end. A wrapped model that already names a ``task_ids`` parameter keeps its own. Models whose
    signature cannot be read get ``(*args, task_ids=None, **kwargs)``.
    """
    try:
        params = list(inspect.signature(wrapped.forward).parameters.values())
    except (TypeError, ValueError):
        params = [
            inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
            inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
        ]
    if any(p.name == TASK_IDS_PARAMETER.name for p in params):
        return inspect.Signature(params)
    at = len(params) - 1 if params and params[-1].kind is inspect.Parameter.VAR_KEYWORD else len(params)
    return inspect.Signature(params[:at] + [TASK_IDS_PARAMETER] + params[at:])


def bind_forward(model: nn.Module, function: Callable[..., Any]) -> types.MethodType:
    """``function`` bound to ``model`` as a method whose ``inspect.signature`` is :func:`forward_signature`.

    A fresh function object sharing ``function``'s code, defaults and globals is made per model, so each
    model's signature is its own (the class's function is never changed).
    """
    clone = types.FunctionType(
        function.__code__, function.__globals__, function.__name__, function.__defaults__, function.__closure__
    )
    clone.__kwdefaults__ = dict(function.__kwdefaults__ or {})
    clone.__qualname__ = function.__qualname__
    clone.__doc__ = function.__doc__
    clone.__module__ = function.__module__
    clone.__polytropon_forward__ = True  # marks the per-model forward (see forward_state)
    self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    signature = forward_signature(model.get_submodule("model"))
    clone.__signature__ = signature.replace(parameters=[self_parameter, *signature.parameters.values()])
    return types.MethodType(clone, model)


def forward_state(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` (a module's ``__dict__``) without the per-model ``forward`` of :func:`bind_forward`.

    The bound method refers back to its model; it is rebuilt after unpickling instead of being pickled.
    """
    forward = state.get("forward")
    if getattr(getattr(forward, "__func__", None), "__polytropon_forward__", False):
        state = {k: v for k, v in state.items() if k != "forward"}
    return state
