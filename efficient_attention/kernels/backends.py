"""Kernel backends as classes: what each one supports, and in words why it cannot take given inputs.

A backend is one way to compute one op (``"sliding_window"``, ``"block_sparse"``, ``"linear_attention"``,
``"landmark"``).  The kinds, with the names a caller passes as ``backend=``:

* ``"triton"``    -- the Triton GPU kernels: CUDA tensors (CPU tensors too under Triton's interpreter,
  ``TRITON_INTERPRET=1``), fp16 / bf16 / fp32;
* ``"cpp"``       -- the C++ CPU kernels of the ``_C`` extension (``csrc/``);
* ``"chunked"``   -- a chunked PyTorch algorithm with batched matmuls (linear attention), any device;
* ``"reference"`` -- the pure-PyTorch path of the op: any device and float dtype, dropout, autograd.

Each op's module subclasses :class:`TritonBackend`, :class:`CppBackend`, ... once per op, adding the op's
own reasons in :meth:`Backend.input_reasons` and the computation in ``run``; its
:class:`~efficient_attention.kernels.dispatch.Dispatcher` lists them fastest first.  The reasons of a
backend may depend only on the devices, dtypes, batch sizes, head counts and head dims of ``q, k, v``, on
whether a length is empty or shorter than :data:`SHORT`, on the number of CPU threads (CPU tensors), and on the
op's keyword parameters (the dispatcher caches its decisions by exactly these).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any, Callable, ClassVar, List, Optional, Tuple

import torch
from torch import Tensor

from ..errors import BackendUnavailableError
from ._loader import cpu_extension, cpu_extension_reason

__all__ = [
    "Backend",
    "TritonBackend",
    "CppBackend",
    "ChunkedBackend",
    "ReferenceBackend",
    "KINDS",
    "BackendUnavailableError",
    "triton_reason",
    "triton_interpreted",
    "triton_probe",
    "SHORT",
    "cpu_threads",
]

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
SHORT = 16  # lengths below this may change a decision (see the module doc)

_env: dict = {}


def triton_interpreted() -> bool:
    """Whether Triton runs its interpreter (``TRITON_INTERPRET=1``): kernels on CPU tensors, for tests."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@torch.compiler.assume_constant_result
def triton_reason() -> Optional[str]:
    """Why the Triton kernels cannot run at all in this process, or ``None`` (computed once)."""
    if "triton" not in _env:
        _env["triton"] = _triton_reason()
    return _env["triton"]


def _triton_reason() -> Optional[str]:
    if not triton_interpreted() and not torch.cuda.is_available():
        return "CUDA is not available"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    try:
        from . import triton_ops  # noqa: F401
    except Exception as exc:  # a broken Triton install must not break the library
        return f"the Triton kernels failed to import ({type(exc).__name__}: {exc})"
    return None


_probes: dict = {}  # key -> None (the kernels ran) or why they cannot


def triton_probe(key: Tuple[Any, ...], run: Callable[[], Any], what: str) -> bool:
    """Whether the Triton kernels that ``run`` launches compile and run in this process: ``run`` (a tiny forward
    and backward with the flags the real calls will use) is tried once per ``key``; a failure is remembered,
    logged once at WARNING with its reason, and the caller takes its PyTorch path from then on.  (A mechanism's
    fused path must never turn a working model into an exception: its kernels are compiled here first, the
    backward's included, before any real tensor depends on them.)"""
    if key not in _probes:
        try:
            run()
            _probes[key] = None
        except Exception as exc:  # noqa: BLE001 - a kernel that cannot compile or run here is reported, not raised
            _probes[key] = f"{type(exc).__name__}: {exc}"
            logging.getLogger(__name__).warning(
                "%s: the Triton kernels cannot run here (%s); using the PyTorch path", what, _probes[key]
            )
    return _probes[key] is None


@torch.compiler.assume_constant_result
def cpu_threads() -> int:
    """``torch.get_num_threads()``, as a constant while torch.compile traces (Dynamo cannot trace the call)."""
    return torch.get_num_threads()


@torch.compiler.assume_constant_result
def _cpp_reason() -> Optional[str]:
    if "cpp" not in _env:
        _env["cpp"] = None if cpu_extension() is not None else cpu_extension_reason()
    return _env["cpp"]


class Backend:
    """One way to compute one op.  Subclasses set the class attributes; op subclasses add ``input_reasons``
    and a ``run`` method (its arguments are the op's).  Backends are used as classes, never instantiated."""

    name: ClassVar[str]  # what a caller passes as backend=
    op: ClassVar[str]  # the op it computes
    devices: ClassVar[Tuple[str, ...]] = ()  # device types it runs on (() = any)
    # each op's backends define ``run`` with that op's arguments; a Dispatcher's caller sees it untyped
    run: ClassVar[Callable[..., Any]]
    dtypes: ClassVar[Tuple[torch.dtype, ...]] = ()  # input dtypes it takes (() = any float dtype)
    description: ClassVar[str] = ""

    @classmethod
    def environment_reason(cls) -> Optional[str]:
        """Why this backend cannot run at all in this process (not built, no GPU, ...), or ``None``."""
        return None

    @classmethod
    def supported_devices(cls) -> Tuple[str, ...]:
        return cls.devices

    @classmethod
    def input_reasons(cls, q: Tensor, k: Tensor, v: Tensor, **params) -> List[str]:
        """The op's own reasons (head dims, block sizes, dropout, ...); [] = no objection."""
        return []

    @classmethod
    def not_supported_reasons(cls, q: Tensor, k: Tensor, v: Tensor, **params) -> List[str]:
        """Every reason this backend cannot run on these inputs, in words ([] = it can)."""
        reasons = []
        devices = cls.supported_devices()
        if not (q.device == k.device == v.device):
            reasons.append("q, k, v are on different devices")
        if devices and q.device.type not in devices:
            names = " or ".join(_DEVICE_NAMES.get(d, d) for d in devices)
            reasons.append(f"tensors are on {q.device.type}, not {names}")
        else:
            why = cls.environment_reason()
            if why:
                reasons.append(why)
        if cls.dtypes and not all(x.dtype in cls.dtypes for x in (q, k, v)):
            reasons.append(f"dtypes {q.dtype}, {k.dtype}, {v.dtype}: {cls.name} takes {_names(cls.dtypes)}")
        return reasons + cls.input_reasons(q, k, v, **params)

    @classmethod
    def supports(cls, q: Tensor, k: Tensor, v: Tensor, **params) -> bool:
        return not cls.not_supported_reasons(q, k, v, **params)


_DEVICE_NAMES = {"cuda": "CUDA", "cpu": "the CPU"}


def _names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


class TritonBackend(Backend):
    name = "triton"
    devices = ("cuda",)
    dtypes = TRITON_DTYPES
    description = "Triton GPU kernels"

    @classmethod
    def environment_reason(cls) -> Optional[str]:
        return triton_reason()

    @classmethod
    def supported_devices(cls) -> Tuple[str, ...]:
        return ("cuda", "cpu") if triton_interpreted() else cls.devices


class CppBackend(Backend):
    name = "cpp"
    devices = ("cpu",)
    dtypes = CPU_DTYPES
    description = "C++ CPU kernels (_C extension)"

    @classmethod
    def environment_reason(cls) -> Optional[str]:
        return _cpp_reason()


class ChunkedBackend(Backend):
    name = "chunked"
    description = "chunked PyTorch (batched matmuls, any device)"


class ReferenceBackend(Backend):
    name = "reference"
    description = "PyTorch reference path (any device and float dtype)"


KINDS = (TritonBackend, CppBackend, ChunkedBackend, ReferenceBackend)  # every op backend subclasses one


# -- reasons shared by the attention kernels (sliding window, block sparse, landmark) -------------------------
TILE_HEAD_DIMS = (16, 32, 64, 128)


def kernel_shape_reasons(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> List[str]:
    """What the C++ and Triton attention kernels need of any input: no dropout, one dtype, whole head groups,
    nothing empty."""
    reasons = []
    if dropout_p > 0.0:
        reasons.append(f"dropout_p={dropout_p} (the kernels do not implement dropout)")
    if not (q.dtype == k.dtype == v.dtype):
        reasons.append(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        reasons.append("q, k, v must be 4-D (B, H, N, d)")
        return reasons
    if q.shape[1] % max(k.shape[1], 1) != 0 or k.shape[1] != v.shape[1]:
        reasons.append(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    if q.shape[-1] == 0 or q.shape[2] == 0 or k.shape[2] == 0:
        reasons.append("an empty dimension")
    return reasons


def tile_head_dim_reasons(q: Tensor, v: Tensor) -> List[str]:
    """The tiled Triton attention kernels hold one head per tile: equal q/k and v head dims of a tile size."""
    if q.shape[-1] not in TILE_HEAD_DIMS or v.shape[-1] != q.shape[-1]:
        return [f"head dims q/k {q.shape[-1]}, v {v.shape[-1]}: the Triton kernels need equal dims in {TILE_HEAD_DIMS}"]
    return []
