"""Former path of :mod:`polytropon.app.cli`, kept importable: this name is that very module."""

import sys

from .app import cli as _module

sys.modules[__name__] = _module
