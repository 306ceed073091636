"""Exact softmax attention: fairseq's ``MultiheadAttention``, the baseline.

``softmax(q kᵀ / √d + mask) v`` in every pattern.  Without weights it runs on
``scaled_dot_product_attention`` (fused kernels, O(N) memory on the flash /
memory-efficient backends); with weights or ``before_softmax`` it materialises
the ``(B, H, T, S)`` scores, softmax in fp32.  Cost: O(T·S·d) time.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..base import AttentionMasks, EfficientAttention
from ..capabilities import ALL_PATTERNS, Capabilities
from ..functional import dense_attention, repeat_kv, sdpa_attention
from ..masks import merge_masks
from ..registry import register_attention

__all__ = ["MultiheadAttention"]


@register_attention("vanilla", "multihead", "softmax")
class MultiheadAttention(EfficientAttention):
    """Multi-head softmax attention, numerically fairseq's ``MultiheadAttention``.

    Patterns: all four.  Supports every fairseq option (``add_bias_kv``,
    ``add_zero_attn``, ``kdim``/``vdim``, ``before_softmax``, weights), bool and
    additive masks, incremental decoding with a key/value cache, and
    multi-query / grouped-query attention through ``num_kv_heads`` (the cache
    then stores only the key/value heads).
    """

    capabilities = Capabilities(
        patterns=ALL_PATTERNS,
        incremental=True,
        attn_mask=True,
        additive_masks=True,
        need_weights=True,
        before_softmax=True,
        bias_kv=True,
        grouped_kv=True,
        independent_queries=True,
        backends=("sdpa", "torch"),
    )

    def _with_extra_kv(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool):
        """Append fairseq's learned (``add_bias_kv``) and zero (``add_zero_attn``) keys.

        They are visible to every query, so the causal mask is merged first.
        """
        if self.bias_k is None and not self.add_zero_attn:
            return k, v, mask, causal
        bsz, tgt_len, src_len = q.shape[0], q.shape[2], k.shape[2]
        if causal:
            mask = merge_masks(tgt_len, src_len, attn_mask=mask, causal=True, dtype=q.dtype, device=q.device)
        extra_k, extra_v = [], []
        if self.bias_k is not None and self.bias_v is not None:
            shape = (bsz, self.num_kv_heads, 1, self.head_dim)
            extra_k.append(self.bias_k.view(1, self.num_kv_heads, 1, self.head_dim).expand(shape).to(k.dtype))
            extra_v.append(self.bias_v.view(1, self.num_kv_heads, 1, self.head_dim).expand(shape).to(v.dtype))
        if self.add_zero_attn:
            extra_k.append(k.new_zeros(bsz, self.num_kv_heads, 1, self.head_dim))
            extra_v.append(v.new_zeros(bsz, self.num_kv_heads, 1, self.head_dim))
        k = torch.cat([k, *extra_k], dim=2)
        v = torch.cat([v, *extra_v], dim=2)
        if mask is not None:
            mask = F.pad(mask, (0, len(extra_k)), value=False if mask.dtype == torch.bool else 0.0)
        return k, v, mask, False

    def _masks_and_kv(self, q, k, v, masks: AttentionMasks):
        tgt_len, src_len = q.shape[2], k.shape[2]
        mask = merge_masks(
            tgt_len, src_len, key_padding_mask=masks.key_padding, attn_mask=masks.attn, dtype=q.dtype, device=q.device
        )
        return self._with_extra_kv(q, k, v, mask, self.causal)

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks, need_weights: bool
    ) -> Tuple[Tensor, Optional[Tensor]]:
        k, v, mask, causal = self._masks_and_kv(q, k, v, masks)
        dropout = self.dropout_p if self.training else 0.0
        if need_weights:
            return dense_attention(
                q, k, v, mask, causal=causal, scale=self.scaling, dropout_p=dropout, training=self.training
            )
        return sdpa_attention(q, k, v, mask, causal=causal, scale=self.scaling, dropout_p=dropout), None

    def _scores(self, q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks) -> Tuple[Tensor, Tensor]:
        k, v, mask, causal = self._masks_and_kv(q, k, v, masks)
        v, scores = dense_attention(q, k, v, mask, causal=causal, scale=self.scaling, before_softmax=True)
        return scores, repeat_kv(v, self.num_heads)
