"""The naive baseline: unfused ``softmax(q kᵀ / √d) v`` with the scores materialised.

This is the baseline the CAB benchmark measured against (an unfused vanilla
attention).  It is kept inside the benchmark package on purpose and is *not*
registered as a mechanism: nobody should pick it for a model.  It computes the
full ``(B, H, T, S)`` score matrix through the shared
:func:`~efficient_attention.functional.dense_attention` (fp32 softmax for half
inputs), so its time and memory are O(T·S) -- quadratic in self attention.
Decoding uses the base class's key/value cache.
"""

from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from ..base import AttentionMasks, EfficientAttention
from ..capabilities import ALL_PATTERNS, Capabilities
from ..functional import dense_attention
from ..masks import merge_masks

__all__ = ["NaiveAttention", "NAIVE_NAME"]

NAIVE_NAME = "naive"


class NaiveAttention(EfficientAttention):
    """Unfused softmax attention (scores materialised), every pattern; benchmark baseline only."""

    capabilities = Capabilities(
        patterns=ALL_PATTERNS, incremental=True, attn_mask=True, additive_masks=True, backends=("torch",)
    )
    attention_name = NAIVE_NAME

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks, need_weights: bool
    ) -> Tuple[Tensor, Optional[Tensor]]:
        tgt_len, src_len = q.shape[2], k.shape[2]
        mask = merge_masks(
            tgt_len, src_len, key_padding_mask=masks.key_padding, attn_mask=masks.attn, dtype=q.dtype, device=q.device
        )
        out, _ = dense_attention(q, k, v, mask, causal=self.causal, scale=self.scaling)
        return out, None
