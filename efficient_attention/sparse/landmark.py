"""Landmark attention (Mohtashami & Jaggi, 2023): grouped softmax gated by landmark tokens.

The keys are split into blocks, each closed by a landmark token (``is_mem``).
A query ``i`` in block ``c`` attends

* its own block's ordinary tokens ``j <= i`` (and itself) directly, and
* every earlier block ``b`` through its landmark ``L_b``:

    p = softmax over {own-block keys} ∪ {L_b : b < c}
    weight(j in block b) = p(L_b) · softmax_{j' in block b, not landmark}(q·k_j')[j]

Landmarks gate their block and are never attended as values; the weights sum
to 1.  With ``top_k`` only the ``k`` earlier blocks with the highest landmark
scores take part (the paper's retrieval at inference); a decoding step then
reads only the landmark keys and the retrieved blocks.  Causal.  Cost
``O(T · S · d)`` for a full pass, ``O(S/bs + k·bs)`` per retrieved decoding step.
Memory: ``O(N)`` forward and backward for the fixed-period layout without
``top_k`` (block by block, :mod:`efficient_attention.kernels.landmark`), else
``O(chunk · S)`` per chunk of the formula (kept by autograd in training).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..functional import acc_dtype, repeat_kv, softmax
from .block_sparse import check_qkv

__all__ = ["landmark_token_attention", "landmark_attention_formula", "landmark_positions"]


def landmark_positions(length: int, block_size: int, device=None) -> Tensor:
    """Bool ``(length,)``: the fixed-period landmark layout (position ``≡ block_size - 1 (mod block_size)``)."""
    return torch.remainder(torch.arange(length, device=device) + 1, block_size) == 0


def _check_options(block_size, top_k) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be a non-negative integer or None, got {top_k!r}")


def _check_is_mem(is_mem: Tensor, bsz: int, src_len: int) -> Tensor:
    if not isinstance(is_mem, Tensor):
        raise TypeError(f"is_mem must be a Tensor, got {type(is_mem).__name__}")
    if is_mem.dim() == 1:
        is_mem = is_mem[None]
    if is_mem.dim() != 2 or is_mem.shape[1] != src_len or is_mem.shape[0] not in (1, bsz):
        raise ValueError(f"is_mem must have shape ({src_len},) or ({bsz}, {src_len}), got {tuple(is_mem.shape)}")
    if is_mem.dtype != torch.bool:
        if is_mem.is_floating_point() or not torch.all((is_mem == 0) | (is_mem == 1)):
            raise ValueError("is_mem must be bool or hold only 0/1")
        is_mem = is_mem.bool()
    return is_mem


def landmark_token_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    is_mem: Tensor,
    block_size: int = 64,
    sm_scale: Optional[float] = None,
    *,
    top_k: Optional[int] = None,
    key_padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """Landmark attention on ``(B, H, N, D)`` tensors.

    Args:
        q: ``(B, H, T, D)`` (the last ``T`` of the ``S`` positions); k, v: ``(B, Hkv, S, D)``.
        is_mem: bool ``(S,)`` or ``(B, S)``: True at landmark tokens (they close their block).
        block_size: queries processed per chunk by the general formula (memory ``O(block_size · S)``).
        sm_scale: logit scale (default ``D ** -0.5``).
        top_k: keep only the ``top_k`` best-scoring earlier blocks per query (``None``: all).
        key_padding_mask: ``(B, S)`` bool, True = padding (a padded landmark hides its block).

    Returns:
        ``(B, H, T, D)``.  With no landmark at all this is causal softmax attention.

    A fixed-period ``is_mem`` (every ``P``-th position, as :func:`landmark_positions` builds it) without
    ``top_k`` runs block by block with O(N) memory (:func:`efficient_attention.kernels.landmark_attention`:
    the Triton kernels on CUDA); anything else runs :func:`landmark_attention_formula`.
    """
    check_qkv(q, k, v)
    _check_options(block_size, top_k)
    mem = _check_is_mem(is_mem, q.shape[0], k.shape[2])
    period = _fixed_period(mem) if top_k is None else None
    if period is not None:
        from ..kernels.landmark import landmark_attention as landmark_blocks

        return landmark_blocks(q, k, v, period, scale=sm_scale, key_padding_mask=key_padding_mask)[0]
    return landmark_attention_formula(
        q, k, v, mem, block_size, sm_scale, top_k=top_k, key_padding_mask=key_padding_mask
    )


def _fixed_period(mem: Tensor) -> Optional[int]:
    """``P`` when every row of ``mem (1|B, S)`` is ``landmark_positions(S, P)`` with at least one landmark."""
    row = mem[0]
    if mem.shape[0] > 1 and not torch.equal(mem, row.expand_as(mem)):
        return None
    first = row.nonzero()
    if first.numel() == 0 or int(first[0]) < 1:
        return None
    period = int(first[0]) + 1
    return period if torch.equal(row, landmark_positions(row.shape[0], period, row.device)) else None


def landmark_attention_formula(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    is_mem: Tensor,
    block_size: int = 64,
    sm_scale: Optional[float] = None,
    *,
    top_k: Optional[int] = None,
    key_padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """:func:`landmark_token_attention` by the grouped-softmax formula, ``block_size`` queries at a time, for any
    ``is_mem`` and ``top_k`` (the float64 reference of the block-by-block path).  Autograd keeps each
    chunk's ``(B, H, block_size, S)`` weights: ``O(T · S)`` memory in training."""
    check_qkv(q, k, v)
    bsz, heads, tgt_len, dim = q.shape
    src_len = k.shape[2]
    _check_options(block_size, top_k)
    mem = _check_is_mem(is_mem, bsz, src_len).to(q.device)  # (1|B, S)
    k, v = repeat_kv(k, heads), repeat_kv(v, heads)
    scale = dim**-0.5 if sm_scale is None else sm_scale
    off = src_len - tgt_len
    blk = torch.cumsum(mem.long(), -1) - mem.long()  # landmarks strictly before j
    nb = int(blk.max()) + 1
    jpos = torch.arange(src_len, device=q.device)
    mem_k, blk_k = mem[:, None, None, :], blk[:, None, None, :]  # (1|B, 1, 1, S)
    pad = None if key_padding_mask is None else key_padding_mask.bool()[:, None, None, :]
    acc = acc_dtype(q.dtype)  # fp16 scores of large inputs would overflow: scale first, form them in fp32
    kt = k.transpose(-1, -2).to(acc)
    outs = []
    for qs in range(0, tgt_len, block_size):
        qe = min(qs + block_size, tgt_len)
        ipos = torch.arange(qs, qe, device=q.device) + off
        s = torch.matmul(q[:, :, qs:qe].to(acc) * scale, kt)  # (B, H, c, S), scaled first
        blk_q = blk[:, ipos][:, None, :, None]  # (1|B, 1, c, 1)
        causal = jpos[None, None, None, :] <= ipos[None, None, :, None]
        own = (blk_k == blk_q) & causal & (~mem_k | (jpos == ipos[:, None])[None, None])
        marks = mem_k & (blk_k < blk_q)
        toks = ~mem_k & (blk_k < blk_q)
        if pad is not None:
            own, marks, toks = own & ~pad, marks & ~pad, toks & ~pad
        if top_k is not None:
            ms = s.masked_fill(~marks, float("-inf"))
            kth = ms.topk(min(top_k, src_len), dim=-1).values[..., -1:] if top_k > 0 else None
            marks = marks & (ms >= kth) if kth is not None else torch.zeros_like(marks)
        p = softmax(s.masked_fill(~(own | marks), float("-inf")))  # (B, H, c, S), fp32
        idx = blk_k.expand(s.shape)
        st = s.masked_fill(~toks, float("-inf"))
        gmax = torch.full(s.shape[:-1] + (nb,), float("-inf"), dtype=s.dtype, device=s.device)
        gmax = gmax.scatter_reduce(-1, idx, st.detach(), reduce="amax", include_self=True)
        gmax = gmax.masked_fill(torch.isneginf(gmax), 0.0)
        e = torch.exp(st - gmax.gather(-1, idx))
        gsum = torch.zeros_like(gmax).scatter_add(-1, idx, e)
        inner = e / gsum.gather(-1, idx).clamp_min(torch.finfo(gsum.dtype).tiny)
        gate = torch.zeros_like(gmax).scatter_add(-1, idx, p * marks)  # p(L_b) per block b
        weight = p * own + gate.gather(-1, idx) * inner
        outs.append(torch.matmul(weight.to(v.dtype), v))
    return torch.cat(outs, dim=2)
