"""Rotary (RoPE) and xpos position embeddings for the per-head local attention.

``rotate(x, pos) = x·cos(pos·θ) + rotate_half(x)·sin(pos·θ)`` on the first
``dim`` features, ``θ_i = base^(-2i/dim)``.  xpos (Sun et al. 2022) also scales
queries by ``ζ^(pos/scale_base)`` and keys by ``ζ^(-pos/scale_base)``, so a
score decays with the distance ``i - j`` only; any common shift of the
positions (a ``center``) leaves the scores unchanged and keeps the factors in
range.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ...base import check_bool

__all__ = ["RotaryEmbedding"]


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary embedding of the first ``dim`` features (``dim`` even), optionally with xpos decay."""

    inv_freq: Tensor  # buffers, registered in __init__
    xpos_zeta: Tensor

    def __init__(self, dim: int, use_xpos: bool = False, scale_base: Optional[float] = None, theta: float = 10000.0):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0 or dim % 2:
            raise ValueError(f"dim (rotary dimension) must be a positive even integer, got {dim!r}")
        self.dim, self.use_xpos = dim, check_bool(use_xpos, "use_xpos")
        self.scale_base = 512.0 if scale_base is None else float(scale_base)
        if self.scale_base <= 0:
            raise ValueError(f"xpos_scale_base must be positive, got {scale_base}")
        self.register_buffer(
            "inv_freq", theta ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim), persistent=False
        )
        self.register_buffer(
            "xpos_zeta", (torch.arange(0, dim, 2, dtype=torch.float32) + 0.4 * dim) / (1.4 * dim), persistent=False
        )

    def _angles(self, pos: Tensor, dtype) -> Tuple[Tensor, Tensor]:
        freqs = pos.to(torch.float32)[:, None] * self.inv_freq[None]
        freqs = torch.cat((freqs, freqs), dim=-1)
        return freqs.cos().to(dtype), freqs.sin().to(dtype)

    def _xpos(self, pos: Tensor, center: int, dtype) -> Tensor:
        power = (pos.to(torch.float32) - center) / self.scale_base
        scale = self.xpos_zeta[None] ** power[:, None]
        return torch.cat((scale, scale), dim=-1).to(dtype)

    def forward(self, q: Tensor, k: Tensor, pos: Tensor, center: int = 0) -> Tuple[Tensor, Tensor]:
        """Rotate ``q`` and ``k`` (``(..., N, D)``, ``D >= dim``) at positions ``pos`` ``(N,)``."""
        cos, sin = self._angles(pos, q.dtype)
        qs: Union[float, Tensor] = 1.0
        ks: Union[float, Tensor] = 1.0
        if self.use_xpos:
            qs = self._xpos(pos, center, q.dtype)
            ks = 1.0 / qs
        d = self.dim
        q_rot = (q[..., :d] * cos + _rotate_half(q[..., :d]) * sin) * qs
        k_rot = (k[..., :d] * cos + _rotate_half(k[..., :d]) * sin) * ks
        return torch.cat((q_rot, q[..., d:]), -1), torch.cat((k_rot, k[..., d:]), -1)
