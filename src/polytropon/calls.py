"""Preparing one call of a :class:`~polytropon.model.PolyModel`: its task ids checked, its training routes drawn.

``PolyModel.forward``/``generate`` hand their ``task_ids`` here and get back what
:meth:`RoutingState.route <polytropon.routing.RoutingState.route>` opens for the call::

    task_ids (ids or names, or those of the enclosing task_context)
      -> CallPreparation.task_ids: names -> ids, dtype / shape / range / batch-size checks, merged task
      -> CallPreparation.routes (training): one relaxed-Bernoulli route per example for every learned router
         of the active adapter, drawn at once (:func:`polytropon.router.presample`)
      -> RoutingState.route(ids, routes): the call's CallRouting, read by every layer

Under ``torch.compile`` the same steps run as :func:`traced_call`: the checks eagerly outside the graph, the
routes in plain differentiable ops (:meth:`PolyRouter.traced_sample <polytropon.router.PolyRouter.traced_sample>`).
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional

import torch
from torch import nn

from .config import PolyConfig
from .fsdp import is_local_full
from .router import PolyRouter, presample
from .routing import RoutingState, TaskIds, check_task_ids
from .tasks import resolve_task_names

#: ``(path, PolyLayer)`` of a model's adapted layers, e.g. ``PolyModel.poly_layers``.
Layers = Callable[[], Iterable[tuple[str, nn.Module]]]


def find_learned_routers(layers: Iterable[tuple[str, nn.Module]], adapter_name: Optional[str]) -> list[PolyRouter]:
    """The distinct learned routers of ``adapter_name`` in ``layers``, in the order of the layers."""
    routers: dict[int, PolyRouter] = {}
    for _, layer in layers:
        router = getattr(layer.adapters[adapter_name], "poly_router", None) if adapter_name in layer.adapters else None
        if isinstance(router, PolyRouter):
            routers.setdefault(id(router), router)
    return list(routers.values())


class CallPreparation:
    """What a :class:`~polytropon.model.PolyModel` does with a call's ``task_ids`` before its model runs.

    Holds no state of any call: only the model's routing state, its adapters' configs (the model's own dict)
    and the learned routers of the active adapter, found once per adapter (:meth:`forget_routers` when the
    adapters change).

    Args:
        state: the model's :class:`RoutingState`.
        configs: the model's ``peft_config`` (adapter name -> :class:`PolyConfig`).
    """

    def __init__(self, state: RoutingState, configs: Mapping[str, PolyConfig]) -> None:
        self.state = state
        self.configs = configs
        self._routers: Optional[tuple[Optional[str], list[PolyRouter]]] = None

    def task_ids(self, task_ids: Optional[TaskIds], batch_size: Optional[int], training: bool) -> Optional[torch.Tensor]:
        """The checked task ids of one call: ``task_ids`` if given, else those of the innermost ``task_context``.

        One id per example, or a single id for the whole batch (expanded to the batch when its size is known).
        ``None`` when nothing is routed (no adapter active, adapters disabled or a task merged).

        Raises:
            ValueError: no ids while an adapter routes; see :meth:`check`.
        """
        state = self.state
        from_context = task_ids is None
        if from_context:
            task_ids = state.context_task_ids
        if task_ids is None:
            active = state.active_adapter
            if active is not None and not state.disabled and state.merged_task is None:
                raise ValueError(
                    f"task_ids are required while adapter {active!r} is active: pass task_ids=... "
                    "(a LongTensor of shape (batch,) or a list of ints, one task per example), or route a block "
                    "of calls with model.task_context(...)"
                )
            return None
        try:
            ids = self.check(task_ids, batch_size, training)
        except ValueError as exc:
            if from_context:  # the caller passed no ids: say where they came from
                raise ValueError(f"{exc} (task ids of the enclosing model.task_context(...))") from None
            raise
        if batch_size is not None and ids.shape[0] == 1 and batch_size > 1:
            ids = ids.expand(batch_size)  # one route per example in training, as for a full list
        return ids

    def check(self, task_ids: TaskIds, batch_size: Optional[int], training: bool) -> torch.Tensor:
        """``task_ids`` (ids or names) checked against the active adapter, the batch size and a merged task.

        Raises:
            TypeError: ids that are not integers (or names). ValueError: no active adapter, an id out of range,
            a number of ids other than ``batch_size`` or 1, or an id other than the merged task.
        """
        state = self.state
        if state.active_adapter is None:
            raise ValueError("task_ids were given but the model has no active adapter")
        config = self.configs[state.active_adapter]
        allow_unknown = config.unknown_task == "average" and not training
        task_ids = resolve_task_names(task_ids, config, allow_unknown=allow_unknown)
        ids = check_task_ids(task_ids, config.n_tasks, batch_size, allow_unknown=allow_unknown)
        if state.merged_task is not None and not state.disabled:
            merged = state.merged_task[1]
            other = ids[ids != merged]
            if other.numel():
                raise ValueError(
                    f"task {merged} is merged into the weights, got task id {int(other[0])}: "
                    "call unmerge_adapter() to route other tasks"
                )
        return ids

    def routes(self, task_ids: Optional[torch.Tensor], training: bool, layers: Layers) -> Optional[dict[int, torch.Tensor]]:
        """Draw the training routes of every layer's router at once, before the model runs.

        One relaxed-Bernoulli sample per example and layer, as when each layer samples its own, but in one
        autograd node for the whole model (:func:`polytropon.router.presample`) instead of a dozen tiny ops per
        layer. Drawn before the model runs, outside any activation-checkpointed segment, so a segment re-run in
        ``backward()`` uses the same samples. Random numbers are drawn in the order of the layers in the model.
        ``None`` in eval mode, without ids, and for routers that sample themselves (hard, shared, sharded).
        """
        state = self.state
        if task_ids is None or state.disabled or state.merged_task is not None or not training:
            return None
        routers = [r for r in self.learned_routers(layers) if r.batchable and r.routing_state is state]
        if not routers or not all(is_local_full(r.module_logits, (r.n_tasks, r.n_splits * r.n_skills)) for r in routers):
            # sharded (FSDP): a layer's logits exist only inside its own forward, where its router samples
            return None
        return presample(routers, task_ids)

    def learned_routers(self, layers: Layers) -> list[PolyRouter]:
        """The distinct learned routers of the active adapter, in the order of the layers (found once)."""
        active = self.state.active_adapter
        if self._routers is None or self._routers[0] != active:
            self._routers = (active, find_learned_routers(layers(), active))
        return self._routers[1]

    def forget_routers(self) -> None:
        """Find the routers afresh at the next call (after adding or deleting an adapter)."""
        self._routers = None


@torch.compiler.disable
def checked_task_ids(
    calls: CallPreparation, task_ids: Optional[TaskIds], batch_size: Optional[int], training: bool
) -> Optional[torch.Tensor]:
    """:meth:`CallPreparation.task_ids` run eagerly from a compiled forward (a graph break; returns a tensor)."""
    return calls.task_ids(task_ids, batch_size, training)


def traced_call(
    calls: CallPreparation, task_ids: Optional[TaskIds], batch_size: Optional[int], training: bool, layers: Layers
) -> tuple[Optional[torch.Tensor], Optional[dict[int, torch.Tensor]]]:
    """``(ids, routes)`` of a call as ``torch.compile`` traces it (see docs/deploy.md, "torch.compile").

    The task-id checks run eagerly, outside the graph (:func:`checked_task_ids`): traced, their
    data-dependent branches would specialise the graph on the ids' values. In training every learned router's
    sample (shared ones too) is drawn here, once per call, with plain differentiable ops
    (:meth:`PolyRouter.traced_sample`), so the layers trace no custom autograd function.
    """
    ids = checked_task_ids(calls, task_ids, batch_size, training)
    state = calls.state
    if ids is None or not training or state.disabled or state.merged_task is not None:
        return ids, None
    # the routers found afresh: filling the router cache while tracing would fail a guard next call
    routers = find_learned_routers(layers(), state.active_adapter)
    return ids, {id(router): router.traced_sample(ids) for router in routers}
