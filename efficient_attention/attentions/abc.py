"""ABC (Peng et al., 2021): attention over a bounded memory of ``n`` learned-control slots.

``K̃_l = Σ_j α_jl k_j``, ``Ṽ_l = Σ_j α_jl v_j`` with ``α_·l = softmax_j(w_l·k_j)``;
``out_i = softmax_l(q_i·K̃_l / √d) Ṽ`` -- softmax attention over ``n`` slots instead of ``S`` keys.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import AttentionMasks, EfficientAttention
from ..capabilities import ALL_PATTERNS, Capabilities
from ..functional import acc_dtype, dense_attention, softmax
from ..kernels.linear_attention import linear_attention
from ..registry import register_attention

__all__ = ["ABC"]


@register_attention("abc")
class ABC(EfficientAttention):
    """Attention with bounded-memory control (ABC-MLP style control, per head).

    Math: slot scores ``a_jl = w_l·k_j`` (``w`` is the parameter
    ``landmark_proj`` ``(H, n, d)``); a query sees the memory of the keys it may
    attend to: ``K̃_l = Σ_j e^{a_jl} k_j / Σ_j e^{a_jl}`` (same for ``Ṽ``), then
    ``out = softmax(q K̃ᵀ / √d) Ṽ``.  Causal queries use the running
    (cumulative) memory and normaliser of the keys up to their position;
    cross attention builds the memory from the key side.

    Shapes: q ``(B, H, T, d)``, k/v ``(B, H, S, d)``, memory ``(B, H, n, d)``.
    Patterns: all four.  Causal attention is three chunked linear attentions
    (:func:`~efficient_attention.kernels.linear_attention.linear_attention`:
    slot scores, slot normalisers, output; never an ``(N, n, d)`` tensor), the
    slot weights stabilised in the log domain by the running max of all slot
    scores so far (a slot whose scores stay ~80 below the best slot's
    underflows to empty in fp32); decoding keeps only the running memory,
    normaliser and that max (constant state), and a prefill hands its memory
    to decoding; ``static_kv`` caches the key-side memory.
    ``key_padding_mask`` honoured (padded keys never enter the memory); an
    arbitrary ``attn_mask`` is not.  Dropout is applied to the slot
    probabilities.  Half inputs: scores and weights in fp32, rounded to the
    input dtype for the kernels, which accumulate in fp32.

    Cost: O((T + S)·n·d) time (causal: + O(N·C·(n + d)) for chunks of ``C``);
    O((T + S)·n + n·d) memory per head.
    """

    capabilities = Capabilities(patterns=ALL_PATTERNS, incremental=True, constant_state=True)
    option_help = {"num_landmarks": "number of memory slots n"}

    def __init__(self, *args, num_landmarks: int = 16, **kwargs):
        super().__init__(*args, **kwargs)
        if isinstance(num_landmarks, bool) or not isinstance(num_landmarks, int) or num_landmarks <= 0:
            raise ValueError(f"num_landmarks must be a positive integer, got {num_landmarks!r}")
        self.num_landmarks = num_landmarks
        self.landmark_proj = nn.Parameter(torch.empty(self.num_heads, num_landmarks, self.head_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "landmark_proj"):  # the base calls this before the slot projection exists
            nn.init.normal_(self.landmark_proj, std=self.head_dim**-0.5)

    def _slot_scores(self, k: Tensor, kpm: Optional[Tensor]) -> Tensor:
        """``a = k wᵀ`` ``(B, H, S, n)``, padded keys at ``-inf``."""
        a = torch.einsum("bhsd,hnd->bhsn", k, self.landmark_proj.to(k.dtype))
        if kpm is not None:
            a = a.masked_fill(kpm[:, None, :, None], float("-inf"))
        return a

    def _memory(self, k: Tensor, v: Tensor, kpm: Optional[Tensor]):
        """Key-side memory ``(K̃, Ṽ)`` ``(B, H, n, d)`` over every (unpadded) key."""
        alpha = softmax(self._slot_scores(k, kpm), dim=-2).to(k.dtype)  # over keys; all padded -> 0
        return torch.matmul(alpha.transpose(-1, -2), k), torch.matmul(alpha.transpose(-1, -2), v)

    def _read(self, q: Tensor, mem_k: Tensor, mem_v: Tensor) -> Tensor:
        dropout = self.dropout_p if self.training else 0.0
        return dense_attention(q, mem_k, mem_v, scale=self.scaling, dropout_p=dropout, training=self.training)[0]

    # ----------------------------------------------------------------- causal
    def _new_state(self, q: Tensor) -> Dict[str, Tensor]:
        bsz, n, d = q.shape[0], self.num_landmarks, self.head_dim
        zeros = q.new_zeros(bsz, self.num_heads, n, d)
        return {
            "mem_k": zeros,  # Σ_j e^{a_jl - c} k_j at the running max c
            "mem_v": zeros,  # Σ_j e^{a_jl - c} v_j
            "mem_norm": zeros[..., 0],  # Σ_j e^{a_jl - c}
            "mem_max": q.new_full((bsz, self.num_heads, 1), float("-inf")),  # c: running max of the slot scores
        }

    @staticmethod
    def _kernel_dtype(dtype: torch.dtype) -> torch.dtype:
        """fp16 would overflow on ``1 / normaliser`` (above 65504): it runs the kernels in fp32."""
        return torch.float32 if dtype == torch.float16 else dtype

    def _causal(self, q: Tensor, k: Tensor, v: Tensor, kpm: Optional[Tensor], state: Dict[str, Tensor],
                dtype: torch.dtype) -> Tensor:
        """Causal ABC for queries that are the last ``T`` of the ``S`` new keys (``state`` holds the past).

        Three causal linear attentions (:func:`linear_attention`) with the slot weights
        ``e_j = exp(a_j - c_j)`` (``c_j``: running max of the scores so far, carried by the log decay
        ``c_{j-1} - c_j``, so query ``i`` sees ``exp(a_jl - c_i)``): the slot scores
        ``Σ_j (q_i·k_j) e_jl`` (features ``q, k``, values ``e``), the normalisers ``Σ_j e_jl`` (unit
        features), then, with ``r_i = softmax_l(scores / normaliser) / normaliser``, the output
        ``Σ_j (r_i·e_j) v_j`` (features ``r, e``).  Casts to ``dtype`` for the kernels.
        """
        tgt_len, src_len = q.shape[-2], k.shape[-2]
        blind = max(tgt_len - src_len, 0)  # queries before the first key see nothing
        if src_len == 0:
            return q.new_zeros(*q.shape[:-1], v.shape[-1])
        q = q[..., blind:, :]
        a = self._slot_scores(k, kpm)  # (B, H, S, n)
        past = state["mem_max"]  # (B, H, 1)
        run = torch.maximum(torch.cummax(a.detach().amax(-1), dim=-1).values, past)  # (B, H, S)
        safe = torch.where(torch.isfinite(run), run, torch.zeros_like(run))
        prev = torch.cat([past, run[..., :-1]], dim=-1)
        decay = torch.where(torch.isfinite(prev), prev - safe, torch.zeros_like(safe))  # nothing before: no decay
        e = torch.exp(a - safe.unsqueeze(-1)).to(dtype)

        def scan(a: Tensor, b: Tensor, c: Tensor, memory: Tensor) -> Tuple[Tensor, Tensor]:
            """Unnormalised decayed causal scan from ``memory``: ``(out, new memory)``."""
            out, (new, _) = linear_attention(a, b, c, causal=True, log_decay=decay, normalize=False,
                                             initial_state=(memory, None), return_state=True)
            return out, new

        num, mem_k = scan(q.to(dtype), k.to(dtype), e, state["mem_k"].transpose(-1, -2))
        unit_q, unit_k = q.new_ones(*q.shape[:-1], 1).to(dtype), k.new_ones(*k.shape[:-1], 1).to(dtype)
        norm, mem_norm = scan(unit_q, unit_k, e, state["mem_norm"].unsqueeze(-2))
        empty = norm <= torch.finfo(norm.dtype).tiny * 1e8  # also underflowed slots: 1 / norm must stay finite
        safe_norm = torch.where(empty, torch.ones_like(norm), norm)
        probs = softmax((num / safe_norm * self.scaling).masked_fill(empty, float("-inf")), dim=-1)
        if self.training and self.dropout_p > 0:
            probs = F.dropout(probs, self.dropout_p, training=True)
        r = (probs / safe_norm).to(dtype)  # weight of each slot's unnormalised value sum
        out, state["mem_v"] = scan(r, e, v.to(dtype), state["mem_v"])
        state["mem_k"], state["mem_norm"] = mem_k.transpose(-1, -2), mem_norm.squeeze(-2)
        state["mem_max"] = run[..., -1:]
        return torch.cat([out.new_zeros(*out.shape[:2], blind, out.shape[-1]), out], dim=-2) if blind else out

    # ------------------------------------------------------------------ hooks
    def _attend(self, q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks, need_weights: bool):
        dtype = acc_dtype(q.dtype)
        q32, k32, v32 = q.to(dtype), k.to(dtype), v.to(dtype)
        if self.causal:
            out = self._causal(q32, k32, v32, masks.key_padding, self._new_state(q32), self._kernel_dtype(q.dtype))
        else:
            out = self._read(q32, *self._memory(k32, v32, masks.key_padding))
        return out.to(q.dtype), None

    def _attend_step(self, q, k, v, state, masks: AttentionMasks, attn_mask, need_weights, static_kv):
        tgt_len = q.shape[2]
        kpm = masks.key_padding  # bool; a causal attn_mask was checked and dropped by the base
        dtype = acc_dtype(q.dtype)
        q32 = q.to(dtype)
        if static_kv:
            if "prev_key" not in state:  # prev_key / prev_value hold the key-side memory K̃ / Ṽ (B, H, n, d)
                state["prev_key"], state["prev_value"] = self._memory(k.to(dtype), v.to(dtype), kpm)
            return self._read(q32, state["prev_key"], state["prev_value"]).to(q.dtype), None
        if "mem_k" in state and k.shape[2] < tgt_len:
            raise ValueError(f"ABC decoding needs at least as many new keys ({k.shape[2]}) as new queries ({tgt_len})")
        names = ("mem_k", "mem_v", "mem_norm", "mem_max")
        sums = {n: state[n] for n in names} if "mem_k" in state else self._new_state(q32)
        out = self._causal(q32, k.to(dtype), v.to(dtype), kpm, sums, self._kernel_dtype(q.dtype))
        state.update(sums)
        return out.to(q.dtype), None
