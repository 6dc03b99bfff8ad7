"""``python -m polytropon``: the command line (see :mod:`polytropon.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
