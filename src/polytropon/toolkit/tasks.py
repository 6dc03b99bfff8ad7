"""Function forms of the task-axis operations: naming an adapter's tasks and adding tasks after training.

The mechanism lives in the tuner (:mod:`polytropon.tasks`, :meth:`PolyModel.add_tasks
<polytropon.model.PolyModel.add_tasks>`); these are the toolkit's spellings, as in ``docs/research.md``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

from ..model import PolyModel


def set_task_names(model: PolyModel, names: Sequence[str], adapter_name: Optional[str] = None) -> None:
    """Name the tasks of an adapter (in id order), replacing any previous names.

    Raises:
        ValueError / TypeError: as ``PolyConfig.task_names`` validation (wrong count, duplicates, non-strings).
    """
    adapter_name = model.resolve_adapter(adapter_name)
    config = model.peft_config[adapter_name]
    model.peft_config[adapter_name] = dataclasses.replace(config, task_names=list(names))


def add_tasks(
    model: PolyModel,
    tasks: Union[int, Sequence[str]],
    init: Union[str, int] = "uniform",
    adapter_name: Optional[str] = None,
) -> list[int]:
    """Add new tasks to an adapter after training; returns their ids. See :meth:`PolyModel.add_tasks`."""
    return model.add_tasks(tasks, init=init, adapter_name=adapter_name)
