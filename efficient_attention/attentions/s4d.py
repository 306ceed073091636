"""S4D: a diagonal state-space sequence mixer in the attention slot (Gu et al. 2022).

Every channel ``c`` of ``u = q_proj(query)`` runs the linear recurrence
``x_l = exp(Δ·A) x_{l-1} + u_l``, ``y_l = 2·Re(C̃·x_l) + D·u_l`` (``d_state``
complex modes, S4D-Lin initialisation, zero-order hold ``C̃ = C(exp(ΔA) - 1)/A``),
i.e. a causal convolution with ``K_l = 2·Re(C̃·exp(ΔA·l))``.  Bidirectional: a
second kernel over the strictly later positions.  Then an activation and
``out_proj``.  It mixes the *query* sequence only: key and value are ignored
(self patterns only).

Two exact algorithms, both a fixed number of batched kernels whatever the length:

* causal (:func:`_scan`): chunks of 64 positions, a Toeplitz product inside a
  chunk, the state carried across chunks by a two-level scan written as two
  batched triangular matmuls (chunks within a group, then groups).  Masked
  entries are exact zeros, so a future input gets exactly zero gradient;
* noncausal (:func:`_fft_conv`): one FFT convolution with the kernel over both
  directions (what CAB does; rounding reaches across positions, which only a
  causal pattern forbids).

Decoding steps the recurrence with a constant ``(B, C, d_state)`` state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import AttentionMasks, EfficientAttention
from ..capabilities import SELF_PATTERNS, Capabilities
from ..functional import acc_dtype
from ..masks import as_bool_mask
from ..options import AttentionOptions, choice, option, positive_int
from ..registry import register_attention

__all__ = ["S4D"]

_ACTIVATIONS: Dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "identity": lambda x: x,
}

_CHUNK = 64


def _powers(dt_a: Tensor, exponents: Tensor) -> Tensor:
    """``exp(dtA)^k`` for real ``exponents`` of any shape: ``(C, n, *exponents.shape)`` complex.

    As ``exp(Re)·e^{i·Im}`` (``torch.polar``): a third of the CPU time of a complex ``exp``."""
    z = dt_a.view(*dt_a.shape, *([1] * exponents.dim())) * exponents.to(dt_a.real.dtype)
    return torch.polar(torch.exp(z.real), z.imag)


def _decay_matrix(dt_a: Tensor, step: int, rows: int, cols: int, strict: bool) -> Tensor:
    """Lower-triangular ``W[a, b] = λ^{step·(a - b - strict)}`` (zero above), ``(C, n, rows, cols)`` complex.

    The powers are computed once per lag and indexed."""
    a = torch.arange(rows, device=dt_a.device)[:, None]
    b = torch.arange(cols, device=dt_a.device)[None, :]
    lag = a - b - int(strict)
    powers = _powers(dt_a, torch.arange(rows, device=dt_a.device) * step)  # (C, n, rows)
    return powers[..., lag.clamp(min=0)] * (lag >= 0)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: the gradient of the mixer output arrives in the
    ``(T, B, C)`` order of ``out_proj``, a layout the CPU ``bmm`` backward would copy one matrix at a time."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def _as_pairs(x: Tensor) -> Tensor:
    """Complex ``(..., n)`` -> real ``(..., 2n)`` laid out as (re, im) pairs per mode."""
    return torch.view_as_real(x).flatten(-2)


def _scan(
    u: Tensor, dt_a: Tensor, c_bar: Tensor, x0: Optional[Tensor] = None, chunk: int = _CHUNK, need_state: bool = True
) -> Tuple[Tensor, Optional[Tensor]]:
    """Causal S4D convolution by chunks, exact (future inputs get exactly zero gradient).

    Args:
        u: ``(C, B, L)`` real inputs (channel first); dt_a, c_bar: ``(C, n)`` complex;
        x0: ``(C, B, n)`` complex state before ``u`` (None: zero).

    With ``λ = exp(dtA)`` and chunks of ``t`` positions: inside a chunk ``y = Toeplitz(K) u``;
    each chunk's own end state ``e_m = Σ_j λ^{t-1-j} u_j``; the chunk start states
    ``s_m = Σ_{j<m} λ^{t(m-1-j)} e_j + λ^{tm} x0`` by a two-level scan (groups of ``g`` chunks:
    one triangular matmul inside the groups, one across them); then ``y_i += 2·Re(C̃ λ^{i+1} s_m)``.
    Cost O(L·C·(t + n)) plus O(L/t · C·n·sqrt(L/t)); a fixed number of kernels.

    Returns ``(y (C, B, L) real, x (C, B, n) complex state after the last input, or None
    unless need_state)``.
    """
    channels, bsz, length = u.shape
    n = dt_a.shape[-1]
    t = max(1, min(chunk, length))
    n_chunks = -(-length // t)
    per_group = max(1, math.isqrt(n_chunks - 1) + 1)  # ceil(sqrt(n_chunks))
    groups = -(-n_chunks // per_group)
    padded = groups * per_group
    real = dt_a.real.dtype
    pos = torch.arange(t + 1, device=u.device, dtype=real)
    lam = _powers(dt_a, pos)  # (C, n, t+1): λ^0 .. λ^t
    w = c_bar[..., None] * lam  # C̃ λ^i
    kern = 2.0 * w[..., :t].sum(1).real  # (C, t)
    # Toeplitz, transposed: toe_t[c, j, i] = K[i - j] (exact zeros for i < j), as windows of the zero-padded kernel
    toe_t = F.pad(kern, (t - 1, 0)).unfold(-1, t, 1).flip(1)  # (C, t, t)
    # contiguous: a (C, B·M, t) view with another batch stride makes the CPU bmm copy one matrix at a time
    flat = F.pad(u, (0, padded * t - length)).reshape(channels, bsz * padded, t).contiguous()
    y = torch.bmm(flat, toe_t)  # (C, B·M, t)
    # end state of every chunk from zero: Σ_j λ^{t-1-j} u_j as real products with (re, im) pairs
    back = _as_pairs(lam[..., :t].flip(-1).transpose(1, 2))  # (C, t, 2n)
    ends = torch.view_as_complex(torch.bmm(flat, back).view(channels, bsz, groups, per_group, n, 2))
    # within a group: row a < g the start of chunk a from a zero group start, row g the group's end state
    inner = torch.einsum("cnaj,czgjn->czgan", _decay_matrix(dt_a, t, per_group + 1, per_group, True), ends)
    # across groups: state at every group start (from x0), and after the last group
    x0 = ends.new_zeros(channels, bsz, n) if x0 is None else x0
    group_ends = torch.cat([x0[:, :, None], inner[:, :, :, per_group]], 2)  # (C, B, G+1, n)
    group_starts = torch.einsum(
        "cngh,czhn->czgn", _decay_matrix(dt_a, t * per_group, groups + 1, groups + 1, False), group_ends
    )
    offsets = _powers(dt_a, torch.arange(per_group, device=u.device) * t).permute(0, 2, 1)  # (C, g, n): λ^{t·a}
    starts = inner[:, :, :, :per_group] + offsets[:, None, None] * group_starts[:, :, :groups, None]  # (C,B,G,g,n)
    out = _as_pairs((w[..., 1:]).transpose(1, 2)) * torch.tensor([2.0, -2.0], dtype=real, device=u.device).repeat(n)
    y = y + torch.bmm(_as_pairs(starts).reshape(channels, bsz * padded, 2 * n), out.transpose(1, 2))
    y = y.view(channels, bsz, padded * t)[..., :length]
    if not need_state:
        return y, None
    last = (length - 1) // t  # the chunk holding the last real input, and its real length
    rest = length - last * t
    u_last = flat.view(channels, bsz, padded, t)[:, :, last, :rest]
    tail = _as_pairs(lam[..., :rest].flip(-1).transpose(1, 2))  # (C, rest, 2n)
    x = lam[:, None, :, rest] * starts.reshape(channels, bsz, padded, n)[:, :, last]
    return y, x + torch.view_as_complex(torch.bmm(u_last, tail).view(channels, bsz, n, 2))


def _kernel(dt_a: Tensor, c_bar: Tensor, length: int, block: int = _CHUNK) -> Tensor:
    """``K_l = 2·Re(C̃ λ^l)`` for ``l < length`` as ``(C, length)``, by blocks ``λ^{at+b} = λ^{at} λ^b``."""
    t = max(1, min(block, length))
    blocks = -(-length // t)
    head = _powers(dt_a, torch.arange(blocks, device=dt_a.device) * t)  # (C, n, A)
    tail = c_bar[..., None] * _powers(dt_a, torch.arange(t, device=dt_a.device))  # (C, n, t)
    kern = 2.0 * torch.einsum("cna,cnb->cab", head, tail).real  # (C, A, t)
    return kern.reshape(dt_a.shape[0], blocks * t)[:, :length]


def _fft_conv(u: Tensor, forward: Tensor, backward: Optional[Tensor]) -> Tensor:
    """``y_l = Σ_{j<=l} K_f[l-j] u_j (+ Σ_{j>l} K_b[j-l-1] u_j)`` by one FFT; u ``(C, B, L)``, kernels ``(C, L)``."""
    length = u.shape[-1]
    size = 1 << max(1, (2 * length - 1).bit_length())  # a power of two >= 2L - 1: no wrap-around
    k = (
        forward
        if backward is None
        else torch.cat(
            [forward, forward.new_zeros(forward.shape[0], size - 2 * length + 1), backward[:, : length - 1].flip(-1)],
            -1,
        )
    )
    spec = torch.fft.rfft(u, n=size) * torch.fft.rfft(k, n=size)[:, None]
    return torch.fft.irfft(spec, n=size)[..., :length]


@dataclass(frozen=True)
class S4DOptions(AttentionOptions):
    d_state: int = positive_int(16, "number of complex state modes per channel (S4D-Lin initialisation)")
    bidirectional: Optional[bool] = option(
        None, "add a backward kernel over later positions (default: not causal; must be False if causal)"
    )
    activation: str = choice("gelu", sorted(_ACTIVATIONS), "activation after the state-space layer")


@register_attention("s4d", "s4")
class S4D(EfficientAttention):
    """Diagonal state-space (S4D) sequence mixer with the attention interface.

    ``y = act(K * u + D·u)`` per channel, ``u = q_proj(query)``, output
    ``out_proj(y)``; ``K`` is the S4D kernel above (plus a backward kernel when
    ``bidirectional``).  Key and value are **ignored** (``k_proj`` / ``v_proj``
    are tied to ``q_proj`` so no parameter is left untrained); key padding
    zeroes the padded inputs so they contribute nothing.  Patterns: noncausal self (FFT convolution),
    causal self (exact chunked scan; cross attention raises).  Cost
    O(N·C·(64 + d_state)) causal, O(N log N · C) noncausal, O(N·C) memory;
    decoding O(C·d_state) per token with constant state.
    """

    capabilities = Capabilities(patterns=SELF_PATTERNS, incremental=True, constant_state=True, backends=("torch",))
    Options = S4DOptions

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        d_state = self.d_state
        bidirectional = (not self.causal) if self.bidirectional is None else self.bidirectional
        if bidirectional and self.causal:
            raise ValueError("bidirectional=True cannot be combined with causal=True")
        if self.kdim != self.embed_dim or self.vdim != self.embed_dim:
            raise ValueError("S4D ignores key/value: kdim and vdim must equal embed_dim")
        self.bidirectional = bidirectional
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
        """Per-head ``(B, H, T, d)`` -> channels first ``(C, B, T)`` (channel ``h·d + i``), fp32+, padding zeroed."""
        bsz, heads, length, dim = q.shape
        u = q.to(acc_dtype(q.dtype)).permute(1, 3, 0, 2).reshape(heads * dim, bsz, length).contiguous()
        if kpm is not None:
            u = u.masked_fill(as_bool_mask(kpm, "key_padding_mask")[None], 0.0)
        return u

    def _finish(self, y: Tensor, u: Tensor, like: Tensor) -> Tensor:
        """``act(y + D·u)`` with dropout, back to per-head ``(B, H, T, d)``."""
        y = _ACTIVATIONS[self.activation](torch.addcmul(_ContiguousGrad.apply(y), self.d.to(y.dtype)[:, None, None], u))
        y = F.dropout(y, self.dropout_p, training=self.training)
        _, bsz, length = y.shape
        return y.to(like.dtype).view(self.num_heads, self.head_dim, bsz, length).permute(2, 0, 3, 1)

    def _discrete_for_steps(self, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """:meth:`_discrete` kept between decoding steps without autograd, until a parameter changes (its
        version counter moves with every in-place update, an optimizer step included)."""
        if torch.is_grad_enabled():
            return self._discrete(dtype)
        params = (self.log_dt, self.log_a_real, self.a_imag, self.c)
        key = (dtype, self.log_dt.device, tuple(p._version for p in params), tuple(p.data_ptr() for p in params))
        hit = self.__dict__.get("_step_discrete")
        if hit is None or hit[0] != key:
            hit = self.__dict__["_step_discrete"] = (key, self._discrete(dtype))
        return hit[1]

    # ------------------------------------------------------------------- hooks
    # The state-space math runs outside autocast: _inputs/_discrete already work in
    # fp32 and complex ops have no half-precision kernels (bf16 autocast failed).
    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks, need_weights: bool
    ) -> Tuple[Tensor, Optional[Tensor]]:
        with torch.autocast(q.device.type, enabled=False):
            return self._mix(q, masks)

    def _mix(self, q: Tensor, masks: AttentionMasks) -> Tuple[Tensor, Optional[Tensor]]:
        u = self._inputs(q, masks.key_padding)
        dt_a, c_bar = self._discrete(q.dtype)
        if self.causal:  # exact: a future input gets exactly zero gradient
            y, _ = _scan(u, dt_a[0], c_bar[0], need_state=False)
        else:
            length = u.shape[-1]
            back = _kernel(dt_a[1], c_bar[1], length) if self.bidirectional else None
            y = _fft_conv(u, _kernel(dt_a[0], c_bar[0], length), back)
        return self._finish(y, u, q), None

    def _attend_step(self, q: Tensor, k: Optional[Tensor], v: Optional[Tensor], state, masks: AttentionMasks) -> Tensor:
        """``T`` new positions continuing the recurrence state ``x (B, C, d_state)`` (stored as real pairs)."""
        prev = state.get("ssm_state")
        with torch.autocast(q.device.type, enabled=False):
            u = self._inputs(q, masks.key_padding)
            dt_a, c_bar = self._discrete_for_steps(q.dtype)
            x0 = None if prev is None else torch.view_as_complex(prev).transpose(0, 1)  # (C, B, n), a view
            if x0 is not None and u.shape[-1] == 1:  # one token: x = λ x0 + u, y = 2 Re(C̃ x), a few kernels
                x = torch.addcmul(u.to(x0.dtype), torch.exp(dt_a[0])[:, None], x0)
                y = 2.0 * (c_bar[0][:, None] * x).real.sum(-1, keepdim=True)
            else:
                y, x_out = _scan(u, dt_a[0], c_bar[0], x0)
                assert x_out is not None  # need_state=True returns the final state
                x = x_out
        state["ssm_state"] = torch.view_as_real(x.transpose(0, 1))
        return self._finish(y, u, q)
