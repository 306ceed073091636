"""LongNet dilated attention with the exact softmax union of its branches.

Branch ``(w, r)``: the sequence is cut into segments of length ``w``; inside a
segment, head ``h`` keeps the positions at offset ``h mod r`` modulo ``r`` and
attends among them (causally if asked).  The branches are merged by the
softmax of their union: ``out = Σ_b exp(lse_b − lse) out_b`` with ``lse =
logsumexp_b lse_b`` -- each branch weighted by its softmax denominator, which
is exactly one softmax over all keys any branch lets the query see.  A key
pair reachable from several branches is counted once: each branch drops the
pairs an earlier branch already covers.  Cost ``O(Σ_b N · w_b / r_b² · d)``.

The union is one token mask, so the fast path is one block-sparse kernel call on a
:class:`~efficient_attention.block_mask.BlockMask` of it (built once per shape: the
segments' diagonal blocks, each with its dilation pattern as a token tile).  The
per-branch gather below is the readable reference; it also serves queries that are not
the last ``T`` positions.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..block_mask import BlockMask, built_outside_graph
from ..functional import acc_dtype, combine_attention, repeat_kv, scaled_scores, softmax
from ..kernels.ops import block_mask_attention
from ..layouts import dilated_mask_mod, or_masks
from .block_sparse import check_qkv

__all__ = ["dilated_attention", "dilated_attention_reference", "check_dilated_config", "dilated_block_mask"]

BLOCK_SIZE = 64  # the kernels' block of the union mask
_masks: "OrderedDict[tuple, BlockMask]" = OrderedDict()  # (config, n, first row) -> BlockMask, the recent ones


def check_dilated_config(
    segment_lengths: Sequence[int], dilation_rates: Sequence[int]
) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Validate the ``(w_i, r_i)`` pairs; returns them as int tuples."""
    for name, vals in (("segment_lengths", segment_lengths), ("dilation_rates", dilation_rates)):
        if vals is None or isinstance(vals, (str, bytes)) or not hasattr(vals, "__iter__"):
            raise ValueError(f"{name} must be a non-empty sequence of positive integers, got {vals!r}")
    ws, rs = tuple(segment_lengths), tuple(dilation_rates)
    if not ws or len(ws) != len(rs):
        raise ValueError(f"segment_lengths {ws} and dilation_rates {rs} must be non-empty and of equal length")
    for name, vals in (("segment_lengths", ws), ("dilation_rates", rs)):
        for x in vals:
            if isinstance(x, bool) or not isinstance(x, int) or x <= 0:
                raise ValueError(f"{name} must hold positive integers, got {vals}")
    for w, r in zip(ws, rs):
        if r > w:
            raise ValueError(f"dilation rate {r} exceeds its segment length {w}")
    return ws, rs


def _covered(i: Tensor, j: Tensor, h: Tensor, w: int, r: int) -> Tensor:
    """Whether branch ``(w, r)`` lets head ``h``'s query ``i`` see key ``j`` (ignoring causality)."""
    off = torch.remainder(h, r)
    return (
        (torch.div(i, w, rounding_mode="floor") == torch.div(j, w, rounding_mode="floor"))
        & (torch.remainder(torch.remainder(i, w), r) == off)
        & (torch.remainder(torch.remainder(j, w), r) == off)
    )


@built_outside_graph
def dilated_block_mask(
    segment_lengths,
    dilation_rates,
    heads: int,
    n: int,
    causal: bool = False,
    device=None,
    q_block_start: int = 0,
    block_size: int = BLOCK_SIZE,
) -> BlockMask:
    """The :class:`BlockMask` of the union of the branches over ``n`` positions (rows from
    ``q_block_start`` on), evaluated only on the blocks that share a segment (cached; a shorter length
    crops a longer length's mask: no evaluation, no host synchronisation)."""
    config = (tuple(segment_lengths), tuple(dilation_rates), heads, causal, block_size, device)
    key = (config, n, q_block_start)
    hit = _masks.get(key)
    if hit is not None:
        _masks.move_to_end(key)
        return hit
    # the branches depend on positions only: a longer sequence's mask, cropped, is this one's (no evaluation)
    longer = [m for (c, n2, start), m in _masks.items() if c == config and start == 0 and n2 >= n]
    if q_block_start == 0 and longer:
        bm = min(longer, key=lambda m: m.shape[0]).crop(n)
    else:
        with torch.no_grad():
            bm = _build_dilated_block_mask(
                segment_lengths, dilation_rates, heads, n, causal, device, q_block_start, block_size
            )
    if len(_masks) >= 16:
        _masks.popitem(last=False)  # the least recently used
    _masks[key] = bm
    return bm


def _build_dilated_block_mask(segment_lengths, dilation_rates, heads, n, causal, device, q_block_start, block_size):
    mod = or_masks(*(dilated_mask_mod(w, r, causal) for w, r in zip(segment_lengths, dilation_rates)))
    nb = -(-n // block_size)
    first = torch.arange(nb, device=device) * block_size
    last = (first + block_size - 1).clamp(max=n - 1)
    cand = torch.zeros(nb - q_block_start, nb, dtype=torch.bool, device=device)  # only the rows asked for
    for w in set(segment_lengths):  # blocks whose segment ranges overlap
        lo, hi = torch.div(first, w, rounding_mode="floor"), torch.div(last, w, rounding_mode="floor")
        lo_q, hi_q = lo[q_block_start:, None], hi[q_block_start:, None]
        cand |= (lo_q <= hi[None, :]) & (lo[None, :] <= hi_q)
    return BlockMask.from_mask_mod(
        mod, heads, n, n, block_size, device=device, q_block_start=q_block_start, candidates=cand[None]
    )


def _branch(q, k, v, w, r, earlier, causal, off, kpm, scale, dropout_p):
    """One branch: (out (B, H, T, d), lse (B, H, T)) with -inf / 0 where the branch gives a query nothing."""
    bsz, heads, tgt_len, dim = q.shape
    src_len = k.shape[2]
    dev = q.device
    s0, s1 = off // w, (src_len - 1) // w
    m = -(-w // r)
    h = torch.arange(heads, device=dev).view(-1, 1, 1)
    seg = torch.arange(s0, s1 + 1, device=dev).view(1, -1, 1)
    t = torch.arange(m, device=dev).view(1, 1, -1)
    rel = torch.remainder(h, r) + r * t  # (H, 1, m)
    pos = seg * w + rel  # (H, nseg, m)
    valid = (rel < w) & (pos < src_len)
    kidx = pos.clamp(max=src_len - 1)
    kg = k[:, h, kidx]  # (B, H, nseg, m, d)
    vg = v[:, h, kidx]
    qvalid = valid & (pos >= off)
    qidx = (pos - off).clamp(0, tgt_len - 1)
    scores = scaled_scores(q[:, h, qidx], kg, scale)  # (B, H, nseg, m, m)
    qp, kp = pos.unsqueeze(-1), pos.unsqueeze(-2)
    ok = valid.unsqueeze(-2) & qvalid.unsqueeze(-1)
    if causal:
        ok = ok & (kp <= qp)
    for w2, r2 in earlier:
        ok = ok & ~_covered(qp, kp, h.unsqueeze(-1), w2, r2)
    ok = ok.unsqueeze(0)
    if kpm is not None:
        ok = ok & ~kpm[:, kidx].unsqueeze(-2)
    scores = scores.masked_fill(~ok, float("-inf"))
    lse = torch.logsumexp(scores.to(acc_dtype(scores.dtype)), dim=-1)  # (B, H, nseg, m)
    probs = softmax(scores).to(vg.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p, training=True)
    out = torch.matmul(probs, vg)
    # scatter the group rows back to query positions (invalid rows go to a dump slot at index T)
    dst = torch.where(qvalid, pos - off, torch.full_like(pos, tgt_len)).flatten()  # (H, nseg*m) -> flat
    dst = dst.view(heads, -1)
    full = out.new_zeros(bsz, heads, tgt_len + 1, out.shape[-1])
    full = full.scatter(2, dst[None, :, :, None].expand(bsz, -1, -1, out.shape[-1]), out.flatten(2, 3))
    lse_full = lse.new_full((bsz, heads, tgt_len + 1), float("-inf"))
    lse_full = lse_full.scatter(2, dst[None].expand(bsz, -1, -1), lse.flatten(2, 3))
    return full[:, :, :tgt_len], lse_full[:, :, :tgt_len]


def dilated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    q_offset: Optional[int] = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Dilated attention over ``(w_i, r_i)`` branches, merged exactly.

    Args:
        q: ``(B, H, T, d)`` at positions ``q_offset .. q_offset + T - 1`` (default ``S - T``:
            the last ``T`` positions, as in decoding); k, v: ``(B, Hkv, S, d)``.
        segment_lengths, dilation_rates: the branches ``(w_i, r_i)``; head ``h`` takes offset ``h mod r_i``.
        causal: key ``j`` visible only if ``j <= i``.
        key_padding_mask: ``(B, S)`` bool, True = padding.

    Returns:
        ``out (B, H, T, d)`` (and the union's log-sum-exp ``(B, H, T)``).  A query no branch
        selects (possible when every ``r_i > 1``) outputs 0.
    """
    check_qkv(q, k, v)
    ws, rs = check_dilated_config(segment_lengths, dilation_rates)
    heads, tgt_len, src_len = q.shape[1], q.shape[2], k.shape[2]
    off = src_len - tgt_len if q_offset is None else q_offset
    if off < 0 or off + tgt_len > src_len:
        raise ValueError(f"queries at positions {off}..{off + tgt_len - 1} fall outside the {src_len} keys")
    if off + tgt_len == src_len and tgt_len > 0:  # the last T positions: one kernel call on the union's mask
        bs = BLOCK_SIZE
        start = (off // bs) * bs  # queries padded in front to a block boundary
        # decoding (queries after a prefix): the mask at the length rounded up to a whole block, so the steps
        # inside one block share it (the kernels never read keys past src_len)
        n = -(-src_len // bs) * bs if off else src_len
        bm = dilated_block_mask(ws, rs, heads, n, bool(causal), q.device, q_block_start=start // bs)
        qp = F.pad(q, (0, 0, off - start, 0)) if off > start else q
        # the mask is built for exactly these lengths (inputs checked above): straight to the kernels' dispatch
        out, lse = block_mask_attention(
            qp, k, v, bm, key_padding_mask=key_padding_mask, scale=scale, dropout_p=dropout_p
        )
        if off > start:
            out, lse = out[:, :, off - start :], lse[:, :, off - start :]
        return (out, lse) if return_lse else out
    out, lse = dilated_attention_reference(
        q,
        k,
        v,
        ws,
        rs,
        causal=causal,
        key_padding_mask=key_padding_mask,
        scale=scale,
        q_offset=off,
        dropout_p=dropout_p,
    )
    return (out, lse) if return_lse else out


def dilated_attention_reference(
    q,
    k,
    v,
    segment_lengths,
    dilation_rates,
    *,
    causal=False,
    key_padding_mask=None,
    scale=None,
    q_offset=None,
    dropout_p=0.0,
) -> Tuple[Tensor, Tensor]:
    """The readable path: each branch gathered and attended, merged by the exact log-sum-exp union
    (``combine_attention``); returns ``(out, lse)``.  Same arguments as :func:`dilated_attention`."""
    ws, rs = check_dilated_config(segment_lengths, dilation_rates)
    heads, tgt_len, src_len = q.shape[1], q.shape[2], k.shape[2]
    off = src_len - tgt_len if q_offset is None else q_offset
    k, v = repeat_kv(k, heads), repeat_kv(v, heads)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kpm = None if key_padding_mask is None else key_padding_mask.bool()
    outs, lses = [], []
    for n, (w, r) in enumerate(zip(ws, rs)):
        o, l = _branch(q, k, v, w, r, list(zip(ws[:n], rs[:n])), causal, off, kpm, scale, dropout_p)
        outs.append(o)
        lses.append(l)
    return combine_attention(outs, lses)
