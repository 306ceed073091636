"""ProbSparse attention (Informer, Zhou et al. 2021).

Each query's sparsity score ``M_i = max_j s_ij - mean_j s_ij`` is estimated on
``U = factor·⌈ln L_K⌉`` sampled keys; only the "active" queries with the largest
scores get exact softmax attention, the others output the mean of the values
they can see.  Noncausal: the top ``u = factor·⌈ln L_Q⌉`` queries.  Causal
(masked ProbSparse): a query samples only keys it may see, and it is active iff
its score is among the ``u_i = factor·⌈ln(i+1)⌉`` largest of queries ``0..i``
(a running top-u, so the selection never looks at the future; Informer's global
top-u would).

Keys are sampled once per call and shared: by every query (noncausal), by every
block of ``_BLOCK`` consecutive query positions from the keys up to the block's
end (causal; a sample beyond the query is wrapped into the visible part of its
block), so the scores are one batched matmul against ``U`` gathered keys per
block (plus the block's own scores), never a ``(T, U, d)`` gather.  Sampling is random in
training and a fixed hash of (block, sample index) in eval: deterministic, and
the same in decoding.  The active rows are gathered and attend through SDPA, or (causal, no key padding, no
dropout, where the Triton kernels take the inputs: CUDA, from :data:`KERNEL_MIN_KEYS` keys) through the
sliding-window kernel with per-row positions (:func:`_kernel_rows`), which builds no ``(B, H, A, S)`` mask.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..base import AttentionMasks, EfficientAttention, _cat_padding
from ..capabilities import SELF_PATTERNS, Capabilities
from ..functional import acc_dtype, capturing_cuda_graph, repeat_kv, sdpa_attention
from ..kernels.ops import SlidingWindowTriton, sliding_window_kernel
from ..options import AttentionOptions, option, positive_int
from ..registry import register_attention

logger = logging.getLogger(__name__)
_CAPTURE_WARNED: list = []  # the capture warning is logged once per process

__all__ = ["ProbSparse"]

_BLOCK = 32  # causal: query positions sharing one key sample
_SEL = 64  # causal selection: queries per block of the within-block comparison
_TOP_LOG = 34  # decoding keeps the factor·34 largest past scores: u = factor·⌈ln n⌉ stays below for n < 2^48


def log_count(factor: int, n: int) -> int:
    """``factor·⌈ln n⌉`` clamped to ``[1, n]``."""
    return max(1, min(n, factor * math.ceil(math.log(max(n, 1)))))


def log_counts(factor: int, n: Tensor) -> Tensor:
    """:func:`log_count` of every entry of a long tensor."""
    logs = torch.ceil(torch.log(n.clamp(min=1).double())).long()
    return torch.minimum((factor * logs).clamp(min=1), n.clamp(min=1))


def hash_samples(pos: Tensor, n_visible: Tensor, count: int, seed: int = 0x5EED) -> Tensor:
    """Deterministic key indices ``(T, count)`` in ``[0, n_visible)`` from (position, sample) pairs."""
    s = torch.arange(count, device=pos.device, dtype=torch.long)
    h = (pos.long()[:, None] * 73856093) ^ (s[None] * 19349663) ^ seed
    h = ((h ^ (h >> 13)) * 1274126177) & 0x7FFFFFFF
    h = ((h ^ (h >> 16)) * 668265263) & 0x7FFFFFFF
    return (h ^ (h >> 15)) % n_visible[:, None]


def _prefix_top(values: Tensor, k: int) -> Tensor:
    """Exclusive running top-``k``: ``(..., G, k)`` largest of ``values[..., :g, :]`` (-inf filled).

    values: ``(..., G, m)``."""
    groups = values.shape[-2]
    flat = values.flatten(-2)[..., None, :].expand(*values.shape[:-2], groups, groups * values.shape[-1])
    earlier = (
        torch.arange(groups, device=values.device).repeat_interleave(values.shape[-1])[None]
        < torch.arange(groups, device=values.device)[:, None]
    )
    masked = flat.masked_fill(~earlier, float("-inf"))
    return masked.topk(min(k, masked.shape[-1]), dim=-1).values


class _RunningMean(torch.autograd.Function):
    """Causal ProbSparse's lazy rows: the running mean of ``v (B, H, S, d)`` over keys ``0 .. p`` (only the real
    ones where ``keep (B, S)``, 1 / 0 in fp32) for the last ``tgt_len`` positions ``p``, returned time-first as
    ``(tgt_len + spare, B, H, d)`` in ``v``'s dtype (``spare``: one more row, left uninitialised).

    Forward and backward each use one fp32 ``(B, H, d, S)`` scan buffer, scanned in place along its last dim (CUDA
    scans an outer dim slowly): autograd through ``cumsum`` kept three fp32 ``(B, H, d, S)`` tensors and two fp32
    ``(B, H, S, d)`` alive at once in the backward, 8 of a causal training step's 13 units of peak memory at 8k in
    CAB's setting.  The gradient of ``v_j`` is the reverse running sum of ``g_i / count_i`` over ``i >= j``, scanned
    on the positions in reverse order (exact, no ``total - prefix`` cancellation)."""

    @staticmethod
    def forward(ctx, v: Tensor, keep: Optional[Tensor], tgt_len: int, spare: int) -> Tensor:
        bsz, heads, src_len, dim = v.shape
        first = src_len - tgt_len
        count = _running_counts(keep, src_len, acc_dtype(v.dtype), v.device)
        x = torch.empty(bsz, heads, dim, src_len, dtype=count.dtype, device=v.device)
        x.copy_(v.transpose(2, 3))
        if keep is not None:
            x.mul_(keep[:, None, None, :])
        x.cumsum_(-1).div_(count)
        out = torch.empty(tgt_len + spare, bsz, heads, dim, dtype=v.dtype, device=v.device)
        out[:tgt_len].copy_(x[..., first:].permute(3, 0, 1, 2))
        ctx.save_for_backward(keep)
        ctx.shape, ctx.dtype, ctx.tgt_len = v.shape, v.dtype, tgt_len
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        (keep,) = ctx.saved_tensors
        bsz, heads, src_len, dim = ctx.shape
        tgt_len = ctx.tgt_len
        count = _running_counts(keep, src_len, acc_dtype(ctx.dtype), g.device)
        y = torch.empty(bsz, heads, dim, src_len, dtype=count.dtype, device=g.device)  # position S-1-r at r
        y[..., :tgt_len].copy_(g[:tgt_len].flip(0).permute(1, 2, 3, 0))
        y[..., tgt_len:].zero_()  # positions before the first query: no mean of theirs is an output
        y.div_(count.flip(-1)).cumsum_(-1)
        gv = y.to(ctx.dtype).flip(-1).transpose(2, 3)  # (B, H, S, d)
        del y
        if keep is not None:
            gv = gv * keep[:, None, :, None].to(gv.dtype)
        return gv, None, None, None


def _running_counts(keep: Optional[Tensor], src_len: int, dtype: torch.dtype, device) -> Tensor:
    """The divisors of :class:`_RunningMean`: ``(S,)`` positions + 1, or ``(B, 1, 1, S)`` real keys so far (at
    least 1)."""
    if keep is None:  # built in their dtype: exact below 2^24 in fp32
        return torch.arange(1, src_len + 1, dtype=dtype, device=device)
    return keep.to(dtype).cumsum(1).clamp_(min=1)[:, None, None, :]


class _PrefixRows(torch.autograd.Function):
    """Exact attention of gathered query rows ``q (B, H, A, d)`` over the keys up to each row's last visible key
    ``last (B, H, A)`` (rows in ascending position order, fillers at ``last = 0``), through SDPA with an additive
    mask built per quarter of the rows and never kept: the forward keeps ``q, k, v, last`` (``k, v`` are the
    inputs), the backward rebuilds each quarter's mask and runs that quarter's SDPA again under autograd.  A
    quarter attends only the key prefix its rows can see (its largest ``last + 1`` rounded up to a power of two:
    few shapes, so few cuDNN graphs; one host read of the quarters' ends per pass), and the running top-u keeps
    most rows early, so most quarters read a short prefix.  A kept ``(B, H, A, S)`` mask was the largest tensor
    of a causal training step (256 MiB at 8k in CAB's setting, against 32 MiB for each of ``q, k, v``).
    ``pieces`` (``_PIECES``, or 1 for fewer positions) divides the rows."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, last: Tensor, scale: float, pieces: int) -> Tensor:
        device = q.device.type
        ctx.autocast = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
        ctx.save_for_backward(q, k, v, last)
        ctx.scale, ctx.pieces = scale, pieces
        keys = torch.arange(k.shape[2], device=q.device)
        ctx.ends = ends = _prefix_ends(last, pieces, k.shape[2])
        outs = [
            F.scaled_dot_product_attention(
                qp, k[:, :, :e], v[:, :, :e], attn_mask=_prefix_mask(keys[:e], lp, qp), scale=scale
            )
            for qp, lp, e in zip(_pieces(q, pieces), _pieces(last, pieces), ends)
        ]
        return torch.cat(outs, 2) if len(outs) > 1 else outs[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        q, k, v, last = ctx.saved_tensors
        keys = torch.arange(k.shape[2], device=q.device)
        dqs: list = []
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(q.device.type, dtype=dtype, enabled=enabled):
            for qp, lp, gp, e in zip(*(_pieces(x, ctx.pieces) for x in (q, last, grad)), ctx.ends):
                qd, kd, vd = (x.detach().requires_grad_() for x in (qp, k[:, :, :e], v[:, :, :e]))
                out = F.scaled_dot_product_attention(
                    qd, kd, vd, attn_mask=_prefix_mask(keys[:e], lp, qd), scale=ctx.scale
                )
                gq, gk, gv = torch.autograd.grad(out, (qd, kd, vd), gp)
                dqs.append(gq)
                dk[:, :, :e].add_(gk)
                dv[:, :, :e].add_(gv)
        return torch.cat(dqs, 2) if len(dqs) > 1 else dqs[0], dk, dv, None, None, None


def _prefix_ends(last: Tensor, pieces: int, length: int) -> list:
    """Per piece of the rows, the key prefix it needs: ``max(last) + 1`` rounded up to a power of two (at most
    ``length``), read back in one host synchronisation."""
    tops = torch.stack([lp.amax() for lp in _pieces(last, pieces)]).tolist()
    return [min(length, 1 << int(t).bit_length()) for t in tops]


_PIECES = 4  # piecewise_mask: the rows' parts


def _pieces(x: Tensor, pieces: int):
    """``x`` split along dim 2 into ``pieces`` parts (it has at least as many rows; the last takes the rest).
    Narrowed views."""
    if pieces == 1:
        return (x,)
    size = x.shape[2] // pieces
    return tuple(x.narrow(2, i * size, size if i < pieces - 1 else x.shape[2] - i * size) for i in range(pieces))


# Below this many keys causal rows take SDPA with the kept mask: on an H200 (bf16, B=4, 8 heads of 64, fwd + bwd,
# one same-process A/B, results/h200/session9/probsparse_kernel_ab.log) the kernel path took 6.26 / 7.14 / 7.26 /
# 9.23 ms at 1k / 4k / 8k / 16k against the SDPA path's 5.41 / 6.04 / 6.84 / 10.51, with the same peak up to 4k
# (84, 264 MiB) and a smaller one from 8k (419 against 650 MiB, 835 against 1167 at 16k): the mask is small below
# 8k, and the kernel's extra launches (row rotation, positions) are what is left.
KERNEL_MIN_KEYS = 8192


def _kernel_reasons(q: Tensor, k: Tensor, v: Tensor) -> list:
    """Why the causal rows do not take the Triton sliding-window kernel with per-row positions ([] = they do): what
    the kernel cannot take, and fewer than :data:`KERNEL_MIN_KEYS` keys (SDPA is faster there, at the same peak)."""
    reasons = SlidingWindowTriton.not_supported_reasons(q, k, v, positions=True)
    if k.shape[2] < KERNEL_MIN_KEYS:
        reasons.append(f"{k.shape[2]} keys: below KERNEL_MIN_KEYS = {KERNEL_MIN_KEYS} the SDPA path is faster")
    return reasons


def _kernel_rows(q: Tensor, k: Tensor, v: Tensor, rows: Tensor, ok: Tensor, q_pos: Tensor, scale: float):
    """Exact causal attention of the query ``rows (B, H, A)`` (``ok``: active; ascending positions first, then
    the fillers) on the Triton sliding-window kernel with per-row positions (query ``a`` sees keys
    ``j <= q_pos[rows[a]]``): no ``(B, H, A, S)`` mask, forward or backward.

    The kernel needs nondecreasing positions: each ``(b, h)`` row list is rotated so that its fillers come first,
    at position 0 (one key each: almost no work; their outputs are discarded and their gradients are zero),
    followed by the active rows in ascending order.  Returns ``(rows, ok, exact (B, H, A, d))`` in that order."""
    n_rows = rows.shape[-1]
    turn = (torch.arange(n_rows, device=rows.device) + ok.sum(-1, keepdim=True)) % n_rows
    rows, ok = rows.gather(-1, turn), ok.gather(-1, turn)
    pos = torch.where(ok, q_pos[rows], 0).to(torch.int32)
    qg = torch.gather(q, 2, rows[..., None].expand(-1, -1, -1, q.shape[-1]))
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    device = q.device.type
    if torch.is_autocast_enabled(device) and q.dtype == torch.float32:  # as SDPA runs under autocast
        dtype = torch.get_autocast_dtype(device)
        qg, k, v = qg.to(dtype), k.to(dtype), v.to(dtype)
    # causal with every earlier key visible: a band of k's length to the left, none to the right
    exact, _ = sliding_window_kernel("triton", qg, k, v, None, 1, k.shape[2], 0, True, 0, scale, pos)
    return rows, ok, exact


def _write_rows(out: Tensor, rows: Tensor, ok: Tensor, exact: Tensor) -> Tensor:
    """``out`` ``(B, H, T + 1, d)`` (the lazy means and a spare last row) with the query ``rows`` ``(B, H, A)`` where
    ``ok`` replaced by ``exact`` ``(B, H, A, d)``, in place; returns its first ``T`` rows.  The filler rows (not
    ``ok``) write the spare row, which is dropped: nothing gathers ``out`` for them, so the backward keeps no copy
    of it (a gather of the lazy means, kept for a ``torch.where``, was one ``(B, H, T, d)`` tensor at the peak of
    a causal training step), and their gradient is zero."""
    length = out.shape[2] - 1
    idx = torch.where(ok, rows, length)[..., None].expand(-1, -1, -1, out.shape[-1])
    return out.scatter_(2, idx, exact.to(out.dtype))[:, :, :length]


def _prefix_mask(keys: Tensor, last: Tensor, q: Tensor) -> Tensor:
    """Additive mask ``(B, H, a, S)`` in ``q``'s dtype: 0 for keys ``<= last``, ``-inf`` after."""
    return torch.where(keys > last[..., None], q.new_full((), float("-inf")), q.new_zeros(()))


@dataclass(frozen=True)
class ProbSparseOptions(AttentionOptions):
    factor: int = positive_int(5, "sampling factor c: c·⌈ln L⌉ sampled keys per query and (noncausal) active queries")
    piecewise_mask: bool = option(
        False,
        "causal passes without padding or dropout that the Triton kernel does not take (it keeps no mask: CUDA, "
        "fp16/bf16/fp32, head dims 16-128): build the active rows' mask a quarter of the rows at a time and again in "
        "the backward, never kept (less peak memory; on an H200 1.1-1.2x the time and one host sync per pass)",
    )


@register_attention("probsparse", "prob_sparse", "informer")
class ProbSparse(EfficientAttention):
    """Informer's ProbSparse self-attention (noncausal, and masked/causal).

    ``out_i = softmax(q_i Kᵀ/√d) V`` for the active queries (see the module
    docstring), ``mean_{j visible} v_j`` for the others.  Padded keys never
    count (not sampled, not attended, not averaged) and padded queries are
    never selected.  Shapes ``(T, B, C)``.  Patterns: noncausal self, causal
    self.  Cost O(L ln L · d) for scores and selection plus O(u_active · L · d)
    for the active rows (causal: the running top-u keeps about
    ``u·(1 + ln(L/u))`` rows; ``piecewise_mask`` trades their kept mask for
    time, :class:`_PrefixRows`).  Decoding keeps the key/value cache and the
    past sparsity scores.
    """

    capabilities = Capabilities(patterns=SELF_PATTERNS, incremental=True, backends=("triton", "sdpa", "torch"))
    Options = ProbSparseOptions

    # ---------------------------------------------------------------- pieces
    def _blocks(self, first: int, src_len: int, device) -> Tuple[Tensor, Tensor, int]:
        """Sample blocks of queries ``first .. src_len-1``: ``(ids (G,), keys each samples from (G,), block size)``."""
        if not self.causal:
            return torch.zeros(1, dtype=torch.long, device=device), torch.full((1,), src_len, device=device), 0
        ids = torch.arange(first // _BLOCK, (src_len - 1) // _BLOCK + 1, device=device)
        return ids, (ids + 1) * _BLOCK, _BLOCK

    def _block_keys(self, ids: Tensor, n_visible: Tensor, count: int) -> Tensor:
        """Key indices ``(G, count)`` per block: random in training, :func:`hash_samples` of the block in eval."""
        if self.training:
            r = torch.rand(ids.shape[0], count, device=ids.device)
            return torch.minimum((r * n_visible[:, None]).long(), n_visible[:, None] - 1)
        return hash_samples(ids, n_visible, count)

    @staticmethod
    def _wrap(raw: Tensor, pos: Tensor) -> Tensor:
        """A block's sample ``raw`` for the query at ``pos``: kept if ``<= pos``, else wrapped into the
        query's visible part of its block ``[start, pos]`` (so a query never samples its future)."""
        start = pos - pos % _BLOCK
        return torch.where(raw <= pos, raw, start + (raw - start) % (pos - start + 1))

    def sample_keys(self, pos: Tensor, n_visible: Tensor, count: int) -> Tensor:
        """Key indices ``(T, count)`` of the queries at consecutive positions ``pos`` (``n_visible`` ``(T,)``).

        Noncausal: one sample shared by all queries.  Causal: one sample per block of ``_BLOCK`` positions,
        drawn from the keys up to the block's end; a query's samples beyond itself are wrapped into the
        visible part of its block (:meth:`_wrap`)."""
        first = int(pos[0])
        ids, n_blk, size = self._blocks(first, first + pos.shape[0], pos.device)
        if not size:
            return self._block_keys(ids, n_visible.max()[None], count).expand(pos.shape[0], -1)
        raw = self._block_keys(ids, n_blk, count)[torch.div(pos, size, rounding_mode="floor") - ids[0]]
        return self._wrap(raw, pos[:, None])

    def _sparsity(self, q: Tensor, k: Tensor, kpm: Optional[Tensor], u: Optional[Tensor]) -> Tensor:
        """``M (B, H, T)`` from the sampled keys (:meth:`sample_keys`); -inf where no valid key was sampled.
        ``u (T,)``: causal, each query's sample count (:func:`log_counts` of its position + 1); noncausal None
        (every query counts all ``U`` samples).

        Each block's queries times its ``U`` shared keys is one batched matmul (causal: plus the block's own
        ``_BLOCK²`` scores for the wrapped samples); fp16 computes in fp32.  The scores leave out the ``1/√d`` of
        the definition: a positive factor of every ``M`` changes no selection."""
        bsz, heads, tgt_len, dim = q.shape
        src_len = k.shape[2]
        first = src_len - tgt_len
        ids, n_blk, size = self._blocks(first, src_len, q.device)
        count = log_count(self.factor, src_len)
        keys = self._block_keys(ids, n_blk, count)  # (G, U)
        size = size or tgt_len
        start = first - first % size if self.causal else 0
        front, rows = first - start, ids.shape[0] * size
        real = torch.float32 if q.dtype == torch.float16 else q.dtype
        with torch.no_grad():  # the scores only select queries
            qs = F.pad(q, (0, 0, front, rows - tgt_len - front)).to(real).view(bsz, heads, -1, size, dim)
            s = torch.matmul(qs, k[:, :, keys.clamp(max=src_len - 1)].to(real).transpose(-1, -2))  # (B, H, G, n, U)
            if self.causal:
                pos = (start + torch.arange(rows, device=q.device)).view(-1, size, 1)  # (G, n, 1)
                raw = keys[:, None, :]
                final = self._wrap(raw, pos)  # (G, n, U)
                own = F.pad(k[:, :, start:], (0, 0, 0, rows - (src_len - start))).to(real).view(qs.shape)
                own = torch.matmul(qs, own.transpose(-1, -2))  # (B, H, G, n, n)
                idx = (final - pos + pos % _BLOCK).clamp(min=0).expand(bsz, heads, -1, -1, -1)  # inside the block
                s = torch.where(raw <= pos, s, torch.gather(own, -1, idx))
                final = final.reshape(rows, count)[front : front + tgt_len]
            else:
                final = keys.expand(tgt_len, -1)
            s = s.flatten(2, 3)[:, :, front : front + tgt_len]  # (B, H, T, U)
            ok = None if u is None else torch.arange(count, device=q.device) < u[:, None]  # (T, U)
            if kpm is not None:
                pad = kpm[:, final.clamp(max=src_len - 1)][:, None]  # (B, 1, T, U)
                ok = ~pad if ok is None else ok & ~pad
            if ok is None:  # every sample counts
                top = s.amax(-1)  # half: promoted exactly below, no cast op
                top = top.float() if top.dtype == torch.float64 else top
                return top - s.mean(-1, dtype=torch.float32)  # (B, H, T) fp32
            n, off = ok.sum(-1), ~ok
            total = s.masked_fill(off, 0.0).sum(-1, dtype=torch.float32)
            top = s.masked_fill_(off, float("-inf")).amax(-1)
            top = top.float() if top.dtype == torch.float64 else top
            return torch.where(n > 0, top - total / n.clamp(min=1), float("-inf"))  # (B, H, T) fp32

    def _running_active(self, m_new: Tensor, m_prev: Optional[Tensor], u: Tensor) -> Tensor:
        """Causal selection by brute force: query ``i`` is active iff fewer than ``u_i`` earlier queries
        score higher."""
        earlier = torch.tril(torch.ones(m_new.shape[-1], m_new.shape[-1], dtype=torch.bool, device=m_new.device), -1)
        count = ((m_new[..., None, :] > m_new[..., :, None]) & earlier).sum(-1)
        if m_prev is not None and m_prev.shape[-1]:
            count = count + (m_prev[..., None, :] > m_new[..., :, None]).sum(-1)
        return count < u

    def _causal_selection(self, m: Tensor, u: Tensor) -> Tensor:
        """The running top-u of a whole sequence (positions ``0 .. T-1``) with a fixed number of kernels.

        Queries in blocks of ``_SEL``: compared with the earlier ones of their block, and with the top
        ``u_max`` scores of all earlier blocks (a two-level exclusive running top-k: blocks within groups of
        about sqrt(blocks), then groups).  Only counts below ``u_max`` matter, so top lists suffice."""
        length = m.shape[-1]
        u_max = log_count(self.factor, length)
        n_blocks = -(-length // _SEL)
        per_group = math.isqrt(n_blocks - 1) + 1
        groups = -(-n_blocks // per_group)
        mb = F.pad(m, (0, groups * per_group * _SEL - length), value=float("-inf"))
        mb = mb.view(*m.shape[:-1], groups * per_group, _SEL)  # (B, H, nb, SEL)
        earlier = torch.tril(torch.ones(_SEL, _SEL, dtype=torch.bool, device=m.device), -1)
        count = ((mb[..., None, :] > mb[..., :, None]) & earlier).sum(-1)
        block_top = mb.topk(min(u_max, _SEL), dim=-1).values.view(*m.shape[:-1], groups, per_group, -1)
        inner = _prefix_top(block_top, u_max)  # (B, H, G, g, ·)
        group_top = block_top.flatten(-2)
        outer = _prefix_top(group_top.topk(min(u_max, group_top.shape[-1]), dim=-1).values, u_max)  # (B, H, G, ·)
        prefix = torch.cat([inner, outer[..., None, :].expand(*inner.shape[:-1], -1)], -1).flatten(2, 3)
        count = count + (prefix[..., None, :] > mb[..., :, None]).sum(-1)
        return count.flatten(-2)[..., :length] < u

    def _lazy(self, v: Tensor, kpm: Optional[Tensor], q_pos: Tensor, spare: bool = False) -> Tensor:
        """Mean of the visible, non-padded values ``(B, H, T, d)`` (causal: a running mean) in ``v``'s dtype; with
        ``spare``, ``(B, H, T + 1, d)`` in a time-first ``(T + 1, B, H, d)`` memory layout whose last row is left
        uninitialised (:func:`_write_rows` writes the exact rows in place and returns the first ``T``: merging the
        heads then needs no copy)."""
        if self.causal:
            keep = None if kpm is None else (~kpm).to(acc_dtype(v.dtype))
            out = _RunningMean.apply(v, keep, q_pos.shape[0], int(spare))
            return out.permute(1, 2, 0, 3)  # (a view: spare's scatter into it is an in-place op on it)
        real = acc_dtype(v.dtype)
        if kpm is None:  # every key counts
            total = v.sum(2, keepdim=True, dtype=real)
            count: Union[Tensor, int] = v.shape[2]
        else:
            keep = (~kpm).to(real)
            total = (v.to(real) * keep[:, None, :, None]).sum(2, keepdim=True)
            count = keep.sum(1)[:, None, None, None].clamp(min=1)
        lazy = (total / count).expand(-1, -1, q_pos.shape[0], -1)
        if not spare:
            return lazy.to(v.dtype)
        bsz, heads, length, dim = lazy.shape
        out = torch.empty(length + 1, bsz, heads, dim, dtype=v.dtype, device=v.device)
        out[:length].copy_(lazy.permute(2, 0, 1, 3))
        return out.permute(1, 2, 0, 3)  # (a view made after the copy: scattering into it is the next in-place op)

    def _exact_rows(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        rows: Tensor,
        ok: Tensor,
        q_pos: Tensor,
        kpm: Optional[Tensor],
        out: Tensor,
    ) -> Tensor:
        """Exact softmax attention (SDPA, or causal without padding or dropout the Triton kernel of
        :func:`_kernel_rows` where it takes the inputs) for the query ``rows`` ``(B, H, A)`` where ``ok``, written
        into ``out`` (:meth:`_lazy` with a spare row) by :func:`_write_rows`: its first ``T`` rows."""
        dropout = self.dropout_p if self.training else 0.0
        if self.causal and kpm is None and dropout == 0.0 and not _kernel_reasons(q, k, v):
            rows, ok, exact = _kernel_rows(q, k, v, rows, ok, q_pos, self.scaling)
            return _write_rows(out, rows, ok, exact)  # (fillers write the spare row: no gradient reaches them)
        idx = rows[..., None].expand(-1, -1, -1, q.shape[-1])
        keep: Optional[Tensor] = None
        if kpm is not None:  # a batch row without real keys has no active query: let its filler rows see everything
            keep = (~kpm | kpm.all(-1, keepdim=True))[:, None, None, :]  # (B, 1, 1, S)
        if self.causal and keep is None:
            # an additive mask from the rows' last visible key (filler rows see every key): a boolean mask took
            # three (B, H, A, S) tensors plus SDPA's own conversion (1 GB each at 32k); with piecewise_mask and
            # without dropout it is built a quarter at a time and never kept (_PrefixRows; not under Dynamo, which
            # cannot trace its backward's autograd)
            piecewise = self.piecewise_mask and dropout == 0.0 and not torch.compiler.is_compiling()
            if piecewise and not capturing_cuda_graph(q):  # (its pieces' key prefixes are read on the host)
                pieces = _PIECES if q.shape[2] >= _PIECES else 1  # _compute then takes at least _PIECES rows
                last = torch.where(ok, q_pos[rows], 0)  # fillers see the first key: no long prefix for them
                exact = _PrefixRows.apply(torch.gather(q, 2, idx), k, v, last, self.scaling, pieces)
                return _write_rows(out, rows, ok, exact)
            last = torch.where(ok, q_pos[rows], k.shape[2])  # (B, H, A)
            keep = _prefix_mask(torch.arange(k.shape[2], device=q.device), last, q)
        elif self.causal and keep is not None:
            seen = torch.arange(k.shape[2], device=q.device) <= q_pos[rows][..., None]  # (B, H, A, S)
            keep = (seen & keep) | ~ok[..., None]  # filler rows: no empty row
        exact = F.scaled_dot_product_attention(
            torch.gather(q, 2, idx),
            k,
            v,
            attn_mask=keep,
            scale=self.scaling,
            dropout_p=dropout,
        )
        return _write_rows(out, rows, ok, exact)

    def _compute(
        self, q: Tensor, k: Tensor, v: Tensor, kpm: Optional[Tensor], qpm: Optional[Tensor], m_prev: Optional[Tensor]
    ) -> Tuple[Tensor, Tensor]:
        """Outputs of the ``T`` queries (the last ``T`` key positions) and their scores ``M``."""
        tgt_len, src_len = q.shape[2], k.shape[2]
        q_pos = torch.arange(src_len - tgt_len, src_len, device=q.device)
        u = log_counts(self.factor, q_pos + 1) if self.causal else None  # (T,): the running top-u's counts
        m = self._sparsity(q, k, kpm, u)
        if qpm is not None:
            m = m.masked_fill(qpm[:, None, :], float("-inf"))
        if u is not None:
            active = self._causal_selection(m, u) if m_prev is None else self._running_active(m, m_prev, u)
            # at least one (filler) row: no branch on the count; rounded up to a power of two (extra rows are
            # fillers): SDPA's cuDNN backend builds a graph per new shape (50-70 ms of host time on an H200)
            least = min(_PIECES, tgt_len) if self.piecewise_mask else 1  # _PrefixRows splits them in _PIECES
            if capturing_cuda_graph(q):
                n_act = tgt_len  # a CUDA graph cannot read the count: every row is exact or a dropped filler
                if not _CAPTURE_WARNED:
                    _CAPTURE_WARNED.append(True)
                    logger.warning(
                        "ProbSparse (causal) in a CUDA graph: the active-row count cannot be read on the host "
                        "while capturing, so every query row takes the exact pass: the same output, but no saving "
                        "over dense attention (a masked pass over every row; on an H200 slower than SDPA below 16k)"
                    )
            else:
                most = active.sum(-1).max().clamp(min=least).float()
                n_act = int(torch.exp2(torch.ceil(torch.log2(most))).clamp(max=tgt_len).long())
                torch._check(n_act >= least)  # (both bounds: a slice whose end is not known in range gets a new
                torch._check(n_act <= tgt_len)  # size symbol under Dynamo, and torch 2.11's SDPA cannot guard on it)
            rows = torch.sort(active.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :n_act]
            ok = torch.gather(active, -1, rows)
        else:
            rows = m.topk(log_count(self.factor, tgt_len), dim=-1).indices
            ok = torch.isfinite(torch.gather(m, -1, rows))
        return self._exact_rows(q, k, v, rows, ok, q_pos, kpm, self._lazy(v, kpm, q_pos, spare=True)), m

    def _step(
        self, q: Tensor, k: Tensor, v: Tensor, kpm: Optional[Tensor], qpm: Optional[Tensor], m_prev: Tensor
    ) -> Tuple[Tensor, Tensor]:
        """:meth:`_compute` for one causal query (the last key): exact attention where it is active, the running
        mean of the values where not, chosen by ``torch.where`` (no row count read back from the device)."""
        q_pos = torch.arange(k.shape[2] - 1, k.shape[2], device=q.device)
        u = log_counts(self.factor, q_pos + 1)
        m = self._sparsity(q, k, kpm, u)
        if qpm is not None:
            m = m.masked_fill(qpm[:, None, :], float("-inf"))
        active = self._running_active(m, m_prev, u)  # (B, H, 1)
        hidden = None  # as in _exact_rows: a batch row without real keys lets the query see every key
        if kpm is not None:
            hidden = (kpm & ~kpm.all(-1, keepdim=True))[:, None, None, :]
        exact = sdpa_attention(q, k, v, hidden, scale=self.scaling, dropout_p=self.dropout_p if self.training else 0.0)
        lazy = self._lazy(v, kpm, q_pos)
        return torch.where(active[..., None], exact.to(lazy.dtype), lazy), m

    # ------------------------------------------------------------------- hooks
    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks, need_weights: bool
    ) -> Tuple[Tensor, Optional[Tensor]]:
        kpm = masks.key_padding
        qpm = kpm  # self attention: padded keys are padded queries, never selected
        if masks.query_padding is not None:
            qpm = masks.query_padding if qpm is None else qpm | masks.query_padding
        out, _ = self._compute(q, k, v, kpm, qpm, None)
        return out, None

    def _attend_step(
        self, q: Tensor, k: Optional[Tensor], v: Optional[Tensor], state: Dict[str, Any], masks: AttentionMasks
    ) -> Tensor:
        """The key/value cache (``prev_key`` ...) and the largest past sparsity scores ``top_scores (B, H, K, 1)``
        (``K = factor·34`` is at least every ``u`` below 2^48 positions, so a query's count of higher earlier
        scores is exact below ``u``, all the running top-u needs)."""
        assert k is not None and v is not None  # self attention only (SELF_PATTERNS): every step brings its keys
        bsz, tgt_len = q.shape[0], q.shape[2]
        prev_k, top = state.get("prev_key"), state.get("top_scores")
        prev_len = 0 if prev_k is None else prev_k.shape[2]
        new_kpm = masks.key_padding
        if prev_k is not None:
            new_kpm = _cat_padding(state.get("prev_key_padding_mask"), new_kpm, prev_len, tgt_len, bsz)
            k, v = torch.cat([prev_k, k], 2), torch.cat([state["prev_value"], v], 2)
        state["prev_key"], state["prev_value"], state["prev_key_padding_mask"] = k, v, new_kpm
        if tgt_len == 1 and top is not None and new_kpm is None and not self.training:
            return self._fast_step(q, k, v, state, top)
        prev_m = None if top is None else top[..., 0]  # (B, H, K)
        qpm = None if new_kpm is None else new_kpm[:, prev_len:]
        if tgt_len == 1 and prev_m is not None:
            out, m = self._step(q, k, v, new_kpm, qpm, prev_m)
        else:
            out, m = self._compute(q, k, v, new_kpm, qpm, prev_m)
        state["top_scores"] = self._top(m if prev_m is None else torch.cat([prev_m, m], -1))
        return out

    def _top(self, scores: Tensor) -> Tensor:
        """The ``K`` largest of ``scores (B, H, N)``, sorted, as ``(B, H, K, 1)`` (``-inf`` filled when ``N < K``)."""
        size = self.factor * _TOP_LOG
        if scores.shape[-1] < size:
            scores = F.pad(scores, (0, size - scores.shape[-1]), value=float("-inf"))
        return scores.topk(size, dim=-1).values[..., None]  # sorted: the fast step reads the u-th largest

    def _step_samples(self, pos: int, count: int, device) -> Tensor:
        """The eval samples ``(count,)`` of the query at ``pos`` (:meth:`sample_keys`'s row), from a table of its
        block's ``_BLOCK`` rows built once per block (the last one is kept on the module, its rows unbound once:
        picking one is no op)."""
        block = pos // _BLOCK
        key = (block, count, device)
        cached = getattr(self, "_sample_table", None)
        if cached is None or cached[0] != key:
            ids = torch.full((1,), block, device=device)
            raw = self._block_keys(ids, (ids + 1) * _BLOCK, count)  # (1, count): the block's samples
            rows = torch.arange(block * _BLOCK, (block + 1) * _BLOCK, device=device)
            table = self._wrap(raw, rows[:, None])  # (_BLOCK, count), as sample_keys gives them (no device sync)
            cached = (key, table.unbind(0))
            self._sample_table = cached
        return cached[1][pos % _BLOCK]

    def _fast_step(self, q: Tensor, k: Tensor, v: Tensor, state: Dict[str, Any], top: Tensor) -> Tensor:
        """:meth:`_step` without padding in eval, in 14 ops beside SDPA: the query's samples come from a
        per-block table, its score ``M (B, H, 1, 1)`` from one product with them (every sample counts: ``U`` is
        the sample count at this length), the running top-u from ``top_scores`` (sorted: the query is active iff
        its score is at least the ``u``-th largest past score, i.e. fewer than ``u`` past scores are higher).  An
        inactive query is zeroed before SDPA: its softmax is then uniform over the cache, the mean of the values
        (the lazy row), so one SDPA call gives both kinds of rows (no row count read back, no running sum)."""
        src_len = k.shape[2]
        count = log_count(self.factor, src_len)
        real = torch.float32 if q.dtype == torch.float16 else q.dtype
        bsz, heads, _, dim = q.shape
        keys = k.index_select(2, self._step_samples(src_len - 1, count, q.device)).to(real)  # (B, H, U, d)
        # one bmm, as _sparsity's matmul: the same rounding in half precision, so the same selection
        s = torch.bmm(keys.view(bsz * heads, count, dim), q.to(real).reshape(bsz * heads, dim, 1))  # q: a copy
        s = s.view(bsz, heads, count, 1)
        hi = s.amax(2, keepdim=True)  # half: promoted exactly below, no cast op; float64: cast as _sparsity does
        hi = hi.float() if hi.dtype == torch.float64 else hi
        m = hi - s.mean(2, keepdim=True, dtype=torch.float32)  # (B, H, 1, 1) fp32, as _sparsity computes it
        active = m >= top[:, :, count - 1 : count]  # the u-th largest past score (u = count here)
        state["top_scores"] = torch.cat([top, m], 2).topk(top.shape[2], dim=2).values
        return sdpa_attention(q * active, k, v, None, scale=self.scaling)
