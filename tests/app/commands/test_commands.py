"""The verb registry: every module in ``COMMANDS`` is a verb of the parser, in ``--help`` order, and runs its own ``run``."""

from __future__ import annotations

import pytest

from polytropon.app.cli import COMMANDS, build_parser

MINIMAL_ARGV = {
    "train": [],
    "adapt": ["RUN"],
    "eval": ["ADAPTER", "--data", "D"],
    "inspect": ["ADAPTER"],
    "export-lora": ["ADAPTER", "--task", "T", "--output", "O"],
    "merge": ["ADAPTER", "--task", "T", "--output", "O"],
    "suite": ["OUT"],
}


def test_parser_lists_exactly_the_registered_verbs_in_order():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    assert list(sub.choices) == [c.VERB for c in COMMANDS] == list(MINIMAL_ARGV)
    assert sub.metavar == "{train,adapt,eval,inspect,export-lora,merge,suite}"


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.VERB)
def test_each_verb_dispatches_to_its_module(command):
    args = build_parser().parse_args([command.VERB, *MINIMAL_ARGV[command.VERB]])
    assert args.command == command.VERB
    assert args.func is command.run


def test_export_lora_takes_one_task_or_all_tasks():
    parser = build_parser()
    one = parser.parse_args(["export-lora", "RUN", "--task", "T", "--output", "O"])
    every = parser.parse_args(["export-lora", "RUN", "--all-tasks", "--output", "O"])
    assert (one.task, one.all_tasks) == ("T", False) and (every.task, every.all_tasks) == (None, True)
    for argv in (["export-lora", "RUN", "--output", "O"], ["export-lora", "RUN", "--task", "T", "--all-tasks", "--output", "O"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
