"""Drop-in PyTorch entry points for AttentionGrid users.

    from efficient_attention.compat.attention_grid import (
        DilatedAttention, dynamic_sparse_attention, fused_landmark_attention, blockwise_compute_attn,
        BlockwiseParallelJax)

* ``dynamic_sparse_attention(q, k, v, q_idx, k_idx, sm_scale=None, sparsity_mode="hash")``
  on ``(BATCH, N_CTX, H, D_HEAD)`` tensors (an unknown mode raises a
  ``ValueError`` that is also a ``KeyError``);
* ``fused_landmark_attention(q, k, v, is_mem, sm_scale=None, block_size=64)``
  on ``(batch, nheads, seqlen, d)`` tensors;
* ``DilatedAttention(d_model, num_heads, dilation_rate, segment_size, dropout=0.0, causal=False)``:
  ``forward(x (batch, seq_len, d_model)) -> (batch, seq_len, d_model)``, built
  on the registered ``dilated`` mechanism (projections included);
* ``blockwise_compute_attn(query, key, value, bias=None, causal_mask=False,
  query_chunk_size=..., key_chunk_size=...)`` on ``(batch, seq, heads, dim)``;
* ``BlockwiseParallelJax`` (= ``BlockwiseParallel``): the blockwise parallel
  transformer block, ``forward(hidden_states, attention_mask, position_ids,
  deterministic=True, init_cache=False)`` on ``(batch, seq, hidden)``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..attentions.dilated import DilatedAttention as _Dilated
from ..functional import merge_heads, split_heads
from ..sparse.blockwise import blockwise_attention
from ..sparse.dynamic import dynamic_sparse_attention, hash_sparse_attention, qk_sparse_attention
from ..sparse.landmark import landmark_token_attention

__all__ = [
    "GridDilatedAttention",
    "DilatedAttention",
    "dynamic_sparse_attention",
    "hash_sparse_attention",
    "qk_sparse_attention",
    "fused_landmark_attention",
    "blockwise_compute_attn",
    "BlockwiseParallel",
    "BlockwiseParallelJax",
]


def fused_landmark_attention(
    q: Tensor, k: Tensor, v: Tensor, is_mem: Tensor, sm_scale: Optional[float] = None, block_size: int = 64
) -> Tensor:
    """Landmark attention, AttentionGrid's argument order.

    See :func:`~efficient_attention.sparse.landmark.landmark_token_attention`.
    """
    return landmark_token_attention(q, k, v, is_mem, block_size=block_size, sm_scale=sm_scale)


def blockwise_compute_attn(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    bias: Optional[Tensor] = None,
    causal_mask: bool = False,
    query_chunk_size: int = 64,
    key_chunk_size: int = 64,
) -> Tensor:
    """Blockwise exact attention on ``(batch, seq, heads, dim)``; ``bias`` is additive ``(1|B, 1|H, Tq, Tk)``."""
    out = blockwise_attention(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        causal=causal_mask,
        attn_mask=bias,
        q_chunk_size=query_chunk_size,
        k_chunk_size=key_chunk_size,
    )
    return out.transpose(1, 2)


class GridDilatedAttention(nn.Module):
    """LongNet dilated self-attention with AttentionGrid's constructor; batch-first in and out.

    Exported under AttentionGrid's name ``DilatedAttention`` too (an alias kept for that API); the
    registered fairseq-style mechanism is :class:`efficient_attention.DilatedAttention`.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        dilation_rate: int,
        segment_size: int,
        dropout: float = 0.0,
        causal: bool = False,
    ):
        super().__init__()
        self.attention = _Dilated(
            d_model,
            num_heads,
            dropout=dropout,
            self_attention=True,
            causal=causal,
            segment_lengths=(segment_size,),
            dilation_rates=(dilation_rate,),
        )

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.attention(x, x, x, need_weights=False, batch_first=True)
        return out


DilatedAttention = GridDilatedAttention  # AttentionGrid's name (the compat API needs it)


# --------------------------------------------------------------------------------------------------
# BlockwiseParallelJax: the blockwise parallel transformer block (Liu & Abbeel), in PyTorch.

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),  # exact erf GELU (transformers' "gelu")
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}

# JAX checkpoint policies -> whether each FFN chunk runs under torch.utils.checkpoint.
_POLICIES = {
    "nothing_saveable": True,
    "checkpoint_dots": True,
    "checkpoint_dots_with_no_batch_dims": True,
    "everything_saveable": False,
}


def _resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise TypeError(f"dtype must be a torch.dtype (or its name, e.g. 'float32'), got {dtype!r}")


def _rotate_every_two(x: Tensor) -> Tensor:
    """GPT-J's rotation of interleaved pairs: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def gptj_rotary(x: Tensor, position_ids: Tensor, rotary_dim: int) -> Tensor:
    """GPT-J rotary embedding on the first ``rotary_dim`` dims of ``x (B, H, S, d)``; ``position_ids (1|B, S)``."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=x.device) / rotary_dim))
    ang = position_ids.to(device=x.device, dtype=torch.float64)[..., None] * inv_freq  # (1|B, S, rotary_dim/2)
    sin = ang.sin().repeat_interleave(2, -1)[:, None].to(x.dtype)  # (1|B, 1, S, rotary_dim)
    cos = ang.cos().repeat_interleave(2, -1)[:, None].to(x.dtype)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rot * cos + _rotate_every_two(rot) * sin, rest), dim=-1)


class BlockwiseParallel(nn.Module):
    """Pre-LayerNorm transformer block with blockwise attention and a blockwise FFN (AttentionGrid's
    ``BlockwiseParallelJax``, same constructor and ``forward``), in PyTorch.

    ``h = x + Dropout(out_proj(Attn(rotary(q_proj(LN1 x)), rotary(k_proj(LN1 x)), v_proj(LN1 x))))``;
    ``y = h + Dropout(fc_out(act(fc_in(LN2 h))))``, the FFN run ``q_chunk_size`` positions at a time.
    Attention is :func:`~efficient_attention.sparse.blockwise.blockwise_attention` (exact, online
    softmax in ``q_chunk_size x k_chunk_size`` chunks, recomputing backward).  q/k/v/out projections
    have no bias (GPT-J); ``fc_in`` / ``fc_out`` do.  Rotary embeddings are GPT-J's (interleaved
    pairs) on the first ``rotary_dim`` dims of each head; ``rotary_dim=None``: no rotary.

    JAX-specific arguments:

    * ``dtype``: a ``torch.dtype`` (or its name); parameters and computation use it.
    * ``policy``: a JAX checkpoint policy name, or ``None``.  ``'everything_saveable'`` / ``None``:
      no checkpointing; ``'nothing_saveable'`` (default), ``'checkpoint_dots'``,
      ``'checkpoint_dots_with_no_batch_dims'``: each FFN chunk runs under
      ``torch.utils.checkpoint`` (recomputed in backward; PyTorch has no "save only the dots" mode).
      The attention never keeps its probabilities whatever the policy (recomputing ``Function``).
    * ``prevent_cse``: accepted (bool) and ignored: it stops XLA from merging the recomputation
      of ``jax.checkpoint`` with the forward pass; eager PyTorch does no common-subexpression
      elimination, so there is nothing to prevent.
    * ``float32_logits``: queries and keys are cast to float32 for the attention (the online
      softmax already accumulates half-precision inputs in float32).
    * ``forward(..., init_cache=True)`` raises ``ValueError``: decode with the registered
      ``blockwise`` mechanism (``efficient_attention.build_attention("blockwise", ...)``) and its
      ``incremental_state`` key/value cache.
    """

    def __init__(
        self,
        q_chunk_size: int,
        k_chunk_size: int,
        hidden_size: int,
        num_heads: int,
        rotary_dim: Optional[int],
        intermediate_size: int,
        layer_norm_epsilon: float = 1e-5,
        activation_function: str = "gelu",
        attn_pdrop: float = 0.0,
        resid_pdrop: float = 0.0,
        max_position_embeddings: int = 1024,
        dtype=torch.float32,
        causal: bool = True,
        policy: Optional[str] = "nothing_saveable",
        prevent_cse: bool = False,
        float32_logits: bool = False,
    ):
        super().__init__()
        for name, val in (
            ("q_chunk_size", q_chunk_size),
            ("k_chunk_size", k_chunk_size),
            ("hidden_size", hidden_size),
            ("num_heads", num_heads),
            ("intermediate_size", intermediate_size),
            ("max_position_embeddings", max_position_embeddings),
        ):
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ValueError(f"{name} must be a positive integer, got {val!r}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        head_dim = hidden_size // num_heads
        if rotary_dim is not None and (
            isinstance(rotary_dim, bool)
            or not isinstance(rotary_dim, int)
            or rotary_dim <= 0
            or rotary_dim % 2
            or rotary_dim > head_dim
        ):
            raise ValueError(
                f"rotary_dim must be None or an even integer in [2, head_dim={head_dim}], got {rotary_dim!r}"
            )
        if activation_function not in _ACTIVATIONS:
            raise ValueError(f"unknown activation_function {activation_function!r}; choose from {sorted(_ACTIVATIONS)}")
        if policy is not None and policy not in _POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose from {sorted(_POLICIES)} or None")
        if not isinstance(prevent_cse, bool):
            raise TypeError(f"prevent_cse must be a bool, got {prevent_cse!r}")
        for name, p in (("attn_pdrop", attn_pdrop), ("resid_pdrop", resid_pdrop)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p!r}")
        self.q_chunk_size, self.k_chunk_size = q_chunk_size, k_chunk_size
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.rotary_dim, self.intermediate_size = rotary_dim, intermediate_size
        self.activation_function, self.attn_pdrop, self.resid_pdrop = activation_function, attn_pdrop, resid_pdrop
        self.max_position_embeddings, self.causal = max_position_embeddings, causal
        self.dtype = _resolve_dtype(dtype)
        self.policy, self.prevent_cse, self.float32_logits = policy, prevent_cse, float32_logits
        kw: Dict[str, Any] = dict(dtype=self.dtype)
        self.ln_1 = nn.LayerNorm(hidden_size, eps=layer_norm_epsilon, **kw)
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False, **kw)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False, **kw)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False, **kw)
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=False, **kw)
        self.ln_2 = nn.LayerNorm(hidden_size, eps=layer_norm_epsilon, **kw)
        self.fc_in = nn.Linear(hidden_size, intermediate_size, **kw)
        self.fc_out = nn.Linear(intermediate_size, hidden_size, **kw)

    def _attention_bias(
        self, attention_mask: Optional[Tensor], additive_mask: Optional[bool], bsz: int, seq: int
    ) -> Optional[Tensor]:
        """``(B, S)`` / ``(B|1, 1, 1|S, S)`` mask -> blockwise ``attn_mask`` (bool True = masked, or additive)."""
        if attention_mask is None:
            return None
        m = torch.as_tensor(attention_mask)
        if m.dim() == 2:
            m = m[:, None, None, :]
        if (
            m.dim() != 4
            or m.shape[0] not in (1, bsz)
            or m.shape[1] != 1
            or m.shape[2] not in (1, seq)
            or m.shape[3] != seq
        ):
            raise ValueError(
                f"attention_mask must have shape (B, 1, 1, S), (B, 1, S, S) or (B, S) with "
                f"B={bsz}, S={seq}; got {tuple(m.shape)}"
            )
        if m.dtype == torch.bool:
            if additive_mask:
                raise ValueError("additive_mask=True needs a floating attention_mask, got a bool one")
            return ~m  # True = keep -> True = masked
        if additive_mask is None:
            additive_mask = bool((m < 0).any())
        return m.to(self.dtype) if additive_mask else m <= 0  # keep where > 0, as the original

    def _ffn(self, x: Tensor, dropout: bool) -> Tensor:
        h = self.fc_out(_ACTIVATIONS[self.activation_function](self.fc_in(self.ln_2(x))))
        return F.dropout(h, self.resid_pdrop, training=dropout)

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        deterministic: bool = True,
        init_cache: bool = False,
        *,
        additive_mask: Optional[bool] = None,
    ) -> Tensor:
        """``hidden_states (B, S, hidden_size)`` -> ``(B, S, hidden_size)``.

        Args:
            attention_mask: ``(B, 1, 1, S)`` (or ``(B, 1, S, S)``, ``(B, S)``): values ``> 0`` (or
                ``True``) attend, ``<= 0`` (``False``) are masked, as in the original.  A floating
                mask with negative entries (or ``additive_mask=True``) is added to the scores
                instead (``0`` keep, ``-inf`` / large negative masked); pass ``additive_mask=True``
                for an all-zero additive mask.  ``None``: nothing masked.  With ``causal=True`` the
                causal mask is applied on top.
            position_ids: ``(1|B, S)`` rotary positions, each ``< max_position_embeddings``;
                ``None``: ``0 .. S-1``.
            deterministic: ``False`` applies ``attn_pdrop`` / ``resid_pdrop`` dropout (only in
                ``train()`` mode).
            init_cache: must be ``False`` (see the class docstring).
        """
        if init_cache:
            raise ValueError(
                "init_cache=True (JAX decoding cache) is not supported by BlockwiseParallel; for incremental "
                "decoding use the registered 'blockwise' mechanism (efficient_attention.build_attention("
                "'blockwise', ...)) with its incremental_state key/value cache"
            )
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states must be (B, S, {self.hidden_size}), got {tuple(hidden_states.shape)}")
        x = hidden_states.to(self.dtype)
        bsz, seq, _ = x.shape
        dropout = (not deterministic) and self.training
        if position_ids is None:
            position_ids = torch.arange(seq, device=x.device)[None]
        position_ids = torch.as_tensor(position_ids, device=x.device)
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        if position_ids.shape[-1] != seq or position_ids.shape[0] not in (1, bsz):
            raise ValueError(f"position_ids must have shape (1|B, S={seq}), got {tuple(position_ids.shape)}")
        if (
            self.rotary_dim is not None
            and position_ids.numel()
            and (int(position_ids.max()) >= self.max_position_embeddings or int(position_ids.min()) < 0)
        ):
            raise ValueError(f"position_ids must lie in [0, max_position_embeddings={self.max_position_embeddings})")
        bias = self._attention_bias(attention_mask, additive_mask, bsz, seq)

        h = self.ln_1(x)
        q, k, v = (split_heads(p(h).transpose(0, 1), self.num_heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.rotary_dim is not None:
            q, k = gptj_rotary(q, position_ids, self.rotary_dim), gptj_rotary(k, position_ids, self.rotary_dim)
        if self.float32_logits:
            q, k, v = q.float(), k.float(), v.float()
            if bias is not None and bias.is_floating_point():
                bias = bias.float()
        attn = blockwise_attention(
            q,
            k,
            v,
            causal=self.causal,
            attn_mask=bias,
            q_chunk_size=self.q_chunk_size,
            k_chunk_size=self.k_chunk_size,
            dropout_p=self.attn_pdrop if dropout else 0.0,
        ).to(self.dtype)
        x = x + F.dropout(self.out_proj(merge_heads(attn).transpose(0, 1)), self.resid_pdrop, training=dropout)

        remat = self.policy is not None and _POLICIES[self.policy] and torch.is_grad_enabled()
        outs = []
        for s in range(0, seq, self.q_chunk_size):
            chunk = x[:, s : s + self.q_chunk_size]
            if remat:
                outs.append(checkpoint(self._ffn, chunk, dropout, use_reentrant=False))
            else:
                outs.append(self._ffn(chunk, dropout))
        return x + torch.cat(outs, dim=1) if outs else x


#: AttentionGrid's class name.
BlockwiseParallelJax = BlockwiseParallel
