"""Context-parallel BigBird-style block-sparse attention: a block band plus global blocks.

The layout is :func:`efficient_attention.layouts.bigbird_layout` without random
blocks: query block ``qb`` sees key block ``kb`` iff ``|kb - qb| <= w // 2``
(causal: ``qb - w < kb <= qb``), or either is one of the first ``ng`` blocks;
causal also hides keys after the query.  With ``G = ng * bs`` global positions
it is the union of three disjoint parts, each exact, merged by their
log-sum-exp (:func:`efficient_attention.functional.combine_attention`):

* the **band** as a sliding window of group ``bs`` (halo exchange,
  :func:`~.window.context_parallel_window_attention`), keys ``< G`` hidden;
* the **global columns**: every query against the ``G`` global keys, which are
  fetched once from their owners (``G * B * Hkv * (d_k + d_v)`` elements);
* the **global rows** (non-causal only; causal global rows only see keys
  ``< G``, already covered): the ``G`` global queries are fetched too, every
  rank attends them to its own keys, and the partial ``(out, lse)`` go to the
  owners of those queries, which merge them -- ``G * (d + 1)`` elements a rank.

Random blocks would reach arbitrary remote keys, so they are refused.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..functional import acc_dtype, combine_attention, dense_attention, repeat_kv, softmax
from ..local_window import LocalWindow
from .comm import Shards, exchange, plan_fetch, plan_to_owners
from .window import context_parallel_window_attention

__all__ = ["bigbird_band", "context_parallel_bigbird_attention"]


def bigbird_band(block_size: int, num_window_blocks: int, causal: bool) -> LocalWindow:
    """The band of :func:`~efficient_attention.layouts.bigbird_layout` as a :class:`LocalWindow` of group ``bs``."""
    if causal:
        return LocalWindow(block_size, (num_window_blocks - 1) * block_size, 0, True)
    half = (num_window_blocks // 2) * block_size
    return LocalWindow(block_size, half, half, False)


def _attend_with_lse(q: Tensor, k: Tensor, v: Tensor, hidden: Optional[Tensor], scale: Optional[float]):
    """Dense attention over a few keys: ``(out, lse)``; ``hidden`` broadcasts to ``(B, H, T, S)``, True = masked."""
    v = repeat_kv(v, q.shape[1])
    _, scores = dense_attention(q, k, v, hidden, scale=scale, before_softmax=True)
    lse = torch.logsumexp(scores.to(acc_dtype(scores.dtype)), dim=-1)
    return torch.matmul(softmax(scores).to(v.dtype), v), lse


def context_parallel_bigbird_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_size: int,
    group=None,
    *,
    num_window_blocks: int = 3,
    num_global_blocks: int = 1,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    lengths: Optional[Sequence[int]] = None,
) -> Tuple[Tensor, Tensor]:
    """BigBird (band + global blocks, no random blocks) over a sequence sharded across ``group``.

    Args:
        q, k, v: ``(B, H, L_r, d)`` / ``(B, Hkv, L_r, d)``, this rank's contiguous shard.
        block_size, num_window_blocks, num_global_blocks, causal: the layout
            (:func:`~efficient_attention.layouts.bigbird_layout` with ``num_random_blocks=0``).
        key_padding_mask: ``(B, L_r)`` bool, True = padding.

    Returns:
        ``(out (B, H, L_r, dv), lse (B, H, L_r))`` for the local queries.
    """
    for name, value in (("block_size", block_size), ("num_window_blocks", num_window_blocks)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(num_global_blocks, bool) or not isinstance(num_global_blocks, int) or num_global_blocks < 0:
        raise ValueError(f"num_global_blocks must be a non-negative integer, got {num_global_blocks!r}")
    shards = Shards.of(q.shape[2], group, lengths, device=q.device)
    start, stop = shards.span(shards.rank)
    n_glob = min(num_global_blocks * block_size, shards.total)
    band = bigbird_band(block_size, num_window_blocks, causal)
    out, lse = context_parallel_window_attention(
        q, k, v, band, key_padding_mask=key_padding_mask, scale=scale, hide_before=n_glob, shards=shards
    )
    if n_glob == 0:
        return out, lse
    bsz, heads = q.shape[:2]
    dk, dv = k.shape[-1], v.shape[-1]
    # the global positions' keys, values, padding (and queries when not causal), fetched from their owners
    fetch = plan_fetch(shards, [(0, n_glob)] * shards.world)
    kv_g = exchange(torch.cat([k, v.to(k.dtype)], dim=-1), shards, fetch, "global_kv")
    k_g, v_g = kv_g[..., :dk], kv_g[..., dk:].to(v.dtype)
    kpm_g = None
    if key_padding_mask is not None:
        kpm_g = exchange(key_padding_mask.bool()[:, None, :, None], shards, fetch, "global_mask")[:, 0, :, 0]
    # global columns: local queries (positions start..) against keys 0..n_glob-1
    hidden = None if kpm_g is None else kpm_g[:, None, None, :]
    if causal:
        later = torch.arange(n_glob, device=q.device)[None, :] > torch.arange(start, stop, device=q.device)[:, None]
        hidden = later if hidden is None else hidden | later
    out_c, lse_c = _attend_with_lse(q, k_g, v_g, hidden, scale)
    out, lse = combine_attention([out, out_c], [lse, lse_c])
    if causal:
        return out, lse
    # global rows: every rank attends the global queries to its own keys; owners merge the partials
    q_g = exchange(q, shards, fetch, "global_q")
    hidden = None if key_padding_mask is None else key_padding_mask.bool()[:, None, None, :]
    out_p, lse_p = _attend_with_lse(q_g, k, v, hidden, scale)
    part = torch.cat([out_p.to(lse_p.dtype), lse_p[..., None]], dim=-1)  # (B, H, n_glob, dv + 1)
    mine = exchange(part, shards, plan_to_owners(shards, (0, n_glob)), "global_rows")
    n_own = max(0, min(stop, n_glob) - start)  # 0 rows on most ranks; still used, so every rank runs its backward
    mine = mine.view(bsz, heads, shards.world, n_own, dv + 1)
    row_out, row_lse = combine_attention(
        [m[..., :dv].to(out.dtype) for m in mine.unbind(2)], [m[..., dv] for m in mine.unbind(2)]
    )
    out = torch.cat([row_out, out[:, :, n_own:]], dim=2)
    lse = torch.cat([row_lse.to(lse.dtype), lse[:, :, n_own:]], dim=2)
    return out, lse
