"""Pure-PyTorch reference paths of the sparse kernels.

They compute exactly what the fast kernels compute, on any device and dtype,
with autograd, and without the dense ``N x N`` score matrix:

* :func:`sliding_window_attention` works on query chunks and only the keys
  their band can reach (scores are ``O(N * span)``, gathered keys a small
  constant times ``K``);
* :func:`block_sparse_attention` gathers, for every query block, only the key
  blocks its layout row keeps (work scales with the kept blocks).

Both return ``(out, lse)``: ``out (B, H, T, d)`` and the fp32 log-sum-exp of
the scaled, masked scores ``(B, H, T)`` (``-inf`` for a query that sees
nothing; its output is 0, never NaN), so callers can combine several calls
exactly (e.g. the branches of dilated attention).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..functional import acc_dtype, repeat_kv, softmax
from ..local_window import LocalWindow

__all__ = ["sliding_window_attention", "block_sparse_attention", "check_layout"]


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
) -> Tuple[Tensor, Tensor]:
    """Attention restricted to a :class:`LocalWindow` band.

    Args:
        q: ``(B, H, T, d)``, at absolute positions ``q_offset .. q_offset + T - 1``.
        k, v: ``(B, Hkv, S, d)`` at positions ``0 .. S - 1``.
        window: the band rule.
        key_padding_mask: ``(B, S)`` bool, True = padding.
        scale: logit scale (default ``d ** -0.5``).
        chunk: queries per chunk (default: the window group, or the band width).

    Returns:
        ``(out (B, H, T, d), lse (B, H, T))``.  Cost ``O(T * span * d)``.
    """
    bsz, heads, tgt_len, dim = q.shape
    src_len = k.shape[2]
    k, v = repeat_kv(k, heads), repeat_kv(v, heads)
    scale = dim**-0.5 if scale is None else scale
    if chunk is None:
        chunk = window.group if window.group > 1 else max(16, window.left + window.right)
    n_chunks = -(-tgt_len // chunk)
    device = q.device
    qpos = torch.arange(n_chunks * chunk, device=device).view(n_chunks, chunk) + q_offset
    start = window.lo(qpos[:, 0])                                   # (n,)
    width = int((window.hi(qpos[:, -1]) - start).max().item()) + 1  # keys any chunk needs
    kpos = start[:, None] + torch.arange(width, device=device)     # (n, W)
    valid = (kpos >= 0) & (kpos < src_len)
    idx = kpos.clamp(0, max(src_len - 1, 0))
    q_pad = F.pad(q, (0, 0, 0, n_chunks * chunk - tgt_len)).view(bsz, heads, n_chunks, chunk, dim)
    kb = k[:, :, idx]                                               # (B, H, n, W, d)
    vb = v[:, :, idx]
    scores = torch.matmul(q_pad, kb.transpose(-1, -2)) * scale      # (B, H, n, C, W)
    keep = window.allowed(qpos[:, :, None], kpos[:, None, :]) & valid[:, None, :]   # (n, C, W)
    keep = keep[None, None]
    if key_padding_mask is not None:
        keep = keep & ~key_padding_mask[:, idx][:, None, :, None, :]
    scores = scores.masked_fill(~keep, float("-inf"))
    out, lse = _finish(scores, vb, dropout_p)
    out = out.reshape(bsz, heads, n_chunks * chunk, v.shape[-1])[:, :, :tgt_len]
    lse = lse.reshape(bsz, heads, n_chunks * chunk)[:, :, :tgt_len]
    return out, lse


def check_layout(layout: Tensor, heads: int, n_q_blocks: int, n_k_blocks: int) -> Tensor:
    """Validate a block layout: bool/0-1 ``(H or 1, n_q_blocks, n_k_blocks)``; returns it as bool."""
    if not isinstance(layout, Tensor):
        raise TypeError(f"layout must be a Tensor, got {type(layout).__name__}")
    if layout.dim() == 2:
        layout = layout.unsqueeze(0)
    if layout.dim() != 3 or layout.shape[0] not in (1, heads) or layout.shape[1:] != (n_q_blocks, n_k_blocks):
        raise ValueError(
            f"layout must have shape ({heads} or 1, {n_q_blocks}, {n_k_blocks}) for {heads} heads and "
            f"{n_q_blocks} x {n_k_blocks} blocks, got {tuple(layout.shape)}"
        )
    if layout.dtype != torch.bool:
        if layout.is_floating_point() or not torch.all((layout == 0) | (layout == 1)):
            raise ValueError(f"layout must be bool or hold only 0/1 integers, got {layout.dtype}")
        layout = layout.bool()
    return layout


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
    """Attention restricted to the kept blocks of ``layout``.

    Args:
        q: ``(B, H, T, d)``; k, v: ``(B, Hkv, S, d)``.  Lengths that are not a
            multiple of ``block_size`` are padded internally (padded keys never count).
        layout: bool ``(H or 1, ceil(T/bs), ceil(S/bs))``; True = the block is computed.
        causal: additionally hide keys after the query (``j <= i + S - T``).
        key_padding_mask: ``(B, S)`` bool, True = padding.

    Returns:
        ``(out (B, H, T, d), lse (B, H, T))``; work ``O(kept blocks * bs^2 * d)``
        (rows padded to the densest row of the layout).
    """
    bsz, heads, tgt_len, dim = q.shape
    src_len = k.shape[2]
    bs = int(block_size)
    if bs <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    nq, nk = -(-tgt_len // bs), -(-src_len // bs)
    layout = check_layout(layout, heads, nq, nk).to(q.device).expand(heads, nq, nk)
    k, v = repeat_kv(k, heads), repeat_kv(v, heads)
    scale = dim**-0.5 if scale is None else scale
    # per (head, q-block): the kept k-blocks, padded to the densest row
    counts = layout.sum(-1)
    kmax = max(int(counts.max().item()), 1)
    order = torch.sort(layout.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :kmax]  # (H, nq, kmax)
    slot_ok = torch.arange(kmax, device=q.device) < counts[..., None]                                   # (H, nq, kmax)
    qb = F.pad(q, (0, 0, 0, nq * bs - tgt_len)).view(bsz, heads, nq, bs, dim)
    kb = F.pad(k, (0, 0, 0, nk * bs - src_len)).view(bsz, heads, nk, bs, dim)
    vb = F.pad(v, (0, 0, 0, nk * bs - src_len)).view(bsz, heads, nk, bs, v.shape[-1])
    h_idx = torch.arange(heads, device=q.device)[:, None, None]
    kg = kb[:, h_idx, order].flatten(-3, -2)                   # (B, H, nq, kmax*bs, d)
    vg = vb[:, h_idx, order].flatten(-3, -2)
    scores = torch.matmul(qb, kg.transpose(-1, -2)) * scale     # (B, H, nq, bs, kmax*bs)
    kpos = (order[..., None] * bs + torch.arange(bs, device=q.device)).flatten(-2)  # (H, nq, kmax*bs)
    keep = (slot_ok[..., None].expand(-1, -1, -1, bs).flatten(-2)) & (kpos < src_len)
    keep = keep[:, :, None, :]                                  # (H, nq, 1, W)
    if causal:
        qpos = (torch.arange(nq * bs, device=q.device).view(nq, bs) + (src_len - tgt_len))[None, :, :, None]
        keep = keep & (kpos[:, :, None, :] <= qpos)
    keep = keep[None]
    if key_padding_mask is not None:
        kpm = F.pad(key_padding_mask, (0, nk * bs - src_len), value=True)
        keep = keep & ~kpm[:, kpos][:, :, :, None, :]
    scores = scores.masked_fill(~keep, float("-inf"))
    out, lse = _finish(scores, vg, dropout_p)
    out = out.reshape(bsz, heads, nq * bs, v.shape[-1])[:, :, :tgt_len]
    lse = lse.reshape(bsz, heads, nq * bs)[:, :, :tgt_len]
    return out, lse
