"""Mask attention: attend only where a mask allows, computing only the allowed entries.

``mask_attention(q, k, v=None, mask=..., fill=...)`` (after
``mask_attention_transformer``'s ``mask_attn``).  **The mask says where to
attend: True = allowed** (as that package's ``mask_to_attend_to``; note that
the library's module masks use the opposite convention).

* ``v is None``: the masked scores ``scale · q kᵀ`` (``fill`` elsewhere), or
  with ``return_weights=True`` their row softmax (0 elsewhere);
* ``v`` given: ``softmax(masked scores) v``; disallowed entries take no part
  (``fill`` is irrelevant there) and a row with nothing allowed gives 0.

Cost follows the allowed entries: with ``v`` the mask becomes a
:class:`~efficient_attention.block_mask.BlockMask` (whole ``bs x bs`` blocks, ``bs`` in 128,
64, 32, 16, as full blocks; any other mask as 64-blocks with token tiles) and goes to the
block-sparse kernels; the scores / weights forms are evaluated pair by pair on the allowed
``(i, j)`` only (``O(nnz · d)``, a segment softmax per row).  The output tensor of the scores form is dense by
definition.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import kernels
from ..block_mask import BlockMask
from ..layouts import BLOCK_SIZES

__all__ = ["mask_attention", "block_structure"]


def block_structure(mask: Tensor, sizes: Tuple[int, ...] = BLOCK_SIZES[::-1]) -> Optional[Tuple[int, Tensor]]:
    """``(bs, layout (G, T/bs, S/bs))`` if the ``(G, T, S)`` bool mask is made of whole blocks, else ``None``."""
    g, t, s = mask.shape
    for bs in sizes:
        if t % bs or s % bs:
            continue
        blocks = mask.view(g, t // bs, bs, s // bs, bs)
        anyb = blocks.any(dim=4).any(dim=2)
        if torch.equal(anyb, blocks.all(dim=4).all(dim=2)):
            return bs, anyb
    return None


def _tiled_mask(own: Tensor, block_size: int = 64) -> BlockMask:
    """A token mask ``(G, T, S)`` as a :class:`BlockMask` of ``block_size`` blocks with token tiles."""
    g, t, s = own.shape

    def mod(b, h, i, j):
        return own[h, i.clamp(max=t - 1), j.clamp(max=s - 1)] & (i < t) & (j < s)

    bs = block_size if max(t, s) >= block_size else 16
    return BlockMask.from_mask_mod(mod, g, t, s, bs, device=own.device)


def _check(q, k, v, mask):
    for name, x in (("q", q), ("k", k)) + ((("v", v),) if v is not None else ()):
        if not isinstance(x, Tensor) or x.dim() < 2 or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor of shape (..., N, D)")
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or not torch.all((mask == 0) | (mask == 1)):
            raise TypeError(f"mask must be bool (True = attend) or 0/1 integers, got {mask.dtype}")
        mask = mask.bool()
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k feature sizes differ: {tuple(q.shape)} vs {tuple(k.shape)}")
    if v is not None and v.shape[-2] != k.shape[-2]:
        raise ValueError(f"k and v lengths differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if mask.dim() < 2 or mask.shape[-2:] != (q.shape[-2], k.shape[-2]):
        raise ValueError(f"mask must end in (N_q, N_k) = ({q.shape[-2]}, {k.shape[-2]}), got {tuple(mask.shape)}")
    return mask


def mask_attention(
    q: Tensor,
    k: Tensor,
    v: Optional[Tensor] = None,
    *,
    mask: Tensor,
    fill: float = float("-inf"),
    scale: Optional[float] = None,
    return_weights: bool = False,
) -> Tensor:
    """Attention restricted to ``mask`` (True = attend).

    Args:
        q: ``(..., T, D)``; k: ``(..., S, D)``; v: ``(..., S, Dv)`` or None; leading dims broadcast.
        mask: bool ``(..., T, S)``, True = attend (broadcasting over the leading dims).
        fill: value of the disallowed entries in the returned scores (``v is None``).
        scale: logit scale (default ``D ** -0.5``; pass 1.0 for raw dot products).
        return_weights: with ``v is None``, return the softmax weights instead of the scores.

    Returns:
        scores / weights ``(..., T, S)`` when ``v is None``, else the output ``(..., T, Dv)``.
    """
    mask = _check(q, k, v, mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    tgt_len, src_len = q.shape[-2], k.shape[-2]
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], mask.shape[:-2], *(() if v is None else (v.shape[:-2],)))
    G = int(torch.tensor(lead).prod()) if lead else 1
    qf = q.expand(*lead, *q.shape[-2:]).reshape(G, tgt_len, q.shape[-1])
    kf = k.expand(*lead, *k.shape[-2:]).reshape(G, src_len, k.shape[-1])
    if v is not None and not return_weights:
        vf = v.expand(*lead, *v.shape[-2:]).reshape(G, src_len, v.shape[-1])
        own = mask.reshape(-1, tgt_len, src_len)
        blocks = block_structure(own)
        if blocks is not None:
            bs, layout = blocks
            bm = BlockMask.from_layout(layout, bs)
        else:  # a token-level mask: 64-blocks, the partial ones with their token tiles
            bm = _tiled_mask(own)
        if bm.heads > 1:  # one mask head per leading index of the mask: select them per group
            sel = torch.arange(own.shape[0], device=own.device).reshape(mask.shape[:-2])
            sel = sel.broadcast_to(lead).reshape(G)
            bm = BlockMask(
                bm.layout[sel],
                bm.block_size,
                tile_index=None if bm.tile_index is None else bm.tile_index[sel],
                tiles=bm.tiles,
                q_len=tgt_len,
                kv_len=src_len,
            )
        out, _ = kernels.block_sparse_attention(qf[None], kf[None], vf[None], bm, scale=scale)
        return out[0].reshape(*lead, tgt_len, v.shape[-1])
    idx = mask.expand(*lead, tgt_len, src_len).reshape(G, tgt_len, src_len).nonzero(as_tuple=True)
    g, i, j = idx
    s = (qf[g, i] * kf[g, j]).sum(-1) * scale  # (nnz,)
    if v is None and not return_weights:
        out = torch.full((G, tgt_len, src_len), fill, dtype=s.dtype, device=s.device).index_put((g, i, j), s)
        return out.reshape(*lead, tgt_len, src_len)
    rows = g * tgt_len + i
    s32 = s.float() if s.dtype in (torch.float16, torch.bfloat16) else s
    rmax = torch.full((G * tgt_len,), float("-inf"), dtype=s32.dtype, device=s.device)
    rmax = rmax.scatter_reduce(0, rows, s32.detach(), reduce="amax", include_self=True)
    e = torch.exp(s32 - rmax[rows])
    den = torch.zeros(G * tgt_len, dtype=s32.dtype, device=s.device).index_add(0, rows, e)
    p = e / den[rows]
    if v is None:
        w = torch.zeros((G, tgt_len, src_len), dtype=p.dtype, device=s.device).index_put((g, i, j), p)
        return w.to(q.dtype).reshape(*lead, tgt_len, src_len)
    vf = v.expand(*lead, *v.shape[-2:]).reshape(G, src_len, v.shape[-1])
    out = torch.zeros(G * tgt_len, v.shape[-1], dtype=p.dtype, device=s.device)
    out = out.index_add(0, rows, p[:, None] * vf[g, j].to(p.dtype))
    return out.to(v.dtype).reshape(*lead, tgt_len, v.shape[-1])
