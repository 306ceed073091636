"""Token + position embedding of a transformer stack (plain PyTorch).

``x = dropout(norm?(scale * embed(tokens) + pos(positions)))``, with
positions ``offset .. offset + T - 1`` so that incremental decoding embeds a
new token at its true position.  Positions are sinusoidal (any length) or
learned (at most ``max_pos``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["sinusoidal_positions", "TokenPositionEmbedding"]


def sinusoidal_positions(positions: Tensor, dim: int) -> Tensor:
    """``(T,)`` positions -> ``(T, dim)`` ``[sin(p·w), cos(p·w)]`` with ``w_i = 10000^(-i/(dim/2-1))``."""
    half = dim // 2
    step = math.log(10000.0) / max(half - 1, 1)
    inv = torch.exp(torch.arange(half, device=positions.device, dtype=torch.float32) * -step)
    angles = positions.to(torch.float32)[:, None] * inv[None, :]
    signal = torch.cat([angles.sin(), angles.cos()], dim=-1)
    if dim % 2:
        signal = torch.nn.functional.pad(signal, (0, 1))
    return signal


class TokenPositionEmbedding(nn.Module):
    """Scaled token embedding plus positional embedding, optional layer norm, dropout.

    Args:
        embed: token embedding ``(V, d_model)`` (shared with the caller).
        d_model: feature size.
        dropout: dropout on the result.
        learn_pos: learned positions (``max_pos`` of them) instead of sinusoidal.
        max_pos: maximum length with learned positions.
        embed_scale: multiply token embeddings by ``sqrt(d_model)``.
        embed_layer_norm: layer norm after adding positions.
    """

    def __init__(
        self,
        embed: nn.Embedding,
        d_model: int,
        dropout: float,
        *,
        learn_pos: bool,
        max_pos: int,
        embed_scale: bool,
        embed_layer_norm: bool,
    ):
        super().__init__()
        if embed.embedding_dim != d_model:
            raise ValueError(f"token embedding has dimension {embed.embedding_dim}, expected d_model={d_model}")
        if learn_pos and (isinstance(max_pos, bool) or not isinstance(max_pos, int) or max_pos <= 0):
            raise ValueError(f"max_pos must be a positive integer with learn_pos, got {max_pos!r}")
        self.embed = embed
        self.d_model = d_model
        self.max_pos = max_pos
        self.scale = math.sqrt(d_model) if embed_scale else 1.0
        self.pos_embed: Optional[nn.Embedding] = None
        if learn_pos:
            self.pos_embed = nn.Embedding(max_pos, d_model)
            nn.init.normal_(self.pos_embed.weight, mean=0.0, std=d_model**-0.5)
        self.norm = nn.LayerNorm(d_model) if embed_layer_norm else None
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: Tensor, offset: int = 0) -> Tensor:
        """``(B, T)`` token ids at positions ``offset..`` -> ``(B, T, d_model)``."""
        length = tokens.shape[1]
        positions = torch.arange(offset, offset + length, device=tokens.device)
        x = self.embed(tokens) * self.scale
        if self.pos_embed is not None:
            if offset + length > self.max_pos:
                raise ValueError(
                    f"position {offset + length - 1} is beyond max_pos={self.max_pos} (learned positions); "
                    f"raise max_pos or use sinusoidal positions (learn_pos: false)"
                )
            pos = self.pos_embed(positions)
        else:
            pos = sinusoidal_positions(positions, self.d_model)
        x = x + pos.to(x.dtype)[None]
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)
