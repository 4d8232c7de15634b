"""relret: text-based audio retrieval trained from similarities between audio captions (Xie et al.)."""

from relret import compat as _compat

_compat.install()

__version__ = "0.1.0"
