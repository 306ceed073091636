"""Drop-in PyTorch entry points for AttentionGrid users.

    from efficient_attention.sparse.attention_grid import (
        DilatedAttention, dynamic_sparse_attention, fused_landmark_attention, blockwise_compute_attn)

* ``dynamic_sparse_attention(q, k, v, q_idx, k_idx, sm_scale=None, sparsity_mode="hash")``
  on ``(BATCH, N_CTX, H, D_HEAD)`` tensors (an unknown mode raises a
  ``ValueError`` that is also a ``KeyError``);
* ``fused_landmark_attention(q, k, v, is_mem, sm_scale=None, block_size=64)``
  on ``(batch, nheads, seqlen, d)`` tensors;
* ``DilatedAttention(d_model, num_heads, dilation_rate, segment_size, dropout=0.0, causal=False)``:
  ``forward(x (batch, seq_len, d_model)) -> (batch, seq_len, d_model)``, built
  on the registered ``dilated`` mechanism (projections included);
* ``blockwise_compute_attn(query, key, value, bias=None, causal_mask=False,
  query_chunk_size=..., key_chunk_size=...)`` on ``(batch, seq, heads, dim)``.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..attentions.dilated import DilatedAttention as _Dilated
from .blockwise import blockwise_attention
from .dynamic import dynamic_sparse_attention, hash_sparse_attention, qk_sparse_attention
from .landmark import landmark_attention

__all__ = [
    "DilatedAttention",
    "dynamic_sparse_attention",
    "hash_sparse_attention",
    "qk_sparse_attention",
    "fused_landmark_attention",
    "blockwise_compute_attn",
]


def fused_landmark_attention(q: Tensor, k: Tensor, v: Tensor, is_mem: Tensor, sm_scale: Optional[float] = None,
                             block_size: int = 64) -> Tensor:
    """Landmark attention, AttentionGrid's argument order (see :func:`landmark_attention`)."""
    return landmark_attention(q, k, v, is_mem, block_size=block_size, sm_scale=sm_scale)


def blockwise_compute_attn(query: Tensor, key: Tensor, value: Tensor, bias: Optional[Tensor] = None,
                           causal_mask: bool = False, query_chunk_size: int = 64, key_chunk_size: int = 64) -> Tensor:
    """Blockwise exact attention on ``(batch, seq, heads, dim)``; ``bias`` is additive ``(1|B, 1|H, Tq, Tk)``."""
    out = blockwise_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=causal_mask, attn_mask=bias,
        q_chunk_size=query_chunk_size, k_chunk_size=key_chunk_size,
    )
    return out.transpose(1, 2)


class DilatedAttention(nn.Module):
    """LongNet dilated self-attention with AttentionGrid's constructor; batch-first in and out."""

    def __init__(self, d_model: int, num_heads: int, dilation_rate: int, segment_size: int, dropout: float = 0.0,
                 causal: bool = False):
        super().__init__()
        self.attention = _Dilated(
            d_model, num_heads, dropout=dropout, self_attention=True, causal=causal,
            segment_lengths=(segment_size,), dilation_rates=(dilation_rate,),
        )

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.attention(x, x, x, need_weights=False, batch_first=True)
        return out
