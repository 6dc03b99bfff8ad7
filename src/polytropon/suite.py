"""Former path of :mod:`polytropon.app.suite`, kept importable: this name is that very module."""

import sys

from .app import suite as _module

sys.modules[__name__] = _module
