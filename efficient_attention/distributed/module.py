"""Module level: run a model's attention context-parallel with one call.

    with context_parallel(model, group):     # or enable_context_parallel(model, group)
        out = model(local_shard)             # every rank passes its contiguous shard of the sequence

Every supported mechanism module of ``model`` gets its ``_attend`` replaced (on
the instance; the class is untouched) by a context-parallel version:

=========================  =================================================
``LocalAttention``         halo exchange (:mod:`.window`), any window, causal or not, ``shared_qk``
``BlockSparseAttention``   ``layout="bigbird"`` with ``num_random_blocks=0`` (:mod:`.block_sparse`)
``Performer``              causal: exclusive prefix of the ``(m x d)`` states (:mod:`.linear`)
``S4D``                    causal: exclusive prefix of the recurrence states (:mod:`.linear`)
=========================  =================================================

Anything else (another mechanism, cross attention, a fairseq / PyTorch
``MultiheadAttention``) raises ``ValueError``: it would silently attend within
the shard only.  Positional encodings are the model's business: it must give
the shard its absolute positions.  Decoding step by step (``incremental_state``)
is not sharded; disable context parallelism for it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..attentions.block_sparse import BlockSparseAttention
from ..attentions.local import LocalAttention
from ..attentions.performer import Performer
from ..attentions.s4d import S4D
from ..base import AttentionMasks, EfficientAttention
from ..functional import acc_dtype, safe_divide
from .block_sparse import context_parallel_bigbird_attention
from .comm import Shards, _record
from .linear import context_parallel_causal_linear_attention, context_parallel_s4d_prefix, s4d_local_state
from .window import context_parallel_window_attention

logger = logging.getLogger(__name__)

__all__ = ["enable_context_parallel", "disable_context_parallel", "context_parallel", "supported_reason"]

_ATTR = "_context_parallel_group"


def _check_call(module: EfficientAttention, q: Tensor, k: Tensor, masks: AttentionMasks) -> None:
    name = type(module).__name__
    if masks.query_offset != 0 or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"context-parallel {name} runs full-sequence passes; it got {q.shape[2]} queries and "
            f"{k.shape[2]} keys (decode without context parallelism)"
        )
    if masks.attn is not None:
        raise ValueError(f"context-parallel {name} does not take an attn_mask (only key_padding_mask)")


# ------------------------------------------------------------------ adapters
def _local(module: LocalAttention, group, lengths, q, k, v, masks: AttentionMasks, need_weights: bool):
    _check_call(module, q, k, masks)
    if module.shared_qk:
        k = F.normalize(k, dim=-1)
    dropout = module.dropout_p if module.training else 0.0
    out, _ = context_parallel_window_attention(
        q,
        k,
        v,
        module.window,
        group,
        key_padding_mask=masks.key_padding,
        scale=module.scaling,
        lengths=lengths,
        dropout_p=dropout,
    )
    return out, None


def _bigbird(module: BlockSparseAttention, group, lengths, q, k, v, masks: AttentionMasks, need_weights: bool):
    _check_call(module, q, k, masks)
    if module.training and module.dropout_p > 0:
        raise ValueError("context-parallel BigBird does not implement attention dropout; build it with dropout=0")
    out, _ = context_parallel_bigbird_attention(
        q,
        k,
        v,
        module.block_size,
        group,
        num_window_blocks=module.num_window_blocks,
        num_global_blocks=module.num_global_blocks,
        causal=module.causal,
        key_padding_mask=masks.key_padding,
        scale=module.scaling,
        lengths=lengths,
    )
    return out, None


def _sync_features(module: Performer, shards: Shards) -> None:
    """Every rank must use the same random features: rank 0's, after each (re)draw."""
    if module._forwards_since_redraw == 1 and module.training:
        dist.broadcast(module.projection_matrix, shards.global_rank(0), group=shards.group)
        t = module.projection_matrix
        _record("broadcast", t.numel() * t.element_size() if shards.rank == 0 else 0)


def _performer(module: Performer, group, lengths, q, k, v, masks: AttentionMasks, need_weights: bool):
    _check_call(module, q, k, masks)
    shards = Shards.of(q.shape[2], group, lengths, device=q.device)
    module._maybe_redraw()
    _sync_features(module, shards)
    dtype = acc_dtype(q.dtype)
    qf = module._query_features(q)
    logits = module._key_logits(k, masks.key_padding)
    if logits.shape[2]:
        scale = logits.detach().amax(dim=(-1, -2))  # (B, H) per-rank stabiliser; -inf if all keys are padding
    else:
        scale = logits.new_full(logits.shape[:2], float("-inf"))
    kf = torch.exp(logits - torch.where(torch.isfinite(scale), scale, torch.zeros_like(scale))[..., None, None])
    num, den = context_parallel_causal_linear_attention(
        qf, kf, v.to(dtype), group, log_scale=scale, lengths=shards.lengths
    )
    return safe_divide(num, den).to(q.dtype), None


def _s4d(module: S4D, group, lengths, q, k, v, masks: AttentionMasks, need_weights: bool):
    from ..attentions.s4d import _scan  # the module's chunked scan, started from the state of the ranks before

    _check_call(module, q, k, masks)
    with torch.autocast(q.device.type, enabled=False):
        u = module._inputs(q, masks.key_padding)
        dt_a, c_bar = module._discrete(q.dtype)
        # the module works channel first, u (C, B, L) and states (C, B, n); the prefix helpers batch first
        local = s4d_local_state(u.transpose(0, 1), dt_a[0])
        x0 = context_parallel_s4d_prefix(local, dt_a[0], q.shape[2], group, lengths=lengths).transpose(0, 1)
        y, _ = _scan(u, dt_a[0], c_bar[0], x0, need_state=False)
        return module._finish(y, u, q), None


def supported_reason(module: nn.Module) -> Optional[str]:
    """Why ``module`` cannot run context-parallel (``None`` if it can; non-attention modules give ``None``)."""
    name = type(module).__name__
    if isinstance(module, EfficientAttention):
        if module.cross:
            return f"{name} is a cross attention (context parallelism shards self attention)"
        if isinstance(module, LocalAttention):
            return None
        if isinstance(module, BlockSparseAttention):
            if module.layout != "bigbird" or module.num_random_blocks != 0:
                return (
                    f"{name} has layout={module.layout!r} (random blocks: {module.num_random_blocks}); only "
                    f"layout='bigbird' with num_random_blocks=0 (a band plus global blocks) is context-parallel"
                )
            return None
        if isinstance(module, (Performer, S4D)):
            return None if module.causal else f"non-causal {name} is not context-parallel (causal only)"
        return f"{name} has no context-parallel implementation"
    if isinstance(module, nn.MultiheadAttention) or (
        name == "MultiheadAttention" and type(module).__module__.startswith("fairseq")
    ):
        return f"{type(module).__module__}.{name} would attend within the shard only"
    return None


_ADAPTERS: Tuple[Tuple[type, Callable[..., Any]], ...] = (
    (LocalAttention, _local),
    (BlockSparseAttention, _bigbird),
    (Performer, _performer),
    (S4D, _s4d),
)


def enable_context_parallel(
    model: nn.Module, group=None, *, lengths: Optional[Sequence[int]] = None
) -> List[EfficientAttention]:
    """Make every attention module of ``model`` run context-parallel over ``group``; returns those modules.

    ``lengths``: every rank's shard length, if fixed (else each call all-gathers them: 8 bytes a rank).
    Raises ``ValueError`` naming the first module that cannot (see :func:`supported_reason`).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("enable_context_parallel needs torch.distributed initialised (dist.init_process_group)")
    found = []
    for name, sub in model.named_modules():
        why = supported_reason(sub)
        if why is not None:
            raise ValueError(f"module {name or type(model).__name__!r}: {why}")
        if isinstance(sub, EfficientAttention):
            found.append(sub)
    if not found:
        raise ValueError(f"{type(model).__name__} holds no attention module that runs context-parallel")
    for sub in found:
        adapter = next(fn for cls, fn in _ADAPTERS if isinstance(sub, cls))
        # an instance attribute over the method: this module's _attend now attends across the ranks
        sub._attend = functools.partial(  # type: ignore[method-assign]
            adapter, sub, group, None if lengths is None else tuple(lengths)
        )
        setattr(sub, _ATTR, group if group is not None else dist.group.WORLD)
    logger.info("context parallelism on %d attention modules over %d ranks", len(found), dist.get_world_size(group))
    return found


def disable_context_parallel(model: nn.Module) -> None:
    """Undo :func:`enable_context_parallel` (the modules attend on one device again)."""
    for sub in model.modules():
        if hasattr(sub, _ATTR):
            del sub._attend
            delattr(sub, _ATTR)


@contextlib.contextmanager
def context_parallel(model: nn.Module, group=None, *, lengths: Optional[Sequence[int]] = None) -> Iterator[nn.Module]:
    """``with context_parallel(model, group): model(shard)``; restores single-device attention on exit."""
    enable_context_parallel(model, group, lengths=lengths)
    try:
        yield model
    finally:
        disable_context_parallel(model)
