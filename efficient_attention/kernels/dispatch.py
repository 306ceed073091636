"""Choosing the kernel for a sparse-attention call, and saying why not.

Backends, tried in order:

* ``"triton"`` -- GPU kernels (``triton_ops.py``), CUDA tensors, Triton installed;
* ``"cpu"``    -- the C++ kernels of the ``_C`` extension, CPU tensors;
* ``"reference"`` -- the PyTorch path of ``reference.py`` (any device/dtype, dropout).

:func:`not_supported_reasons` returns, per fast backend, the reasons it cannot
take the given inputs (empty list = usable), xformers-style.  The entries log
the reasons of a fallback once per distinct message (at WARNING).
"""
from __future__ import annotations

import importlib.util
import logging
from typing import Dict, List, Optional

import torch
from torch import Tensor

from ._loader import cpu_extension, cpu_extension_reason

logger = logging.getLogger(__name__)

__all__ = ["not_supported_reasons", "choose_backend", "triton_reason"]

OPS = ("sliding_window", "block_sparse", "linear_attention")
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_HEAD_DIMS = (16, 32, 64, 128)
TRITON_BLOCK_SIZES = (16, 32, 64, 128)
CPU_MAX_HEAD_DIM = 512
_logged: set = set()


_env: dict = {}
_decisions: dict = {}


@torch.compiler.assume_constant_result
def triton_reason() -> Optional[str]:
    """Why the Triton kernels cannot run at all here, or ``None`` (computed once)."""
    if "triton" not in _env:
        _env["triton"] = _triton_reason()
    return _env["triton"]


@torch.compiler.assume_constant_result
def _cpu_reason() -> Optional[str]:
    if "cpu" not in _env:
        _env["cpu"] = None if cpu_extension() is not None else cpu_extension_reason()
    return _env["cpu"]


def _triton_reason() -> Optional[str]:
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    try:
        from . import triton_ops  # noqa: F401
    except Exception as exc:  # a broken Triton install must not break the library
        return f"the Triton kernels failed to import ({type(exc).__name__}: {exc})"
    return None


def _common(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> List[str]:
    reasons = []
    if dropout_p > 0.0:
        reasons.append(f"dropout_p={dropout_p} (the kernels do not implement dropout)")
    if not (q.device == k.device == v.device):
        reasons.append("q, k, v are on different devices")
    if not (q.dtype == k.dtype == v.dtype):
        reasons.append(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        reasons.append("q, k, v must be 4-D (B, H, N, d)")
    elif q.shape[1] % k.shape[1] != 0 or k.shape[1] != v.shape[1]:
        reasons.append(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    if q.shape[-1] == 0 or q.shape[2] == 0 or k.shape[2] == 0:
        reasons.append("an empty dimension")
    return reasons


def not_supported_reasons(
    op: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    dropout_p: float = 0.0,
    block_size: Optional[int] = None,
    exclude_self: bool = False,
) -> Dict[str, List[str]]:
    """Per fast backend (``"triton"``, ``"cpu"``), why it cannot run ``op`` on these inputs ([] = it can)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if op == "linear_attention":
        return _linear_reasons(q, k, v)
    common = _common(q, k, v, dropout_p)
    if exclude_self:
        common.append("the window excludes each query's own key (LocalWindow.exclude_self, shared_qk), "
                      "which the kernels do not implement")
    cpu = list(common)
    if q.device.type != "cpu":
        cpu.append(f"tensors are on {q.device.type}, not the CPU")
    if q.dtype not in CPU_DTYPES:
        cpu.append(f"dtype {q.dtype} is not one of {CPU_DTYPES}")
    if q.shape[-1] > CPU_MAX_HEAD_DIM or v.shape[-1] > CPU_MAX_HEAD_DIM:
        cpu.append(f"head dim {q.shape[-1]}/{v.shape[-1]} is above {CPU_MAX_HEAD_DIM}")
    why = _cpu_reason()
    if why:
        cpu.append(why)
    gpu = list(common) + _triton_tile_reasons(q, v, triton_reason)
    if op == "block_sparse" and block_size is not None and block_size not in TRITON_BLOCK_SIZES:
        gpu.append(f"block_size {block_size} is not one of {TRITON_BLOCK_SIZES}")
    return {"triton": gpu, "cpu": cpu}


LINEAR_MAX_FEATURES = 256
LINEAR_MIN_FEATURES = 16  # fewer are zero-padded to 16 (exact) before the kernels
LINEAR_MIN_POSITIONS = 16
LINEAR_MAX_VALUE_DIM = 129  # a head dim of 128 plus the normaliser's ones column



def _triton_tile_reasons(q: Tensor, v: Tensor, environment_reason) -> List[str]:
    """What every tiled Triton attention kernel needs: CUDA, a usable Triton, a kernel dtype, equal head dims
    of a tile size (``environment_reason()`` says why Triton cannot run at all, or ``None``)."""
    reasons = []
    if q.device.type != "cuda":
        reasons.append(f"tensors are on {q.device.type}, not CUDA")
    else:
        why = environment_reason()
        if why:
            reasons.append(why)
    if q.dtype not in TRITON_DTYPES:
        reasons.append(f"dtype {q.dtype} is not one of {TRITON_DTYPES}")
    if q.shape[-1] not in TRITON_HEAD_DIMS or v.shape[-1] != q.shape[-1]:
        reasons.append(f"head dims q/k {q.shape[-1]}, v {v.shape[-1]}: Triton kernels need equal dims in "
                       f"{TRITON_HEAD_DIMS}")
    return reasons

def _linear_reasons(q: Tensor, k: Tensor, v: Tensor) -> Dict[str, List[str]]:
    """Causal chunked linear attention (``linear_attention.py``): ``"triton"`` on CUDA, else ``"chunked"``
    (batched PyTorch matmuls, any device and dtype)."""
    gpu = []
    if not (q.device == k.device == v.device):
        gpu.append("q, k, v are on different devices")
    if q.device.type != "cuda":
        gpu.append(f"tensors are on {q.device.type}, not CUDA")
    else:
        why = triton_reason()
        if why:
            gpu.append(why)
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in TRITON_DTYPES:
        gpu.append(f"dtypes {q.dtype}, {k.dtype}, {v.dtype}: the kernels need one dtype of {TRITON_DTYPES}")
    if q.shape[2] < LINEAR_MIN_POSITIONS:
        gpu.append(f"{q.shape[2]} positions (a decoding step): fewer than {LINEAR_MIN_POSITIONS}, where the batched "
                   "PyTorch path is cheaper and the kernels are not checked")
    if q.shape[-1] > LINEAR_MAX_FEATURES:
        gpu.append(f"{q.shape[-1]} features: the kernels hold at most {LINEAR_MAX_FEATURES} per program")
    if v.shape[-1] > LINEAR_MAX_VALUE_DIM:
        gpu.append(f"value dim {v.shape[-1]} is above {LINEAR_MAX_VALUE_DIM - 1}")
    return {"triton": gpu, "chunked": []}


def choose_backend(
    op: str, q: Tensor, k: Tensor, v: Tensor, *, dropout_p: float = 0.0, block_size: Optional[int] = None,
    exclude_self: bool = False,
) -> str:
    """``"triton"``, ``"cpu"`` (``"chunked"`` for ``linear_attention``) or ``"reference"`` for these inputs
    (logs why a fallback happened, once).

    Decisions are cached by everything they depend on, so repeated calls cost a dict lookup.
    """
    compiling = torch.compiler.is_compiling()
    key = None
    if not compiling and q.dim() == 4 and k.dim() == 4 and v.dim() == 4:
        key = (op, q.device, k.device, v.device, q.dtype, k.dtype, v.dtype, q.shape[1], k.shape[1], v.shape[1],
               q.shape[-1], v.shape[-1], q.shape[2] == 0 or k.shape[2] == 0, dropout_p > 0.0, block_size, exclude_self,
               q.shape[2] < LINEAR_MIN_POSITIONS)  # the reasons depend on nothing else of the shapes
        hit = _decisions.get(key)
        if hit is not None:
            return hit
    backend = _choose(op, q, k, v, dropout_p, block_size, exclude_self, compiling)
    if key is not None:
        _decisions[key] = backend
    return backend


def _log_once(level: int, msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        logger.log(level, msg)


def _choose(op, q, k, v, dropout_p, block_size, exclude_self, compiling) -> str:
    reasons = not_supported_reasons(op, q, k, v, dropout_p=dropout_p, block_size=block_size, exclude_self=exclude_self)
    for backend in reasons:  # the fast backends, fastest first
        if not reasons[backend]:
            if backend == "chunked" and q.device.type == "cuda" and not compiling:
                why = "; ".join(reasons["triton"])
                _log_once(logging.WARNING, f"{op}: using the PyTorch chunked path because {why}")
            return backend
    if not compiling:
        relevant = reasons["triton"] if q.device.type == "cuda" else reasons["cpu"]
        msg = f"{op}: using the reference path because " + "; ".join(relevant)
        if msg not in _logged:
            _logged.add(msg)
            logger.warning(msg)
    return "reference"


# -- landmark attention (kernels/landmark.py) -------------------------------------------------------
LANDMARK_BLOCK_SIZES = (16, 32, 64, 128)
LANDMARK_FP32_TILE = 64 * 128  # largest fp32 key tile (block_size * head_dim) of the landmark kernels


@torch.compiler.assume_constant_result
def _landmark_triton_reason() -> Optional[str]:
    if "landmark" not in _env:
        why = triton_reason()
        if why is None:
            try:
                from . import _triton_landmark  # noqa: F401
            except Exception as exc:  # a broken Triton install must not break the library
                why = f"the Triton landmark kernels failed to import ({type(exc).__name__}: {exc})"
        _env["landmark"] = why
    return _env["landmark"]


def landmark_not_supported_reasons(q: Tensor, k: Tensor, v: Tensor, *, block_size: int) -> Dict[str, List[str]]:
    """Why the Triton landmark kernels cannot take these inputs ([] = they can); the PyTorch path takes all.

    k, v already carry q's head count."""
    gpu = _common(q, k, v, 0.0) + _triton_tile_reasons(q, v, _landmark_triton_reason)
    if block_size not in LANDMARK_BLOCK_SIZES:
        gpu.append(f"block_size {block_size} is not one of {LANDMARK_BLOCK_SIZES} (a landmark block is one key tile)")
    elif q.dtype == torch.float32 and block_size * q.shape[-1] > LANDMARK_FP32_TILE:
        gpu.append(f"fp32 key tiles of {block_size} keys x {q.shape[-1]} dims do not fit the registers "
                   f"(fp32 needs block_size * head_dim <= {LANDMARK_FP32_TILE})")
    return {"triton": gpu, "torch": []}


def choose_landmark_backend(q: Tensor, k: Tensor, v: Tensor, block_size: int) -> str:
    """``"triton"`` or ``"torch"``; on CUDA a fallback to the PyTorch path is logged once at WARNING."""
    if torch.compiler.is_compiling():
        return _choose_landmark(q, k, v, block_size)
    key = ("landmark", q.device, q.dtype, k.dtype, v.dtype, q.shape[1], k.shape[1], v.shape[1], q.shape[-1],
           v.shape[-1], min(q.shape) == 0 or k.shape[2] == 0, block_size)
    hit = _decisions.get(key)
    if hit is None:
        hit = _decisions[key] = _choose_landmark(q, k, v, block_size)
    return hit


def _choose_landmark(q: Tensor, k: Tensor, v: Tensor, block_size: int) -> str:
    reasons = landmark_not_supported_reasons(q, k, v, block_size=block_size)["triton"]
    if not reasons:
        return "triton"
    if q.device.type == "cuda" and not torch.compiler.is_compiling():
        msg = "landmark: using the PyTorch path because " + "; ".join(reasons)
        if msg not in _logged:
            _logged.add(msg)
            logger.warning(msg)
    return "torch"
