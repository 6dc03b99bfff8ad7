"""Trainable per-adapter copies of whole modules (``PolyConfig.modules_to_save``), e.g. a classifier head."""

from __future__ import annotations

import copy

from torch import nn

from .routing import RoutingState


class ModulesToSave(nn.Module):
    """Wraps ``original_module``; runs the active adapter's trainable copy of it instead.

    The original stays frozen and is used with adapters disabled, while a task is merged through
    ``merge_and_unload`` it is replaced by the active copy, and for adapters that have no copy.

    Args:
        original_module: the module to copy.
        routing: the model's :class:`RoutingState` (gives the active adapter).
    """

    def __init__(self, original_module: nn.Module, routing: RoutingState) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.routing = routing

    def add_copy(self, adapter_name: str) -> None:
        """Give ``adapter_name`` its own copy of the original module."""
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)

    def active_module(self) -> nn.Module:
        state = self.routing
        if state.disabled or state.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[state.active_adapter]

    def forward(self, *args, **kwargs):
        return self.active_module()(*args, **kwargs)

    def __getattr__(self, name: str):
        # attribute reads (``head.weight``, ``head.out_features``) see the module that currently runs
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.active_module(), name)
