"""Landmark attention with fairseq's interface (causal language modelling).

Every ``block_size``-th position (``pos ≡ block_size − 1``) is a landmark
token closing its block; attention to earlier blocks is gated by their
landmarks through the grouped softmax of
:func:`efficient_attention.sparse.landmark.landmark_attention_formula`.  With
``top_k > 0`` each query uses only its ``top_k`` best earlier blocks, and a
decoding step reads only the landmark keys and those blocks
(``O(S/bs + top_k · bs)`` keys instead of ``S``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..base import AttentionMasks, EfficientAttention
from ..capabilities import Capabilities, Pattern
from ..functional import acc_dtype, repeat_kv
from ..kernels.landmark import landmark_attention as landmark_blocks
from ..options import AttentionOptions, nonnegative_int, option
from ..registry import register_attention
from ..sparse.landmark import landmark_attention_formula, landmark_positions

__all__ = ["LandmarkAttention"]


@dataclass(frozen=True)
class LandmarkOptions(AttentionOptions):
    block_size: int = option(
        64, "landmark period: every block_size-th token is a landmark closing its block", minimum=2
    )
    top_k: int = nonnegative_int(0, "earlier blocks each query may use (0 = all); decoding retrieves only these")


@register_attention("landmark", "landmark_attention")
class LandmarkAttention(EfficientAttention):
    """Landmark attention (Mohtashami & Jaggi): blocks of ``block_size`` closed by landmark tokens.

    Pattern: causal self attention.  The caller's sequence must hold its
    landmark tokens at positions ``block_size - 1, 2·block_size - 1, ...``
    (as the paper's data pipeline inserts them).  Key padding, grouped-query
    attention, incremental decoding with top-k block retrieval.  Full pass
    ``O(N² d)`` time and ``O(N)`` memory forward and backward, block by block
    (:func:`efficient_attention.kernels.landmark_attention`: Triton kernels on CUDA);
    with ``top_k > 0`` the full pass uses the general formula (``O(block_size · N)`` memory per chunk).
    """

    capabilities = Capabilities(
        patterns=frozenset({Pattern.CAUSAL_SELF}),
        incremental=True,
        key_padding_mask=True,
        grouped_kv=True,
        backends=("triton", "torch"),
    )
    Options = LandmarkOptions

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks, need_weights: bool):
        src_len = k.shape[2]
        bs = self.block_size
        if q.shape[2] == 1 and not self.top_k and masks.key_padding is None:  # a decoding step
            return self._one_query(q, k, v), None
        if self.top_k and q.shape[2] == 1 and (src_len - 1) // bs > self.top_k:
            return self._retrieve(q, k, v, masks.key_padding), None
        if not self.top_k:  # block by block: the Triton kernels on CUDA, the chunked PyTorch path elsewhere
            return landmark_blocks(q, k, v, bs, scale=self.scaling, key_padding_mask=masks.key_padding)[0], None
        is_mem = landmark_positions(src_len, bs, q.device)
        out = landmark_attention_formula(
            q, k, v, is_mem, bs, self.scaling, top_k=self.top_k, key_padding_mask=masks.key_padding
        )
        return out, None

    def _one_query(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The last position's query over unpadded keys in about 20 ops (a decoding step is host-bound): the
        grouped softmax is one softmax over every key once each earlier block's tokens carry
        ``s(L_b) + log_softmax_b(s)`` (so they share ``exp s(L_b)`` as ``p(L_b) · inner`` does) and its landmark
        ``-inf`` (the block's softmax runs with ``-inf`` added at the landmark, which that sum keeps).  Scores
        in the accumulation dtype, as the formula forms them."""
        bsz, heads, _, dim = q.shape
        kv_heads, src_len, bs = k.shape[1], k.shape[2], self.block_size
        acc = acc_dtype(q.dtype)
        group, rows = heads // kv_heads, bsz * kv_heads
        qg = q.to(acc).reshape(rows, group, dim)  # the query heads of each key head
        kt = k.to(acc).reshape(rows, src_len, dim).transpose(1, 2)
        zero, no_landmark = self._step_constants(q.device, acc)
        if torch.is_autocast_enabled(q.device.type):  # autocast would run the product in its lower precision
            with torch.autocast(q.device.type, enabled=False):
                s = torch.baddbmm(zero, qg, kt, beta=0.0, alpha=self.scaling)
        else:
            s = torch.baddbmm(zero, qg, kt, beta=0.0, alpha=self.scaling)  # (B·Hkv, g, S), scaled in the product
        earlier = (src_len - 1) // bs * bs  # keys of the complete earlier blocks
        if earlier:
            blocks = s[..., :earlier].unflatten(-1, (-1, bs))  # (B·Hkv, g, C, bs)
            gated = torch.log_softmax(blocks + no_landmark, dim=-1) + blocks[..., bs - 1 :]
            s = torch.cat([gated.flatten(-2), s[..., earlier:]], dim=-1)
        probs = torch.softmax(s, dim=-1)
        return torch.bmm(probs.to(v.dtype), v.reshape(rows, src_len, dim)).view(bsz, heads, 1, dim)

    def _step_constants(self, device, dtype: torch.dtype):
        """A zero to start the score product from and the row ``(bs,)`` of 0 with ``-inf`` at the landmark,
        made once per device and dtype."""
        key = (device, dtype)
        hit = self.__dict__.get("_step_consts")
        if hit is None or hit[0] != key:
            row = torch.zeros(self.block_size, device=device, dtype=dtype)
            row[-1] = float("-inf")
            hit = self.__dict__["_step_consts"] = (key, (torch.zeros((), device=device, dtype=dtype), row))
        return hit[1]

    def _retrieve(self, q: Tensor, k: Tensor, v: Tensor, kpm) -> Tensor:
        """One new query: score the landmarks, gather the top-k blocks and the current block, attend."""
        bsz, heads, _, dim = q.shape
        bs, src_len = self.block_size, k.shape[2]
        pos = src_len - 1
        cur = pos // bs
        dev = q.device
        marks = torch.arange(cur, device=dev) * bs + bs - 1  # landmarks of earlier blocks
        acc = acc_dtype(q.dtype)  # fp16 scores of large inputs would overflow: form them in fp32
        marks_k = repeat_kv(k[:, :, marks], heads).to(acc)
        scores = torch.matmul(q.to(acc), marks_k.transpose(-1, -2)).squeeze(2)  # (B, H, cur)
        if kpm is not None:
            scores = scores.masked_fill(kpm[:, None, marks], float("-inf"))
        sel = scores.topk(self.top_k, dim=-1).indices.sort(dim=-1).values  # (B, H, k), in position order
        blocks = (sel[..., None] * bs + torch.arange(bs, device=dev)).flatten(-2)
        here = torch.arange(cur * bs, src_len, device=dev).expand(bsz, heads, -1)
        P = torch.cat([blocks, here], dim=-1)  # (B, H, n) ascending positions
        group = heads // k.shape[1]
        kv_h = (torch.arange(heads, device=dev) // group)[None, :, None]
        b_i = torch.arange(bsz, device=dev)[:, None, None]
        ks, vs = k[b_i, kv_h, P], v[b_i, kv_h, P]  # (B, H, n, d)
        n = P.shape[-1]
        is_mem = torch.remainder(P + 1, bs) == 0
        sub_kpm = None if kpm is None else kpm[b_i, P].reshape(bsz * heads, n)
        out = landmark_attention_formula(
            q.reshape(bsz * heads, 1, 1, dim),
            ks.reshape(bsz * heads, 1, n, dim),
            vs.reshape(bsz * heads, 1, n, dim),
            is_mem.reshape(bsz * heads, n),
            bs,
            self.scaling,
            key_padding_mask=sub_kpm,
        )
        return out.view(bsz, heads, 1, dim)
