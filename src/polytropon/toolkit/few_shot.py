"""Few-shot adaptation regimes of MHR (Caccia et al. 2022, arXiv 2211.03831).

* MHR-z -- :func:`freeze_skills`: keep the trained skills, learn only the routing of (new) tasks.
* MHR-mu -- :func:`collapse_to_average`: drop the routing, average the skills into one LoRA and fine-tune it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

import torch

from ..checkpoint import check_adapter_name

if TYPE_CHECKING:  # pragma: no cover
    from ..model import PolyModel


def freeze_skills(model: "PolyModel", adapter_name: Optional[str] = None, freeze_saved_modules: bool = True) -> int:
    """MHR-z: freeze the skills so that only the routing trains; returns the number of trainable parameters.

    The function form of :meth:`PolyModel.freeze_skills <polytropon.model.PolyModel.freeze_skills>`. Typical
    few-shot use::

        add_tasks(model, ["new_task"]); freeze_skills(model)     # then train on the new task only

    :meth:`PolyModel.set_adapter` restores the default trainable set; so does :func:`unfreeze_skills`.

    Raises:
        ValueError: the adapter is not the active (trainable) one, is in inference mode, or has no learned router.
    """
    return model.freeze_skills(adapter_name, freeze_saved_modules)


def unfreeze_skills(model: "PolyModel") -> int:
    """Undo :func:`freeze_skills`: the active adapter trains fully again; returns the trainable count."""
    model.set_adapter(model.resolve_adapter())
    return model.get_nb_trainable_parameters()[0]


@torch.no_grad()
def collapse_to_average(
    model: "PolyModel",
    adapter_name: Optional[str] = None,
    new_adapter_name: str = "average",
    activate: bool = True,
) -> str:
    """MHR-mu: add an adapter that is the average of an adapter's skills, with routing dropped.

    For every layer, with ``A`` of shape ``(n_splits, n_skills, in/n_splits, r)`` and ``B`` of shape
    ``(n_splits, n_skills, r, out/n_splits)``::

        A_mu = concat over splits q of  mean_s A[q, s]      -> (in, r)
        B_mu = concat over splits q of  mean_s B[q, s]      -> (r, out)
        y    = W x + x A_mu B_mu / r

    which is exactly the adapter routed with uniform weights (every task's "average of the skills"). The new
    adapter is a single LoRA: ``poly_type="shared"``, ``n_skills=1``, ``n_tasks=1``, ``n_splits=1`` (call it
    with ``task_ids=[0]``); its ``modules_to_save`` copies start from the source adapter's. Fine-tune it like
    any adapter; the LoRA export handles it as a one-skill adapter.

    Args:
        model: the :class:`~polytropon.model.PolyModel`.
        adapter_name: the adapter to average (default: active).
        new_adapter_name: name of the new adapter.
        activate: make the new adapter active (and so the trainable one).

    Returns:
        ``new_adapter_name``.

    Raises:
        ValueError: unknown source adapter, or ``new_adapter_name`` invalid (see
        :func:`~polytropon.checkpoint.check_adapter_name`) or already taken (nothing is changed).
    """
    adapter_name = model.resolve_adapter(adapter_name)
    check_adapter_name(new_adapter_name, "new_adapter_name")
    if new_adapter_name in model.peft_config:
        raise ValueError(f"an adapter named {new_adapter_name!r} already exists")
    source = model.peft_config[adapter_name]
    config = dataclasses.replace(
        source, poly_type="shared", n_skills=1, n_tasks=1, n_splits=1, task_names=None, allocation=None,
        router_granularity="module", hard_routing=False, router_temperature=1.0, unknown_task="error",
        inference_mode=False,
    )
    if isinstance(config.target_modules, list):  # exactly the source's layers, whatever the patterns match now
        config.target_modules = [path for path, _ in model.named_adapters(adapter_name)]
    averaged = {}
    for path, adapter in model.named_adapters(adapter_name):
        a, b = adapter.poly_lora_A, adapter.poly_lora_B
        q, _, d_in, r = a.shape
        a_mu = a.mean(dim=1).reshape(q * d_in, r)  # splits stacked along in_features
        b_mu = b.mean(dim=1).permute(1, 0, 2).reshape(r, -1)  # splits stacked along out_features
        averaged[path] = (a_mu, b_mu)
    model.add_adapter(new_adapter_name, config)
    for path, adapter in model.named_adapters(new_adapter_name):
        a_mu, b_mu = averaged[path]
        adapter.poly_lora_A.copy_(a_mu.view_as(adapter.poly_lora_A))
        adapter.poly_lora_B.copy_(b_mu.view_as(adapter.poly_lora_B))
    for _, wrapper in model.saved_modules():
        if adapter_name in wrapper.modules_to_save and new_adapter_name in wrapper.modules_to_save:
            wrapper.modules_to_save[new_adapter_name].load_state_dict(wrapper.modules_to_save[adapter_name].state_dict())
    if activate:
        model.set_adapter(new_adapter_name)
    return new_adapter_name
