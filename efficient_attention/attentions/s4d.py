"""S4D: a diagonal state-space sequence mixer in the attention slot (Gu et al. 2022).

Every channel ``c`` of ``u = q_proj(query)`` runs the linear recurrence
``x_l = exp(Δ·A) x_{l-1} + u_l``, ``y_l = 2·Re(C̃·x_l) + D·u_l`` (``d_state``
complex modes, S4D-Lin initialisation, zero-order hold ``C̃ = C(exp(ΔA) - 1)/A``),
i.e. a causal convolution with ``K_l = 2·Re(C̃·exp(ΔA·l))``, computed exactly by
chunks (Toeplitz within a chunk, the state carried across chunks).  Bidirectional: a second kernel over the strictly later positions.
Then an activation and ``out_proj``.  It mixes the *query* sequence only: key
and value are ignored (self patterns only).  Decoding steps the recurrence with
a constant ``(B, C, d_state)`` state.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import AttentionMasks, EfficientAttention, check_bool
from ..capabilities import SELF_PATTERNS, Capabilities
from ..functional import acc_dtype, merge_heads
from ..masks import as_bool_mask
from ..registry import register_attention

__all__ = ["S4D"]

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh, "identity": lambda x: x}


_CHUNK = 64


def _scan(u: Tensor, dt_a: Tensor, c_bar: Tensor, x0: Optional[Tensor] = None, chunk: int = _CHUNK) -> Tuple[Tensor, Tensor]:
    """Causal S4D scan by chunks: exact (future inputs get exactly zero gradient).

    Args:
        u: ``(B, C, L)`` real inputs; dt_a, c_bar: ``(C, n)`` complex; x0: ``(B, C, n)`` complex state before ``u``.

    Within a chunk ``y = Toeplitz(K) u`` (``K_l = 2·Re(C̃ λ^l)``, ``λ = exp(dtA)``);
    across chunks the state ``x`` is carried: ``y_i += 2·Re(C̃ λ^{i+1} x)``,
    ``x <- λ^T x + sum_j λ^{T-1-j} u_j``.  Cost O(L·C·(chunk + n)).

    Returns ``(y (B, C, L) real, x (B, C, n) complex state after the last input)``.
    """
    bsz, channels, length = u.shape
    t = max(1, min(chunk, length))
    n_chunks = -(-length // t)
    pos = torch.arange(t + 1, device=u.device, dtype=dt_a.real.dtype)
    lam = torch.exp(dt_a[..., None] * pos)                                 # (C, n, t+1): λ^0 .. λ^t
    kern = 2.0 * torch.einsum("cn,cnl->cl", c_bar, lam[..., :t]).real      # (C, t)
    i = torch.arange(t, device=u.device)
    lag = i[:, None] - i[None, :]
    toe = torch.where(lag >= 0, kern[:, lag.clamp(min=0)], kern.new_zeros(()))  # (C, t, t)
    uc = F.pad(u, (0, n_chunks * t - length)).view(bsz, channels, n_chunks, t)
    # Toeplitz products as one contiguous bmm per channel (einsum's layouts hit a slow CPU bmm in backward)
    flat = uc.permute(1, 0, 2, 3).reshape(channels, bsz * n_chunks, t).contiguous()
    y = torch.bmm(flat, toe.transpose(1, 2).contiguous()).view(channels, bsz, n_chunks, t).permute(1, 0, 2, 3)
    # each chunk's own end state sum_j λ^{t-1-j} u_j (real inputs times complex powers, as real products)
    back = lam[..., :t].flip(-1)
    local = torch.complex(torch.einsum("bcmj,cnj->bcmn", uc, back.real), torch.einsum("bcmj,cnj->bcmn", uc, back.imag))
    x = torch.zeros(bsz, channels, dt_a.shape[-1], dtype=lam.dtype, device=u.device) if x0 is None else x0
    starts, lam_t = [], lam[..., t]
    for local_m in local.unbind(2):
        starts.append(x)
        x = lam_t * x + local_m
    start = torch.stack(starts, 2)                                          # (B, C, m, n)
    w = c_bar[..., None] * lam[..., 1:]                                    # C̃ λ^{i+1}: (C, n, t)
    carried = 2.0 * (torch.einsum("bcmn,cni->bcmi", start.real, w.real) - torch.einsum("bcmn,cni->bcmi", start.imag, w.imag))
    y = (y + carried).reshape(bsz, channels, n_chunks * t)[..., :length]
    if n_chunks * t != length:  # the state after the real last input (not after the padding)
        rest = length - (n_chunks - 1) * t
        tail = lam[..., :rest].flip(-1)
        u_last = uc[:, :, -1, :rest]
        x = lam[..., rest] * starts[-1] + torch.complex(torch.einsum("bcj,cnj->bcn", u_last, tail.real),
                                                         torch.einsum("bcj,cnj->bcn", u_last, tail.imag))
    return y, x


@register_attention("s4d", "s4")
class S4D(EfficientAttention):
    """Diagonal state-space (S4D) sequence mixer with the attention interface.

    ``y = act(K * u + D·u)`` per channel, ``u = q_proj(query)``, output
    ``out_proj(y)``; ``K`` is the S4D kernel above (plus a backward kernel when
    ``bidirectional``).  Key and value are **ignored** (``k_proj`` / ``v_proj``
    are tied to ``q_proj`` so no parameter is left untrained); key padding
    zeroes the padded inputs so they contribute nothing.  Patterns: noncausal
    self, causal self (cross attention raises).  Cost O(N·C·(64 + d_state)) time,
    O(N·C) memory; decoding O(C·d_state) per token with constant state.
    """

    capabilities = Capabilities(patterns=SELF_PATTERNS, incremental=True, constant_state=True, backends=("torch",))
    option_help = {
        "d_state": "number of complex state modes per channel (S4D-Lin initialisation)",
        "bidirectional": "add a backward kernel over later positions (default: not causal; must be False if causal)",
        "activation": f"activation after the state-space layer, one of {sorted(_ACTIVATIONS)}",
    }

    def __init__(self, *args, d_state: int = 16, bidirectional: Optional[bool] = None, activation: str = "gelu", **kwargs):
        super().__init__(*args, **kwargs)
        if isinstance(d_state, bool) or not isinstance(d_state, int) or d_state <= 0:
            raise ValueError(f"d_state must be a positive integer, got {d_state!r}")
        bidirectional = (not self.causal) if bidirectional is None else check_bool(bidirectional, "bidirectional")
        if bidirectional and self.causal:
            raise ValueError("bidirectional=True cannot be combined with causal=True")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        if self.kdim != self.embed_dim or self.vdim != self.embed_dim:
            raise ValueError("S4D ignores key/value: kdim and vdim must equal embed_dim")
        self.d_state, self.bidirectional, self.activation = d_state, bidirectional, activation
        self.k_proj = self.v_proj = self.q_proj  # key/value are ignored: no separate, untrained projections
        channels, kernels = self.embed_dim, 2 if bidirectional else 1
        self.log_dt = nn.Parameter(torch.empty(kernels, channels))
        self.log_a_real = nn.Parameter(torch.empty(kernels, channels, d_state))
        self.a_imag = nn.Parameter(torch.empty(kernels, channels, d_state))
        self.c = nn.Parameter(torch.empty(kernels, channels, d_state, 2))  # complex as (real, imag)
        self.d = nn.Parameter(torch.empty(channels))
        self._init_ssm()

    def _init_ssm(self) -> None:
        with torch.no_grad():
            self.log_dt.uniform_(math.log(1e-3), math.log(1e-1))
            self.log_a_real.fill_(math.log(0.5))
            self.a_imag.copy_(math.pi * torch.arange(self.d_state, dtype=self.a_imag.dtype).expand_as(self.a_imag))
            self.c.normal_(0.0, 0.5**0.5)
            self.d.normal_()

    # ------------------------------------------------------------------- math
    def _discrete(self, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """``(dtA, C̃)`` complex ``(kernels, C, d_state)`` in the accumulation precision."""
        real = acc_dtype(dtype)
        a = torch.complex(-torch.exp(self.log_a_real.to(real)), self.a_imag.to(real))
        dt_a = a * torch.exp(self.log_dt.to(real))[..., None]
        c = torch.view_as_complex(self.c.to(real).contiguous())
        return dt_a, c * (torch.exp(dt_a) - 1.0) / a

    def _inputs(self, q: Tensor, kpm: Optional[Tensor]) -> Tensor:
        """Per-head ``(B, H, T, d)`` -> channels ``(B, C, T)`` in the accumulation precision, padding zeroed."""
        u = merge_heads(q).permute(1, 2, 0).to(acc_dtype(q.dtype))  # (B, C, T)
        if kpm is not None:
            u = u.masked_fill(as_bool_mask(kpm, "key_padding_mask")[:, None, :], 0.0)
        return u

    def _finish(self, y: Tensor, u: Tensor, like: Tensor) -> Tensor:
        """``act(y + D·u)`` with dropout, back to per-head ``(B, H, T, d)``."""
        y = _ACTIVATIONS[self.activation](y + self.d.to(y.dtype)[:, None] * u)
        y = F.dropout(y, self.dropout_p, training=self.training)
        bsz, _, length = y.shape
        return y.to(like.dtype).view(bsz, self.num_heads, self.head_dim, length).transpose(-1, -2)

    # ------------------------------------------------------------------- hooks
    # The state-space math runs outside autocast: _inputs/_discrete already work in
    # fp32 and complex ops have no half-precision kernels (bf16 autocast failed).
    def _attend(self, q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks, need_weights: bool) -> Tuple[Tensor, Optional[Tensor]]:
        with torch.autocast(q.device.type, enabled=False):
            return self._mix(q, masks)

    def _mix(self, q: Tensor, masks: AttentionMasks) -> Tuple[Tensor, Optional[Tensor]]:
        u = self._inputs(q, masks.key_padding)
        dt_a, c_bar = self._discrete(q.dtype)
        y, _ = _scan(u, dt_a[0], c_bar[0])
        if self.bidirectional:  # later positions j > l, lag j - l - 1: the causal scan of the reversed sequence
            back, _ = _scan(u.flip(-1), dt_a[1], c_bar[1])
            y = y + F.pad(back.flip(-1)[..., 1:], (0, 1))
        return self._finish(y, u, q), None

    def _attend_step(
        self,
        q: Tensor,
        k: Optional[Tensor],
        v: Optional[Tensor],
        state: Dict[str, Optional[Tensor]],
        masks: AttentionMasks,
        attn_mask: Optional[Tensor],
        need_weights: bool,
        static_kv: bool,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """``T`` new positions continuing the recurrence state ``x (B, C, d_state)`` (stored as real pairs)."""
        prev = state.get("ssm_state")
        tgt_len = q.shape[2]
        prev_len = 0 if prev is None else int(state["position"][0].item())
        u = self._inputs(q, masks.key_padding)
        dt_a, c_bar = self._discrete(q.dtype)
        x0 = None if prev is None else torch.view_as_complex(prev.contiguous())
        with torch.autocast(q.device.type, enabled=False):
            y, x = _scan(u, dt_a[0], c_bar[0], x0)
        state["ssm_state"] = torch.view_as_real(x)
        state["position"] = torch.full((q.shape[0],), prev_len + tgt_len, dtype=torch.long, device=q.device)
        return self._finish(y, u, q), None
