"""Former path of :mod:`polytropon.toolkit.optim`, kept importable: this name is that very module."""

import sys

from .toolkit import optim as _module

sys.modules[__name__] = _module
