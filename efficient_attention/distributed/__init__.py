"""Context parallelism on ``torch.distributed``: the sequence split across the ranks of a process group.

Each rank holds a contiguous shard of the sequence (ranks in order; lengths may
differ).  Attention that only looks a bounded distance away, or through a small
state, needs only a little from the other ranks:

* :func:`context_parallel_window_attention` -- sliding / block-local windows by
  halo exchange: ``O(W·d)`` bytes a rank, independent of the sequence length;
* :func:`context_parallel_bigbird_attention` -- a block band plus global blocks;
* :func:`context_parallel_causal_linear_attention` and
  :func:`context_parallel_s4d_prefix` -- an exclusive prefix of ``O(m·d)`` states;
* :func:`context_parallel` / :func:`enable_context_parallel` -- the same for the
  mechanism modules of a model (``LocalAttention``, BigBird ``BlockSparseAttention``,
  causal ``Performer`` and ``S4D``);
* :func:`count_bytes` -- what a rank sends.

Everything is differentiable and exact (equal to the single-process result up to
rounding).  See ``docs/distributed.md``.
"""

from .block_sparse import bigbird_band, context_parallel_bigbird_attention
from .comm import ByteCount, Shards, count_bytes
from .linear import (
    causal_linear_shard,
    context_parallel_causal_linear_attention,
    context_parallel_s4d_prefix,
    s4d_local_state,
)
from .module import context_parallel, disable_context_parallel, enable_context_parallel, supported_reason
from .window import context_parallel_window_attention, window_key_range

__all__ = [
    "ByteCount",
    "Shards",
    "bigbird_band",
    "causal_linear_shard",
    "context_parallel",
    "context_parallel_bigbird_attention",
    "context_parallel_causal_linear_attention",
    "context_parallel_s4d_prefix",
    "context_parallel_window_attention",
    "count_bytes",
    "disable_context_parallel",
    "enable_context_parallel",
    "s4d_local_state",
    "supported_reason",
    "window_key_range",
]
