"""collapsed_tasks: the tasks answered the same for every example, on synthetic outputs."""

from __future__ import annotations

import pytest
import torch

from polytropon.toolkit.diagnostics import collapsed_tasks

TASKS = ["a", "a", "a", "b", "b", "b", "c", "c"]


def test_flat_probabilities_collapse_and_varied_ones_do_not():
    probs = torch.tensor([
        [0.5, 0.5], [0.5, 0.5], [0.5, 0.5],  # a: the same 50/50 answer (argmax 0) for every example
        [0.9, 0.1], [0.2, 0.8], [0.7, 0.3],  # b: answers differ
        [0.1, 0.9], [0.4, 0.6],              # c: always class 1, with different confidences
    ])
    assert collapsed_tasks(probs, TASKS) == ["a", "c"]


def test_answers_as_labels_and_order_of_first_example():
    answers = ["no", "yes", "no", "yes", "yes", "yes", "no", "no"]
    tasks = ["x", "x", "x", "z", "z", "z", "y", "y"]
    assert collapsed_tasks(answers, tasks) == ["z", "y"]
    assert collapsed_tasks(torch.tensor([1, 1, 1, 0, 0, 0, 1, 0]), TASKS) == ["a", "b"]


def test_labels_exempt_tasks_whose_gold_answers_are_all_equal():
    answers = [1, 1, 1, 0, 0, 0, 1, 0]
    labels = [0, 1, 0, 0, 0, 0, 1, 1]  # a has mixed labels (collapsed), b's labels are all 0 (answering 0 is right)
    assert collapsed_tasks(answers, TASKS, labels) == ["a"]
    assert collapsed_tasks(answers, TASKS, torch.tensor(labels)) == ["a"]


def test_min_examples():
    assert collapsed_tasks([1, 0, 1], ["a", "b", "b"]) == []  # a has one example: not judged
    assert collapsed_tasks([1, 0, 1], ["a", "b", "b"], min_examples=1) == ["a"]


def test_logits_use_argmax_over_classes():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0], [2.0, 0.0, 1.0], [2.0, 0.0, 1.5]])
    assert collapsed_tasks(logits, ["a", "a", "b", "b"]) == ["b"]


@pytest.mark.parametrize("kwargs, error, fragment", [
    (dict(outputs=[0, 1], tasks=["a"]), ValueError, "outputs has 2 examples but tasks has 1"),
    (dict(outputs=[0, 1], tasks=["a", "a"], labels=[0]), ValueError, "labels has 1 examples"),
    (dict(outputs=torch.zeros(2, 2, 2), tasks=["a", "a"]), ValueError, "shape (2, 2, 2)"),
    (dict(outputs=torch.zeros(2, 0), tasks=["a", "a"]), ValueError, "0 classes"),
    (dict(outputs="ab", tasks=["a", "a"]), TypeError, "string"),
    (dict(outputs=[0, 1], tasks=["a", "a"], min_examples=0), ValueError, "min_examples"),
])
def test_bad_input(kwargs, error, fragment):
    with pytest.raises(error, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        collapsed_tasks(**kwargs)
