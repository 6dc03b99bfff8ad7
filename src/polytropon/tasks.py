"""The task axis of an adapter: tasks by name, new tasks after training, the unknown-task fallback.

* ``PolyConfig.task_names`` lets ``task_ids`` (and ``merge_adapter``) take names; the names are saved in
  ``adapter_config.json`` and restored with it (:func:`task_index`, :func:`resolve_task_names`).
* :func:`grow_tasks` (behind :meth:`PolyModel.add_tasks <polytropon.model.PolyModel.add_tasks>`) grows every
  router of an adapter by new rows, for few-shot adaptation to unseen tasks (Caccia et al. 2022, arXiv
  2211.03831: the skills stay, a new task only learns its routing -- see
  :meth:`PolyModel.freeze_skills <polytropon.model.PolyModel.freeze_skills>`). Trained rows are kept bit for bit.
* ``PolyConfig.unknown_task="average"`` routes, at eval, an unknown task to the average of the skills
  (uniform weights -- what MHR-mu does for unseen tasks), instead of raising.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Sequence, Union

import torch
from torch import nn

from .config import PolyConfig
from .router import PolyRouter
from .routing import UNKNOWN_TASK
from .variants import FixedRouter, unique_routers

TaskRef = Union[int, str]


def task_index(name: str, config: PolyConfig) -> int:
    """The id of task ``name``.

    Raises:
        TypeError: the config has no ``task_names`` (so task ids must be ints).
        ValueError: ``name`` is not one of the task names (listing the known names).
    """
    if config.task_names is None:
        raise TypeError(
            f"task_id must be an int, got {name!r} (str): the adapter has no task_names; set "
            "PolyConfig.task_names (or polytropon.set_task_names) to refer to tasks by name"
        )
    try:
        return config.task_names.index(name)
    except ValueError:
        raise ValueError(f"unknown task name {name!r}; known tasks: {config.task_names}") from None


def resolve_task(task: Any, config: PolyConfig, adapter_name: str) -> int:
    """One task given by id or by name (``config.task_names``) as a checked Python int.

    Accepts an int, a NumPy integer or a 0-d integer tensor (anything with ``__index__``, except bool), or a name.

    Raises:
        TypeError: neither an integer nor (with task names) a string. ValueError: unknown name, or an id outside
        ``[0, n_tasks)`` (naming ``adapter_name``).
    """
    if isinstance(task, str):
        task = task_index(task, config)
    n_tasks = config.n_tasks
    if isinstance(task, bool) or not hasattr(type(task), "__index__"):
        raise TypeError(f"task_id must be an int, got {task!r} ({type(task).__name__})")
    try:
        value = operator.index(task)
    except TypeError:  # e.g. a tensor with more than one element, or a float tensor
        raise TypeError(f"task_id must be an int, got {task!r} ({type(task).__name__})") from None
    if not 0 <= value < n_tasks:
        raise ValueError(
            f"task_id {value} is out of range: adapter {adapter_name!r} has n_tasks={n_tasks} (ids 0..{n_tasks - 1})"
        )
    return value


def resolve_task_names(task_ids: Any, config: PolyConfig, allow_unknown: bool = False) -> Any:
    """Turn task names in ``task_ids`` into ids; leave everything else for :func:`~polytropon.routing.check_task_ids`.

    Args:
        task_ids: a list/tuple mixing ints and task names, or a LongTensor.
        config: the active adapter's config (``task_names``, ``n_tasks``).
        allow_unknown: map unknown names and ids ``>= n_tasks`` to :data:`~polytropon.routing.UNKNOWN_TASK`
            (``unknown_task="average"`` at eval) instead of raising.

    Raises:
        TypeError: a name while the config has no ``task_names``.
        ValueError: an unknown name (naming it and the known names) when ``allow_unknown`` is off.
    """
    if isinstance(task_ids, torch.Tensor):
        if allow_unknown and not task_ids.is_floating_point() and task_ids.dtype != torch.bool:
            return torch.where(task_ids >= config.n_tasks, torch.full_like(task_ids, UNKNOWN_TASK), task_ids)
        return task_ids
    if not isinstance(task_ids, (list, tuple)):
        return task_ids
    out = []
    for value in task_ids:
        if isinstance(value, str):
            known = config.task_names is not None and value in config.task_names
            if not known and allow_unknown and config.task_names is not None:
                out.append(UNKNOWN_TASK)
            else:
                out.append(task_index(value, config))
        elif allow_unknown and isinstance(value, int) and not isinstance(value, bool) and value >= config.n_tasks:
            out.append(UNKNOWN_TASK)
        else:
            out.append(value)
    return out


def task_names_of(config: PolyConfig) -> list[str]:
    """The task names of ``config``, or ``"task 0"``, ``"task 1"``, ... when it has none."""
    return list(config.task_names) if config.task_names is not None else [f"task {i}" for i in range(config.n_tasks)]


def _new_rows(old: torch.Tensor, k: int, init: Union[str, int], uniform: torch.Tensor) -> torch.Tensor:
    """``k`` new rows for a ``(n_tasks, ...)`` tensor: ``uniform`` repeated, the mean row, or a copy of a row."""
    if init == "uniform":
        row = uniform.to(old)
    elif init == "average":
        row = old.mean(dim=0)
    else:
        row = old[init]
    return row.unsqueeze(0).expand(k, *row.shape).clone()


def _fresh_skill(adapter: nn.Module, init_weights: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A newly initialised skill ``(n_splits, 1, d_in, r)``, ``(n_splits, 1, r, d_out)`` (the adapter's init)."""
    n_splits, _, d_in, r = adapter.poly_lora_A.shape
    d_out = adapter.poly_lora_B.shape[-1]
    a = torch.empty(n_splits, 1, d_in, r)
    b = torch.zeros(n_splits, 1, r, d_out)
    for split in range(n_splits):
        weight = torch.empty(r, d_in)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        a[split, 0] = weight.T
        if not init_weights:
            weight = torch.empty(d_out, r)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            b[split, 0] = weight.T
    return a.to(adapter.poly_lora_A), b.to(adapter.poly_lora_B)


def _replace_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.detach().to(old), requires_grad=old.requires_grad))


def grow_tasks(
    config: PolyConfig,
    adapters: Sequence[tuple[str, nn.Module]],
    tasks: Union[int, Sequence[str]],
    init: Union[str, int] = "uniform",
    adapter_name: str = "default",
) -> PolyConfig:
    """Add new tasks to an adapter after training, for few-shot adaptation to unseen tasks.

    Every router of the adapter gets ``k`` new rows after its ``n_tasks`` trained rows, which are kept bit for
    bit (so trained tasks' outputs do not change). New rows start as:

    * ``"uniform"``: equal weights on every skill -- zero logits for learned routers (``sigmoid(0)`` for all
      skills), a uniform row for ``poly_type="fixed"``;
    * ``"average"``: the mean of the trained rows (of the logits, for learned routers);
    * an existing task (name or id): a copy of its row (the keywords win over tasks named "uniform"/"average").

    With ``poly_type="private"`` (one skill per task) each new task also gets a new skill in every layer:
    freshly initialised (``"uniform"``, same init as the adapter's), the mean of the skills (``"average"``)
    or a copy of the given task's skill. The returned config has the new ``n_tasks`` (and ``task_names``,
    ``allocation``, ``n_skills``) so that saves stay consistent; the caller stores it.

    Learned routers get new ``nn.Parameter`` objects: build the optimizer after calling this.

    Args:
        config: the adapter's current config.
        adapters: ``(layer path, PolyAdapter)`` of every layer carrying the adapter; grown in place.
        tasks: number of new tasks, or their names (required when the adapter has ``task_names``).
        init: ``"uniform"``, ``"average"`` or an existing task (name or id).
        adapter_name: the adapter's name, for error messages.

    Returns:
        The adapter's new config; the new tasks' ids are ``range(config.n_tasks, new_config.n_tasks)``.

    Raises:
        TypeError / ValueError: bad ``tasks`` or ``init`` (naming the value); nothing is changed.
    """
    names = _new_task_names(config, tasks, adapter_name)
    k = len(names) if isinstance(names, list) else names
    init = _check_init(config, init, adapter_name)
    new_config = _grown_config(config, names, k, init)  # validates before anything changes
    routers = unique_routers([adapter.poly_router for _, adapter in adapters])
    new_logits = _grown_logits(routers, k, init)  # every new tensor first, then swap them in
    new_skills = _grown_skills(adapters, k, init, config.init_weights) if config.poly_type == "private" else {}
    _swap_in(routers, adapters, new_logits, new_skills, new_config)
    return new_config


def _new_task_names(config: PolyConfig, tasks: Any, adapter_name: str) -> Union[int, list[str]]:
    """The number of new tasks (adapter without names) or their checked names."""
    if isinstance(tasks, bool) or not isinstance(tasks, (int, list, tuple)):
        raise TypeError(f"tasks must be a positive int or a list of new task names, got {tasks!r}")
    if isinstance(tasks, int):
        if tasks <= 0:
            raise ValueError(f"tasks must be a positive number of new tasks, got {tasks}")
        if config.task_names is not None:
            raise ValueError(
                f"adapter {adapter_name!r} names its tasks ({config.task_names}): pass the new tasks' names, not a count"
            )
        return tasks
    names = list(tasks)
    if not names:
        raise ValueError("tasks must name at least one new task, got an empty list")
    if config.task_names is None:
        raise ValueError(
            f"adapter {adapter_name!r} has no task_names, so new tasks cannot be named: pass a count, or "
            "name the existing tasks first with polytropon.set_task_names"
        )
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"new task names must be non-empty strings, got {name!r}")
        if name in config.task_names:
            raise ValueError(f"task {name!r} already exists in adapter {adapter_name!r}")
    return names


def _check_init(config: PolyConfig, init: Any, adapter_name: str) -> Union[str, int]:
    """``"uniform"``, ``"average"`` or the id of the existing task to copy."""
    if isinstance(init, str) and init not in ("uniform", "average"):
        if config.task_names is None or init not in config.task_names:
            raise ValueError(
                f"init must be 'uniform', 'average' or an existing task, got {init!r}"
                + (f"; known tasks: {config.task_names}" if config.task_names else "")
            )
        return config.task_names.index(init)
    if isinstance(init, bool) or not isinstance(init, (int, str)):
        raise TypeError(f"init must be 'uniform', 'average' or an existing task (name or id), got {init!r}")
    if isinstance(init, int) and not 0 <= init < config.n_tasks:
        raise ValueError(f"init task id {init} is out of range: adapter {adapter_name!r} has n_tasks={config.n_tasks}")
    return init


def _grown_config(config: PolyConfig, names: Union[int, list[str]], k: int, init: Union[str, int]) -> PolyConfig:
    updates: dict[str, Any] = {"n_tasks": config.n_tasks + k}
    if isinstance(names, list):
        updates["task_names"] = list(config.task_names) + names
    if config.poly_type == "private":
        updates["n_skills"] = config.n_skills + k
    if config.poly_type == "fixed":
        old = torch.tensor(config.allocation, dtype=torch.float64)
        normalised = old / old.sum(dim=-1, keepdim=True)
        source = normalised if init == "average" else old
        rows = _new_rows(source, k, init, torch.full((config.n_skills,), 1.0 / config.n_skills, dtype=torch.float64))
        updates["allocation"] = config.allocation + rows.tolist()
    return dataclasses.replace(config, **updates)


def _grown_logits(routers: Sequence[nn.Module], k: int, init: Union[str, int]) -> dict[int, torch.Tensor]:
    """``id(router)`` -> its logits with ``k`` new rows, for every learned router."""
    grown = {}
    for router in routers:
        if isinstance(router, PolyRouter):
            old_logits = router.module_logits.detach()
            rows = _new_rows(old_logits, k, init, torch.zeros(old_logits.shape[1]))
            grown[id(router)] = torch.cat([old_logits, rows], dim=0)
    return grown


def _grown_skills(
    adapters: Sequence[tuple[str, nn.Module]], k: int, init: Union[str, int], init_weights: bool
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Layer path -> its ``(A, B)`` with ``k`` new skills (``poly_type="private"``: one skill per task)."""
    grown = {}
    for path, adapter in adapters:
        a_old, b_old = adapter.poly_lora_A.detach(), adapter.poly_lora_B.detach()
        if init == "uniform":
            fresh = [_fresh_skill(adapter, init_weights) for _ in range(k)]
            a_new = torch.cat([f[0] for f in fresh], dim=1)
            b_new = torch.cat([f[1] for f in fresh], dim=1)
        elif init == "average":
            a_new = a_old.mean(dim=1, keepdim=True).expand(-1, k, -1, -1)
            b_new = b_old.mean(dim=1, keepdim=True).expand(-1, k, -1, -1)
        else:
            a_new = a_old[:, init : init + 1].expand(-1, k, -1, -1)
            b_new = b_old[:, init : init + 1].expand(-1, k, -1, -1)
        grown[path] = (torch.cat([a_old, a_new], dim=1), torch.cat([b_old, b_new], dim=1))
    return grown


@torch.no_grad()
def _swap_in(
    routers: Sequence[nn.Module],
    adapters: Sequence[tuple[str, nn.Module]],
    new_logits: dict[int, torch.Tensor],
    new_skills: dict[str, tuple[torch.Tensor, torch.Tensor]],
    new_config: PolyConfig,
) -> None:
    for router in routers:
        if isinstance(router, PolyRouter):
            _replace_param(router, "module_logits", new_logits[id(router)])
            router.n_tasks = new_config.n_tasks
        elif isinstance(router, FixedRouter):
            fresh = FixedRouter.from_config(new_config).to(router.weights.device)
            router.weights = fresh.weights
            router.n_tasks, router.n_skills = fresh.n_tasks, fresh.n_skills
    for path, adapter in adapters:
        if path in new_skills:
            _replace_param(adapter, "poly_lora_A", new_skills[path][0])
            _replace_param(adapter, "poly_lora_B", new_skills[path][1])
            adapter.n_skills = new_config.n_skills
        adapter.n_tasks = new_config.n_tasks
        adapter.clear_cache()
