"""Pure-PyTorch reference paths of the sparse kernels.

They compute exactly what the fast kernels compute, on any device and dtype,
with autograd, and without the dense ``N x N`` score matrix:

* :func:`sliding_window_attention` works on query chunks and only the keys
  their band can reach (scores are ``O(N * span)``, gathered keys a small
  constant times ``K``);
* :func:`block_sparse_attention` (a :class:`~efficient_attention.block_mask.BlockMask`) and
  :func:`gathered_block_attention` (any token rule, per-batch layouts) gather, for every query
  block, only the key blocks its layout row keeps (work scales with the kept blocks).

Both return ``(out, lse)``: ``out (B, H, T, d)`` and the fp32 log-sum-exp of
the scaled, masked scores ``(B, H, T)`` (``-inf`` for a query that sees
nothing; its output is 0, never NaN), so callers can combine several calls
exactly (e.g. the branches of dilated attention).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..block_mask import BlockMask, as_block_mask
from ..functional import acc_dtype, repeat_kv, scaled_scores, softmax
from ..local_window import LocalWindow

__all__ = ["sliding_window_attention", "block_sparse_attention", "gathered_block_attention", "KeepFn"]

# keep(b, h, i, j) -> bool, on broadcasting index tensors; i, j are query / key positions
KeepFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def _lse(scores: Tensor) -> Tensor:
    return torch.logsumexp(scores.to(acc_dtype(scores.dtype)), dim=-1)


def _finish(scores: Tensor, vals: Tensor, dropout_p: float) -> Tuple[Tensor, Tensor]:
    """softmax over the last dim of ``scores (..., C, W)`` against ``vals (..., W, d)``."""
    lse = _lse(scores)
    probs = softmax(scores).to(vals.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p, training=True)
    return torch.matmul(probs, vals), lse


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
    q_pos: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Attention restricted to a :class:`LocalWindow` band.

    Args:
        q: ``(B, H, T, d)``, at absolute positions ``q_offset .. q_offset + T - 1``.
        k, v: ``(B, Hkv, S, d)`` at positions ``0 .. S - 1``.
        window: the band rule.
        key_padding_mask: ``(B, S)`` bool, True = padding.
        scale: logit scale (default ``d ** -0.5``).
        chunk: queries per chunk (default: the window group, or the band width; 64 with ``q_pos``).
        q_pos: ``(B, H, T)`` integer, each query row's own position (in place of ``q_offset``): gathered rows.

    Returns:
        ``(out (B, H, T, d), lse (B, H, T))``.  Cost ``O(T * span * d)`` (with ``q_pos``, a chunk of rows
        spans the keys from its smallest position's band to its largest's).
    """
    bsz, heads, tgt_len, dim = q.shape
    src_len = k.shape[2]
    k, v = repeat_kv(k, heads), repeat_kv(v, heads)
    scale = dim**-0.5 if scale is None else scale
    if q_pos is not None:
        return _positions_attention(q, k, v, window, q_pos, key_padding_mask, scale, dropout_p, chunk or 64)
    if chunk is None:
        chunk = window.group if window.group > 1 else max(16, window.left + window.right)
    n_chunks = -(-tgt_len // chunk)
    device = q.device
    qpos = torch.arange(n_chunks * chunk, device=device).view(n_chunks, chunk) + q_offset
    start = window.lo(qpos[:, 0])  # (n,)
    width = window.chunk_span(q_offset, chunk, n_chunks)  # keys any chunk needs (a Python int: no sync)
    kpos = start[:, None] + torch.arange(width, device=device)  # (n, W)
    valid = (kpos >= 0) & (kpos < src_len)
    idx = kpos.clamp(0, max(src_len - 1, 0))
    q_pad = F.pad(q, (0, 0, 0, n_chunks * chunk - tgt_len)).view(bsz, heads, n_chunks, chunk, dim)
    keep = window.allowed(qpos[:, :, None], kpos[:, None, :]) & valid[:, None, :]  # (n, C, W)
    keep = keep[None, None]
    if key_padding_mask is not None:
        keep = keep & ~key_padding_mask[:, idx][:, None, :, None, :]
    return _attend_chunks(q_pad, k[:, :, idx], v[:, :, idx], keep, scale, dropout_p, tgt_len)


def _attend_chunks(
    q_pad: Tensor, kb: Tensor, vb: Tensor, keep: Tensor, scale: float, dropout_p: float, tgt_len: int
) -> Tuple[Tensor, Tensor]:
    """Chunks of query rows ``q_pad (B, H, n, C, d)`` over their own keys ``kb, vb (B, H, n, W, ·)`` where
    ``keep`` (broadcast to ``(B, H, n, C, W)``): ``(out (B, H, T, dv), lse (B, H, T))``, the first ``tgt_len``
    rows."""
    bsz, heads, n_chunks, chunk, _ = q_pad.shape
    scores = scaled_scores(q_pad, kb, scale)  # (B, H, n, C, W), fp32 for half inputs
    out, lse = _finish(scores.masked_fill(~keep, float("-inf")), vb, dropout_p)
    out = out.reshape(bsz, heads, n_chunks * chunk, vb.shape[-1])[:, :, :tgt_len]
    return out, lse.reshape(bsz, heads, n_chunks * chunk)[:, :, :tgt_len]


def _positions_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: LocalWindow,
    q_pos: Tensor,
    key_padding_mask: Optional[Tensor],
    scale: float,
    dropout_p: float,
    chunk: int,
) -> Tuple[Tensor, Tensor]:
    """:func:`sliding_window_attention` of rows at positions ``q_pos (B, H, T)`` (k, v with q's heads): chunks of
    ``chunk`` rows, each over the keys from its smallest position's band start to its largest's end (one width
    for all, read back once)."""
    bsz, heads, tgt_len, dim = q.shape
    src_len = k.shape[2]
    if tgt_len == 0:
        return q.new_zeros(*q.shape[:3], v.shape[-1]), q.new_zeros(q.shape[:3], dtype=acc_dtype(q.dtype))
    n_chunks = -(-tgt_len // chunk)
    pad = n_chunks * chunk - tgt_len
    pos = q_pos.long().to(q.device)
    pos = torch.cat([pos, pos[..., -1:].expand(-1, -1, pad)], -1).view(bsz, heads, n_chunks, chunk)  # (B, H, n, C)
    start = window.lo(pos.amin(-1))  # (B, H, n)
    width = max(int((window.hi(pos.amax(-1)) - start).max().item()) + 1, 1)
    kpos = start[..., None] + torch.arange(width, device=q.device)  # (B, H, n, W)
    valid = (kpos >= 0) & (kpos < src_len)
    idx = kpos.clamp(0, max(src_len - 1, 0)).flatten(2)  # (B, H, n*W)
    kb = torch.gather(k, 2, idx[..., None].expand(-1, -1, -1, dim)).view(bsz, heads, n_chunks, width, dim)
    vb = torch.gather(v, 2, idx[..., None].expand(-1, -1, -1, v.shape[-1])).view(
        bsz, heads, n_chunks, width, v.shape[-1]
    )
    q_pad = F.pad(q, (0, 0, 0, pad)).view(bsz, heads, n_chunks, chunk, dim)
    keep = window.allowed(pos[..., None], kpos[..., None, :]) & valid[..., None, :]
    if key_padding_mask is not None:
        keep = keep & ~key_padding_mask[torch.arange(bsz, device=q.device)[:, None, None], idx].view(
            bsz, heads, n_chunks, 1, width
        )
    return _attend_chunks(q_pad, kb, vb, keep, scale, dropout_p, tgt_len)


def gathered_block_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: Tensor,
    block_size: int,
    keep: Optional[KeepFn] = None,
    *,
    causal: bool = False,
    q_offset: Optional[int] = None,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> Tuple[Tensor, Tensor]:
    """The one reference path of block-sparse attention: for each query block, gather only the key
    blocks its layout row keeps, score them, hide what ``keep`` / ``causal`` / padding reject, softmax.

    Args:
        q: ``(B, H, T, d)``; k, v: ``(B, Hkv, S, d)``.  Query ``t`` sits at position ``t + q_offset``
            (default ``S - T``); keys at ``0..S-1``.
        layout: bool ``(B or 1, H or 1, ceil(T/bs), ceil(S/bs))`` (per batch item: hash buckets).
        keep: ``keep(b, h, i, j)`` on broadcasting long tensors (positions), True = attend; ``None``
            keeps every entry of a kept block.
        causal: also require ``j <= i``.

    Returns:
        ``(out (B, H, T, d), lse (B, H, T))``; a query that sees nothing gets ``out = 0``, ``lse = -inf``.
        Work ``O(kept blocks * bs^2 * d)`` (rows padded to the densest row); scores in fp32 for
        half-precision inputs (scaled before the product, so large inputs do not overflow).
    """
    bsz, heads, tgt_len, dim = q.shape
    src_len = k.shape[2]
    bs = int(block_size)
    off = src_len - tgt_len if q_offset is None else q_offset
    nq, nk = -(-tgt_len // bs), -(-src_len // bs)
    if (
        layout.dim() != 4
        or layout.shape[0] not in (1, bsz)
        or layout.shape[1] not in (1, heads)
        or layout.shape[2:] != (nq, nk)
    ):
        raise ValueError(f"layout must have shape ({bsz} or 1, {heads} or 1, {nq}, {nk}), got {tuple(layout.shape)}")
    dev = q.device
    layout = layout.to(dev)
    k, v = repeat_kv(k, heads), repeat_kv(v, heads)
    scale = dim**-0.5 if scale is None else scale
    counts = layout.sum(-1)
    kmax = max(int(counts.max().item()) if counts.numel() else 0, 1)
    order = torch.sort(layout.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :kmax]
    order = order.expand(bsz, heads, nq, kmax)
    slot_ok = (torch.arange(kmax, device=dev) < counts[..., None]).expand(bsz, heads, nq, kmax)
    qb = F.pad(q, (0, 0, 0, nq * bs - tgt_len)).view(bsz, heads, nq, bs, dim)
    kb = F.pad(k, (0, 0, 0, nk * bs - src_len)).view(bsz, heads, nk, bs, dim)
    vb = F.pad(v, (0, 0, 0, nk * bs - src_len)).view(bsz, heads, nk, bs, v.shape[-1])
    b_idx = torch.arange(bsz, device=dev).view(-1, 1, 1, 1)
    h_idx = torch.arange(heads, device=dev).view(1, -1, 1, 1)
    kg = kb[b_idx, h_idx, order].flatten(-3, -2)  # (B, H, nq, W, d)
    vg = vb[b_idx, h_idx, order].flatten(-3, -2)
    scores = scaled_scores(qb, kg, scale)  # (B, H, nq, bs, W), fp32 for half inputs (keys gathered in their dtype)
    kpos = (order[..., None] * bs + torch.arange(bs, device=dev)).flatten(-2)[:, :, :, None, :]  # (B, H, nq, 1, W)
    qpos = (torch.arange(nq * bs, device=dev).view(1, 1, nq, bs, 1)) + off
    ok = slot_ok[..., None].expand(-1, -1, -1, -1, bs).flatten(-2)[:, :, :, None, :] & (kpos < src_len)
    ok = ok & (qpos < tgt_len + off)
    if causal:
        ok = ok & (kpos <= qpos)
    if key_padding_mask is not None:
        kpm = F.pad(key_padding_mask.bool(), (0, nk * bs - src_len), value=True)
        ok = ok & ~kpm[b_idx[..., None], kpos.clamp(max=nk * bs - 1)]
    if keep is not None:
        ok = ok & keep(b_idx[..., None], h_idx[..., None], qpos, kpos)
    out, lse = _finish(scores.masked_fill(~ok, float("-inf")), vg, dropout_p)
    out = out.reshape(bsz, heads, nq * bs, v.shape[-1])[:, :, :tgt_len]
    lse = lse.reshape(bsz, heads, nq * bs)[:, :, :tgt_len]
    return out, lse


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
    """Attention restricted to a :class:`BlockMask` (or a bool block layout with ``block_size``).

    Args:
        q: ``(B, H, T, d)``; k, v: ``(B, Hkv, S, d)``.  Lengths that are not a multiple of the block
            size are padded internally (padded keys never count).
        mask: the block mask, or a layout ``(H or 1, ceil(T/bs), ceil(S/bs))``, True = computed.
        causal: additionally hide keys after the query (``j <= i + S - T``).
        key_padding_mask: ``(B, S)`` bool, True = padding.

    Returns:
        ``(out (B, H, T, dv), lse (B, H, T))``.
    """
    heads, tgt_len, src_len = q.shape[1], q.shape[2], k.shape[2]
    bm = as_block_mask(mask, heads, tgt_len, src_len, block_size, causal)
    keep = None
    if bm.tiles is not None and bm.tile_index is not None:
        tile_index, tiles, bs, off = (
            bm.tile_index.to(q.device).long(),
            bm.tiles.to(q.device),
            bm.block_size,
            src_len - tgt_len,
        )
        hm = bm.heads

        def keep(b, h, i, j):  # positions are absolute (i = t + off); tiles index the mask's own rows
            t = i - off
            hh = h if hm > 1 else torch.zeros_like(h)
            ti = tile_index[
                hh,
                torch.div(t, bs, rounding_mode="floor").clamp(max=bm.shape[0] - 1),
                torch.div(j, bs, rounding_mode="floor").clamp(max=bm.shape[1] - 1),
            ]
            return tiles[ti.clamp(min=0), torch.remainder(t, bs), torch.remainder(j, bs)] | (ti < 0)

    return gathered_block_attention(
        q,
        k,
        v,
        bm.layout[None],
        bm.block_size,
        keep,
        causal=bm.causal,
        key_padding_mask=key_padding_mask,
        scale=scale,
        dropout_p=dropout_p,
    )
