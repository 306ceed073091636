"""The dispatching entries of the sparse ops (same signatures and results as ``reference.py``)."""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from ..block_mask import BlockMask, as_block_mask
from ..functional import repeat_kv
from ..local_window import LocalWindow
from . import reference
from .dispatch import choose_backend

__all__ = ["sliding_window_attention", "block_sparse_attention", "check_inputs"]

# Triton computes blocks of 64 best; finer masks run as 64-blocks with token tiles (FlexAttention's way)
TRITON_MIN_BLOCK = 64


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
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor):
            raise TypeError(f"key_padding_mask must be a Tensor, got {type(key_padding_mask).__name__}")
        if key_padding_mask.shape != (q.shape[0], k.shape[2]):
            raise ValueError(f"key_padding_mask must have shape (B, S) = {(q.shape[0], k.shape[2])}, "
                             f"got {tuple(key_padding_mask.shape)}")


def _prepare(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor]):
    heads = q.shape[1]
    k, v = repeat_kv(k, heads), repeat_kv(v, heads)  # GQA: autograd sums the repeated heads' grads
    if key_padding_mask is not None:
        if key_padding_mask.shape != (q.shape[0], k.shape[2]):
            raise ValueError(
                f"key_padding_mask must have shape (B, S) = {(q.shape[0], k.shape[2])}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        key_padding_mask = key_padding_mask.to(device=q.device, dtype=torch.bool)
    return k, v, key_padding_mask


def sliding_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: LocalWindow,
    *,
    q_offset: int = 0,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    chunk: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """Attention restricted to a :class:`LocalWindow` band (see :func:`reference.sliding_window_attention`).

    Returns ``(out (B, H, T, dv), lse (B, H, T))``; ``chunk`` only tunes the reference path.
    """
    if not isinstance(window, LocalWindow):
        raise TypeError(f"window must be a LocalWindow, got {type(window).__name__}")
    check_inputs(q, k, v, dropout_p=dropout_p, scale=scale, key_padding_mask=key_padding_mask)
    q_offset = _int(q_offset, "q_offset")
    if chunk is not None:
        _int(chunk, "chunk", 1)
    backend = choose_backend("sliding_window", q, k, v, dropout_p=dropout_p, exclude_self=window.exclude_self)
    if backend == "reference":
        return reference.sliding_window_attention(
            q, k, v, window, q_offset=q_offset, key_padding_mask=key_padding_mask, scale=scale,
            dropout_p=dropout_p, chunk=chunk,
        )
    k, v, kpm = _prepare(q, k, v, key_padding_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    args = (window.group, window.left, window.right, window.causal, int(q_offset), scale)
    if backend == "triton":
        from . import triton_ops

        if torch.compiler.is_compiling():
            return torch.ops.efficient_attention.triton_sliding_window(q, k, v, kpm, *args)
        return triton_ops.sliding_window_eager(q, k, v, kpm, *args)
    return torch.ops.efficient_attention.sliding_window_fwd(q, k, v, kpm, *args)


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
) -> Tuple[Tensor, Tensor]:
    """Attention over a :class:`BlockMask` (or a bool block layout with ``block_size``), see
    :func:`reference.block_sparse_attention`.  Full blocks skip the element mask; partial blocks apply
    the causal rule or their token tile inside the C++ / Triton kernels.

    Returns ``(out (B, H, T, dv), lse (B, H, T))``.
    """
    check_inputs(q, k, v, dropout_p=dropout_p, scale=scale, key_padding_mask=key_padding_mask)
    if block_size is not None:
        _int(block_size, "block_size", 1)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    heads, tgt_len, src_len = q.shape[1], q.shape[2], k.shape[2]
    bm = as_block_mask(mask, heads, tgt_len, src_len, block_size, causal)
    backend = choose_backend("block_sparse", q, k, v, dropout_p=dropout_p, block_size=bm.block_size)
    if backend == "reference":
        return reference.block_sparse_attention(q, k, v, bm, key_padding_mask=key_padding_mask, scale=scale,
                                                dropout_p=dropout_p)
    k, v, kpm = _prepare(q, k, v, key_padding_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend == "triton":
        from . import triton_ops

        if bm.block_size < TRITON_MIN_BLOCK and min(tgt_len, src_len) >= TRITON_MIN_BLOCK:
            bm = bm.coarsened(TRITON_MIN_BLOCK)
        t = bm.tables(q.device)
        tables = (*t["row"], *t["col"], t["tiles"])
        if torch.compiler.is_compiling():
            return torch.ops.efficient_attention.triton_block_sparse(q, k, v, *tables, bm.block_size, bm.causal, kpm,
                                                                     scale)
        return triton_ops.block_sparse_eager(q, k, v, tables, bm.block_size, bm.causal, kpm, scale)
    t = bm.tables("cpu")
    return torch.ops.efficient_attention.block_sparse_fwd(q, k, v, *t["row"], t["tiles"], bm.block_size, bm.causal, kpm,
                                                          scale)
