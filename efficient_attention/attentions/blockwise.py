"""Blockwise exact attention (memory-efficient / blockwise parallel) with fairseq's interface.

``softmax(q kᵀ/√d + mask) v`` computed in ``q_chunk_size x k_chunk_size``
chunks with an online softmax and a recomputing backward
(:func:`efficient_attention.sparse.blockwise.blockwise_attention`): the same
numbers as ``vanilla`` to fp rounding, activations ``O(N · chunk)`` instead of
``O(N²)``.  Time ``O(T · S · d)``.  It runs fused (``scaled_dot_product_attention``: FlashAttention
on CUDA), the chunk loop being the readable reference.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..base import AttentionMasks, EfficientAttention
from ..capabilities import ALL_PATTERNS, Capabilities
from ..functional import sdpa_attention
from ..masks import to_additive
from ..options import AttentionOptions, positive_int
from ..registry import register_attention
from ..sparse.blockwise import blockwise_attention

__all__ = ["BlockwiseAttention"]


@dataclass(frozen=True)
class BlockwiseOptions(AttentionOptions):
    q_chunk_size: int = positive_int(64, "queries per chunk")
    k_chunk_size: int = positive_int(64, "keys per chunk")


@register_attention("blockwise", "memory_efficient", "blockwise_parallel")
class BlockwiseAttention(EfficientAttention):
    """Exact attention in query / key chunks (online softmax, recomputation in backward).

    Patterns: all four.  Bool and additive ``attn_mask``, key padding,
    incremental decoding (key/value cache), grouped-query attention
    (``num_kv_heads``; the cache holds only the key/value heads).  Attention
    dropout in training switches to per-chunk ``torch.utils.checkpoint``.
    """

    capabilities = Capabilities(
        patterns=ALL_PATTERNS,
        incremental=True,
        attn_mask=True,
        additive_masks=True,
        key_padding_mask=True,
        grouped_kv=True,
        backends=("sdpa", "torch"),
    )
    Options = BlockwiseOptions

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks, need_weights: bool):
        kpm, attn = masks.key_padding, masks.attn
        if q.shape[2] == 1 and kpm is None and attn is None and not (self.training and self.dropout_p > 0):
            # one query (a decoding step; causal: the last position, it sees every key): one fused call,
            # not a block layout built for a single row of blocks
            return sdpa_attention(q, k, v, scale=self.scaling), None
        if kpm is not None and kpm.is_floating_point():  # additive key padding: one additive (B, 1|H, 1|T, S) mask
            add = kpm[:, None, None, :].to(q.dtype)
            attn = add if attn is None else to_additive(attn, q.dtype) + add
            kpm = None
        out = blockwise_attention(
            q,
            k,
            v,
            causal=self.causal,
            key_padding_mask=kpm,
            attn_mask=attn,
            scale=self.scaling,
            q_chunk_size=self.q_chunk_size,
            k_chunk_size=self.k_chunk_size,
            dropout_p=self.dropout_p if self.training else 0.0,
        )
        return out, None
