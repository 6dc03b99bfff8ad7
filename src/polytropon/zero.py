"""DeepSpeed ZeRO-3: saving an adapter whose parameters are partitioned across the processes.

Under ZeRO-3 (``"zero_optimization": {"stage": 3}``) DeepSpeed replaces every managed parameter's data by an
empty tensor and keeps ``1/world_size`` of it on each process (``param.ds_tensor``); the full shape is in
``param.ds_shape``. A parameter is whole only inside ``deepspeed.zero.GatheredParameters([...])``, a collective
call every process enters with the same parameters in the same order.

:meth:`PolyModel.save_pretrained <polytropon.model.PolyModel.save_pretrained>` finds the partitioned parameters
of the adapters it saves (:func:`adapter_parameters`, :func:`partitioned`), gathers them on every process
(:func:`gathered_parameters`, ``modifier_rank=None``: read only), copies the adapter tensors, and lets rank 0
write them; every process returns after a barrier. The base model's frozen weights are never gathered. Given a
``state_dict`` gathered by the caller (the HF ``Trainer`` does so under ZeRO-3), it takes the adapter's tensors
from it instead (:func:`adapter_tensors_from_state_dict`) and makes no collective call. :func:`polytropon.fsdp.
is_sharded` is true for a model with partitioned trainable parameters and :func:`polytropon.fsdp.gathered`
gathers them, so code that saves sharded models on every rank (``PolyTrainer``) handles ZeRO-3 as FSDP2.

Loading needs no gathering: ``from_pretrained``/``load_adapter`` build the adapter's parameters anew, as plain
tensors, and copy the checkpoint into them (a base model partitioned by ``deepspeed.zero.Init`` is fine: the
layer sizes are read from ``nn.Linear.in_features``/``out_features``). Such a newly added adapter is not
partitioned and not known to a DeepSpeed engine created before: load it before ``deepspeed.initialize`` (or
the Trainer) to train it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

from .checkpoint import KEY_PREFIX


def is_partitioned(param: torch.Tensor) -> bool:
    """Whether ``param`` is managed by DeepSpeed ZeRO-3 (it carries DeepSpeed's ``ds_id``)."""
    return hasattr(param, "ds_id")


def adapter_parameters(model: nn.Module, adapter_names: Iterable[str]) -> list[nn.Parameter]:
    """The parameters of adapters ``adapter_names`` (skills, routers, ``modules_to_save`` copies) of a ``PolyModel``.

    Each parameter once, in the order of the model's layers, the same on every process. The base model's weights
    are not included.
    """
    names = list(adapter_names)
    params: dict[int, nn.Parameter] = {}
    for _, layer in model.poly_layers():
        for name in names:
            if name in layer.adapters:
                for param in layer.adapters[name].parameters():
                    params.setdefault(id(param), param)
    for _, wrapper in model.saved_modules():
        for name in names:
            if name in wrapper.modules_to_save:
                for param in wrapper.modules_to_save[name].parameters():
                    params.setdefault(id(param), param)
    return list(params.values())


def partitioned(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Those of ``params`` that DeepSpeed ZeRO-3 manages (see :func:`is_partitioned`) and that are not whole now.

    A parameter already gathered (``ds_status`` ``AVAILABLE``: inside its module's forward, or inside an
    enclosing :func:`gathered_parameters`) is left out: DeepSpeed refuses to gather it a second time.
    """
    return [p for p in params if is_partitioned(p) and getattr(p.ds_status, "name", None) != "AVAILABLE"]


@contextmanager
def gathered_parameters(params: list[torch.Tensor]) -> Iterator[None]:
    """Inside the block every parameter of ``params`` (ZeRO-3 partitioned) is whole, for reading.

    ``deepspeed.zero.GatheredParameters(params, modifier_rank=None)``: a collective call, every process must
    enter it with the same parameters in the same order; changes made inside are discarded on exit. Does
    nothing for an empty list (DeepSpeed is then not imported).
    """
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached copies of ``tensors``, which outlive a :func:`gathered_parameters` block."""
    with torch.no_grad():
        return {key: tensor.detach().clone() for key, tensor in tensors.items()}


def adapter_tensors_from_state_dict(
    model: nn.Module, adapter_name: str, state_dict: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The adapter's checkpoint tensors (``model.adapter_state_dict(adapter_name)``'s keys) taken from ``state_dict``.

    ``state_dict`` is a state dict of the whole ``model`` under its own parameter names, already gathered by the
    caller -- as the HF ``Trainer`` passes to ``save_pretrained(state_dict=...)`` under DeepSpeed ZeRO-3 (DeepSpeed's
    consolidated 16-bit state dict, trainable tensors only) or FSDP (``accelerator.get_state_dict``). A tensor
    shared by several modules (a shared router) may appear under any of its names.

    Raises:
        ValueError: ``state_dict`` holds none of the names of an adapter tensor (e.g. an adapter that is not
            trainable, left out by ``exclude_frozen_parameters``), naming the tensor and the names looked for.
    """
    prefixes: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        prefixes.setdefault(id(module), []).append(name)
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    candidates = {key: owners.get(id(tensor), []) for key, tensor in model.adapter_state_dict(adapter_name).items()}
    for path, wrapper in model.saved_modules():  # their state_dict() tensors are detached: match by module path
        if adapter_name in wrapper.modules_to_save:
            copy = wrapper.modules_to_save[adapter_name]
            for local in copy.state_dict():
                candidates[f"{KEY_PREFIX}{path}.{local}"] = [f"{p}.{local}" for p in prefixes[id(copy)]]
    out = {}
    for key, names in candidates.items():
        found = next((n for n in names if n in state_dict), None)
        if found is None:
            raise ValueError(
                f"the state_dict given to save_pretrained has no tensor for {key} of adapter {adapter_name!r} "
                f"(looked for {names}); pass the whole model's state dict, or call save_pretrained without state_dict"
            )
        out[key] = state_dict[found]
    return out
