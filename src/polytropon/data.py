"""Former path of :mod:`polytropon.app.data`, kept importable: this name is that very module."""

import sys

from .app import data as _module

sys.modules[__name__] = _module
