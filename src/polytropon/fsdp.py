"""Sharded training with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

A Poly model shards like any transformers model: ``fully_shard`` on every transformer block, then on the
root. Two things are specific to Poly adapters:

* A learned router shared by layers of several blocks (``router_granularity="model"``, or ``"block"`` when
  the sharded units are smaller than the blocks) belongs to no single block; FSDP refuses a parameter
  claimed by two units. :func:`fully_shard_routers` makes every shared router its own unit, gathered when
  the first layer of a call asks for its weights; run it before sharding the blocks.
* Under FSDP a layer's parameters exist in full only inside that layer's forward. The model then does not
  draw the training routes of all layers at the start of the call (the single-process fast path,
  :func:`polytropon.router.presample`); every router draws its own inside its layer, in the order the layers
  run. For models whose layers run in the order they are registered (transformers decoders and encoders),
  that is the same random numbers in the same order: a sharded step equals the single-process step.

:meth:`PolyModel.save_pretrained <polytropon.model.PolyModel.save_pretrained>` gathers the shards (and DeepSpeed
ZeRO-3 partitions, :mod:`polytropon.zero`); call it on every rank (rank 0 writes).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from . import zero
from .router import PolyRouter


def _dtensor_type() -> tuple[type, ...]:
    """``(DTensor,)``, or ``()`` on a torch without the public ``torch.distributed.tensor`` (before 2.5)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return ()
    return (DTensor,)


def fully_shard_routers(model: nn.Module, **fully_shard_kwargs: Any) -> list[nn.Module]:
    """Apply ``fully_shard`` to every learned router shared by several layers; returns those routers.

    Call it on every rank before ``fully_shard`` is applied to the blocks and the root (or before
    ``accelerate``/the HF ``Trainer`` prepares the model: they leave modules that are already sharded alone).
    Routers of a single layer are left to their block's unit. ``eval_weights`` is registered as a forward
    method, so that eval-mode calls also gather the router's logits.

    Args:
        model: a :class:`~polytropon.model.PolyModel` (or any module holding Poly layers).
        **fully_shard_kwargs: passed to ``fully_shard`` (``mesh``, ``mp_policy``, ...). ``reshard_after_forward``
            defaults to ``False``: the logits (``n_tasks x n_splits * n_skills`` numbers) stay gathered until
            the backward pass is done instead of being gathered again by every layer that reads them.

    Raises:
        ValueError: ``model`` has already been sharded (its shared routers would belong to another unit).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    routers: dict[int, PolyRouter] = {}
    for module in model.modules():
        if isinstance(module, PolyRouter) and module.shared and id(module) not in routers:
            routers[id(module)] = module
    if routers and any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ValueError(
            "fully_shard_routers must run before fully_shard is applied to the model's blocks or root: "
            "the model already has sharded modules"
        )
    fully_shard_kwargs.setdefault("reshard_after_forward", False)
    for router in routers.values():
        fully_shard(router, **fully_shard_kwargs)
        register_fsdp_forward_method(router, "eval_weights")
    return list(routers.values())


def is_local_full(tensor: torch.Tensor, shape: tuple[int, ...]) -> bool:
    """Whether ``tensor`` is a plain local tensor of ``shape``.

    Not so for a parameter that FSDP keeps sharded outside its module's forward: a ``DTensor`` shard
    (``fully_shard``) or a flat 1-D view (``FullyShardedDataParallel`` with ``use_orig_params``).
    """
    return type(tensor) in (torch.Tensor, nn.Parameter) and tensor.shape == shape


def is_sharded(model: nn.Module) -> bool:
    """Whether saving ``model`` is a collective call: it holds modules sharded by FSDP2 (``fully_shard``) in an
    initialised process group, or trainable parameters partitioned by DeepSpeed ZeRO-3.

    Raises:
        ValueError: ``model`` holds a ``FullyShardedDataParallel`` (FSDP1) module: its flat parameters are not
            gathered by polytropon.
    """
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch before 2.6: no fully_shard, nothing sharded by it
        FSDPModule = ()  # noqa: N806
    sharded = False
    for module in model.modules():
        if isinstance(module, FullyShardedDataParallel):
            raise ValueError(
                "a model wrapped in FullyShardedDataParallel (FSDP1) cannot be saved by polytropon: shard it with "
                "torch.distributed.fsdp.fully_shard (FSDP2; accelerate: fsdp_version 2)"
            )
        sharded = sharded or isinstance(module, FSDPModule)
    return sharded or any(p.requires_grad and zero.is_partitioned(p) for p in model.parameters())


def gathered(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (detached) with every FSDP2 shard (a ``DTensor``) and every DeepSpeed ZeRO-3 partition replaced
    by the full tensor (ZeRO-3 ones copied: they are whole only inside the gathering).

    A collective call when any tensor is sharded: every rank must call it, with the same keys in the same order.
    """
    dtensor = _dtensor_type()
    partitioned = zero.partitioned(tensors.values())
    with torch.no_grad(), zero.gathered_parameters(partitioned):
        out = {k: (v.full_tensor() if isinstance(v, dtensor) else v).detach() for k, v in tensors.items()}
        return zero.copies(out) if partitioned else out


def check_complete(tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse tensors of which this process holds only a partition (so a checkpoint is never silently empty).

    DeepSpeed ZeRO-3 replaces a partitioned parameter's data by an empty tensor and records its full shape in
    ``ds_shape``; such a parameter is complete only inside ``deepspeed.zero.GatheredParameters`` (which
    ``save_pretrained`` enters, :mod:`polytropon.zero`): a last check that nothing partial is written.

    Raises:
        ValueError: naming the first such tensor, its shape here and its full shape.
    """
    for key, tensor in tensors.items():
        full = getattr(tensor, "ds_shape", None)
        if tensor.numel() == 0 or (full is not None and tuple(full) != tuple(tensor.shape)):
            raise ValueError(
                f"cannot save {key}: this process holds only a partition of it (shape {tuple(tensor.shape)}, full "
                f"shape {tuple(full) if full is not None else 'unknown'}) and it is neither an FSDP2 shard nor a "
                "DeepSpeed ZeRO-3 parameter, the two kinds save_pretrained gathers"
            )


def copy_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """``param.copy_(full)`` for a full tensor ``full``; a parameter sharded by FSDP2 takes its own shard of it.

    No communication: every rank is expected to hold the same ``full`` (e.g. read from the same checkpoint).
    """
    with torch.no_grad():
        if isinstance(param, _dtensor_type()):
            from torch.distributed.tensor import distribute_tensor

            full = distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements, src_data_rank=None)
        param.copy_(full)
