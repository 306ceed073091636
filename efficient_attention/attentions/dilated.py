"""LongNet dilated attention with fairseq's interface.

For each ``(w_i, r_i)``: attention inside segments of length ``w_i`` among
every ``r_i``-th position (head ``h`` at offset ``h mod r_i``); the branches
are merged by the exact softmax of their union (weights ∝ each branch's
softmax denominator, overlapping pairs counted once), see
:func:`efficient_attention.sparse.dilated.dilated_attention`.
Cost ``O(Σ_i N · w_i / r_i² · d)``.  The union is one block mask (the segments'
diagonal blocks with their dilation patterns as token tiles) computed by the block-sparse
C++ / Triton kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from torch import Tensor

from ..base import AttentionMasks, EfficientAttention
from ..capabilities import SELF_PATTERNS, Capabilities
from ..options import AttentionOptions, positive_int
from ..registry import register_attention
from ..sparse.dilated import check_dilated_config, dilated_attention

__all__ = ["DilatedAttention"]


@dataclass(frozen=True)
class DilatedOptions(AttentionOptions):
    segment_lengths: Tuple[int, ...] = positive_int(
        (64, 128, 256), "segment length w_i of each branch (comma-separated list)"
    )
    dilation_rates: Tuple[int, ...] = positive_int(
        (1, 2, 4), "dilation r_i of each branch (same count as segment_lengths)"
    )


@register_attention("dilated", "longnet", "dilated_attention")
class DilatedAttention(EfficientAttention):
    """LongNet's dilated attention: segments × dilations, merged by the exact softmax union.

    Patterns: noncausal and causal self attention.  Key padding,
    grouped-query attention (``num_kv_heads``), incremental decoding (a
    key/value cache; a step computes only the segments holding the new
    queries, ``O(Σ w_i / r_i)`` per token).  A query that no branch selects
    (only possible when every rate is > 1) outputs 0.
    """

    capabilities = Capabilities(
        patterns=SELF_PATTERNS,
        incremental=True,
        key_padding_mask=True,
        grouped_kv=True,
        backends=("kernels", "torch"),
    )
    Options = DilatedOptions

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.segment_lengths, self.dilation_rates = check_dilated_config(self.segment_lengths, self.dilation_rates)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks, need_weights: bool):
        out = dilated_attention(
            q,
            k,
            v,
            self.segment_lengths,
            self.dilation_rates,
            causal=self.causal,
            key_padding_mask=masks.key_padding,
            scale=self.scaling,
            q_offset=masks.query_offset,
            dropout_p=self.dropout_p if self.training else 0.0,
        )
        return out, None
