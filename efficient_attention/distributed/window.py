"""Context-parallel sliding-window attention by halo exchange.

Rank ``r`` holds the queries, keys and values of positions ``[s_r, e_r)``.  Its
queries see (the :class:`~efficient_attention.local_window.LocalWindow` rule,
``lo``/``hi`` monotone in the position) only keys in::

    [a_r, b_r) = [g * floor(max(0, lo(s_r)) / g),  min(N, hi(e_r - 1) + 1))     (b_r = e_r if causal)

so it fetches ``[a_r, s_r)`` and ``[e_r, b_r)`` from the ranks that own them --
one hop, or several when the window spans several shards -- in one
``batch_isend_irecv`` (keys, values and, if given, the key padding), and runs
the single-device window kernel on the buffer ``[a_r, b_r)`` with
``q_offset = s_r - a_r``.  ``a_r`` is a multiple of the window group, so the
blocks of the buffer are the blocks of the sequence.  Traffic per rank:
``(left + right) * B * Hkv * (d_k + d_v)`` elements, independent of ``N``.
Backward sends the halo's key/value gradients back to their owners.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..kernels import sliding_window_attention
from ..local_window import LocalWindow
from ..sparse.window import attend_self_where_empty
from .comm import Shards, exchange, plan_fetch

__all__ = ["window_key_range", "context_parallel_window_attention"]


def window_key_range(window: LocalWindow, start: int, stop: int, total: int) -> Tuple[int, int]:
    """The absolute key range ``[a, b)`` that the queries ``[start, stop)`` of a ``total``-long sequence need."""
    if stop <= start:
        return start, start
    g = window.group
    lo = int(window.lo(torch.tensor(start)))
    a = (max(0, lo) // g) * g
    b = stop if window.causal else min(total, int(window.hi(torch.tensor(stop - 1))) + 1)
    return a, b


def _check(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor]) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-D (B, H, L_local, d) tensor")
    if q.shape[2] != k.shape[2] or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"context parallelism shards self attention: q, k, v must hold the same positions, got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if key_padding_mask is not None and key_padding_mask.shape != (q.shape[0], q.shape[2]):
        raise ValueError(
            f"key_padding_mask must be (B, L_local) = {(q.shape[0], q.shape[2])}, got {tuple(key_padding_mask.shape)}"
        )


def context_parallel_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: LocalWindow,
    group=None,
    *,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    lengths: Optional[Sequence[int]] = None,
    hide_before: int = 0,
    dropout_p: float = 0.0,
    shards: Optional[Shards] = None,
) -> Tuple[Tensor, Tensor]:
    """Sliding-window attention over a sequence sharded across ``group``; returns ``(out, lse)`` for the local queries.

    Args:
        q, k, v: ``(B, H, L_r, d)`` / ``(B, Hkv, L_r, d)``: this rank's contiguous shard (ranks in order).
        window: the band rule (absolute positions); ``exclude_self`` gets the ``shared_qk`` fallback.
        group: the ``torch.distributed`` process group (``None``: the default group).
        key_padding_mask: ``(B, L_r)`` bool, True = padding (exchanged with the halo).
        lengths: every rank's ``L_r`` if known (else one tiny all-gather finds them).
        hide_before: keys at absolute positions ``< hide_before`` are not attended (BigBird's global
            keys, attended separately).
        dropout_p: attention dropout (the kernels' reference path applies it).

    Returns:
        ``out (B, H, L_r, dv)`` and ``lse (B, H, L_r)`` (fp32 for half inputs; ``-inf`` where nothing is visible).
    """
    _check(q, k, v, key_padding_mask)
    if not isinstance(window, LocalWindow):
        raise TypeError(f"window must be a LocalWindow, got {type(window).__name__}")
    shards = shards or Shards.of(q.shape[2], group, lengths, device=q.device)
    need = [window_key_range(window, *shards.span(r), shards.total) for r in range(shards.world)]
    plan = plan_fetch(shards, need)
    a, b = need[shards.rank]
    start = shards.start(shards.rank)
    dk = k.shape[-1]
    kv = exchange(torch.cat([k, v.to(k.dtype)], dim=-1), shards, plan, "halo_kv")
    k_buf, v_buf = kv[..., :dk], kv[..., dk:].to(v.dtype)
    kpm = None
    if key_padding_mask is not None:
        kpm = exchange(key_padding_mask.bool()[:, None, :, None], shards, plan, "halo_mask")[:, 0, :, 0]
    if hide_before > a:
        hidden = torch.arange(a, b, device=q.device) < hide_before
        kpm = hidden.expand(q.shape[0], -1) if kpm is None else kpm | hidden
    q_offset = start - a
    if k_buf.shape[2] == 0 or q.shape[2] == 0:
        out = q.new_zeros(*q.shape[:3], v.shape[-1])
        lse = torch.full(
            q.shape[:3],
            float("-inf"),
            device=q.device,
            dtype=torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype,
        )
        return out, lse
    out, lse = sliding_window_attention(
        q, k_buf, v_buf, window, q_offset=q_offset, key_padding_mask=kpm, scale=scale, dropout_p=dropout_p
    )
    if window.exclude_self:
        out = attend_self_where_empty(out, lse, v_buf, q_offset, kpm)
    return out, lse
