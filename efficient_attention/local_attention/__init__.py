"""Older import path of :mod:`efficient_attention.compat.local_attention` (lucidrains' ``local-attention`` API);
new code imports that module (see ``docs/architecture.md``)."""

from ..compat.local_attention import *  # noqa: F401,F403
from ..compat.local_attention import __all__  # noqa: F401
