"""Transformer encoder / decoder layers around any registered attention (plain PyTorch).

Both follow ParaGen's ``TransformerEncoderLayer`` / ``TransformerDecoderLayer``:
time-first ``(T, B, C)`` tensors, residual blocks ``x + dropout(block(x))``,
post-norm by default, pre-norm with ``normalize_before``.  The attention of
each block is built from an :class:`~efficient_transformers.spec.AttentionSpec`
for its pattern: encoder self-attention is noncausal self, decoder
self-attention causal self, decoder cross-attention noncausal cross.

Incremental decoding goes through fairseq's ``incremental_state`` protocol of
:class:`efficient_attention.EfficientAttention`: the self-attention keeps its
own decoding state (a key/value cache, or a constant-size state for mechanisms
that have one) and the cross-attention caches its projected memory
(``static_kv``).  A causal mechanism without incremental decoding still works:
its layer keeps the prefix of its inputs and recomputes that one attention
(logged once when decoding starts).
"""

from __future__ import annotations

import logging
import uuid
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efficient_attention import UnsupportedInputError

from .spec import AttentionSpec

logger = logging.getLogger(__name__)

__all__ = ["FeedForward", "EfficientEncoderLayer", "EfficientDecoderLayer", "IncrementalState"]

IncrementalState = Dict[str, object]

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}


def drop_empty(mask: Optional[Tensor]) -> Optional[Tensor]:
    """``mask`` if it masks anything, else ``None`` (mechanisms skip the work, or need not support it).

    The stacks call it once per forward, not every layer.
    """
    return mask if mask is not None and bool(mask.any()) else None


class FeedForward(nn.Module):
    """``fc2(activation(fc1(x)))``; ``activation`` in relu, gelu, tanh, silu."""

    def __init__(self, d_model: int, dim_feedforward: int, activation: str):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(_ACTIVATIONS)}, got {activation!r}")
        self.fc1 = nn.Linear(d_model, dim_feedforward)
        self.fc2 = nn.Linear(dim_feedforward, d_model)
        self.activation = _ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class _Block(nn.Module):
    """Shared residual / norm plumbing of the layers."""

    def __init__(self, d_model: int, dropout: float, normalize_before: bool):
        super().__init__()
        self.normalize_before = bool(normalize_before)
        self.dropout = nn.Dropout(dropout)

    def _residual(self, x: Tensor, norm: nn.LayerNorm, fn) -> Tensor:
        h = norm(x) if self.normalize_before else x
        x = x + self.dropout(fn(h))
        return x if self.normalize_before else norm(x)


class EfficientEncoderLayer(_Block):
    """Self-attention (noncausal) + feed-forward.

    Args:
        d_model, n_head, dim_feedforward, dropout, attention_dropout, activation,
        normalize_before: as ParaGen's ``TransformerEncoderLayer``.
        attention: the mechanism and its options.
        where: the layer's name in error messages (``"encoder layer 3"``).
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        *,
        dim_feedforward: int,
        dropout: float,
        attention_dropout: float,
        activation: str,
        normalize_before: bool,
        attention: AttentionSpec,
        where: str,
        max_positions: Optional[int] = None,
    ):
        super().__init__(d_model, dropout, normalize_before)
        self.where = where
        self.self_attn = attention.build(
            d_model,
            n_head,
            dropout=attention_dropout,
            cross=False,
            causal=False,
            where=f"{where} attention",
            max_positions=max_positions,
        )
        self.ffn = FeedForward(d_model, dim_feedforward, activation)
        self.self_attn_norm = nn.LayerNorm(d_model)
        self.ffn_norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """``x`` ``(S, B, C)``; ``padding_mask`` ``(B, S)`` bool, True = padding (``None``: none)."""
        attend = lambda h: self.self_attn(h, h, h, key_padding_mask=padding_mask, need_weights=False)[0]  # noqa: E731
        x = self._residual(x, self.self_attn_norm, attend)
        return self._residual(x, self.ffn_norm, self.ffn)


class EfficientDecoderLayer(_Block):
    """Causal self-attention + cross-attention over the encoder memory + feed-forward.

    Args:
        d_model, n_head, dim_feedforward, dropout, attention_dropout, activation,
        normalize_before: as ParaGen's ``TransformerDecoderLayer``.
        self_attention, cross_attention: the mechanisms and their options.
        memory_dim: feature size of the encoder memory (keys/values of the cross-attention).
        where: the layer's name in error messages (``"decoder layer 0"``).
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        *,
        dim_feedforward: int,
        dropout: float,
        attention_dropout: float,
        activation: str,
        normalize_before: bool,
        self_attention: AttentionSpec,
        cross_attention: AttentionSpec,
        memory_dim: int,
        where: str,
        max_positions: Optional[int] = None,
    ):
        super().__init__(d_model, dropout, normalize_before)
        self.where = where
        self.self_attn = self_attention.build(
            d_model,
            n_head,
            dropout=attention_dropout,
            cross=False,
            causal=True,
            where=f"{where} self_attention",
            max_positions=max_positions,
        )
        self.cross_attn = cross_attention.build(
            d_model,
            n_head,
            dropout=attention_dropout,
            cross=True,
            causal=False,
            kdim=memory_dim,
            where=f"{where} cross_attention",
            max_positions=max_positions,
        )
        self.ffn = FeedForward(d_model, dim_feedforward, activation)
        self.self_attn_norm = nn.LayerNorm(d_model)
        self.cross_attn_norm = nn.LayerNorm(d_model)
        self.ffn_norm = nn.LayerNorm(d_model)
        self._prefix_key = f"{uuid.uuid4()}.prefix"
        self._warned_prefix = False

    def __setstate__(self, state):  # copies get their own cache key
        super().__setstate__(state)
        self._prefix_key = f"{uuid.uuid4()}.prefix"

    # ------------------------------------------------------------ attention
    def _self_padding(self, padding_mask: Optional[Tensor]) -> Optional[Tensor]:
        """The target padding mask for the causal self-attention, if it is needed.

        A mechanism without ``key_padding_mask`` support gets none when the
        padding is at the end: under the causal rule a real token never sees a
        later (padding) key, so the mask would change nothing it outputs.
        """
        if padding_mask is None or self.self_attn.capabilities.key_padding_mask:
            return padding_mask
        if bool((padding_mask[:, :-1] & ~padding_mask[:, 1:]).any()):
            raise UnsupportedInputError(
                f"{self.where} self_attention {self.self_attn.attention_name!r} does not support key_padding_mask "
                f"and the target has padding before real tokens"
            )
        return None

    def _self_attend(
        self, h: Tensor, padding_mask: Optional[Tensor], incremental_state: Optional[IncrementalState]
    ) -> Tensor:
        attn = self.self_attn
        if incremental_state is None or attn.capabilities.incremental:
            kpm = self._self_padding(padding_mask)
            return attn(h, h, h, key_padding_mask=kpm, incremental_state=incremental_state, need_weights=False)[0]
        # no incremental decoding in this mechanism: recompute this attention over the kept prefix
        if not self._warned_prefix:
            logger.warning(
                "%s self_attention %r has no incremental decoding; each step recomputes it over the prefix",
                self.where,
                attn.attention_name,
            )
            self._warned_prefix = True
        buf = incremental_state.get(self._prefix_key)
        seq = h.transpose(0, 1)
        pad = torch.zeros(seq.shape[:2], dtype=torch.bool, device=h.device) if padding_mask is None else padding_mask
        if buf is not None:
            seq, pad = torch.cat([buf["input"], seq], dim=1), torch.cat([buf["padding"], pad], dim=1)
        incremental_state[self._prefix_key] = {"input": seq, "padding": pad}
        full = seq.transpose(0, 1)
        out = attn(full, full, full, key_padding_mask=self._self_padding(drop_empty(pad)), need_weights=False)[0]
        return out[-h.shape[0] :]

    def _cross_attend(
        self, h: Tensor, memory: Tensor, memory_padding_mask: Optional[Tensor], incremental_state
    ) -> Tensor:
        attn = self.cross_attn
        if incremental_state is not None and attn.capabilities.incremental:
            if attn._get_input_buffer(incremental_state):  # the memory is projected and cached: keys not needed
                memory = memory_padding_mask = None
            return attn(
                h,
                memory,
                memory,
                key_padding_mask=memory_padding_mask,
                incremental_state=incremental_state,
                static_kv=True,
                need_weights=False,
            )[0]
        return attn(h, memory, memory, key_padding_mask=memory_padding_mask, need_weights=False)[0]

    # -------------------------------------------------------------- forward
    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        memory_padding_mask: Optional[Tensor] = None,
        padding_mask: Optional[Tensor] = None,
        incremental_state: Optional[IncrementalState] = None,
    ) -> Tensor:
        """``x`` ``(T, B, C)`` (the new positions when decoding), ``memory`` ``(S, B, C_mem)``.

        ``memory_padding_mask`` ``(B, S)`` and ``padding_mask`` ``(B, T)`` are
        bool, True = padding, or ``None`` when nothing is padded.  With
        ``incremental_state`` the layer continues from its state and updates it.
        """
        x = self._residual(x, self.self_attn_norm, lambda h: self._self_attend(h, padding_mask, incremental_state))
        x = self._residual(
            x, self.cross_attn_norm, lambda h: self._cross_attend(h, memory, memory_padding_mask, incremental_state)
        )
        return self._residual(x, self.ffn_norm, self.ffn)

    def reorder_incremental_state(self, incremental_state: IncrementalState, new_order: Tensor) -> None:
        """Select batch rows ``new_order`` of every decoding state of this layer (beam search)."""
        self.self_attn.reorder_incremental_state(incremental_state, new_order)
        self.cross_attn.reorder_incremental_state(incremental_state, new_order)
        buf = incremental_state.get(self._prefix_key)
        if buf is not None:
            incremental_state[self._prefix_key] = {k: v.index_select(0, new_order) for k, v in buf.items()}
