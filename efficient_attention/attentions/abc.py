"""ABC (Peng et al., 2021): attention over a bounded memory of ``n`` learned-control slots.

``K̃_l = Σ_j α_jl k_j``, ``Ṽ_l = Σ_j α_jl v_j`` with ``α_·l = softmax_j(w_l·k_j)``;
``out_i = softmax_l(q_i·K̃_l / √d) Ṽ`` -- softmax attention over ``n`` slots instead of ``S`` keys.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import AttentionMasks, EfficientAttention
from ..capabilities import ALL_PATTERNS, Capabilities
from ..functional import acc_dtype, dense_attention, softmax
from ..masks import causal_mask
from ..registry import register_attention

__all__ = ["ABC"]

_CHUNK = 32  # causal chunk length: the per-chunk weights are (chunk, chunk, n)


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
    Patterns: all four.  Causal attention works by chunks of 32 with running
    sums (never an ``(N, n, d)`` tensor), each query stabilised by the max of
    the scores it sees; decoding keeps only the running memory, normaliser
    and per-slot max (constant state); ``static_kv``
    caches the key-side memory.  ``key_padding_mask`` honoured (padded keys
    never enter the memory); an arbitrary ``attn_mask`` is not.  Dropout is
    applied to the slot probabilities.  Half inputs compute in fp32.

    Cost: O((T + S)·n·d) time (causal: + O(N·32·(n + d))); O((T + S)·n + n·d)
    memory per head (causal: O(N·32·n) saved for the backward).
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
            "mem_k": zeros,  # Σ e^{a_jl - max_l} k_j
            "mem_v": zeros,  # Σ e^{a_jl - max_l} v_j
            "mem_norm": zeros[..., 0],  # Σ e^{a_jl - max_l}
            "mem_max": torch.full_like(zeros[..., 0], float("-inf")),  # running max_l of a_jl
        }

    @staticmethod
    def _rescale(state: Dict[str, Tensor], a: Tensor) -> Tensor:
        """Raise the per-slot running max to cover ``a``; rescale the sums; return ``e^{a - max}``."""
        old = state["mem_max"]
        new = torch.maximum(old, a.detach().amax(-2)) if a.shape[-2] else old
        safe = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
        scale = torch.where(torch.isfinite(old), torch.exp(old - safe), torch.zeros_like(safe))
        state["mem_k"] = state["mem_k"] * scale.unsqueeze(-1)
        state["mem_v"] = state["mem_v"] * scale.unsqueeze(-1)
        state["mem_norm"] = state["mem_norm"] * scale
        state["mem_max"] = new
        return torch.exp(a - safe.unsqueeze(-2))

    @staticmethod
    def _absorb(state: Dict[str, Tensor], e: Tensor, k: Tensor, v: Tensor) -> None:
        state["mem_k"] = state["mem_k"] + torch.matmul(e.transpose(-1, -2), k)
        state["mem_v"] = state["mem_v"] + torch.matmul(e.transpose(-1, -2), v)
        state["mem_norm"] = state["mem_norm"] + e.sum(-2)

    def _chunk(self, q: Tensor, k: Tensor, v: Tensor, a: Tensor, state: Dict[str, Tensor]) -> Tensor:
        """Queries aligned with keys: query ``i`` reads the memory of the past and of keys ``<= i`` here.

        Stabilised per query and slot by the running max ``c_il`` of the scores it sees (never by a
        later key): key ``j`` weighs ``e^{a_jl - c_jl} e^{c_jl - c_il}``, the past ``e^{max_l - c_il}``.
        """
        c = q.shape[-2]
        past = state["mem_max"]  # (B, H, n)
        run = torch.maximum(torch.cummax(a.detach(), dim=-2).values, past.unsqueeze(-2))  # (B, H, c, n)
        safe = torch.where(torch.isfinite(run), run, torch.zeros_like(run))
        e = torch.exp(a - safe)  # key j at its own running max
        future = causal_mask(c, c, device=q.device)
        rel = (safe.unsqueeze(-3) - safe.unsqueeze(-2)).masked_fill(future.unsqueeze(-1), float("-inf"))
        g = e.unsqueeze(-3) * torch.exp(rel)  # (B, H, i, j, n): weight of key j in query i's slot sums
        carry = torch.where(torch.isfinite(past).unsqueeze(-2), torch.exp(past.unsqueeze(-2) - safe), torch.zeros_like(safe))
        norm = carry * state["mem_norm"].unsqueeze(-2) + g.sum(-2)  # (B, H, c, n)
        qk = torch.matmul(q, k.transpose(-1, -2))
        num = carry * torch.matmul(q, state["mem_k"].transpose(-1, -2)) + torch.einsum("bhij,bhijn->bhin", qk, g)
        empty = norm <= 0
        safe_norm = torch.where(empty, torch.ones_like(norm), norm)
        probs = softmax((num / safe_norm * self.scaling).masked_fill(empty, float("-inf")), dim=-1)
        if self.training and self.dropout_p > 0:
            probs = F.dropout(probs, self.dropout_p, training=True)
        r = probs / safe_norm  # (B, H, c, n): weight of each slot's unnormalised value sum
        out = torch.matmul(r * carry, state["mem_v"]) + torch.matmul(torch.einsum("bhin,bhijn->bhij", r, g), v)
        last = safe[..., -1, :]  # the memory moves to the scale of the chunk's last position
        to_last = e * torch.exp(safe - last.unsqueeze(-2))
        keep = torch.where(torch.isfinite(past), torch.exp(past - last), torch.zeros_like(last))
        state["mem_k"] = state["mem_k"] * keep.unsqueeze(-1)
        state["mem_v"] = state["mem_v"] * keep.unsqueeze(-1)
        state["mem_norm"] = state["mem_norm"] * keep
        state["mem_max"] = run[..., -1, :]
        self._absorb(state, to_last, k, v)
        return out

    def _causal(self, q: Tensor, k: Tensor, v: Tensor, kpm: Optional[Tensor], state: Dict[str, Tensor]) -> Tensor:
        """Causal ABC for queries that are the last ``T`` of the ``S`` new keys (``state`` holds the past)."""
        a = self._slot_scores(k, kpm)
        offset = k.shape[-2] - q.shape[-2]
        if offset > 0:  # keys every query sees
            self._absorb(state, self._rescale(state, a[..., :offset, :]), k[..., :offset, :], v[..., :offset, :])
            a, k, v = a[..., offset:, :], k[..., offset:, :], v[..., offset:, :]
        blind = max(-offset, 0)  # queries before the first key see nothing
        outs = [q.new_zeros(*q.shape[:2], blind, v.shape[-1])]
        q = q[..., blind:, :]
        # split (not slicing in a loop): its backward concatenates once instead of one full-size gradient per chunk
        for q_c, k_c, v_c, a_c in zip(*(t.split(_CHUNK, dim=-2) for t in (q, k, v, a))):
            outs.append(self._chunk(q_c, k_c, v_c, a_c, state))
        return torch.cat(outs, dim=-2)

    # ------------------------------------------------------------------ hooks
    def _attend(self, q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks, need_weights: bool):
        dtype = acc_dtype(q.dtype)
        q32, k32, v32 = q.to(dtype), k.to(dtype), v.to(dtype)
        if self.causal:
            out = self._causal(q32, k32, v32, masks.key_padding, self._new_state(q32))
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
        out = self._causal(q32, k.to(dtype), v.to(dtype), kpm, sums)
        state.update(sums)
        return out.to(q.dtype), None
