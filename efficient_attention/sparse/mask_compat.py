"""Older import path of :mod:`efficient_attention.compat.mask_attention` (``mask_attention_transformer``);
new code imports that module (see ``docs/architecture.md``)."""

from ..compat.mask_attention import *  # noqa: F401,F403
from ..compat.mask_attention import __all__  # noqa: F401
