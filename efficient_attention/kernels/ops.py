"""The sparse ops (same signatures and results as ``reference.py``), their backends and their autograd.

Each public entry checks its arguments, asks its :class:`~efficient_attention.kernels.dispatch.Dispatcher`
for a backend (``backend=`` forces one: ``"triton"``, ``"cpp"`` or ``"reference"``) and runs it.  The C++
and Triton backends of an op share one ``autograd.Function`` (``_SlidingWindowFn``, ``_BlockSparseFn``)
whose forward and backward call the backend's registered ops (``torch.ops.efficient_attention.*``, with
fake impls: what ``torch.compile`` sees); in eager mode the Triton launches are called directly, which
costs less Python per call than the custom-op dispatch.  The reference backend is plain PyTorch autograd.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from ..block_mask import TRITON_MIN_BLOCK, BlockMask, as_block_mask
from ..functional import repeat_kv
from ..local_window import LocalWindow
from . import reference
from .backends import CppBackend, ReferenceBackend, TritonBackend, kernel_shape_reasons, tile_head_dim_reasons
from .dispatch import Dispatcher

__all__ = [
    "sliding_window_attention",
    "block_sparse_attention",
    "block_mask_attention",
    "check_inputs",
    "check_positions",
    "sliding_window_kernel",
    "block_sparse_kernel",
    "SLIDING_WINDOW",
    "BLOCK_SPARSE",
]


def _int(value, name: str, low: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def check_inputs(q, k, v, *, dropout_p: float = 0.0, scale: Optional[float] = None, key_padding_mask=None) -> None:
    """Argument checks shared by the sparse ops: ``TypeError`` / ``ValueError`` naming the argument."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, N, d), got shape {tuple(x.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(f"q, k, v batch sizes differ: {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    if k.shape[1:3] != v.shape[1:3]:
        raise ValueError(f"k and v must have the same heads and length, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"key/value heads ({k.shape[1]}) must divide query heads ({q.shape[1]})")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
    ):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor):
            raise TypeError(f"key_padding_mask must be a Tensor, got {type(key_padding_mask).__name__}")
        if key_padding_mask.shape != (q.shape[0], k.shape[2]):
            raise ValueError(
                f"key_padding_mask must have shape (B, S) = {(q.shape[0], k.shape[2])}, "
                f"got {tuple(key_padding_mask.shape)}"
            )


def _prepare(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor]):
    heads = q.shape[1]
    k, v = repeat_kv(k, heads), repeat_kv(v, heads)  # GQA: autograd sums the repeated heads' grads
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.to(device=q.device, dtype=torch.bool)
    return k, v, key_padding_mask


# -- the one autograd wiring of the C++ and Triton kernels -----------------------------------------------------
_EAGER_TRITON: dict = {}  # op -> the Triton launch functions eager mode calls (imported once)


def _kernel_ops(backend: str, op: str):
    """``(forward, backward)`` callables of ``op``'s kernels on ``backend`` ("cpp" or "triton")."""
    ops = torch.ops.efficient_attention
    if backend == "cpp":
        return (
            (ops.sliding_window_fwd, ops.sliding_window_bwd)
            if op == "window"
            else (ops.block_sparse_fwd, ops.block_sparse_bwd)
        )
    if torch.compiler.is_compiling():  # the registered ops: opaque to the compiler, with fake impls
        return (
            (ops.triton_sliding_window, ops.triton_sliding_window_bwd)
            if op == "window"
            else (ops.triton_block_sparse, ops.triton_block_sparse_bwd)
        )
    hit = _EAGER_TRITON.get(op)
    if hit is None:
        from . import triton_ops

        hit = _EAGER_TRITON[op] = (
            (triton_ops.sliding_window_fwd, triton_ops.sliding_window_bwd)
            if op == "window"
            else (triton_ops.block_sparse_fwd, triton_ops.block_sparse_bwd)
        )
    return hit


class _SlidingWindowFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend, q, k, v, kpm, group, left, right, causal, q_offset, scale, q_pos):
        fwd, _ = _kernel_ops(backend, "window")
        args = (group, left, right, causal, q_offset, scale)
        # (per-row positions: the Triton kernels only; the C++ ops' schemas have no such argument)
        out, lse = fwd(q, k, v, kpm, *args) if q_pos is None else fwd(q, k, v, kpm, *args, q_pos)
        ctx.set_materialize_grads(False)  # an unused lse gets no zero gradient (and no delta term)
        ctx.save_for_backward(q, k, v, out, lse, kpm, q_pos)
        ctx.backend, ctx.args = backend, args
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, kpm, q_pos = ctx.saved_tensors
        _, bwd = _kernel_ops(ctx.backend, "window")
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out
        tail = () if q_pos is None else (q_pos,)
        dq, dk, dv = bwd(grad_out, grad_lse, q, k, v, out, lse, kpm, *ctx.args, *tail)
        return (None, dq, dk, dv) + (None,) * 8


class _BlockSparseFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        backend,
        q,
        k,
        v,
        kpm,
        block_size,
        causal,
        scale,
        row_idx,
        row_cnt,
        row_tile,
        col_idx,
        col_cnt,
        col_tile,
        tiles,
    ):
        fwd, _ = _kernel_ops(backend, "block")
        if backend == "cpp":
            out, lse = fwd(q, k, v, row_idx, row_cnt, row_tile, tiles, block_size, causal, kpm, scale)
        else:
            out, lse = fwd(
                q, k, v, row_idx, row_cnt, row_tile, col_idx, col_cnt, col_tile, tiles, block_size, causal, kpm, scale
            )
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, out, lse, kpm, row_idx, row_cnt, row_tile, col_idx, col_cnt, col_tile, tiles)
        ctx.backend, ctx.args = backend, (block_size, causal)
        ctx.scale = scale
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, kpm, row_idx, row_cnt, row_tile, col_idx, col_cnt, col_tile, tiles = ctx.saved_tensors
        _, bwd = _kernel_ops(ctx.backend, "block")
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out
        if ctx.backend == "cpp":
            tables = (row_idx, row_cnt, row_tile, tiles)
        else:
            tables = (row_idx, row_cnt, row_tile, col_idx, col_cnt, col_tile, tiles)
        dq, dk, dv = bwd(grad_out, grad_lse, q, k, v, out, lse, *tables, *ctx.args, kpm, ctx.scale)
        return (None, dq, dk, dv) + (None,) * 11


def sliding_window_kernel(
    backend: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kpm: Optional[Tensor],
    group: int,
    left: int,
    right: int,
    causal: bool,
    q_offset: int,
    scale: float,
    q_pos: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """The C++ (``"cpp"``) or Triton kernels of a window band, with autograd; ``k, v`` carry q's head count,
    ``kpm`` is bool ``(B, S)`` or None; ``q_pos`` int32 ``(B, H, T)`` (Triton only) the rows' positions, nondecreasing
    along ``T``, in place of ``q_offset``.  Returns ``(out, lse)``; no checks (callers dispatch first)."""
    return _SlidingWindowFn.apply(backend, q, k, v, kpm, group, left, right, causal, q_offset, scale, q_pos)


def block_sparse_kernel(
    backend: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tables: tuple,
    block_size: int,
    causal: bool,
    kpm: Optional[Tensor],
    scale: float,
) -> Tuple[Tensor, Tensor]:
    """The C++ or Triton kernels of a block mask's ``tables`` ``(row_idx, row_cnt, row_tile, col_idx, col_cnt,
    col_tile, tiles)`` (:meth:`BlockMask.tables`; the C++ kernels read no ``col_*``), with autograd."""
    return _BlockSparseFn.apply(backend, q, k, v, kpm, block_size, causal, scale, *tables)


# -- sliding window: backends -----------------------------------------------------------------------------------
CPU_MAX_HEAD_DIM = 512
TRITON_BLOCK_SIZES = (16, 32, 64, 128)
_EXCLUDE_SELF = (
    "the window excludes each query's own key (LocalWindow.exclude_self, shared_qk), which the kernels do not implement"
)
_POSITIONS = "per-row query positions (q_pos), which the C++ kernels do not implement"


def _run_window(backend, q, k, v, window, q_offset, key_padding_mask, scale, q_pos=None):
    k, v, kpm = _prepare(q, k, v, key_padding_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return sliding_window_kernel(
        backend, q, k, v, kpm, window.group, window.left, window.right, window.causal, int(q_offset), scale, q_pos
    )


def check_positions(q_pos, q: Tensor, q_offset: int = 0) -> None:
    """``q_pos`` must be an int32 ``(B, H, T)`` tensor on ``q``'s device (and ``q_offset`` 0 with it): ``ValueError``
    naming it otherwise.  That it is nondecreasing along ``T`` is the caller's promise (not checked: no device
    sync)."""
    if not isinstance(q_pos, Tensor):
        raise ValueError(f"q_pos must be a Tensor or None, got {type(q_pos).__name__}")
    if q_pos.shape != q.shape[:3]:
        raise ValueError(f"q_pos must have shape (B, H, T) = {tuple(q.shape[:3])}, got {tuple(q_pos.shape)}")
    if q_pos.dtype != torch.int32:
        raise ValueError(f"q_pos must be int32, got {q_pos.dtype}")
    if q_pos.device != q.device:
        raise ValueError(f"q_pos must be on q's device {q.device}, got {q_pos.device}")
    if q_offset != 0:
        raise ValueError(f"q_offset must be 0 when q_pos gives the positions, got {q_offset}")


class SlidingWindowTriton(TritonBackend):
    op = "sliding_window"

    @classmethod
    def input_reasons(cls, q, k, v, dropout_p=0.0, exclude_self=False, positions=False):
        return (
            kernel_shape_reasons(q, k, v, dropout_p)
            + tile_head_dim_reasons(q, v)
            + ([_EXCLUDE_SELF] if exclude_self else [])
        )

    @classmethod
    def run(cls, q, k, v, window, q_offset, key_padding_mask, scale, dropout_p, chunk, q_pos=None):
        return _run_window(cls.name, q, k, v, window, q_offset, key_padding_mask, scale, q_pos)


class SlidingWindowCpp(CppBackend):
    op = "sliding_window"

    @classmethod
    def input_reasons(cls, q, k, v, dropout_p=0.0, exclude_self=False, positions=False):
        reasons = kernel_shape_reasons(q, k, v, dropout_p) + ([_EXCLUDE_SELF] if exclude_self else [])
        if q.shape[-1] > CPU_MAX_HEAD_DIM or v.shape[-1] > CPU_MAX_HEAD_DIM:
            reasons.append(f"head dim {q.shape[-1]}/{v.shape[-1]} is above {CPU_MAX_HEAD_DIM}")
        if positions:
            reasons.append(_POSITIONS)
        return reasons

    @classmethod
    def run(cls, q, k, v, window, q_offset, key_padding_mask, scale, dropout_p, chunk, q_pos=None):
        return _run_window(cls.name, q, k, v, window, q_offset, key_padding_mask, scale)


class SlidingWindowReference(ReferenceBackend):
    op = "sliding_window"

    @classmethod
    def input_reasons(cls, q, k, v, dropout_p=0.0, exclude_self=False, positions=False):
        return []

    @staticmethod
    def run(q, k, v, window, q_offset, key_padding_mask, scale, dropout_p, chunk, q_pos=None):
        return reference.sliding_window_attention(
            q,
            k,
            v,
            window,
            q_offset=q_offset,
            key_padding_mask=key_padding_mask,
            scale=scale,
            dropout_p=dropout_p,
            chunk=chunk,
            q_pos=q_pos,
        )


SLIDING_WINDOW = Dispatcher(
    "sliding_window", (SlidingWindowTriton, SlidingWindowCpp, SlidingWindowReference), aliases={"cpu": "cpp"}
)


# -- block sparse: backends -------------------------------------------------------------------------------------
class BlockSparseTriton(TritonBackend):
    op = "block_sparse"

    @classmethod
    def input_reasons(cls, q, k, v, dropout_p=0.0, block_size=None):
        reasons = kernel_shape_reasons(q, k, v, dropout_p) + tile_head_dim_reasons(q, v)
        if block_size is not None and block_size not in TRITON_BLOCK_SIZES:
            reasons.append(f"block_size {block_size} is not one of {TRITON_BLOCK_SIZES}")
        return reasons

    @classmethod
    def run(cls, q, k, v, bm, key_padding_mask, scale, dropout_p):
        k, v, kpm = _prepare(q, k, v, key_padding_mask)
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        if bm.block_size < TRITON_MIN_BLOCK and min(q.shape[2], k.shape[2]) >= TRITON_MIN_BLOCK:
            bm = bm.coarsened(TRITON_MIN_BLOCK)
        tables = bm.tables(q.device)["kernel"]
        return block_sparse_kernel(cls.name, q, k, v, tables, bm.block_size, bm.causal, kpm, scale)


class BlockSparseCpp(CppBackend):
    op = "block_sparse"

    @classmethod
    def input_reasons(cls, q, k, v, dropout_p=0.0, block_size=None):
        return SlidingWindowCpp.input_reasons(q, k, v, dropout_p)

    @classmethod
    def run(cls, q, k, v, bm, key_padding_mask, scale, dropout_p):
        k, v, kpm = _prepare(q, k, v, key_padding_mask)
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        t = bm.tables("cpu")
        tables = (*t["row"], None, None, None, t["tiles"])
        return block_sparse_kernel(cls.name, q, k, v, tables, bm.block_size, bm.causal, kpm, scale)


class BlockSparseReference(ReferenceBackend):
    op = "block_sparse"

    @classmethod
    def input_reasons(cls, q, k, v, dropout_p=0.0, block_size=None):
        return []

    @staticmethod
    def run(q, k, v, bm, key_padding_mask, scale, dropout_p):
        return reference.block_sparse_attention(
            q, k, v, bm, key_padding_mask=key_padding_mask, scale=scale, dropout_p=dropout_p
        )


BLOCK_SPARSE = Dispatcher(
    "block_sparse", (BlockSparseTriton, BlockSparseCpp, BlockSparseReference), aliases={"cpu": "cpp"}
)


# -- the public entries -----------------------------------------------------------------------------------------
def sliding_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: LocalWindow,
    *,
    q_offset: int = 0,
    q_pos: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    chunk: Optional[int] = None,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor]:
    """Attention restricted to a :class:`LocalWindow` band (see :func:`reference.sliding_window_attention`).

    ``q_pos`` (int32 ``(B, H, T)``, nondecreasing along ``T``), instead of ``q_offset``, gives each query row its
    own position: gathered rows (ProbSparse's active queries) attend with the band of their positions (Triton
    and the reference path; the C++ kernels do not take it).  Returns ``(out (B, H, T, dv), lse (B, H, T))``;
    ``chunk`` only tunes the reference path.  ``backend`` forces ``"triton"``, ``"cpp"`` or ``"reference"``
    (``BackendUnavailableError``, a ``ValueError``, listing every reason when it cannot run); by default the
    fastest that supports the inputs.
    """
    if not isinstance(window, LocalWindow):
        raise TypeError(f"window must be a LocalWindow, got {type(window).__name__}")
    check_inputs(q, k, v, dropout_p=dropout_p, scale=scale, key_padding_mask=key_padding_mask)
    q_offset = _int(q_offset, "q_offset")
    if q_pos is not None:
        check_positions(q_pos, q, q_offset)
    if chunk is not None:
        _int(chunk, "chunk", 1)
    impl = SLIDING_WINDOW.select(
        backend, q, k, v, dropout_p=dropout_p, exclude_self=window.exclude_self, positions=q_pos is not None
    )
    return impl.run(q, k, v, window, q_offset, key_padding_mask, scale, dropout_p, chunk, q_pos)


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Union[BlockMask, Tensor],
    block_size: Optional[int] = None,
    *,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor]:
    """Attention over a :class:`BlockMask` (or a bool block layout with ``block_size``), see
    :func:`reference.block_sparse_attention`.  Full blocks skip the element mask; partial blocks apply
    the causal rule or their token tile inside the C++ / Triton kernels.  ``backend`` as in
    :func:`sliding_window_attention`.

    Returns ``(out (B, H, T, dv), lse (B, H, T))``.
    """
    check_inputs(q, k, v, dropout_p=dropout_p, scale=scale, key_padding_mask=key_padding_mask)
    if block_size is not None:
        _int(block_size, "block_size", 1)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    heads, tgt_len, src_len = q.shape[1], q.shape[2], k.shape[2]
    bm = as_block_mask(mask, heads, tgt_len, src_len, block_size, causal)
    return block_mask_attention(
        q, k, v, bm, key_padding_mask=key_padding_mask, scale=scale, dropout_p=dropout_p, backend=backend
    )


def block_mask_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bm: BlockMask,
    *,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor]:
    """:func:`block_sparse_attention` without its argument checks, for callers that built ``bm`` for exactly
    these inputs (the attention modules, whose inputs ``EfficientAttention.forward`` checks, and which build
    each mask once per length): per call only the backend decision (a cached lookup) and the kernels run.
    ``bm.causal`` decides the causal rule.  Returns ``(out (B, H, T, dv), lse (B, H, T))``."""
    impl = BLOCK_SPARSE.select(backend, q, k, v, dropout_p=dropout_p, block_size=bm.block_size)
    return impl.run(q, k, v, bm, key_padding_mask, scale, dropout_p)
