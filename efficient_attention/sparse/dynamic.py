"""Dynamic sparse attention (hash- and qk-sparse), AttentionGrid's ``(B, N, H, D)`` API.

* **hash-sparse**: query ``i`` attends key ``j`` iff both fall in the same
  bucket (``q_bucket_idx[b, i, h] == k_bucket_idx[b, j, h]``) and, when
  causal, ``j <= i`` by *original* positions (queries are the last ``N_Q`` of
  the ``N_KV`` positions).  Queries and keys are stably sorted by bucket;
  each block of sorted queries only visits the sorted key blocks whose bucket
  range overlaps its own, so the work follows the kept pairs, not ``N²``.
* **qk-sparse**: per head, dropped queries / keys (``keep == 0``) take no part;
  the kept ones are compacted (stable, so causality by original positions is
  preserved) and attend each other.  Dropped queries output 0.

A query with nothing to attend to outputs 0 (never NaN).  After Pagliardini
et al., "Faster Causal Attention Over Large Sequences Through Sparse Flash
Attention" (2023).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..errors import UnknownSparsityModeError
from ..functional import sdpa_attention
from ..kernels.reference import gathered_block_attention

__all__ = [
    "hash_sparse_attention",
    "qk_sparse_attention",
    "dynamic_sparse_attention",
    "UnknownSparsityModeError",
    "SPARSITY_MODES",
]

SPARSITY_MODES = ("hash", "qk")


def _check(q: Tensor, k: Tensor, v: Tensor, q_idx: Tensor, k_idx: Tensor, names=("q_idx", "k_idx")) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-D (BATCH, N_CTX, H, D_HEAD) tensor, got {getattr(x, 'shape', x)}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must share batch, heads and D_HEAD"
        )
    if k.shape[1] < q.shape[1]:
        raise ValueError(f"N_CTX_KV ({k.shape[1]}) must be >= N_CTX_Q ({q.shape[1]})")
    for name, idx, ref in ((names[0], q_idx, q), (names[1], k_idx, k)):
        if not isinstance(idx, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(idx).__name__}")
        if idx.shape != ref.shape[:3]:
            raise ValueError(
                f"{name} must have shape (BATCH, N_CTX, H) = {tuple(ref.shape[:3])}, got {tuple(idx.shape)}"
            )


def _positions(n_q: int, n_kv: int, device):
    return torch.arange(n_q, device=device) + (n_kv - n_q), torch.arange(n_kv, device=device)


def _tile_layout(qb_sorted: Tensor, kb_sorted: Tensor, bs: int) -> Tensor:
    """(B, H, nq, nk) bool: query tile x key tile pairs whose bucket ranges overlap (sorted inputs)."""
    n_q, n_kv = qb_sorted.shape[-1], kb_sorted.shape[-1]
    dev = qb_sorted.device
    nq, nk = -(-n_q // bs), -(-n_kv // bs)
    first = torch.arange(nq, device=dev) * bs
    last = (first + bs - 1).clamp(max=n_q - 1)
    bmin, bmax = qb_sorted[..., first].contiguous(), qb_sorted[..., last].contiguous()
    start = torch.searchsorted(kb_sorted.contiguous(), bmin, right=False)
    end = torch.searchsorted(kb_sorted.contiguous(), bmax, right=True)
    lo = torch.arange(nk, device=dev) * bs
    return (lo < end[..., None]) & (lo + bs > start[..., None])


def hash_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_bucket_idx: Tensor,
    k_bucket_idx: Tensor,
    sm_scale: Optional[float] = None,
    *,
    causal: bool = True,
    block_size: int = 64,
) -> Tensor:
    """Attention within equal hash buckets.

    Args:
        q: ``(B, N_Q, H, D)``; k, v: ``(B, N_KV, H, D)``.
        q_bucket_idx, k_bucket_idx: integer ``(B, N_Q, H)`` / ``(B, N_KV, H)`` bucket ids.
        sm_scale: logit scale (default ``D ** -0.5``).
        causal: key ``j`` visible only if ``j <= i`` (original positions).
        block_size: tile of the sorted sequences.

    Returns:
        ``(B, N_Q, H, D)``.  Work ``O(kept tiles · block_size² · D)``.
    """
    _check(q, k, v, q_bucket_idx, k_bucket_idx, ("q_bucket_idx", "k_bucket_idx"))
    if q_bucket_idx.is_floating_point() or k_bucket_idx.is_floating_point():
        raise TypeError("bucket indices must be integer tensors")
    bsz, n_q, heads, dim = q.shape
    n_kv = k.shape[1]
    dev = q.device
    bs = int(block_size)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, N, D)
    qb, kb = q_bucket_idx.transpose(1, 2).long(), k_bucket_idx.transpose(1, 2).long()
    q_order = torch.sort(qb, dim=-1, stable=True).indices  # stable: positions stay ordered in a bucket
    k_order = torch.sort(kb, dim=-1, stable=True).indices
    qb_s, kb_s = qb.gather(-1, q_order), kb.gather(-1, k_order)
    qpos, kpos = _positions(n_q, n_kv, dev)
    qpos_s, kpos_s = qpos[q_order], kpos[k_order]
    take = lambda x, order: x.gather(2, order[..., None].expand(-1, -1, -1, x.shape[-1]))  # noqa: E731
    qs, ks, vs = take(qt, q_order), take(kt, k_order), take(vt, k_order)
    layout = _tile_layout(qb_s, kb_s, bs)

    def keep(b, h, i, j):
        i, j = i.clamp(max=n_q - 1), j.clamp(max=n_kv - 1)
        ok = qb_s[b, h, i] == kb_s[b, h, j]
        return ok & (kpos_s[b, h, j] <= qpos_s[b, h, i]) if causal else ok

    out_s, _ = gathered_block_attention(qs, ks, vs, layout, bs, keep, q_offset=0, scale=sm_scale)
    out = torch.zeros_like(out_s).scatter(2, q_order[..., None].expand(-1, -1, -1, dim), out_s)
    return out.transpose(1, 2)


def _compact(x: Tensor, keep: Tensor, width: int):
    """Kept rows first (stable), cut to ``width``: (values, order (B, H, width), valid (B, H, width))."""
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    valid = torch.arange(width, device=x.device) < keep.sum(-1, keepdim=True)
    return x.gather(2, order[..., None].expand(-1, -1, -1, x.shape[-1])), order, valid


def qk_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_keep: Tensor,
    k_keep: Tensor,
    sm_scale: Optional[float] = None,
    *,
    causal: bool = True,
) -> Tensor:
    """Attention among the kept queries and keys of each head.

    Args:
        q: ``(B, N_Q, H, D)``; k, v: ``(B, N_KV, H, D)``.
        q_keep, k_keep: ``(B, N_Q, H)`` / ``(B, N_KV, H)``; bool or float (1 = kept, 0 = dropped).
        causal: key ``j`` visible only if ``j <= i`` (original positions).

    Returns:
        ``(B, N_Q, H, D)``; dropped queries give 0.  Work ``O(max kept queries · max kept keys · D)``.
    """
    _check(q, k, v, q_keep, k_keep, ("q_keep", "k_keep"))
    for name, keep in (("q_keep", q_keep), ("k_keep", k_keep)):
        if keep.dtype != torch.bool and not torch.all((keep == 0) | (keep == 1)):
            raise ValueError(f"{name} must hold only 0 and 1 (or be bool)")
    bsz, n_q, heads, dim = q.shape
    n_kv = k.shape[1]
    qk, kk = q_keep.transpose(1, 2).bool(), k_keep.transpose(1, 2).bool()
    tq, tk = max(int(qk.sum(-1).max()), 1), max(int(kk.sum(-1).max()), 1)
    qc, q_order, q_valid = _compact(q.transpose(1, 2), qk, tq)
    kc, k_order, k_valid = _compact(k.transpose(1, 2), kk, tk)
    vc = v.transpose(1, 2).gather(2, k_order[..., None].expand(-1, -1, -1, dim))
    qpos, kpos = _positions(n_q, n_kv, q.device)
    masked = ~(q_valid[..., :, None] & k_valid[..., None, :])
    if causal:
        masked = masked | (kpos[k_order][..., None, :] > qpos[q_order][..., :, None])
    out_c = sdpa_attention(qc, kc, vc, masked, scale=sm_scale)
    out_c = out_c.masked_fill(~q_valid[..., None], 0.0)
    out = q.new_zeros(bsz, heads, n_q + 1, dim)
    dst = torch.where(q_valid, q_order, torch.full_like(q_order, n_q))
    out = out.scatter(2, dst[..., None].expand(-1, -1, -1, dim), out_c)[:, :, :n_q]
    return out.transpose(1, 2)


def dynamic_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_idx: Tensor,
    k_idx: Tensor,
    sm_scale: Optional[float] = None,
    sparsity_mode: str = "hash",
    *,
    causal: bool = True,
) -> Tensor:
    """AttentionGrid's entry point: ``sparsity_mode="hash"`` (``q_idx``/``k_idx`` = bucket ids) or
    ``"qk"`` (``q_idx``/``k_idx`` = keep flags); ``(B, N, H, D)`` tensors.  Unknown modes raise
    :class:`UnknownSparsityModeError` (a ``ValueError``)."""
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    if sparsity_mode == "hash":
        return hash_sparse_attention(q, k, v, q_idx, k_idx, sm_scale, causal=causal)
    if sparsity_mode == "qk":
        return qk_sparse_attention(q, k, v, q_idx, k_idx, sm_scale, causal=causal)
    raise UnknownSparsityModeError(
        f"unknown sparsity_mode {sparsity_mode!r}; choose one of {', '.join(SPARSITY_MODES)}"
    )
