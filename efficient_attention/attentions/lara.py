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

from ..base import AttentionMasks, EfficientAttention
from ..capabilities import Capabilities, Pattern
from ..functional import LengthChunks, acc_dtype, segment_weights, softmax
from ..options import AttentionOptions, positive_int
from ..registry import register_attention

__all__ = ["Lara", "LARA"]

logger = logging.getLogger(__name__)


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
        """:meth:`_attend_fp32` without padding for a length that is a multiple of ``C``: equal segments (means of
        views, no weights), no empty segment or dead proposal (the key softmax as ``exp(log ξ - logsumexp)``),
        ``log ξ(q_n, ω_c)`` without its ``-|q'_n|²/2`` (the same for every proposal ``c``: the softmax over ``c``
        cancels it), the ``|k'|²/2`` term and the scales folded into ``baddbmm``, and products batched over ``B·H``
        (and over chunks of the length on CUDA, :class:`LengthChunks`: no product reduces over the whole length,
        forward or backward) that read the time-first projections in place when there is one chunk."""
        bsz, heads, length, d = q.shape
        dtype = acc_dtype(q.dtype)
        c = self.num_landmarks
        scale = d**-0.25
        chunks = LengthChunks(bsz * heads, length, q.device)
        fmt = torch.contiguous_format if chunks.n > 1 else torch.preserve_format
        q32, k32, v32 = (chunks.split(x.to(dtype, memory_format=fmt).flatten(0, 1)) for x in (q, k, v))
        mu = torch.add(q32, k32).reshape(bsz * heads, c, length // c, d).mean(-2) * scale  # (B·H, C, d)
        omega = mu + torch.randn_like(mu) if self.training else mu
        sq_k = (k32 * k32).sum(-1).unsqueeze(1)  # (B·H·n, 1, l)
        log_k = torch.baddbmm(sq_k, chunks.repeat(omega), k32.transpose(1, 2), beta=-0.5 * scale * scale, alpha=scale)
        log_k = chunks.per_batch(log_k)  # log ξ(k_m, ω_c) (B·H, n, C, l)
        log_norm = torch.logsumexp(log_k, dim=(1, 3), keepdim=True)  # (B·H, 1, C, 1)
        if chunks.n == 1:
            probs = torch.softmax(log_k, dim=-1).flatten(0, 1)
        else:  # the softmax over the keys of every chunk (B·H·n, C, l)
            probs = torch.exp(log_k - log_norm).flatten(0, 1)
        kv_stats = chunks.total(torch.bmm(probs, v32))  # (B·H, C, d)
        log_mu = (torch.sub(omega, mu, alpha=0.5) * mu).sum(-1, keepdim=True)  # log ξ(μ_c, ω_c) (B·H, C, 1)
        bias = log_norm.view(bsz * heads, c, 1) - log_mu
        log_ratio = torch.baddbmm(chunks.repeat(bias), chunks.repeat(mu + omega), q32.transpose(1, 2), alpha=scale)
        importance = torch.softmax(log_ratio, dim=-2)  # over proposals c (B·H·n, C, l)
        out = torch.bmm(importance.transpose(1, 2), chunks.repeat(kv_stats))  # (B·H·n, l, d)
        return out.view(bsz, heads, length, d).to(q.dtype)


LARA = Lara
