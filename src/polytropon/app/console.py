"""What the command line says, and how it fails.

* :class:`CliError` -- bad input; :func:`polytropon.app.cli.main` prints it as one line
  (``polytropon: error: ...``) and exits with code 2.
* :func:`say` prints on the main process only, so a run under ``torchrun`` speaks once, and not at all after
  :func:`set_quiet` (``--quiet``: only errors and the final table).
* :func:`quiet_transformers` silences the libraries' own warnings and progress bars.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["CliError", "is_main_process", "world_size", "say", "set_quiet", "quiet_transformers"]

_quiet = False


class CliError(Exception):
    """Bad input; reported as one line on stderr with exit code 2."""


def is_main_process() -> bool:
    """Whether this is rank 0 (or the only process) of the run."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    """How many processes train together (1 outside torchrun / accelerate)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def set_quiet(quiet: bool) -> None:
    """Silence (or restore) :func:`say` for the rest of this command."""
    global _quiet
    _quiet = bool(quiet)


def say(*parts: Any) -> None:
    """``print`` on the main process only, flushed at once; nothing after ``set_quiet(True)``."""
    if is_main_process() and not _quiet:
        print(*parts, flush=True)


def quiet_transformers() -> None:
    """Silence transformers', huggingface_hub's and torch's warnings and progress bars."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:  # hub retries would otherwise print a warning per attempt before our one-line error
        import huggingface_hub

        huggingface_hub.utils.logging.set_verbosity_error()
    except (ImportError, AttributeError):
        pass
    import warnings

    warnings.filterwarnings("ignore", module="transformers")
    warnings.filterwarnings("ignore", module="torch")
