"""Former path of :mod:`polytropon.app.training`, kept importable: this name is that very module."""

import sys

from .app import training as _module

sys.modules[__name__] = _module
