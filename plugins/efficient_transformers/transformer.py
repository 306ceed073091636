"""Transformer encoder and decoder stacks over any registered attention (plain PyTorch).

They take ParaGen's ``TransformerEncoder`` / ``TransformerDecoder`` options and
add ``attention`` (encoder) and ``self_attention`` / ``cross_attention``
(decoder): a mechanism name, or a mapping ``{name: ..., <option>: ...}``.  They
know nothing of ParaGen; :mod:`efficient_transformers.paragen_plugin` wraps
them for its registries.

Decoding: :meth:`EfficientDecoder.forward` with an ``incremental_state`` dict
embeds and runs only the positions it has not seen yet, continuing every
layer's attention state, so a step costs what the mechanism's own decoding
step costs; :meth:`EfficientDecoder.reorder_incremental_state` selects batch
rows (beam search).
"""

from __future__ import annotations

import uuid
from typing import Any, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from efficient_attention.options import check_int

from .embeddings import TokenPositionEmbedding
from .layers import EfficientDecoderLayer, EfficientEncoderLayer, IncrementalState, drop_empty
from .spec import AttentionSpec

__all__ = ["EfficientEncoder", "EfficientDecoder"]

AttentionConfig = Union[None, str, Mapping[str, Any], AttentionSpec]


def _probability(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1), got {value!r}")
    return float(value)


def _check_stack(num_layers, d_model, n_head, dim_feedforward, dropout, attention_dropout) -> None:
    check_int(num_layers, "num_layers", 1)
    check_int(d_model, "d_model", 1)
    check_int(n_head, "n_head", 1)
    check_int(dim_feedforward, "dim_feedforward", 1)
    if d_model % n_head:
        raise ValueError(f"n_head ({n_head}) must divide d_model ({d_model})")
    _probability(dropout, "dropout")
    _probability(attention_dropout, "attention_dropout")


def _check_tokens(tokens: Tensor, name: str) -> None:
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
        raise ValueError(
            f"{name} must be a (batch, length) integer tensor, got "
            f"{tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__}"
        )


class EfficientEncoder(nn.Module):
    """Embedding + ``num_layers`` encoder layers (+ final norm with ``normalize_before``).

    Args:
        embed: token embedding ``(V, d_model)``.
        padding_idx: the padding token id.
        attention: the self-attention mechanism of every layer (noncausal self).
        return_seed: also return the first position's state (ParaGen's
            sequence classification reads it); ``keep_seed_in_hidden`` keeps
            that position in the returned states.
        max_pos: the longest sequence; also the ``max_len`` of a mechanism with that option
            (cosFormer's fixed ``M``) unless the attention spec sets it.
        The others: as ParaGen's ``TransformerEncoder``.

    ``forward(src (B, S))`` returns ``(states (S, B, C), padding (B, S))`` or,
    with ``return_seed``, ``(states, padding, seed (B, C))``.
    """

    def __init__(
        self,
        embed: nn.Embedding,
        padding_idx: int,
        num_layers: int,
        d_model: int = 512,
        n_head: int = 8,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        activation: str = "relu",
        return_seed: bool = False,
        keep_seed_in_hidden: bool = False,
        learn_pos: bool = False,
        normalize_before: bool = False,
        embed_scale: bool = True,
        embed_layer_norm: bool = False,
        max_pos: int = 1024,
        attention: AttentionConfig = None,
    ):
        super().__init__()
        _check_stack(num_layers, d_model, n_head, dim_feedforward, dropout, attention_dropout)
        self.padding_idx = padding_idx
        self.d_model = d_model
        self.return_seed, self.keep_seed_in_hidden = bool(return_seed), bool(keep_seed_in_hidden)
        self.attention = AttentionSpec.parse(attention, "encoder attention")
        self.embedding = TokenPositionEmbedding(
            embed,
            d_model,
            dropout,
            learn_pos=learn_pos,
            max_pos=max_pos,
            embed_scale=embed_scale,
            embed_layer_norm=embed_layer_norm,
        )
        self.layers = nn.ModuleList(
            EfficientEncoderLayer(
                d_model,
                n_head,
                dim_feedforward=dim_feedforward,
                dropout=dropout,
                attention_dropout=attention_dropout,
                activation=activation,
                normalize_before=normalize_before,
                attention=self.attention,
                where=f"encoder layer {i}",
                max_positions=max_pos,
            )
            for i in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model) if normalize_before else None

    def forward(self, src: Tensor) -> Tuple[Tensor, ...]:
        _check_tokens(src, "src")
        padding = src.eq(self.padding_idx)
        x = self.embedding(src).transpose(0, 1)
        kpm = drop_empty(padding)
        for layer in self.layers:
            x = layer(x, kpm)
        if self.norm is not None:
            x = self.norm(x)
        if not self.return_seed:
            return x, padding
        shift = 0 if self.keep_seed_in_hidden else 1
        return x[shift:], padding[:, shift:], x[0]


class EfficientDecoder(nn.Module):
    """Embedding + ``num_layers`` decoder layers + output projection to the vocabulary.

    Args:
        embed: target token embedding ``(V, d_model)``.
        padding_idx: the padding token id.
        self_attention: the causal self-attention mechanism of every layer.
        cross_attention: the cross-attention mechanism of every layer.
        out_proj: projection to the vocabulary (default: tied to ``embed``).
        output_bias: add a learned bias to the logits.
        memory_dim: encoder feature size (default ``d_model``).
        max_pos: the longest sequence; also the ``max_len`` of a mechanism with that option
            (cosFormer's fixed ``M``, self and cross) unless the attention spec sets it.
        The others: as ParaGen's ``TransformerDecoder``.

    ``forward(tgt (B, T), memory (S, B, C), memory_padding_mask (B, S))``
    returns logits ``(B, T, V)``; with ``incremental_state`` only those of the
    positions not decoded before.
    """

    def __init__(
        self,
        embed: nn.Embedding,
        padding_idx: int,
        num_layers: int,
        d_model: int = 512,
        n_head: int = 8,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        activation: str = "relu",
        learn_pos: bool = False,
        normalize_before: bool = False,
        embed_scale: bool = True,
        embed_layer_norm: bool = False,
        output_bias: bool = False,
        max_pos: int = 1024,
        self_attention: AttentionConfig = None,
        cross_attention: AttentionConfig = None,
        out_proj: Optional[nn.Module] = None,
        memory_dim: Optional[int] = None,
    ):
        super().__init__()
        _check_stack(num_layers, d_model, n_head, dim_feedforward, dropout, attention_dropout)
        self.padding_idx = padding_idx
        self.d_model = d_model
        self.self_attention = AttentionSpec.parse(self_attention, "decoder self_attention")
        self.cross_attention = AttentionSpec.parse(cross_attention, "decoder cross_attention")
        memory_dim = d_model if memory_dim is None else check_int(memory_dim, "memory_dim", 1)
        self.embedding = TokenPositionEmbedding(
            embed,
            d_model,
            dropout,
            learn_pos=learn_pos,
            max_pos=max_pos,
            embed_scale=embed_scale,
            embed_layer_norm=embed_layer_norm,
        )
        self.layers = nn.ModuleList(
            EfficientDecoderLayer(
                d_model,
                n_head,
                dim_feedforward=dim_feedforward,
                dropout=dropout,
                attention_dropout=attention_dropout,
                activation=activation,
                normalize_before=normalize_before,
                self_attention=self.self_attention,
                cross_attention=self.cross_attention,
                memory_dim=memory_dim,
                where=f"decoder layer {i}",
                max_positions=max_pos,
            )
            for i in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model) if normalize_before else None
        if out_proj is None:
            out_proj = nn.Linear(d_model, embed.num_embeddings, bias=False)
            out_proj.weight = embed.weight
        self.out_proj = out_proj
        self.out_bias = nn.Parameter(torch.zeros(embed.num_embeddings)) if output_bias else None
        self._length_key = f"{uuid.uuid4()}.decoded_length"

    def __setstate__(self, state):  # copies get their own state key
        super().__setstate__(state)
        self._length_key = f"{uuid.uuid4()}.decoded_length"

    def decoded_length(self, incremental_state: Optional[IncrementalState]) -> int:
        """How many target positions ``incremental_state`` has seen."""
        return 0 if incremental_state is None else int(incremental_state.get(self._length_key, 0))

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_padding_mask: Optional[Tensor] = None,
        incremental_state: Optional[IncrementalState] = None,
    ) -> Tensor:
        _check_tokens(tgt, "tgt")
        done = self.decoded_length(incremental_state)
        if tgt.shape[1] <= done:
            raise ValueError(
                f"incremental decoding: tgt has {tgt.shape[1]} positions but {done} are already decoded; "
                f"pass the prefix plus new tokens, or a fresh incremental_state for a new sequence"
            )
        if memory.dim() != 3 or memory.shape[1] != tgt.shape[0]:
            raise ValueError(f"memory must be (src_len, batch={tgt.shape[0]}, dim), got {tuple(memory.shape)}")
        new = tgt[:, done:]
        padding, memory_padding_mask = drop_empty(new.eq(self.padding_idx)), drop_empty(memory_padding_mask)
        x = self.embedding(new, offset=done).transpose(0, 1)
        for layer in self.layers:
            x = layer(x, memory, memory_padding_mask, padding_mask=padding, incremental_state=incremental_state)
        if self.norm is not None:
            x = self.norm(x)
        if incremental_state is not None:
            incremental_state[self._length_key] = tgt.shape[1]
        logits = self.out_proj(x.transpose(0, 1))
        return logits if self.out_bias is None else logits + self.out_bias

    def reorder_incremental_state(self, incremental_state: IncrementalState, new_order: Tensor) -> None:
        """Keep batch rows ``new_order`` of every layer's decoding state (beam search)."""
        for layer in self.layers:
            layer.reorder_incremental_state(incremental_state, new_order)
