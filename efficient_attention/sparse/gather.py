"""Block-gathered attention with a token-level rule inside the kept blocks.

The one gather path behind every sparse functional whose pattern is finer
than its blocks (OpenAI's ``local`` / ``strided`` / ``fixed`` callbacks,
hash buckets, dilated groups, allowed-pair masks):

    for each query block: gather only the key blocks its layout row keeps,
    score them, hide the entries ``keep(b, h, i, j)`` rejects, softmax.

Work is ``O(kept blocks * bs^2 * d)`` (rows padded to the densest row); the
dense ``T x S`` score matrix is never built.  The fast kernels
(``efficient_attention.kernels.block_sparse_attention``) serve the
block-aligned case; this path is for the token-level remainder.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..functional import acc_dtype, repeat_kv, softmax

__all__ = ["gathered_block_attention", "KeepFn"]

# keep(b, h, i, j) -> bool, on broadcasting index tensors; i, j are query / key positions
KeepFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


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
    """Attention over the kept blocks of ``layout`` with a token rule ``keep``.

    Args:
        q: ``(B, H, T, d)``; k, v: ``(B, Hkv, S, d)``.  Query ``t`` sits at
            position ``t + q_offset`` (default ``S - T``); keys at ``0..S-1``.
        layout: bool ``(B or 1, H or 1, ceil(T/bs), ceil(S/bs))``.
        keep: ``keep(b, h, i, j)`` on broadcasting long tensors (positions),
            True = attend; ``None`` keeps every entry of a kept block.
        causal: also require ``j <= i``.
        key_padding_mask: ``(B, S)`` bool, True = padding.

    Returns:
        ``(out (B, H, T, d), lse (B, H, T))``; a query that sees nothing gets
        ``out = 0`` and ``lse = -inf``.
    """
    bsz, heads, tgt_len, dim = q.shape
    src_len = k.shape[2]
    bs = int(block_size)
    off = src_len - tgt_len if q_offset is None else q_offset
    nq, nk = -(-tgt_len // bs), -(-src_len // bs)
    if layout.dim() != 4 or layout.shape[0] not in (1, bsz) or layout.shape[1] not in (1, heads) or layout.shape[2:] != (nq, nk):
        raise ValueError(f"layout must have shape ({bsz} or 1, {heads} or 1, {nq}, {nk}), got {tuple(layout.shape)}")
    dev = q.device
    layout = layout.to(dev)
    k, v = repeat_kv(k, heads), repeat_kv(v, heads)
    scale = dim**-0.5 if scale is None else scale
    counts = layout.sum(-1)
    kmax = max(int(counts.max().item()), 1)
    order = torch.sort(layout.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :kmax]
    order = order.expand(bsz, heads, nq, kmax)
    slot_ok = (torch.arange(kmax, device=dev) < counts[..., None]).expand(bsz, heads, nq, kmax)
    qb = F.pad(q, (0, 0, 0, nq * bs - tgt_len)).view(bsz, heads, nq, bs, dim)
    kb = F.pad(k, (0, 0, 0, nk * bs - src_len)).view(bsz, heads, nk, bs, dim)
    vb = F.pad(v, (0, 0, 0, nk * bs - src_len)).view(bsz, heads, nk, bs, v.shape[-1])
    b_idx = torch.arange(bsz, device=dev).view(-1, 1, 1, 1)
    h_idx = torch.arange(heads, device=dev).view(1, -1, 1, 1)
    kg = kb[b_idx, h_idx, order].flatten(-3, -2)                  # (B, H, nq, W, d)
    vg = vb[b_idx, h_idx, order].flatten(-3, -2)
    scores = torch.matmul(qb, kg.transpose(-1, -2)) * scale       # (B, H, nq, bs, W)
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
    scores = scores.masked_fill(~ok, float("-inf"))
    lse = torch.logsumexp(scores.to(acc_dtype(scores.dtype)), dim=-1)
    probs = softmax(scores).to(vg.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p, training=True)
    out = torch.matmul(probs, vg)
    out = out.reshape(bsz, heads, nq * bs, v.shape[-1])[:, :, :tgt_len]
    lse = lse.reshape(bsz, heads, nq * bs)[:, :, :tgt_len]
    return out, lse
