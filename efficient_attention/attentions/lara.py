"""LARA (Zheng et al., 2022): linear randomized attention with importance sampling on C proposals.

Each proposal ``c`` (a Gaussian centred at ``μ_c``, the sum of the query and key segment means)
gives a self-normalised estimate ``Σ_m ξ(k_m, ω_c) v_m / Σ_m ξ(k_m, ω_c)``; the query mixes them
with importance weights ``softmax_c(μ_c·q + log ξ(q, ω_c) + log Σ_m ξ(k_m, ω_c) - log ξ(μ_c, ω_c))``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..base import AttentionMasks, EfficientAttention
from ..capabilities import Capabilities, Pattern
from ..functional import LengthChunks, acc_dtype, copy_into_layout, dense_strides, segment_weights, softmax, take_inputs
from ..options import AttentionOptions, positive_int
from ..registry import register_attention

__all__ = ["Lara", "LARA"]

logger = logging.getLogger(__name__)


class _LaraEven(torch.autograd.Function):
    """:meth:`Lara._attend_even` as one autograd node: the forward keeps only the inputs as given (half inputs
    stay half: their fp32 copies are made again in the backward, an exact widening) and the ``(C, L)`` key and
    proposal probabilities, and the backward runs the reverse mode by hand (about a fifth of the ops autograd
    records over the same products, and none of its fp32 ``(L, d)`` copies)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, noise: Optional[Tensor], c: int) -> Tensor:
        bsz, heads, length, d = q.shape
        dtype, batch, seg = acc_dtype(q.dtype), bsz * heads, length // c
        scale = d**-0.25
        chunks = LengthChunks(batch, length, q.device)

        def wide(x: Tensor) -> Tensor:
            return chunks.widen(x, dtype)

        # segment means of q' + k' (B·H, C, d), summed in the accumulation dtype without an (L, d) copy
        mu = torch.add(*(x.flatten(0, 1).unflatten(1, (c, seg)).sum(-2, dtype=dtype) for x in (q, k)))
        mu = mu.mul_(scale / seg)
        omega = mu if noise is None else mu + noise
        k32 = wide(k)
        sq_k = torch.linalg.vector_norm(k32, dim=-1).square_().unsqueeze(1)  # |k|² (B·H·n, 1, l), no (l, d) temp
        log_k = torch.baddbmm(sq_k, chunks.repeat(omega), k32.transpose(1, 2), beta=-0.5 * scale * scale, alpha=scale)
        del k32, sq_k
        log_norm = torch.logsumexp(chunks.per_batch(log_k), dim=(1, 3), keepdim=True)  # (B·H, 1, C, 1)
        probs = chunks.per_batch(log_k).sub_(log_norm).exp_().flatten(0, 1)  # key softmax per proposal (B·H·n, C, l)
        kv = chunks.total(torch.bmm(probs, wide(v)))  # (B·H, C, d)
        log_mu = (torch.sub(omega, mu, alpha=0.5) * mu).sum(-1, keepdim=True)  # log ξ(μ_c, ω_c) (B·H, C, 1)
        bias = log_norm.view(batch, c, 1) - log_mu
        both = torch.add(mu, omega).mul_(scale)  # (μ + ω)·s, also the backward's for dq
        log_ratio = torch.baddbmm(chunks.repeat(bias), chunks.repeat(both), wide(q).transpose(1, 2))
        importance = torch.softmax(log_ratio, dim=-2)  # over proposals c (B·H·n, C, l)
        del log_ratio
        out = torch.bmm(importance.transpose(1, 2), chunks.repeat(kv))  # (B·H·n, l, d)
        # the inputs ride on ctx rather than in save_for_backward so that the backward can drop each one once it
        # has read it (saved tensors live until the backward returns; inputs on ctx make no reference cycle)
        ctx.save_for_backward(omega, both, kv, probs, importance)
        ctx.c, ctx.q, ctx.k, ctx.v = c, q, k, v
        return copy_into_layout(out, q.shape, dense_strides(q), q.dtype)  # time-first: heads merge as a view

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        with torch.autocast(grad.device.type, enabled=False):  # fp32 as in the forward, whatever the caller's state
            return _LaraEven.grads(ctx, grad)

    @staticmethod
    def grads(ctx, grad: Tensor):
        omega, both, kv, probs, importance = ctx.saved_tensors
        q, k, v = take_inputs(ctx, "q", "k", "v")
        strides = [dense_strides(x) for x in (q, k, v)]
        dq_dtype, dk_dtype, dv_dtype = q.dtype, k.dtype, v.dtype
        bsz, heads, length, d = q_shape = q.shape
        c = ctx.c
        dtype, batch, seg = acc_dtype(q.dtype), bsz * heads, length // c
        scale = d**-0.25
        chunks = LengthChunks(batch, length, q.device)

        def wide(x: Tensor) -> Tensor:
            return chunks.widen(x, dtype)

        # the (C, L) and (C, d) gradients first, then dk, dq and dv one at a time (each (L, d) fp32 gradient
        # is narrowed as soon as it is complete: at most two fp32 (L, d) tensors live at once)
        g = wide(grad)
        d_kv = chunks.total(torch.bmm(importance, g))  # (B·H, C, d)
        d_ratio = torch.bmm(chunks.repeat(kv), g.transpose(1, 2))  # d importance (B·H·n, C, l)
        del g
        d_ratio = torch.ops.aten._softmax_backward_data(d_ratio, importance, -2, dtype)
        d_bias = chunks.per_batch(d_ratio).sum((1, 3)).unsqueeze(-1)  # (B·H, C, 1): d log_norm = -d log_mu
        d_both = chunks.total(torch.bmm(d_ratio, wide(q)))  # (B·H, C, d), without its factor s
        del q  # read for the last time: released before the (L, d) gradients are made
        d_probs = torch.bmm(chunks.repeat(d_kv), wide(v).transpose(1, 2))  # (B·H·n, C, l)
        del v
        # key softmax and its log-normaliser: d log_k = P (dP - Σ_m P dP + d log_norm), Σ_m P dP = kv·d_kv
        shift = d_bias - (kv * d_kv).sum(-1, keepdim=True)
        d_log_k = d_probs.add_(chunks.repeat(shift)).mul_(probs)  # (B·H·n, C, l)
        d_omega = chunks.total(torch.bmm(d_log_k, wide(k)))  # (B·H, C, d) through log ξ(k_m, ω_c), without s
        # ω = μ + noise, so d μ = d ω + the direct terms: μ + ω (twice d_both), and log ξ(μ, ω) = ω·μ - |μ|²/2
        # entering with -d_bias (∂/∂μ + ∂/∂ω = ω); then the segment mean's s / seg
        d_mu = d_omega.add_(d_both, alpha=2).mul_(scale * scale / seg).addcmul_(d_bias, omega, value=-scale / seg)
        d_mu = d_mu.unsqueeze(2)  # every position of a segment gets its mean's gradient

        # |k'|²/2: -s² Σ_c d log_k · k, added from k as given (no fp32 copy of k next to dk's)
        dk = torch.bmm(d_log_k.transpose(1, 2), chunks.repeat(omega * scale)).view(batch, length, d)
        dk.addcmul_(k.flatten(0, 1), d_log_k.sum(1).view(batch, length, 1), value=-scale * scale)
        del k, d_log_k
        dk = copy_into_layout(dk.view(batch, c, seg, d).add_(d_mu), q_shape, strides[1], dk_dtype)
        dq = torch.bmm(d_ratio.transpose(1, 2), chunks.repeat(both))
        dq = copy_into_layout(dq.view(batch, c, seg, d).add_(d_mu), q_shape, strides[0], dq_dtype)
        # dv last, as one product in v's dtype (fp32 accumulation; for half inputs no fp32 (L, d) copy next to
        # dk's and dq's): P in half rounds each of its C terms once, as the output's own rounding does
        half = dv_dtype if dv_dtype in (torch.float16, torch.bfloat16) else dtype
        dv = torch.bmm(probs.transpose(1, 2).to(half), chunks.repeat(d_kv).to(half))
        dv = copy_into_layout(dv, q_shape, strides[2], dv_dtype)
        return dq, dk, dv, None, None


@dataclass(frozen=True)
class LaraOptions(AttentionOptions):
    num_landmarks: int = positive_int(16, "number of segments / proposal distributions C")


@register_attention("lara", "linear_ra")
class Lara(EfficientAttention):
    """Linear randomized attention (LARA), noncausal self attention.

    Math (``x' = x d^(-1/4)``, ``log ξ(x, ω) = ω·x' - |x'|²/2``): with segment
    means ``q̄_c, k̄_c`` of ``q', k'`` over ``C = num_landmarks`` segments,
    ``μ_c = q̄_c + k̄_c`` and samples ``ω_c = μ_c + ε`` (``ε ~ N(0, I)`` in
    training, ``ε = 0`` in eval, so evaluation is deterministic):
    ``out_n = Σ_c softmax_c(μ_c·q'_n + log ξ(q_n, ω_c) + logΣ_m ξ(k_m, ω_c) - log ξ(μ_c, ω_c))
    · softmax_m(log ξ(k_m, ω_c)) V``.

    Padding: padded keys are excluded from the segment means, the key
    softmax and the log-normaliser, and segments are formed over the real
    tokens only (a padded sequence gives the output of the unpadded one).
    Sequences shorter than ``C`` use one landmark per token.

    Shapes: q/k/v ``(B, H, N, d)``.  Pattern: noncausal self only (the
    landmarks summarise the whole sequence).  No ``attn_mask`` (only
    ``key_padding_mask``), no attention dropout (the paper has none).  Half
    inputs compute in fp32.  Cost: O(N·C·d) time and O(N·C) memory per head.
    """

    capabilities = Capabilities(patterns=frozenset({Pattern.NONCAUSAL_SELF}))
    Options = LaraOptions

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.dropout_p > 0:
            logger.info("LARA applies no attention dropout (dropout=%s is unused)", self.dropout_p)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks, need_weights: bool):
        # autocast off: the math runs in fp32 as documented, and autocast would otherwise cast every
        # operand of every product back to half (two casts per product: most of this module's host time)
        with torch.autocast(q.device.type, enabled=False):
            return self._attend_fp32(q, k, v, masks)

    def _attend_fp32(self, q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks):
        dtype = acc_dtype(q.dtype)
        bsz, _, length, d = q.shape
        kpm: Optional[Tensor] = masks.key_padding
        if kpm is None and length % self.num_landmarks == 0:
            return self._attend_even(q, k, v), None
        scale = d**-0.25  # folded into the (B, H, C, d) side: x' = x·scale is never materialised
        q32, k32, v32 = q.to(dtype), k.to(dtype), v.to(dtype)
        weights = segment_weights(None if kpm is None else ~kpm, bsz, length, self.num_landmarks, dtype, q.device)
        empty = (weights.sum(-1) == 0)[:, None, :, None]  # (B, 1, C, 1) segments without tokens
        weights = weights.unsqueeze(1)  # (B, 1, C, N)
        mu = torch.matmul(weights, q32 + k32) * scale  # (B, H, C, d)
        omega = mu + torch.randn_like(mu) if self.training else mu

        def half_sq(x: Tensor) -> Tensor:  # |x'|²/2 as (B, H, 1, L)
            return (x * x).sum(-1).unsqueeze(-2) * (0.5 * scale * scale)

        log_k = torch.matmul(omega * scale, k32.transpose(-1, -2)) - half_sq(k32)  # log ξ(k_m, ω_c): (B, H, C, N)
        if kpm is not None:
            log_k = log_k.masked_fill(kpm[:, None, None, :], float("-inf"))
        kv_stats = torch.matmul(softmax(log_k, dim=-1).to(dtype), v32)  # (B, H, C, d)
        log_mu = (omega * mu).sum(-1, keepdim=True) - 0.5 * (mu * mu).sum(-1, keepdim=True)  # (B, H, C, 1)
        dead = torch.isneginf(log_k).all(-1, keepdim=True)  # every key padded: keep the gradient finite
        log_norm = torch.logsumexp(log_k.masked_fill(dead, 0.0), -1, keepdim=True).masked_fill(dead, float("-inf"))
        # μ_c·q' + log ξ(q, ω_c) as one product: (μ_c + ω_c)·q' - |q'|²/2
        log_ratio = torch.matmul((mu + omega) * scale, q32.transpose(-1, -2)) - half_sq(q32) + (log_norm - log_mu)
        log_ratio = log_ratio.masked_fill(empty, float("-inf"))
        importance = softmax(log_ratio, dim=-2).to(dtype)  # over proposals c
        out = torch.matmul(importance.transpose(-1, -2), kv_stats)  # (B, H, N, d)
        return out.to(q.dtype), None

    def _attend_even(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """:meth:`_attend_fp32` without padding for a length that is a multiple of ``C`` (:class:`_LaraEven`):
        equal segments (means of views, no weights), no empty segment or dead proposal (the key softmax as
        ``exp(log ξ - logsumexp)``), ``log ξ(q_n, ω_c)`` without its ``-|q'_n|²/2`` (the same for every proposal
        ``c``: the softmax over ``c`` cancels it), the ``|k'|²/2`` term and the scales folded into ``baddbmm``, and
        products batched over ``B·H`` (and over chunks of the length on CUDA, :class:`LengthChunks`: no product
        reduces over the whole length, forward or backward) that read the time-first projections in place when
        there is one chunk."""
        bsz, heads, _, d = q.shape
        noise = None
        if self.training:  # drawn as the general path draws it (the same numbers for the same seed)
            noise = torch.randn(bsz * heads, self.num_landmarks, d, dtype=acc_dtype(q.dtype), device=q.device)
        return _LaraEven.apply(q, k, v, noise, self.num_landmarks)


LARA = Lara
