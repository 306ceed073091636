"""Local attention on per-head tensors, with lucidrains' ``local-attention`` API.

    from efficient_attention.compat.local_attention import LocalAttention, LocalTransformer

(``efficient_attention.local_attention``, the older path, re-exports this package.)

``LocalAttention(window_size, causal, look_backward, look_forward, dropout,
shared_qk, dim, autopad, exact_windowsize, ...)(q, k, v, mask=None)`` on
``(..., N, D)`` tensors, and ``LocalTransformer`` with ``generate``.  This
``LocalAttention`` (an alias of :class:`PerHeadLocalAttention`, kept under
lucidrains' name) is the per-head function-like module; the fairseq-style
registered mechanism is :class:`efficient_attention.LocalAttention`.  Both use
the one window rule in :mod:`efficient_attention.local_window`.
"""

from .attention import LocalAttention, PerHeadLocalAttention
from .rotary import RotaryEmbedding
from .transformer import FeedForward, LocalMHA, LocalTransformer, top_k

__all__ = [
    "PerHeadLocalAttention",
    "LocalAttention",
    "LocalTransformer",
    "LocalMHA",
    "FeedForward",
    "RotaryEmbedding",
    "top_k",
]
