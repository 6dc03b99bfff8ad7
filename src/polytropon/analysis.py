"""Former path of :mod:`polytropon.toolkit.analysis`, kept importable: this name is that very module."""

import sys

from .toolkit import analysis as _module

sys.modules[__name__] = _module
