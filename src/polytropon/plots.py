"""Former path of :mod:`polytropon.toolkit.plots`, kept importable: this name is that very module."""

import sys

from .toolkit import plots as _module

sys.modules[__name__] = _module
