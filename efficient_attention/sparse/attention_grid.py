"""Older import path of :mod:`efficient_attention.compat.attention_grid` (AttentionGrid);
new code imports that module (see ``docs/architecture.md``)."""

from ..compat.attention_grid import *  # noqa: F401,F403
from ..compat.attention_grid import __all__  # noqa: F401
