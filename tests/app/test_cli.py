"""The ``polytropon`` parser: the verb registry (every module in ``COMMANDS`` is a verb, in ``--help`` order, and runs
its own ``run``), one-line usage errors, the console entry point."""

from __future__ import annotations

import os
import subprocess
import sys

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


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["frobnicate"], "invalid choice"),
        (["train", "--lr", "-1"], "positive"),
        (["train", "--bogus"], "unrecognized arguments"),
        (["eval"], "required"),
        (["inspect", "/nonexistent/run"], "no such directory"),
        (["eval", "/nonexistent/run", "--data", "x.jsonl"], "no such directory"),
        (["train", "--eval-data", "e.jsonl"], "--eval-data needs --data"),
    ],
)
def test_usage_errors_are_one_line(argv, fragment, capsys, assert_one_line_error, run_cli):
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, fragment)


def test_console_entry_points(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "..", "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "polytropon", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "train" in proc.stdout and "inspect" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "polytropon", "inspect", str(tmp_path / "none")], capture_output=True, text=True, env=env, timeout=120)
    # our error is one line; lines that other libraries print while they import (e.g. torchao's kernel loading)
    # are theirs, not the command's
    ours = [line for line in proc.stderr.splitlines() if line.startswith("polytropon")]
    assert proc.returncode == 2 and len(ours) == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ours[0]


def test_the_installed_command_is_the_entry_point():
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="polytropon")
    assert script.value == "polytropon.app.cli:entry_point"


ENTRY_SCRIPT = """
import atexit, sys
atexit.register(lambda: print("teardown ran"))
from polytropon.app.cli import entry_point
sys.argv = ["polytropon", *sys.argv[1:]]
entry_point()
"""


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_a_launched_worker_ends_without_the_interpreters_teardown_and_loses_no_output(world_size):
    """Under a distributed launcher (WORLD_SIZE > 1) the process ends with ``os._exit`` once its output is flushed:
    atexit handlers (the interpreter's teardown) do not run, yet block-buffered output and the exit code survive."""
    src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # pipes block-buffered, as by default
    env.update(PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), WORLD_SIZE=world_size)
    ok = subprocess.run([sys.executable, "-c", ENTRY_SCRIPT, "--help"], capture_output=True, text=True, env=env,
                        timeout=120)
    bad = subprocess.run([sys.executable, "-c", ENTRY_SCRIPT, "train", "--bogus"], capture_output=True, text=True,
                         env=env, timeout=120)
    help_text = build_parser().format_help()
    assert ok.returncode == 0 and ok.stdout.startswith(help_text)
    assert bad.returncode == 2 and "polytropon: error: unrecognized arguments: --bogus" in bad.stderr
    teardown = world_size == "1"
    assert ok.stdout.endswith("teardown ran\n") is teardown
    assert ("teardown ran" in bad.stdout) is teardown
