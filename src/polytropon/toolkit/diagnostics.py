"""Run diagnostics: the tasks a trained model answers the same way for every example.

A multi-task run can *collapse* on a task: the adapted model maps every example of the task to the same
answer (on a balanced binary task, typically a 50/50 output, accuracy 0.5 and a loss of ``ln 2``). A mean
accuracy over tasks hides it; :func:`collapsed_tasks` names such tasks from per-example outputs.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Optional, Union

import torch

__all__ = ["collapsed_tasks"]

Outputs = Union[torch.Tensor, Sequence[Hashable]]


def _answers(outputs: Outputs) -> list[Hashable]:
    """One hashable answer per example: the argmax of a ``(n, n_classes)`` tensor, else the values as given."""
    if isinstance(outputs, torch.Tensor):
        if outputs.dim() == 2:
            if outputs.shape[1] == 0:
                raise ValueError("outputs has 0 classes (shape (n, 0)); expected (n, n_classes) with n_classes >= 1")
            return outputs.argmax(-1).tolist()
        if outputs.dim() == 1:
            return outputs.tolist()
        raise ValueError(f"outputs must be 1-D (answers) or 2-D (n, n_classes), got shape {tuple(outputs.shape)}")
    if isinstance(outputs, (str, bytes)):
        raise TypeError("outputs must be a sequence of per-example answers or a tensor, got a string")
    return list(outputs)


def collapsed_tasks(
    outputs: Outputs,
    tasks: Sequence[str],
    labels: Optional[Sequence[Hashable]] = None,
    min_examples: int = 2,
) -> list[str]:
    """The tasks whose every example receives the same answer.

    Args:
        outputs: per-example answers, either a ``(n,)`` sequence / tensor of answers (class ids, strings, ...)
            or a ``(n, n_classes)`` tensor of probabilities or logits, whose argmax is the answer.
        tasks: ``n`` task names, ``tasks[i]`` the task of example ``i``.
        labels: optional ``n`` gold answers. When given, a task whose gold answers are themselves all equal
            is never reported (answering it the same way every time can be right).
        min_examples: tasks with fewer examples are not judged (one example is always "the same").

    Returns:
        The collapsed tasks in the order of their first example: for a task ``t`` with examples ``I_t``,
        ``|{answer_i : i in I_t}| == 1`` (and, with ``labels``, ``|{label_i : i in I_t}| > 1``).

    Raises:
        ValueError: ``outputs``, ``tasks`` (and ``labels``) of different lengths, an output tensor that is not
            1-D or 2-D, or ``min_examples < 1``.
        TypeError: ``outputs`` given as a string.
    """
    if isinstance(min_examples, bool) or not isinstance(min_examples, int) or min_examples < 1:
        raise ValueError(f"min_examples must be a positive integer, got {min_examples!r}")
    answers = _answers(outputs)
    tasks = list(tasks)
    if len(answers) != len(tasks):
        raise ValueError(f"outputs has {len(answers)} examples but tasks has {len(tasks)}; expected one task per example")
    if labels is not None:
        labels = list(labels.tolist() if isinstance(labels, torch.Tensor) else labels)
        if len(labels) != len(tasks):
            raise ValueError(f"labels has {len(labels)} examples but tasks has {len(tasks)}; expected one label per example")
    seen_answers: dict[str, set] = {}
    seen_labels: dict[str, set] = {}
    counts: dict[str, int] = {}
    for i, task in enumerate(tasks):
        seen_answers.setdefault(task, set()).add(answers[i])
        counts[task] = counts.get(task, 0) + 1
        if labels is not None:
            seen_labels.setdefault(task, set()).add(labels[i])
    return [
        task
        for task in seen_answers
        if counts[task] >= min_examples
        and len(seen_answers[task]) == 1
        and (labels is None or len(seen_labels[task]) > 1)
    ]
