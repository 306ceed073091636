"""Block-sparse attention on ``(B, H, N, D)`` tensors.

``softmax(q kᵀ · scale)`` restricted to the kept blocks of a layout (and,
optionally, to a token-level ``mask_mod`` inside them), times ``v``.  Blocks
the layout drops are never computed.  Block-aligned layouts go to the kernels
dispatch (``efficient_attention.kernels.block_sparse_attention``: C++ / Triton
fast paths where available); token-level patterns use the gathered path of
:mod:`efficient_attention.sparse.gather`.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

from torch import Tensor

from .. import kernels
from ..kernels import check_layout
from ..layouts import MaskMod
from .gather import gathered_block_attention

__all__ = ["block_sparse_attention", "check_qkv"]


def check_qkv(q: Tensor, k: Tensor, v: Tensor, layout_name: str = "(B, H, N, D)") -> None:
    """Shapes / dtypes of per-head inputs: ``q (B, H, T, d)``, ``k, v (B, Hkv, S, d)``."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D {layout_name}, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape[:3] != v.shape[:3] or k.shape[0] != q.shape[0] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"key/value heads ({k.shape[1]}) must divide query heads ({q.shape[1]})")


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: Tensor,
    block_size: int,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    *,
    mask_mod: Optional[MaskMod] = None,
    pad: bool = True,
    dropout_p: float = 0.0,
    return_lse: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Attention restricted to a block layout.

    Args:
        q: ``(B, H, T, D)``; k, v: ``(B, Hkv, S, D)`` (``Hkv`` divides ``H``: grouped-query).
        layout: bool or 0/1 ``(H or 1, ceil(T/bs), ceil(S/bs))``; True = computed.
        block_size: ``bs`` (16, 32, 64, 128 are the tuned sizes; any positive size works).
        causal: also hide key ``j > i + S - T``.
        key_padding_mask: ``(B, S)`` bool, True = padding.
        scale: logit scale (default ``D ** -0.5``).
        mask_mod: optional token rule inside kept blocks (``mask_mod(b, h, i, j)``, True = attend).
        pad: allow lengths that are not multiples of ``block_size`` (padded internally);
            with ``pad=False`` they raise ``ValueError``.
        return_lse: also return the fp32 log-sum-exp ``(B, H, T)`` (to merge several calls exactly).

    Returns:
        ``out (B, H, T, D)`` (and ``lse``).  A query whose layout row (or mask) keeps nothing
        gets ``out = 0``, ``lse = -inf`` -- never NaN.  Cost ``O(kept blocks * bs^2 * D)``.
    """
    check_qkv(q, k, v)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    tgt_len, src_len = q.shape[2], k.shape[2]
    if not pad and (tgt_len % block_size or src_len % block_size):
        raise ValueError(
            f"sequence lengths ({tgt_len}, {src_len}) are not multiples of block_size ({block_size}) and pad=False"
        )
    nq, nk = -(-tgt_len // block_size), -(-src_len // block_size)
    layout = check_layout(layout, q.shape[1], nq, nk)
    if key_padding_mask is not None and key_padding_mask.shape != (q.shape[0], src_len):
        raise ValueError(f"key_padding_mask must have shape ({q.shape[0]}, {src_len}), got {tuple(key_padding_mask.shape)}")
    if mask_mod is None:
        out, lse = kernels.block_sparse_attention(
            q, k, v, layout, block_size, causal=causal, key_padding_mask=key_padding_mask, scale=scale, dropout_p=dropout_p
        )
    else:
        out, lse = gathered_block_attention(
            q, k, v, layout[None], block_size, mask_mod, causal=causal, key_padding_mask=key_padding_mask,
            scale=scale, dropout_p=dropout_p,
        )
    return (out, lse) if return_lse else out
