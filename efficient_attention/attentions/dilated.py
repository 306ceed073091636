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

from typing import Tuple

from torch import Tensor

from ..base import AttentionMasks, EfficientAttention
from ..capabilities import SELF_PATTERNS, Capabilities
from ..registry import register_attention
from ..sparse.dilated import check_dilated_config, dilated_attention

__all__ = ["DilatedAttention"]


def _int_tuple(value, name: str) -> Tuple[int, ...]:
    if value is None:
        raise ValueError(f"{name} must be given: a comma-separated list or a sequence of positive integers")
    if isinstance(value, str):
        try:
            return tuple(int(x) for x in value.replace(" ", "").strip("()[]").split(",") if x)
        except ValueError:
            raise ValueError(f"{name} must be a comma-separated list of integers, got {value!r}") from None
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    return tuple(value)


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
        patterns=SELF_PATTERNS, incremental=True, key_padding_mask=True, grouped_kv=True,
        backends=("kernels", "torch"),
    )
    option_help = {
        "segment_lengths": "segment length w_i of each branch (comma-separated list)",
        "dilation_rates": "dilation r_i of each branch (same count as segment_lengths)",
    }

    def __init__(self, *args, segment_lengths: Tuple[int, ...] = (64, 128, 256),
                 dilation_rates: Tuple[int, ...] = (1, 2, 4), **kwargs):
        super().__init__(*args, **kwargs)
        self.segment_lengths, self.dilation_rates = check_dilated_config(
            _int_tuple(segment_lengths, "segment_lengths"), _int_tuple(dilation_rates, "dilation_rates")
        )

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks, need_weights: bool):
        out = dilated_attention(
            q, k, v, self.segment_lengths, self.dilation_rates, causal=self.causal,
            key_padding_mask=masks.key_padding, scale=self.scaling, q_offset=masks.query_offset,
            dropout_p=self.dropout_p if self.training else 0.0,
        )
        return out, None
