"""Context-parallel causal linear attention and S4D: an exclusive prefix of small per-rank states.

Causal linear attention (Performer-style features ``qf, kf >= 0``)::

    num_i = qf_i · (S_<r + sum_{s_r <= j <= i} kf_j v_jᵀ),    den_i = qf_i · (z_<r + sum_{s_r <= j <= i} kf_j)

where ``S_<r = sum_{q < r} S_q`` and ``z_<r`` sum the states ``S_q = sum_j kf_j v_jᵀ``
``(m x dv)`` and ``z_q = sum_j kf_j`` ``(m)`` of the ranks before.  Each rank
computes its state, one all-gather shares them (``(m·dv + m + 1)`` numbers per
head and rank, independent of ``N``) and each rank adds the ones before it.
Feature maps stabilised by a per-rank log-scale (``kf = exp(logit - c_r)``) pass
``c_r``; the states are then rescaled to a common scale, so the result is exact.

S4D (diagonal linear recurrence ``x_l = λ x_{l-1} + u_l`` per channel and mode):
the state entering rank ``r`` is ``x_<r = sum_{q<r} λ^(s_r - e_q) x_q`` with ``x_q``
the state a zero-started scan of rank ``q``'s inputs ends in.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .comm import Shards, all_gather

__all__ = [
    "causal_linear_shard",
    "context_parallel_causal_linear_attention",
    "s4d_local_state",
    "context_parallel_s4d_prefix",
]


def causal_linear_shard(
    qf: Tensor, kf: Tensor, v: Tensor, kv0: Tensor, z0: Tensor, chunk: int = 64
) -> Tuple[Tensor, Tensor]:
    """Causal linear attention of one shard whose past is summarised by ``kv0 (B, H, m, dv)``, ``z0 (B, H, m)``.

    ``qf, kf (B, H, L, m)``, ``v (B, H, L, dv)``; queries aligned with keys.  By chunks of ``chunk``
    positions (masked ``(c, c)`` products inside, running sums across).  Returns ``(num (B, H, L, dv),
    den (B, H, L))``.
    """
    nums, dens, kv, z = [], [], kv0, z0
    for q_c, k_c, v_c in zip(qf.split(chunk, dim=-2), kf.split(chunk, dim=-2), v.split(chunk, dim=-2)):
        c = q_c.shape[-2]
        later = torch.ones(c, c, dtype=torch.bool, device=q_c.device).triu(1)
        intra = torch.matmul(q_c, k_c.transpose(-1, -2)).masked_fill(later, 0.0)
        nums.append(torch.matmul(intra, v_c) + torch.matmul(q_c, kv))
        dens.append(intra.sum(-1) + torch.matmul(q_c, z.unsqueeze(-1)).squeeze(-1))
        kv = kv + torch.matmul(k_c.transpose(-1, -2), v_c)
        z = z + k_c.sum(-2)
    if not nums:
        return qf.new_zeros(*qf.shape[:-1], v.shape[-1]), qf.new_zeros(qf.shape[:-1])
    return torch.cat(nums, dim=-2), torch.cat(dens, dim=-1)


def _weights(log_scale: Tensor, ref: Tensor) -> Tensor:
    """``exp(log_scale - ref)``, 0 where ``log_scale`` is ``-inf`` (a rank whose keys are all padding)."""
    safe_ref = torch.where(torch.isfinite(ref), ref, torch.zeros_like(ref))
    return torch.where(torch.isfinite(log_scale), torch.exp(log_scale - safe_ref), torch.zeros_like(log_scale))


def context_parallel_causal_linear_attention(
    qf: Tensor,
    kf: Tensor,
    v: Tensor,
    group=None,
    *,
    log_scale: Optional[Tensor] = None,
    lengths: Optional[Sequence[int]] = None,
    chunk: int = 64,
) -> Tuple[Tensor, Tensor]:
    """Causal linear attention over a sequence sharded across ``group``: ``(num, den)`` of the local queries.

    Args:
        qf, kf: ``(B, H, L_r, m)`` non-negative features of this rank's shard; v: ``(B, H, L_r, dv)``.
        log_scale: ``(B, H)``: the keys' features are ``exp(-log_scale)`` times the true ones (a per-rank
            stabiliser, no gradient; ``-inf`` when all keys are padding); default 0.

    Returns:
        ``num (B, H, L_r, dv)`` and ``den (B, H, L_r)``; the output is ``num / den`` (``safe_divide``).
    """
    if qf.shape != kf.shape or qf.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"qf, kf must be (B, H, L, m) and v (B, H, L, dv) alike, got {tuple(qf.shape)}, "
            f"{tuple(kf.shape)}, {tuple(v.shape)}"
        )
    shards = Shards.of(qf.shape[2], group, lengths, device=qf.device)
    bsz, heads, _, m = kf.shape
    dv = v.shape[-1]
    if log_scale is None:
        log_scale = kf.new_zeros(bsz, heads)
    log_scale = log_scale.detach().to(kf.dtype)
    state = torch.cat([torch.matmul(kf.transpose(-1, -2), v).flatten(-2), kf.sum(-2), log_scale[..., None]], -1)
    states = all_gather(state, shards)  # (P, B, H, m*dv + m + 1)
    before = states[: shards.rank]
    scales = torch.cat([before[..., -1].detach(), log_scale[None]], 0)  # (r + 1, B, H)
    ref = scales.amax(0)
    w = _weights(scales, ref)  # (r + 1, B, H)
    prefix = (w[:-1, ..., None] * before[..., :-1]).sum(0)  # (B, H, m*dv + m)
    kv0, z0 = prefix[..., : m * dv].view(bsz, heads, m, dv), prefix[..., m * dv :]
    return causal_linear_shard(qf, kf * w[-1][..., None, None], v, kv0, z0, chunk)


def s4d_local_state(u: Tensor, dt_a: Tensor, chunk: int = 1024) -> Tensor:
    """The state ``sum_j λ^(L-1-j) u_j`` ``(B, C, n)`` complex that a zero-started scan of ``u (B, C, L)`` ends in.

    ``λ = exp(dt_a)``, ``dt_a (C, n)`` complex; computed by chunks of positions (memory ``O(C·n·chunk)``).
    """
    length = u.shape[-1]
    x = torch.zeros(u.shape[0], u.shape[1], dt_a.shape[-1], dtype=dt_a.dtype, device=u.device)
    for begin in range(0, length, chunk):
        part = u[..., begin : begin + chunk]
        power = torch.arange(length - 1 - begin, length - 1 - begin - part.shape[-1], -1, device=u.device)
        lam = torch.exp(dt_a[..., None] * power.to(dt_a.real.dtype))  # (C, n, c)
        x = x + torch.complex(
            torch.einsum("bcj,cnj->bcn", part, lam.real), torch.einsum("bcj,cnj->bcn", part, lam.imag)
        )
    return x


def context_parallel_s4d_prefix(
    x_local: Tensor, dt_a: Tensor, local_len: int, group=None, *, lengths: Optional[Sequence[int]] = None
) -> Tensor:
    """The S4D state entering this rank's shard: ``sum_{q<r} λ^(s_r - e_q) x_q`` ``(B, C, n)`` complex.

    ``x_local`` is :func:`s4d_local_state` of this rank's ``local_len`` inputs; ``dt_a (C, n)`` complex.
    One all-gather of the ``(B, C, n)`` complex states.
    """
    shards = Shards.of(local_len, group, lengths, device=x_local.device)
    states = torch.view_as_complex(all_gather(torch.view_as_real(x_local), shards))  # (P, B, C, n)
    start = shards.start(shards.rank)
    gaps = torch.tensor([start - shards.span(q)[1] for q in range(shards.rank)], device=x_local.device)
    decay = torch.exp(dt_a * gaps.to(dt_a.real.dtype)[:, None, None])  # (r, C, n)
    # a sum over an empty slice on rank 0: the gathered states are still used, so every rank runs the backward
    return (decay[:, None] * states[: shards.rank]).sum(0)
