"""Former path of :mod:`polytropon.toolkit.priors`, kept importable: this name is that very module."""

import sys

from .toolkit import priors as _module

sys.modules[__name__] = _module
