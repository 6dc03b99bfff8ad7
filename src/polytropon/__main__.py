"""``python -m polytropon``: the command line (see :mod:`polytropon.app.cli`)."""

from .app.cli import entry_point

if __name__ == "__main__":
    entry_point()
