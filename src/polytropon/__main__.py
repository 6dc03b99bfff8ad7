"""``python -m polytropon``: the command line (see :mod:`polytropon.app.cli`)."""

import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())
