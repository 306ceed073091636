"""Block-sparse attention on ``(B, H, N, D)`` tensors.

``softmax(q kᵀ · scale)`` restricted to a :class:`~efficient_attention.block_mask.BlockMask`
(or a block layout, optionally with a token-level ``mask_mod`` inside the kept blocks), times
``v``.  Blocks the mask drops are never computed; every form goes to the kernels dispatch
(``efficient_attention.kernels.block_sparse_attention``: C++ / Triton fast paths where
available, the one reference path otherwise).  :func:`block_layout_attention` is the
functional on layouts (it was ``block_sparse_attention`` here too; that name is now the
kernel op's alone, which takes a ``BlockMask`` and returns ``(out, lse)``).
"""

from __future__ import annotations

from typing import Literal, Optional, Tuple, Union, overload

import torch
from torch import Tensor

from .. import kernels
from ..block_mask import BlockMask, as_block_mask
from ..layouts import MaskMod, layout_mask_mod

__all__ = ["block_layout_attention", "check_qkv", "block_mask_of"]


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


def block_mask_of(
    layout: Union[BlockMask, Tensor],
    block_size: int,
    heads: int,
    tgt_len: int,
    src_len: int,
    mask_mod: Optional[MaskMod] = None,
    device=None,
) -> BlockMask:
    """A :class:`BlockMask` for a layout tensor restricted by a token rule ``mask_mod`` (or as is).

    ``mask_mod`` sees absolute query positions ``t + S - T`` (the queries are the last ``T``)."""
    bm = as_block_mask(layout, heads, tgt_len, src_len, block_size)
    if mask_mod is None:
        return bm
    off = src_len - tgt_len
    lay_mod = layout_mask_mod(bm.layout, bm.block_size)

    def mod(b, h, i, j):
        return lay_mod(b, h, i, j) & mask_mod(b, h, i + off, j)

    return BlockMask.from_mask_mod(mod, bm.heads, tgt_len, src_len, bm.block_size, device=device, candidates=bm.layout)


@overload
def block_layout_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: Union[BlockMask, Tensor],
    block_size: Optional[int] = None,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    *,
    mask_mod: Optional[MaskMod] = None,
    pad: bool = True,
    dropout_p: float = 0.0,
    return_lse: Literal[False] = False,
) -> Tensor: ...


@overload
def block_layout_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: Union[BlockMask, Tensor],
    block_size: Optional[int] = None,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    *,
    mask_mod: Optional[MaskMod] = None,
    pad: bool = True,
    dropout_p: float = 0.0,
    return_lse: Literal[True],
) -> Tuple[Tensor, Tensor]: ...


def block_layout_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: Union[BlockMask, Tensor],
    block_size: Optional[int] = None,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    *,
    mask_mod: Optional[MaskMod] = None,
    pad: bool = True,
    dropout_p: float = 0.0,
    return_lse: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Attention restricted to a block mask.

    Args:
        q: ``(B, H, T, D)``; k, v: ``(B, Hkv, S, D)`` (``Hkv`` divides ``H``: grouped-query).
        layout: a :class:`BlockMask`, or a bool / 0-1 layout ``(H or 1, ceil(T/bs), ceil(S/bs))``
            (True = computed) with ``block_size``.
        block_size: ``bs`` (16, 32, 64, 128 are the kernels' sizes; any positive size works).
        causal: also hide key ``j > i + S - T``.
        key_padding_mask: ``(B, S)`` bool, True = padding.
        scale: logit scale (default ``D ** -0.5``).
        mask_mod: optional token rule inside kept blocks (``mask_mod(b, h, i, j)``, True = attend);
            it becomes the block mask's partial-block tiles (built here: pass a :class:`BlockMask`
            to build it once).
        pad: allow lengths that are not multiples of ``block_size`` (padded internally);
            with ``pad=False`` they raise ``ValueError``.
        return_lse: also return the fp32 log-sum-exp ``(B, H, T)`` (to merge several calls exactly).

    Returns:
        ``out (B, H, T, D)`` (and ``lse``).  A query whose mask row keeps nothing
        gets ``out = 0``, ``lse = -inf`` -- never NaN.  Cost ``O(kept blocks * bs^2 * D)``.
    """
    check_qkv(q, k, v)
    if isinstance(layout, BlockMask):
        if block_size is not None and block_size != layout.block_size:
            raise ValueError(f"block_size {block_size!r} differs from the block mask's {layout.block_size}")
        block_size = layout.block_size
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__} {block_size!r}")
    if block_size <= 0:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    tgt_len, src_len = q.shape[2], k.shape[2]
    if not pad and (tgt_len % block_size or src_len % block_size):
        raise ValueError(
            f"sequence lengths ({tgt_len}, {src_len}) are not multiples of block_size ({block_size}) and pad=False"
        )
    with torch.no_grad():
        bm = block_mask_of(layout, block_size, q.shape[1], tgt_len, src_len, mask_mod, q.device)
    out, lse = kernels.block_sparse_attention(
        q, k, v, bm, causal=bool(causal), key_padding_mask=key_padding_mask, scale=scale, dropout_p=dropout_p
    )
    return (out, lse) if return_lse else out
