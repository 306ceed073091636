"""Loading the compiled CPU extension ``efficient_attention.kernels._C``.

The extension is optional: where it is missing (``EA_BUILD_EXT=0``, a failed
build, an ABI mismatch) or disabled with ``EA_DISABLE_KERNELS=1``, the package
still imports and the sparse ops use the PyTorch reference path.  The reason is
logged once and returned by :func:`cpu_extension_reason`.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType
from typing import Optional

logger = logging.getLogger(__name__)

__all__ = ["cpu_extension", "cpu_extension_reason"]

_state: dict = {}


def _load() -> None:
    if os.environ.get("EA_DISABLE_KERNELS", "0") not in ("", "0"):
        _state["module"], _state["reason"] = None, "the C++ kernels are disabled by EA_DISABLE_KERNELS"
    else:
        try:
            module = importlib.import_module("efficient_attention.kernels._C")
        except (ImportError, OSError) as exc:  # not built, or built against another torch
            _state["module"] = None
            _state["reason"] = (
                f"the C++ extension efficient_attention.kernels._C is unavailable ({exc}); build it with "
                "`python setup.py build_ext --inplace` (or pip install without EA_BUILD_EXT=0)"
            )
        else:
            _state["module"], _state["reason"] = module, None
            from . import _cpu_ops  # noqa: F401  (fake impls + autograd of the C++ ops)
    if _state["reason"]:
        logger.info("efficient_attention kernels: using the PyTorch reference path on the CPU: %s", _state["reason"])


def cpu_extension() -> Optional[ModuleType]:
    """The loaded ``_C`` module, or ``None`` (see :func:`cpu_extension_reason`)."""
    if "module" not in _state:
        _load()
    return _state["module"]


def cpu_extension_reason() -> Optional[str]:
    """Why the C++ extension is not used, or ``None`` when it is loaded."""
    cpu_extension()
    return _state["reason"]
