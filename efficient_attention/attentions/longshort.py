"""Long-Short Transformer attention (Transformer-LS, Zhu et al. 2021).

One softmax over two key sets: a **short** local window (the block rule of
:class:`~efficient_attention.local_window.LocalWindow`) and **long** compressed
memories made by a dynamic projection ``P = softmax_positions(k W)``
(``K̄ = Pᵀ K``, ``V̄ = Pᵀ V``).  Training runs as one block-sparse kernel call
over the keys ``[memory slots ; sequence]`` with a cached
:class:`~efficient_attention.block_mask.BlockMask` (the window and each query's
memories as kept blocks and token tiles): one fused softmax, no merge.

* noncausal (:class:`AttentionLS`): window ``wsize`` blocks looking one block
  back and forward; ``num_landmarks`` global memories from the whole sequence.
* causal (:class:`CausalLS`): window of the own block and the one before;
  every ``chunk_size`` tokens form a chunk compressed into ``chunk_rank``
  memories; a query sees the compressed memories of the last
  ``num_landmarks // chunk_rank`` chunks *before its own chunk* (bounded, so
  decoding state is constant).

Cost O(N·(3·window + memories)·d).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import astuple, dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import AttentionMasks, EfficientAttention
from ..block_mask import BlockMask, built_outside_graph
from ..capabilities import SELF_PATTERNS, Capabilities, Pattern
from ..functional import acc_dtype, sdpa_attention, softmax
from ..kernels.linear_attention import _split_k
from ..kernels.ops import block_mask_attention
from ..local_window import LocalWindow, cache_len
from ..options import AttentionOptions, positive_int
from ..registry import register_attention

__all__ = ["LongShort", "AttentionLS", "CausalLS"]


def _chunked(x: Tensor, c: int) -> Tensor:
    """``(B, H, G, n, ·)`` as ``(B, H, G, c, n/c, ·)`` (a view); itself for one chunk."""
    return x if c == 1 else x.unflatten(-2, (c, x.shape[-2] // c))


def _per_chunk(x: Tensor, c: int) -> Tensor:
    """``(B, H, G, r, ·)`` broadcast over :func:`_chunked`'s chunk dim (a view); itself for one chunk."""
    return x if c == 1 else x.unsqueeze(-3)


def _over_group(c: int) -> Tuple[int, ...]:
    """The dims of a :func:`_chunked` ``(.., r, n)`` tensor that run over the group's positions."""
    return (-1,) if c == 1 else (-3, -1)


class _Compress(torch.autograd.Function):
    """The dynamic projection as one node: ``P = softmax_n(k W)``, ``(K̄, V̄) = (P k, P v)``, P recomputed backward.

    ``k, v (B, H, G, n, d)``, ``proj (H, d, r)``, ``pad (B, G, n)`` or None (True = padding) -> ``(B, H, G, r, d)``
    twice, in at least fp32 inside (fp16 logits overflow), returned in ``k``'s dtype.

    A long group on CUDA (noncausal attention's whole sequence) is cut into the ``c`` chunks of
    ``linear_attention._split_k``: ``P`` and its gradient are ``(B, H, G, c, r, n/c)``, each product that reduces
    over the group's positions is one batched product per chunk and a sum over the chunks, every operand a view
    (unsplit, cuBLAS ran one tile per (batch, head) over the whole group: 0.99 of the step's 3.97 ms GPU time at 8k
    in CAB's setting on an H200), and the softmax is a max and a sum over ``(c, n/c)``.  Elsewhere ``c = 1`` and the
    shapes keep no chunk dim (fewest ops: the step is host-bound there).
    """

    @staticmethod
    def _probs(k: Tensor, proj: Tensor, pad: Optional[Tensor], c: int) -> Tensor:
        """``P`` ``(B, H, G, [c,] r, n/c)``: the softmax over the group's ``n`` positions of ``Wᵀ kᵀ``; a group of
        padding only gives zeros (no memory)."""
        logits = torch.matmul(_per_chunk(proj.transpose(-1, -2)[:, None], c), _chunked(k, c).transpose(-1, -2))
        if pad is not None:  # (B, G, n) -> (B, 1, G, [c,] 1, n/c)
            pad = pad[:, None, :, None] if c == 1 else pad.unflatten(-1, (c, -1))[:, None, :, :, None]
            logits = logits.masked_fill(pad, float("-inf"))
        if c == 1:
            return softmax(logits)
        top = logits.amax((-3, -1), keepdim=True)
        probs = logits.sub_(top.masked_fill_(torch.isneginf(top), 0.0)).exp_()
        total = probs.sum((-3, -1), keepdim=True)
        return probs.div_(total.masked_fill_(total == 0, 1.0))

    @staticmethod
    def _reduce(probs: Tensor, x: Tensor, c: int) -> Tensor:
        """``P x`` ``(B, H, G, r, d)`` for ``x (B, H, G, n, d)``: per chunk, summed."""
        out = torch.matmul(probs, _chunked(x, c))
        return out if c == 1 else out.sum(-3)

    @staticmethod
    def forward(ctx, k, v, proj, pad):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(k, v, proj, pad)
        with torch.autocast(k.device.type, enabled=False):
            acc = acc_dtype(k.dtype)
            kf, vf = k.to(acc), v.to(acc)
            c = _split_k(k.shape[-2], k)
            probs = _Compress._probs(kf, proj.to(acc), pad, c)
            return _Compress._reduce(probs, kf, c).to(k.dtype), _Compress._reduce(probs, vf, c).to(v.dtype)

    @staticmethod
    def backward(ctx, grad_k, grad_v):
        """``dv = Pᵀ g_v``; ``dP = g_k kᵀ + g_v vᵀ`` -> ``dlogits`` (in place on ``dP``); ``dk = Pᵀ g_k + dlogitsᵀ W``
        as one product of ``[P; dlogits]ᵀ`` and ``[g_k; W]``; ``dW = Σ dlogits k``.  Each fp32 copy lives only while
        it is used: the straightforward version held fp32 ``k, v``, ``Pᵀ g_k``, ``dlogitsᵀ W`` and their sum at once
        (13 of the 23 units of peak memory of a noncausal step at 8k in CAB's setting, where one group spans the
        sequence)."""
        k, v, proj, pad = ctx.saved_tensors
        if grad_k is None and grad_v is None:
            return None, None, None, None
        with torch.autocast(k.device.type, enabled=False):
            acc = acc_dtype(k.dtype)
            pf = proj.to(acc)
            c = _split_k(k.shape[-2], k)
            probs = _Compress._probs(k.to(acc), pf, pad, c)  # (B, H, G, [c,] r, n/c); fp32 k again after v's part
            grad_p = torch.zeros((), dtype=acc, device=k.device)  # dP
            dv = None
            if grad_v is not None:
                gv = _per_chunk(grad_v.to(acc), c)
                grad_p = torch.matmul(gv, _chunked(v.to(acc), c).transpose(-1, -2))  # (its fp32 v freed here)
                dv = torch.matmul(probs.transpose(-1, -2), gv)
                dv = (dv if c == 1 else dv.flatten(-3, -2)).to(v.dtype)
                del gv
            kc = _chunked(k.to(acc), c)  # (not alive beside v's fp32 copy)
            gk = None if grad_k is None else _per_chunk(grad_k.to(acc), c)
            if gk is not None:
                prod = torch.matmul(gk, kc.transpose(-1, -2))
                grad_p = prod if grad_v is None else grad_p.add_(prod)  # (in place: one (r, n) less)
                del prod
            # the softmax's backward in place on dP (its own): one (r, n) temporary
            logits = grad_p.sub_((grad_p * probs).sum(_over_group(c), keepdim=True)).mul_(probs)
            del grad_p
            dproj = torch.matmul(logits, kc).sum((0, 2) if c == 1 else (0, 2, 3)).transpose(-1, -2)  # (H, d, r)
            del kc
            pt = _per_chunk(pf.transpose(-1, -2)[:, None], c)  # (H, 1, [1,] r, d)
            if gk is None:
                dk = torch.matmul(logits.transpose(-1, -2), pt)
            else:
                rows = torch.cat([probs, logits], -2).transpose(-1, -2)  # (B, H, G, [c,] n/c, 2r)
                del probs, logits
                dk = torch.matmul(rows, torch.cat([gk, pt.expand(*gk.shape[:-2], *pt.shape[-2:])], -2))
                del rows  # (not alive beside dk's cast)
        return (dk if c == 1 else dk.flatten(-3, -2)).to(k.dtype), dv, dproj.to(proj.dtype), None


_BLOCK = 64  # block size of the fused path's BlockMask
_masks: "OrderedDict[tuple, BlockMask]" = OrderedDict()  # built once per (rule, length, device); LRU


@built_outside_graph
def _memory_mask(band: tuple, causal: bool, chunk: int, rank: int, reach: int, length: int, device) -> BlockMask:
    """The fused path's :class:`BlockMask`: queries ``0..length-1`` against ``[memory slots ; sequence]``;
    ``band``: the window's :class:`LocalWindow` fields (plain values: a compiled graph's constant).

    The memory slots come first, padded to a whole block (``_slots`` gives their count); then the sequence.
    A query sees its window of the sequence and, noncausal, every memory slot; causal, the slots of the
    ``reach`` chunks before its own (``rank`` slots per chunk of ``chunk`` tokens).
    """
    n_slots, n_mem = _slots(causal, chunk, rank, reach, length)
    window = LocalWindow(*band)
    key = (window, causal, chunk, rank, reach, length, str(device))
    hit = _masks.get(key)
    if hit is not None:
        _masks.move_to_end(key)
        return hit

    def rule(b, h, i, j):
        p = j - n_mem  # the sequence position of key j (negative: a memory slot)
        seen = (p >= 0) & window.allowed(i, p)
        if causal:
            c = torch.div(j, rank, rounding_mode="floor")  # the chunk slot j compresses
            own = torch.div(i, chunk, rounding_mode="floor")
            return seen | ((j < n_slots) & (c < own) & (c >= own - reach))
        return seen | (j < n_slots)

    first = torch.arange(0, length, _BLOCK, device=device)
    last = (first + _BLOCK - 1).clamp(max=length - 1)
    cols = torch.arange(0, n_mem + length, _BLOCK, device=device)
    lo = torch.where(cols >= n_mem, cols, 0)  # a column block's first and last key (sequence positions or slots)
    hi = cols + _BLOCK - 1
    seq = (
        (cols[None] >= n_mem)
        & (lo[None] - n_mem <= window.hi(last)[:, None])
        & (hi[None] - n_mem >= window.lo(first)[:, None])
    )
    if causal:  # slots of chunks own - reach .. own - 1
        slot_lo = (torch.div(first, chunk, rounding_mode="floor") - reach) * rank
        slot_hi = torch.div(last, chunk, rounding_mode="floor") * rank - 1
        mem = (cols[None] < n_slots) & (cols[None] <= slot_hi[:, None]) & (hi[None] >= slot_lo[:, None])
    else:
        mem = (cols[None] < n_slots).expand(len(first), -1)
    with torch.no_grad():
        bm = BlockMask.from_mask_mod(
            rule, 1, length, n_mem + length, _BLOCK, device=device, candidates=(seq | mem)[None]
        )
    if len(_masks) >= 16:
        _masks.popitem(last=False)
    _masks[key] = bm
    return bm


def _slots(causal: bool, chunk: int, rank: int, reach: int, length: int) -> Tuple[int, int]:
    """``(memory slots, their block-padded count)`` for a sequence of ``length``."""
    n_slots = length // chunk * rank if causal else reach * rank
    return n_slots, -(-n_slots // _BLOCK) * _BLOCK


@dataclass(frozen=True)
class LongShortOptions(AttentionOptions):
    window_size: int = positive_int(
        16, "block size of the short-term window (a query sees its block and the blocks next to it)"
    )
    num_landmarks: int = positive_int(
        32,
        "noncausal: global compressed memories; causal: compressed memories kept "
        "(the last num_landmarks // chunk_rank chunks)",
    )
    chunk_size: int = positive_int(16, "causal: tokens per compressed chunk")
    chunk_rank: int = positive_int(1, "causal: compressed memories per chunk")


class LongShort(EfficientAttention):
    """Transformer-LS attention: short window + compressed long memories in one softmax.

    ``out_i = softmax([q_i k_j/√d]_{j in W(i)} ∪ [q_i k̄_m/√d]_{m in M(i)}) · [v_j; v̄_m]``
    where ``W(i)`` is the local window and ``M(i)`` the compressed memories
    (see the module docstring).  Builds :class:`AttentionLS` when
    ``causal=False`` and :class:`CausalLS` when ``causal=True`` (registered as
    ``longshort``: one name for both self patterns).  Shapes ``(T, B, C)``.
    Padded keys never count (nor enter a memory; a chunk of padding gives no
    memory).  Cost O(N·(span + memories)·d); causal decoding keeps a constant
    state (window cache, the current chunk, the last memories).
    """

    capabilities = Capabilities(
        patterns=SELF_PATTERNS,
        incremental=True,
        constant_state=True,
        backends=("kernels.block_sparse_attention", "sdpa"),
    )
    Options = LongShortOptions

    def __new__(cls, *args, **kwargs):
        cross = kwargs.get("cross") or (kwargs.get("cross") is None and kwargs.get("encoder_decoder_attention"))
        if cls is LongShort and not cross:  # the front: pick by causal (cross stays here and is refused)
            cls = CausalLS if kwargs.get("causal", False) else AttentionLS
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        window_size, num_landmarks, chunk_rank = self.window_size, self.num_landmarks, self.chunk_rank
        if self.causal and num_landmarks < chunk_rank:
            raise ValueError(f"num_landmarks ({num_landmarks}) must be >= chunk_rank ({chunk_rank}) with causal=True")
        self.window = LocalWindow.from_blocks(window_size, 1, 0 if self.causal else 1, causal=self.causal)
        self.band = astuple(self.window)
        rank = chunk_rank if self.causal else num_landmarks
        self.memory_chunks = num_landmarks // chunk_rank
        # dynamic projection: memory logits from each head's keys
        self.landmark_proj = nn.Parameter(torch.randn(self.num_kv_heads, self.head_dim, rank) * self.head_dim**-0.5)

    # ------------------------------------------------------------- memories
    def _compress(self, k: Tensor, v: Tensor, pad: Optional[Tensor]) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """Memories of groups of positions ``k, v (B, H, G, n, d)``, ``pad (B, G, n)`` or None.

        ``P = softmax over the n positions of k W`` -> ``(K̄, V̄) (B, H, G, r, d)`` and
        ``empty (B, G)``: the group held only padding (no memory); None without ``pad``.
        """
        return (*_Compress.apply(k, v, self.landmark_proj, pad), None if pad is None else pad.all(-1))

    def _chunk_memories(self, k: Tensor, v: Tensor, kpm: Optional[Tensor]) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """Compressed memories of the complete chunks: ``(B, H, C, r, d)`` twice and ``empty (B, C)`` or None."""
        n_chunks = k.shape[2] // self.chunk_size
        cut = n_chunks * self.chunk_size
        shape = (k.shape[0], k.shape[1], n_chunks, self.chunk_size, k.shape[-1])
        pad = None if kpm is None else kpm[:, :cut].reshape(k.shape[0], n_chunks, self.chunk_size)
        return self._compress(k[:, :, :cut].reshape(shape), v[:, :, :cut].reshape(shape), pad)

    # ---------------------------------------------------------------- forward
    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks, need_weights: bool
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """One block-sparse kernel call over ``[memory slots ; sequence]`` keys (see :func:`_memory_mask`)."""
        kpm, length = masks.key_padding, q.shape[2]
        if self.causal:
            mk, mv, empty = self._chunk_memories(k, v, kpm)  # (B, H, C, r, d), empty (B, C)
            mk, mv = mk.flatten(2, 3), mv.flatten(2, 3)
            reach, rank = self.memory_chunks, self.chunk_rank
        else:
            mk, mv, empty = self._compress(k[:, :, None], v[:, :, None], None if kpm is None else kpm[:, None])
            mk, mv = mk.squeeze(2), mv.squeeze(2)  # (B, H, r, d); empty (B, 1)
            reach, rank = 1, self.num_landmarks
        n_slots, n_mem = _slots(self.causal, self.chunk_size, rank, reach, length)
        bm = _memory_mask(self.band, self.causal, self.chunk_size, rank, reach, length, q.device)
        fill = (0, 0, 0, n_mem - n_slots)
        keys, values = torch.cat([F.pad(mk, fill), k], 2), torch.cat([F.pad(mv, fill), v], 2)
        if kpm is not None and empty is not None:  # a memory of padding only is hidden like a padded key
            kpm = torch.cat([F.pad(empty.repeat_interleave(rank, dim=1), (0, n_mem - n_slots), value=True), kpm], 1)
        dropout = self.dropout_p if self.training else 0.0
        out, _ = block_mask_attention(q, keys, values, bm, key_padding_mask=kpm, scale=self.scaling, dropout_p=dropout)
        return out.to(q.dtype), None

    # --------------------------------------------------------------- decoding
    def _attend_step(
        self, q: Tensor, k: Optional[Tensor], v: Optional[Tensor], state: Dict[str, Any], masks: AttentionMasks
    ) -> Tensor:
        """Constant state: the window cache (the base's ``prev_key`` ...), the current chunk ``chunk_key`` /
        ``chunk_value`` ``(B, H, l, d)`` with its fill mask ``chunk_padding (B, l)`` (True = empty or padding),
        and the last memories ``memory_key`` / ``memory_value`` ``(B, H, slots, d)`` with ``memory_hidden``."""
        assert k is not None and v is not None  # self attention only (SELF_PATTERNS): every step brings its keys
        pos, tgt_len, kpm = masks.query_offset, q.shape[2], masks.key_padding
        if "chunk_key" not in state:
            self._init_state(state, k)
            if tgt_len > 1:  # a prompt: one full pass, then the state it leaves
                out, _ = self._attend(q, k, v, AttentionMasks(key_padding=kpm), False)
                self._fill_state(state, k, v, kpm)
                return out
        outs = [
            self._step_one(
                q[:, :, t : t + 1],
                k[:, :, t : t + 1],
                v[:, :, t : t + 1],
                None if kpm is None else kpm[:, t : t + 1],
                state,
                pos + t,
            )
            for t in range(tgt_len)
        ]
        return outs[0] if tgt_len == 1 else torch.cat(outs, dim=2)

    def _init_state(self, state: Dict[str, Any], k: Tensor) -> None:
        bsz, heads, dim, device = k.shape[0], k.shape[1], k.shape[-1], k.device
        l, slots = self.chunk_size, self.memory_chunks * self.chunk_rank
        state["chunk_key"] = k.new_zeros(bsz, heads, l, dim)
        state["chunk_value"] = k.new_zeros(bsz, heads, l, dim)
        state["chunk_padding"] = torch.ones(bsz, l, dtype=torch.bool, device=device)
        state["memory_key"] = k.new_zeros(bsz, heads, slots, dim)
        state["memory_value"] = k.new_zeros(bsz, heads, slots, dim)
        state["memory_hidden"] = torch.ones(bsz, slots, dtype=torch.bool, device=device)

    def _fill_state(self, state: Dict[str, Any], k: Tensor, v: Tensor, kpm: Optional[Tensor]) -> None:
        """The decoding state after a full pass over ``k, v (B, H, L, d)``: window tail, last memories, open chunk."""
        length, l, r = k.shape[2], self.chunk_size, self.chunk_rank
        self._window_cache(state, k, v, kpm, cache_len(self.window))
        mk, mv, empty = self._chunk_memories(k, v, kpm)  # (B, H, C, r, d)
        mk, mv = mk.flatten(2, 3), mv.flatten(2, 3)
        hidden = (
            torch.zeros(mk.shape[0], mk.shape[2], dtype=torch.bool, device=k.device)
            if empty is None
            else empty.repeat_interleave(r, dim=1)
        )
        slots = state["memory_key"].shape[2]
        state["memory_key"] = torch.cat([state["memory_key"], mk], 2)[:, :, -slots:]
        state["memory_value"] = torch.cat([state["memory_value"], mv], 2)[:, :, -slots:]
        state["memory_hidden"] = torch.cat([state["memory_hidden"], hidden], 1)[:, -slots:]
        rest = length % l
        if rest:
            state["chunk_key"][:, :, :rest] = k[:, :, length - rest :]
            state["chunk_value"][:, :, :rest] = v[:, :, length - rest :]
            state["chunk_padding"][:, :rest] = False if kpm is None else kpm[:, length - rest :]

    def _step_one(
        self, q: Tensor, k: Tensor, v: Tensor, kpm: Optional[Tensor], state: Dict[str, Any], pos: int
    ) -> Tensor:
        """The token at position ``pos``: window + memories, then it joins the open chunk (written in place)."""
        l, r = self.chunk_size, self.chunk_rank
        wk, wv, wp = self._window_cache(state, k, v, kpm, cache_len(self.window))
        # the query sees a contiguous run of the window cache and the memories: one softmax over both
        start = max(self.window.lo(pos) - (pos + 1 - wk.shape[2]), 0)
        seen = wk.shape[2] - start
        keys = torch.cat([wk[:, :, start:], state["memory_key"]], 2)
        values = torch.cat([wv[:, :, start:], state["memory_value"]], 2)
        dropout = self.dropout_p if self.training else 0.0
        if wp is None and pos // l >= self.memory_chunks:  # no key ever padded, every memory filled: no mask
            out = sdpa_attention(q, keys, values, None, scale=self.scaling, dropout_p=dropout)
        else:
            hidden = state["memory_hidden"]
            hidden = F.pad(hidden, (seen, 0), value=False) if wp is None else torch.cat([wp[:, start:], hidden], 1)
            out = sdpa_attention(q, keys, values, hidden[:, None, None, :], scale=self.scaling, dropout_p=dropout)
        slot = pos % l
        ck, cv, cp = state["chunk_key"], state["chunk_value"], state["chunk_padding"]
        ck[:, :, slot : slot + 1].copy_(k)
        cv[:, :, slot : slot + 1].copy_(v)
        if kpm is None:
            cp[:, slot].fill_(False)
        else:
            cp[:, slot : slot + 1].copy_(kpm)
        if slot == l - 1:  # chunk complete: compress it into the memories, drop the oldest
            mk, mv, empty = self._compress(ck[:, :, None], cv[:, :, None], cp[:, None])
            state["memory_key"] = torch.cat([state["memory_key"][:, :, r:], mk[:, :, 0]], 2)
            state["memory_value"] = torch.cat([state["memory_value"][:, :, r:], mv[:, :, 0]], 2)
            assert empty is not None  # the chunk's fill mask was given
            state["memory_hidden"] = torch.cat([state["memory_hidden"][:, r:], empty.expand(-1, r)], 1)
            cp.fill_(True)
        return out.to(q.dtype)


@register_attention("attention_ls", "ls", "longshort_noncausal")
class AttentionLS(LongShort):
    """Noncausal Transformer-LS: local window (one block each side) + ``num_landmarks`` global memories.

    See :class:`LongShort`.  Patterns: noncausal self.  Cost O(N·(3·window_size + num_landmarks)·d).
    """

    capabilities = Capabilities(
        patterns=frozenset({Pattern.NONCAUSAL_SELF}), backends=("kernels.block_sparse_attention", "sdpa")
    )


@register_attention("causal_ls", "longshort_causal")
class CausalLS(LongShort):
    """Causal Transformer-LS: causal local window + compressed memories of the last chunks; constant-state decoding.

    See :class:`LongShort`.  Patterns: causal self (``causal`` defaults to True).
    Cost O(N·(2·window_size + num_landmarks)·d).
    """

    capabilities = Capabilities(
        patterns=frozenset({Pattern.CAUSAL_SELF}),
        incremental=True,
        constant_state=True,
        backends=("kernels.block_sparse_attention", "sdpa"),
    )

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("causal", True)  # its only pattern
        super().__init__(*args, **kwargs)


register_attention("longshort", "long_short")(LongShort)
