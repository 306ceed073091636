"""Older import path of :mod:`efficient_attention.compat.openai` (OpenAI ``sparse_attention``);
new code imports that module (see ``docs/architecture.md``)."""

from ..compat.openai import *  # noqa: F401,F403
from ..compat.openai import __all__  # noqa: F401
