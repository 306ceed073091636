"""The dispatching entries of the sparse ops (same signatures and results as ``reference.py``)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..functional import repeat_kv
from ..local_window import LocalWindow
from . import reference
from .dispatch import choose_backend
from .reference import check_layout

__all__ = ["sliding_window_attention", "block_sparse_attention"]


def _prepare(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor]):
    heads = q.shape[1]
    k, v = repeat_kv(k, heads), repeat_kv(v, heads)  # GQA: autograd sums the repeated heads' grads
    if key_padding_mask is not None:
        if key_padding_mask.shape != (q.shape[0], k.shape[2]):
            raise ValueError(
                f"key_padding_mask must have shape (B, S) = {(q.shape[0], k.shape[2])}, got {tuple(key_padding_mask.shape)}"
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
    layout: Tensor,
    block_size: int,
    *,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> Tuple[Tensor, Tensor]:
    """Attention over the kept blocks of ``layout`` (see :func:`reference.block_sparse_attention`).

    Returns ``(out (B, H, T, dv), lse (B, H, T))``.
    """
    bs = int(block_size)
    if bs <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    heads, tgt_len, src_len = q.shape[1], q.shape[2], k.shape[2]
    layout = check_layout(layout, heads, -(-tgt_len // bs), -(-src_len // bs))
    backend = choose_backend("block_sparse", q, k, v, dropout_p=dropout_p, block_size=bs)
    if backend == "reference":
        return reference.block_sparse_attention(
            q, k, v, layout, bs, causal=causal, key_padding_mask=key_padding_mask, scale=scale, dropout_p=dropout_p
        )
    k, v, kpm = _prepare(q, k, v, key_padding_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend == "triton":
        from . import triton_ops

        args = (q, k, v, layout.to(q.device), bs, bool(causal), kpm, scale)
        if torch.compiler.is_compiling():
            return torch.ops.efficient_attention.triton_block_sparse(*args)
        return triton_ops.block_sparse_eager(*args)
    return torch.ops.efficient_attention.block_sparse_fwd(q, k, v, layout.cpu(), bs, bool(causal), kpm, scale)
