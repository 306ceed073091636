"""S4D: a diagonal state-space sequence mixer in the attention slot (Gu et al. 2022).

Every channel ``c`` of ``u = q_proj(query)`` runs the linear recurrence
``x_l = exp(Δ·A) x_{l-1} + u_l``, ``y_l = 2·Re(C̃·x_l) + D·u_l`` (``d_state``
complex modes, S4D-Lin initialisation, zero-order hold ``C̃ = C(exp(ΔA) - 1)/A``),
i.e. a causal convolution with ``K_l = 2·Re(C̃·exp(ΔA·l))``.  Bidirectional: a
second kernel over the strictly later positions.  Then an activation and
``out_proj``.  It mixes the *query* sequence only: key and value are ignored
(self patterns only).

On CUDA (fp16 / bf16 / fp32 inputs, up to 32 modes, eager) both patterns run on one Triton kernel per direction
(:class:`_FusedConvolution`, ``kernels/_triton_s4d.py``: the exact recurrence in chunks of 64, forward and
backward).  Elsewhere, two exact PyTorch algorithms, both a fixed number of batched kernels whatever the length:

* causal (:func:`_scan`, :class:`_CausalScan`): chunks of 64 positions, a Toeplitz product inside a
  chunk, the state carried across chunks by a two-level scan written as two
  batched triangular matmuls (chunks within a group, then groups).  Masked
  entries are exact zeros, so a future input gets exactly zero gradient.  It reads
  the per-head projection and writes the output in their own layouts (one copy
  each way) and its backward is the transposed scan in the same layout;
* noncausal (:class:`_FFTConvolution`): one FFT convolution with the kernel over both
  directions (what CAB does; rounding reaches across positions, which only a
  causal pattern forbids).

Decoding steps the recurrence with a constant ``(B, C, d_state)`` state.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import AttentionMasks, EfficientAttention
from ..capabilities import SELF_PATTERNS, Capabilities
from ..functional import acc_dtype, may_keep_derived, take_inputs
from ..kernels.backends import TRITON_DTYPES, triton_interpreted, triton_probe, triton_reason
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
_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64}  # (torch.compile: no dtype.to_real)
_COMPLEX = {v: k for k, v in _REAL.items()}
_FFT_CHUNK_BYTES = 40 << 20  # spectrum bytes per batch chunk of the FFT convolution: bounds its peak memory


def _powers(dt_a: Tensor, exponents: Tensor) -> Tensor:
    """``exp(dtA)^k`` for real ``exponents`` of any shape: ``(C, n, *exponents.shape)`` complex.

    On the CPU as ``exp(Re)·e^{i·Im}`` (``torch.polar``): a third of the time of a complex ``exp`` there; on a
    GPU one complex ``exp`` (fewer launches)."""
    z = dt_a.view(*dt_a.shape, *([1] * exponents.dim())) * exponents.to(_REAL[dt_a.dtype])
    if z.is_cuda:
        return torch.exp(z)
    parts = torch.view_as_real(z)
    return torch.polar(torch.exp(parts[..., 0]), parts[..., 1])


def _as_pairs(x: Tensor) -> Tensor:
    """Complex ``(..., n)`` -> real ``(..., 2n)`` laid out as (re, im) pairs per mode."""
    return torch.view_as_real(x).flatten(-2)


@functools.lru_cache(maxsize=64)
def _scan_indices(t: int, per_group: int, groups: int, device: torch.device) -> Tuple[Tensor, Tensor, Tensor]:
    """The length-only part of the scan plan, kept per shape: exponents ``E`` (real, ``λ^E`` is all the plan
    needs), the gather index of the real-form matrices into the table of :func:`_scan_plan` and that of the
    transposed Toeplitz.

    A complex ``z = λ^e`` acting on ``(re, im)`` is the real 2x2 block ``[[re, -im], [im, re]]``; entry
    ``(p', p)`` of the block is ``Re(e^{iφ} z)`` with ``φ = 0, π/2, -π/2, 0`` (``q = 2p' + p``): the table holds
    ``Re(e^{iφ_q} λ^{E_e})`` at ``q·|E| + e`` and a zero last (masked entries point there, so they are exact
    zeros)."""
    g, big = per_group, groups
    exps = torch.cat([torch.arange(t + 1), t * torch.arange(g), t * g * torch.arange(big)])  # λ^0..λ^t, λ^{ta}, ..
    n_e = exps.numel()
    zero = 4 * n_e
    lag_base, group_base = t + 1, t + 1 + g

    def real_form(rows: Tensor, cols: Tensor, lag: Tensor, base: int) -> Tensor:
        """``(2R, 2Cc)`` indices of a complex ``(R, Cc)`` matrix with entries ``λ^{E[base + lag]}`` (0 where
        lag < 0), rows ``(p', r)`` and columns ``(p, c)`` with the real/imaginary part outermost."""
        q = 2 * torch.arange(2)[:, None, None, None] + torch.arange(2)[None, None, :, None]  # (2, 1, 2, 1)
        idx = q * n_e + base + lag.clamp(min=0)[None, :, None, :]
        return torch.where((lag >= 0)[None, :, None, :], idx, zero).reshape(2 * rows.numel(), 2 * cols.numel())

    a, j = torch.arange(g + 1)[:, None], torch.arange(g)[None, :]
    inner = real_form(a, j[0], a - j - 1, lag_base)  # (2(g+1), 2g): rows (p', a), a = g the group's end state
    # the end-state rows last, so the chunk starts (rows a < g) and the group ends are two contiguous blocks
    inner = torch.cat([inner.view(2, g + 1, 2 * g)[:, :g].reshape(2 * g, 2 * g), inner.view(2, g + 1, 2 * g)[:, g]])
    h, k = torch.arange(big)[:, None], torch.arange(big + 1)[None, :]
    across = real_form(h, k[0], h - k, group_base)  # (2G, 2(G+1)): column 0 the state before the first group
    across_zero = across.view(2 * big, 2, big + 1)[:, :, 1:].reshape(2 * big, 2 * big)  # no initial state
    offsets = real_form(torch.arange(g), torch.arange(1), torch.arange(g)[:, None], lag_base)  # (2g, 2): λ^{ta}
    back = torch.stack([torch.arange(t - 1, -1, -1), 2 * n_e + torch.arange(t - 1, -1, -1)])  # (2, t): λ^{t-1-j}
    # the matrix from an initial state first, so a plan without it gathers a suffix
    gather = torch.cat([across.flatten(), inner.flatten(), across_zero.flatten(), offsets.flatten(), back.flatten()])
    i, jj = torch.arange(t)[None, :], torch.arange(t)[:, None]
    toe = torch.where(i >= jj, i - jj + 1, 0)  # toe_t[j, i] = K[i - j] from the kernel padded by one zero in front
    return exps.to(device), gather.to(device), toe.to(device)


class _ScanPlan(NamedTuple):
    """What the chunked scan needs besides the inputs: it depends on the parameters and the length only, so one
    training step builds it once for the forward and the backward (which keeps it without its gathered matrices,
    :func:`_without_matrices`).  Real matrices, complex numbers as ``(re, im)`` blocks; ``Cn`` is channels x
    modes."""

    t: int  # positions per chunk
    per_group: int  # chunks per group
    groups: int
    lam: Tensor  # (C, n, t+1) complex: λ^0 .. λ^t
    toe_t: Tensor  # (C, t, t): transposed Toeplitz of K_0 .. K_{t-1} (exact zeros above the diagonal)
    back: Tensor  # (C, 2n, t): λ^{t-1-j}, a chunk's own end state, rows (mode, re/im)
    inner: Tensor  # (Cn, 2g+2, 2g): chunk start states in a group from its chunks' end states, then its end state
    across: Optional[Tensor]  # (Cn, 2G, 2G+2): group start states from the initial state and the group ends
    across_zero: Tensor  # (Cn, 2G, 2G): the same without an initial state
    offsets: Tensor  # (Cn, 2g, 2): λ^{t·a}, a group's start state carried to its chunk a
    out: Tensor  # (C, 2n, t): state -> outputs of a chunk, 2·Re(C̃ λ^{i+1} s), rows (mode, re/im)
    table: Tensor  # (Cn, 4|E|+1): what the real-form matrices are gathered from (see _scan_indices)


def _chunk_layout(length: int, chunk: int = _CHUNK) -> Tuple[int, int, int]:
    """``(t, g, G)``: positions per chunk, chunks per group, groups.  ``g`` is a divisor of the number of chunks
    near its square root where there is one (no padding when ``t`` divides the length), else ``ceil(sqrt)``."""
    t = max(1, min(chunk, length))
    n_chunks = -(-length // t)
    root = math.isqrt(n_chunks - 1) + 1  # ceil(sqrt(n_chunks))
    for g in range(root, 2 * root + 1):
        if n_chunks % g == 0:
            return t, g, n_chunks // g
    return t, root, -(-n_chunks // root)


def _scan_plan(
    dt_a: Tensor, c_bar: Tensor, length: int, chunk: int = _CHUNK, d: Optional[Tensor] = None, with_x0: bool = False
) -> _ScanPlan:
    """The parameter-only part of :func:`_scan` for ``length`` positions; dt_a, c_bar ``(C, n)`` complex;
    ``d`` ``(C,)``: a skip ``D·u`` added to lag 0 of the kernel (exact, inside the Toeplitz product);
    ``with_x0``: the scan may start from a state."""
    channels, n = dt_a.shape
    t, g, big = _chunk_layout(length, chunk)
    exps, gather, toe = _scan_indices(t, g, big, dt_a.device)
    lam = _powers(dt_a, exps)  # (C, n, |E|)
    parts = torch.view_as_real(lam)  # no constant from the host: a copy to the device would wait for the stream
    re, im = parts[..., 0], parts[..., 1]
    table = torch.stack([re, -im, im, re], 2)  # (C, n, 4, |E|): Re(e^{iφ_q} λ^E)
    table = F.pad(table.reshape(channels * n, -1), (0, 1))  # a zero last
    if not with_x0:  # the matrix that starts from an initial state is not gathered
        gather = gather[2 * big * (2 * big + 2) :]
    back, inner, across, across_zero, offsets = _gather(table, channels, t, g, big, gather, with_x0)
    w = c_bar[..., None] * lam[..., : t + 1]  # C̃ λ^i
    kern = 2.0 * w[..., :t].sum(1).real  # (C, t)
    if d is not None:
        kern.select(1, 0).add_(d)
    out = torch.view_as_real(2.0 * torch.conj_physical(w[..., 1:])).transpose(-1, -2)  # (C, n, 2, t)
    return _ScanPlan(
        t,
        g,
        big,
        lam[..., : t + 1],
        F.pad(kern, (1, 0))[:, toe],
        back,
        inner,
        across,
        across_zero,
        offsets,
        out.reshape(channels, 2 * n, t),
        table,
    )


def _gather(table: Tensor, channels: int, t: int, g: int, big: int, gather: Tensor, with_x0: bool):
    """The plan's real-form matrices ``(back, inner, across, across_zero, offsets)`` (:class:`_ScanPlan`) gathered
    from its ``table`` in one ``index_select`` (views of one tensor; ``across`` None without ``with_x0``).  ``gather``
    as :func:`_scan_indices` gives it, or without its first (``across``'s) part when not ``with_x0``."""
    sizes = [2 * big * (2 * big + 2) if with_x0 else 0, (2 * g + 2) * 2 * g, 4 * big * big, 4 * g, 2 * t]
    parts = table.index_select(1, gather).split(sizes, 1)
    return (
        parts[4].reshape(channels, -1, t),
        parts[1].view(-1, 2 * g + 2, 2 * g),
        parts[0].view(-1, 2 * big, 2 * big + 2) if with_x0 else None,
        parts[2].view(-1, 2 * big, 2 * big),
        parts[3].view(-1, 2 * g, 2),
    )


def _without_matrices(plan: _ScanPlan) -> _ScanPlan:
    """``plan`` without its gathered matrices (48 MiB of a causal training step's saved tensors at 8k in CAB's
    setting, alive at its peak, the backward's start): what a long sequence's backward keeps, regathering them with
    :func:`_with_matrices` when it runs (8 ops)."""
    none = dict.fromkeys(("back", "inner", "across", "across_zero", "offsets"))
    return plan._replace(**none)  # type: ignore[arg-type]  # (a kept plan's matrices are None until regathered)


def _with_matrices(plan: _ScanPlan) -> _ScanPlan:
    """:func:`_without_matrices`'s plan (one that starts from a zero state) with its matrices gathered again."""
    t, g, big = plan.t, plan.per_group, plan.groups
    gather = _scan_indices(t, g, big, plan.table.device)[1][2 * big * (2 * big + 2) :]
    back, inner, _, across_zero, offsets = _gather(plan.table, plan.lam.shape[0], t, g, big, gather, False)
    return plan._replace(back=back, inner=inner, across_zero=across_zero, offsets=offsets)


def _scan_chunks(flat: Tensor, plan: _ScanPlan, x0: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The scan on inputs already in chunks: ``flat`` ``(C, (a, h, b), t)`` real, ``x0`` ``(C, B, n)`` complex.
    Returns the outputs ``(C, (a, h, b), t)`` and the chunk start states ``(Cn, (re/im, a), (h, b))``.

    Chunks are ordered ``(a, h, b)`` (chunk in its group, group, batch), so every step is one (batched) matmul
    on a view: the end states ``(C, (mode, re/im), (a, h, b))`` are per mode ``(2g, (h, b))`` blocks."""
    channels, rows, _ = flat.shape
    g, big, n = plan.per_group, plan.groups, plan.lam.shape[1]
    bsz = rows // (g * big)
    y = torch.bmm(flat, plan.toe_t)  # inside the chunks
    ends = torch.bmm(plan.back, flat.transpose(1, 2)).view(channels * n, 2 * g, big * bsz)
    del flat  # (a temporary of the training forward: its memory is free for the rest)
    inner = torch.bmm(plan.inner, ends)  # (Cn, 2g+2, (h, b)): chunk starts from a zero group start, group ends
    group_ends = inner[:, 2 * g :].view(channels * n, 2 * big, bsz)  # rows (re/im, h)
    if x0 is None:
        group_starts = torch.bmm(plan.across_zero, group_ends)
    else:
        first = torch.view_as_real(x0).permute(0, 2, 3, 1).reshape(channels * n, 2, 1, bsz)
        both = torch.cat([first, group_ends.view(channels * n, 2, big, bsz)], 2).view(channels * n, -1, bsz)
        assert plan.across is not None, "a scan from a state needs a plan built with_x0"
        group_starts = torch.bmm(plan.across, both)
    starts = torch.baddbmm(inner[:, : 2 * g], plan.offsets, group_starts.view(channels * n, 2, big * bsz))
    return y.baddbmm_(starts.view(channels, 2 * n, rows).transpose(1, 2), plan.out), starts


def _scan_chunks_backward(grad: Tensor, plan: _ScanPlan) -> Tensor:
    """The transpose of :func:`_scan_chunks` (no initial state): the gradient of its inputs from that of its
    outputs, both ``(C, (a, h, b), t)``, by the transposed matrices in the same layout (no flip, no copy).  The
    masked entries are exact zeros in every product, so a future input gets exactly zero gradient."""
    channels, rows, _ = grad.shape
    g, big, n = plan.per_group, plan.groups, plan.lam.shape[1]
    bsz = rows // (g * big)
    g_starts = torch.bmm(plan.out, grad.transpose(1, 2)).view(channels * n, 2 * g, big * bsz)
    g_group_starts = torch.bmm(plan.offsets.transpose(1, 2), g_starts).view(channels * n, 2 * big, bsz)
    g_group_ends = torch.bmm(plan.across_zero.transpose(1, 2), g_group_starts).view(channels * n, 2, big * bsz)
    g_ends = torch.bmm(plan.inner[:, : 2 * g].transpose(1, 2), g_starts)
    g_ends = g_ends.baddbmm_(plan.inner[:, 2 * g :].transpose(1, 2), g_group_ends).view(channels, 2 * n, rows)
    return torch.bmm(grad, plan.toe_t.transpose(1, 2)).baddbmm_(g_ends.transpose(1, 2), plan.back)


def _scan_apply(
    u: Tensor, plan: _ScanPlan, x0: Optional[Tensor] = None, need_state: bool = True
) -> Tuple[Tensor, Optional[Tensor]]:
    """:func:`_scan` with its plan built: ``u`` ``(C, B, L)`` real (any strides), ``x0`` ``(C, B, n)`` complex."""
    channels, bsz, length = u.shape
    t, g, big = plan.t, plan.per_group, plan.groups
    n = plan.lam.shape[1]
    if big * g * t != length:
        u = F.pad(u, (0, big * g * t - length))
    rows = g * big * bsz
    flat = u.reshape(channels, bsz, big, g, t).permute(0, 3, 2, 1, 4).reshape(channels, rows, t)
    y, starts = _scan_chunks(flat, plan, x0)
    y = y.view(channels, g, big, bsz, t).permute(0, 3, 2, 1, 4).reshape(channels, bsz, big * g * t)[..., :length]
    if not need_state:
        return y, None
    last = (length - 1) // t  # the chunk holding the last real input, and its real length
    rest = length - last * t
    h, a = divmod(last, g)
    start = starts.view(channels, n, 2, g, big, bsz)[:, :, :, a, h].permute(0, 3, 1, 2)  # (C, B, n, re/im)
    u_last = flat.view(channels, g, big, bsz, t)[:, a, h, :, :rest]
    tail = _as_pairs(plan.lam[..., :rest].flip(-1).transpose(1, 2))  # (C, rest, 2n)
    x = plan.lam[:, None, :, rest] * torch.view_as_complex(start.contiguous())
    return y, x + torch.view_as_complex(torch.bmm(u_last, tail).view(channels, bsz, n, 2))


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
    return _scan_apply(u, _scan_plan(dt_a, c_bar, u.shape[-1], chunk, with_x0=x0 is not None), x0, need_state)


def _kernel(dt_a: Tensor, c_bar: Tensor, length: int, block: int = _CHUNK) -> Tensor:
    """``K_l = 2·Re(C̃ λ^l)`` for ``l < length`` as ``(C, length)``, by blocks ``λ^{at+b} = λ^{at} λ^b``."""
    t = max(1, min(block, length))
    blocks = -(-length // t)
    lag_tables = _block_lags.__wrapped__ if torch.compiler.is_compiling() else _block_lags
    powers = _powers(dt_a, lag_tables(t, blocks, dt_a.device, _REAL[dt_a.dtype])[0])  # (C, n, t + A): λ^b, λ^{at}
    kern = 2.0 * torch.bmm(powers[..., t:].transpose(1, 2), c_bar[..., None] * powers[..., :t]).real  # (C, A, t)
    return kern.reshape(dt_a.shape[0], blocks * t)[:, :length]


@functools.lru_cache(maxsize=64)
def _block_lags(t: int, blocks: int, device: torch.device, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """The exponents of :func:`_kernel_backward`, kept per shape: ``(t + A,)`` (lags ``0..t-1`` in a block, then
    the block starts ``a·t``) and the global lag of every position ``(A, t)``."""
    lags = torch.arange(blocks * t, dtype=dtype).view(blocks, t)
    return torch.cat([lags[0], lags[:, 0]]).to(device), lags.to(device)


def _kernel_backward(dt_a: Tensor, c_bar: Tensor, grad: Tensor, block: int = _CHUNK) -> Tuple[Tensor, Tensor]:
    """Conjugated gradients of ``Σ grad·K`` (``K = _kernel(dt_a, c_bar, L)``, grad ``(C, L)`` real) with respect
    to dt_a and c_bar, complex ``(C, n)`` as ``∂/∂re - i·∂/∂im``, by the same blocks and nothing of size ``C·n·L``:

    ``S0 = Σ_l g_l λ^l``, ``S1 = Σ_l g_l·l·λ^l``; conjugated ``∂/∂C̃ = 2·S0``, ``∂/∂dtA = 2·C̃·S1``.  With
    ``l = a·t + b``: ``S = Σ_a λ^{at} Σ_b (g, g·l)_{ab} λ^b``, one real batched product (the real ``[g, g·l]``
    against ``λ^b`` as (re, im) pairs: half a complex product's work, and no complex copy of ``[g, g·l]``, which
    was the largest tensor of noncausal S4D's training step: ``(C, 2L/t, t)``, 128 MiB at 8k in CAB's setting)
    and one reduction.
    """
    channels, length = grad.shape
    t = max(1, min(block, length))
    blocks = -(-length // t)
    # (Dynamo traces through an lru_cache wrapper with a warning: the uncached tables when compiling)
    lag_tables = _block_lags.__wrapped__ if torch.compiler.is_compiling() else _block_lags
    real = _REAL[dt_a.dtype]
    exps, lags = lag_tables(t, blocks, grad.device, real)
    g = grad if grad.dtype == real else grad.to(real)
    g = (g if blocks * t == length else F.pad(g, (0, blocks * t - length))).view(channels, blocks, t)
    powers = _powers(dt_a, exps)  # (C, n, t + A): λ^b, then λ^{at}
    both = torch.cat([g, g * lags], 1)  # (C, 2A, t) real: g, g·l
    pq = torch.bmm(both, _as_pairs(powers[..., :t].transpose(1, 2)))  # (C, 2A, 2n): against λ^b as (re, im)
    pq = torch.view_as_complex(pq.view(channels, 2, blocks, -1, 2))  # (C, 2, A, n)
    s = (pq * powers[:, None, :, t:].transpose(2, 3)).sum(2)  # (C, 2, n): S0, S1
    return 2.0 * c_bar * s[:, 1], 2.0 * s[:, 0]


class _SSM(NamedTuple):
    """The discretised S4D parameters (complex, ``(..., n)``; ``dt`` real ``(..., 1)``) and what their
    backward reuses."""

    a: Tensor
    dt: Tensor
    dt_a: Tensor
    lam: Tensor  # exp(dtA)
    c: Tensor
    c_bar: Tensor  # C (λ - 1) / A: zero-order hold


def _discretise(log_dt: Tensor, log_a_real: Tensor, a_imag: Tensor, c: Tensor) -> _SSM:
    """``A = -exp(log_a_real) + i·a_imag``, ``Δ = exp(log_dt)``, ``dtA = ΔA``, ``C̃ = C(exp(ΔA) - 1)/A``."""
    a = torch.complex(-torch.exp(log_a_real), a_imag)
    dt = torch.exp(log_dt)[..., None]
    dt_a = a * dt
    lam = torch.exp(dt_a)
    cc = torch.view_as_complex(c)
    return _SSM(a, dt, dt_a, lam, cc, cc * (lam - 1.0) / a)


def _discretise_backward(ssm: _SSM, h_dt_a: Tensor, h_c_bar: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``(log_dt, log_a_real, a_imag, c)`` from the conjugated ones of dtA and C̃ (``h = ∂/∂re -
    i·∂/∂im``: through a holomorphic ``f``, ``h_z = h_f·f'(z)``, no conjugation on the way)."""
    zoh = (ssm.lam - 1.0) / ssm.a  # C̃ = C·zoh
    h_w = torch.addcmul(h_dt_a, h_c_bar, ssm.c * ssm.lam / ssm.a)  # dtA, C̃ through λ = exp(dtA) included
    g_log_dt = torch.real(h_w * ssm.a).sum(-1) * ssm.dt[..., 0]  # ∂/∂Δ = Re(h_dtA·A)
    h_a = torch.addcmul(h_w * ssm.dt, h_c_bar, ssm.c_bar / ssm.a, value=-1.0)  # ∂C̃/∂A = -C̃/A
    g_c = torch.view_as_real(torch.conj_physical(h_c_bar * zoh))
    return g_log_dt, torch.real(h_a) * ssm.a.real, -torch.imag(h_a), g_c


def _fft_size(length: int) -> int:
    """A power of two >= 2L - 1: a linear (not circular) convolution of two length-L signals."""
    return 1 << max(1, (2 * length - 1).bit_length())


def _batch_chunks(channels: int, bsz: int, size: int) -> List[slice]:
    """Batch slices whose spectra stay under ``_FFT_CHUNK_BYTES`` (one slice unless the sequence is long)."""
    per_item = channels * (size // 2 + 1) * 8
    step = max(1, _FFT_CHUNK_BYTES // per_item)
    return [slice(None)] if step >= bsz else [slice(i, i + step) for i in range(0, bsz, step)]


def _conv_kernel(kern: Tensor, size: int) -> Tensor:
    """``(kernels, C, L)`` -> the circular kernel ``(C, size)``: lags ``0..L-1`` of the forward kernel, then zeros,
    then lags ``-(L-1)..-1`` holding the backward kernel ``K_b[L-2..0]`` (lag ``-j-1`` reads ``K_b[j]``)."""
    length = kern.shape[-1]
    if kern.shape[0] == 1:
        return F.pad(kern[0], (0, size - length))
    return torch.cat([F.pad(kern[0], (0, size - 2 * length + 1)), kern[1, :, : length - 1].flip(-1)], -1)


def _conv_kernel_backward(grad: Tensor, kernels: int, length: int) -> Tensor:
    """The transpose of :func:`_conv_kernel`: ``(C, size)`` -> ``(kernels, C, L)``."""
    forward = grad[:, :length]
    if kernels == 1:
        return forward[None]
    backward = F.pad(grad[:, grad.shape[-1] - length + 1 :].flip(-1), (0, 1))  # K_b[L-1] is never used
    return torch.stack([forward, backward])


def _correlate(grad: Tensor, u: Tensor, size: int) -> Tensor:
    """``Σ_b Σ_l grad[c, b, l]·u[c, b, l - s]`` for every circular lag ``s``: the kernel gradient of a convolution,
    ``(C, size)``; grad, u ``(C, B, L)``."""
    channels, bsz, _ = u.shape
    chunks = _batch_chunks(channels, bsz, size)
    if len(chunks) == 1:
        acc = torch.fft.rfft(u, n=size).conj_physical_().mul_(torch.fft.rfft(grad, n=size))
        acc = acc.sum(1) if bsz > 1 else acc[:, 0]
    else:
        acc = grad.new_zeros(channels, size // 2 + 1, dtype=_COMPLEX[grad.dtype])
        for part in chunks:
            acc += (
                torch.fft.rfft(u[:, part], n=size).conj_physical_().mul_(torch.fft.rfft(grad[:, part], n=size)).sum(1)
            )
    return torch.fft.irfft(acc, n=size)


def _ssm_kernel(ssm: _SSM, length: int) -> Tensor:
    """``(kernels, C, n)`` discretised parameters -> ``(kernels, C, L)`` kernels."""
    kernels, channels, n = ssm.dt_a.shape
    return _kernel(ssm.dt_a.reshape(-1, n), ssm.c_bar.reshape(-1, n), length).view(kernels, channels, length)


def _param_grads(ssm: _SSM, g_kern: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of the four parameters from that of the ``(kernels, C, L)`` kernels."""
    n = ssm.dt_a.shape[-1]
    g_dt_a, g_c_bar = _kernel_backward(ssm.dt_a.reshape(-1, n), ssm.c_bar.reshape(-1, n), g_kern.flatten(0, 1))
    return _discretise_backward(ssm, g_dt_a.view_as(ssm.dt_a), g_c_bar.view_as(ssm.c_bar))


def _activation_backward(name: str, grad: Tensor, pre: Tensor) -> Tensor:
    """``grad·act'(pre)`` for the activations of :data:`_ACTIVATIONS`."""
    if name == "gelu":
        return torch.ops.aten.gelu_backward(grad, pre)
    if name == "relu":
        return torch.ops.aten.threshold_backward(grad, pre, 0)
    if name == "silu":
        return torch.ops.aten.silu_backward(grad, pre)
    if name == "tanh":
        return torch.ops.aten.tanh_backward(grad, torch.tanh(pre))
    return grad


def _contiguous_as(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` contiguous in ``dtype`` in one copy (``to`` with ``x``'s own dtype returns a strided ``x`` as it is, and
    elementwise ops and FFTs over a transposed view are several times slower on the CPU)."""
    return x.contiguous() if x.dtype == dtype else x.to(dtype, memory_format=torch.contiguous_format)


def _part(x: Tensor, part: slice) -> Tensor:
    """``x[:, part]``, ``x`` itself for the whole batch (one op less on the host)."""
    return x if part == slice(None) else x[:, part]


def _channels_first(x: Tensor) -> Tensor:
    """Per-head ``(B, H, L, d)`` whose ``(H, d)`` dims merge (a view of a time-first ``(L, B, H, d)`` tensor, or
    contiguous) -> channels first ``(C, B, L)``, a view when they merge (channel ``h·d + i``)."""
    bsz, heads, length, dim = x.shape
    return x.permute(1, 3, 0, 2).reshape(heads * dim, bsz, length)


def _time_first(shape: torch.Size, like: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """A new time-first ``(L, B, H, d)`` tensor for per-head ``shape`` ``(B, H, L, d)``: ``(its per-head view,
    its channels-first (C, B, L) view)`` (what the output projection reads without another copy)."""
    bsz, heads, length, dim = shape
    out = like.new_empty(length, bsz, heads, dim, dtype=dtype)
    return out.permute(1, 2, 0, 3), out.view(length, bsz, heads * dim).permute(2, 1, 0)


class _FFTConvolution(torch.autograd.Function):
    """``act(K * u + D·u)`` for the S4D kernel(s) of ``(log_dt, log_a_real, a_imag, c)`` (``(kernels, C, n)``;
    ``kernels = 2``: the second over later positions) and the skip ``d`` ``(C,)`` (lag 0 of the kernel) on
    per-head ``u`` ``(B, H, L, d)`` (channel ``h·d + i``, any float dtype; the math runs in the parameters'
    dtype), by FFT, in batch chunks of bounded memory (:func:`_batch_chunks`).  The output is in ``u``'s dtype,
    a view of a time-first tensor (the cast and the layout change in the one write of the result).

    Backward, per batch chunk: the pre-activation is recomputed from the spectrum of ``u`` (which the kernel
    gradient needs anyway), ``∂u`` is the correlation of ``∂y`` with the same kernel spectrum, ``∂K`` that of
    ``∂y`` with ``u`` (summed over the batch; ``∂D`` is its lag 0), then the parameters' gradients by
    :func:`_param_grads`.  Saved: ``u`` as given if it is in a lower precision (not a float copy), else its
    channels-first copy, and the kernel spectrum ``(C, L+1)``; nothing of size ``C·n·L``."""

    @staticmethod
    def forward(
        ctx, u: Tensor, log_dt: Tensor, log_a_real: Tensor, a_imag: Tensor, c: Tensor, d: Tensor, activation: str
    ) -> Tensor:
        bsz, heads, length, dim = u.shape
        channels, size, real = heads * dim, _fft_size(length), log_dt.dtype
        ssm = _discretise(log_dt, log_a_real, a_imag, c)
        kern = _ssm_kernel(ssm, length)
        kern[0, :, 0].add_(d)
        k_spec = torch.fft.rfft(_conv_kernel(kern, size))[:, None]
        act, src = _ACTIVATIONS[activation], _channels_first(u)
        if u.dtype == real:  # a float copy takes no more memory than u: kept channels first (no transposed reads)
            src = src.contiguous()
        ctx.save_for_backward(src if u.dtype == real else u, k_spec)
        ctx.ssm, ctx.activation, ctx.shape = ssm, activation, u.shape
        out, dst = _time_first(u.shape, u, u.dtype)
        for part in _batch_chunks(channels, bsz, size):
            spec = torch.fft.rfft(_contiguous_as(_part(src, part), real), n=size).mul_(k_spec)
            _part(dst, part).copy_(act(torch.fft.irfft(spec, n=size)[..., :length]))
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        # fp32/fp64 math even if the backward is called inside an autocast region
        with torch.autocast(grad.device.type, enabled=False):
            return _FFTConvolution._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad: Tensor):
        u, k_spec = ctx.saved_tensors  # u per-head, or channels first (C, B, L) if it was in the math's dtype
        ssm: _SSM = ctx.ssm
        bsz, heads, length, dim = ctx.shape
        channels, size = heads * dim, _fft_size(length)
        src, g_src = (u if u.dim() == 3 else _channels_first(u)), _channels_first(grad)
        g_u, g_dst = _time_first(ctx.shape, u, u.dtype)
        acc: Optional[Tensor] = None
        for part in _batch_chunks(channels, bsz, size):
            prod = _FFTConvolution._chunk_backward(ctx.activation, src, g_src, g_dst, part, k_spec, size, length)
            acc = prod if acc is None else acc.add_(prod)
        assert acc is not None
        # nothing of the chunks may outlive the loop: the chunks' spectra died with their frames, and the last
        # chunk's product (a spectrum as large as u's) would otherwise be alive through the parameters' gradients,
        # the step's peak (with a k_conj kept beside k_spec, 2 of 13.8 units at 8k in CAB's setting)
        del prod
        g_kern = _conv_kernel_backward(torch.fft.irfft(acc, n=size), ssm.dt_a.shape[0], length)
        del acc
        return (g_u, *_param_grads(ssm, g_kern), g_kern[0, :, 0], None)

    @staticmethod
    def _chunk_backward(
        activation: str,
        src: Tensor,
        g_src: Tensor,
        g_dst: Tensor,
        part: slice,
        k_spec: Tensor,
        size: int,
        length: int,
    ) -> Tensor:
        """One batch chunk of the backward: writes ``∂u`` into ``g_dst`` and returns its part of the kernel
        gradient's spectrum ``(C, size / 2 + 1)`` (summed over the chunk's batch items).  A function of its own
        so that the chunk's spectra (each as large as ``u`` in fp32, or twice) are freed when it returns: left in
        the loop's variables they were alive through the parameters' gradients, the peak of noncausal S4D's
        training step (554 MiB at 8k on an H200, against SDPA's 392)."""
        real = _REAL[k_spec.dtype]
        u_spec = torch.fft.rfft(_contiguous_as(_part(src, part), real), n=size)
        if activation == "identity":
            g_p = _contiguous_as(_part(g_src, part), real)
        else:  # the pre-activation first: the gradient's fp32 copy is not alive beside its two spectrum-sized
            # buffers (the product and the inverse FFT's output; 16 MiB of the step's peak at 8k in CAB's setting)
            pre = torch.fft.irfft(u_spec * k_spec, n=size)[..., :length]
            g_p = _activation_backward(activation, _contiguous_as(_part(g_src, part), real), pre)
            del pre
        g_spec = torch.fft.rfft(g_p, n=size)
        del g_p
        prod = u_spec.conj_physical_().mul_(g_spec)
        # (k's conjugate as a lazy view, not kept beside k_spec through the whole backward: 1 unit of its peak)
        _part(g_dst, part).copy_(torch.fft.irfft(g_spec.mul_(k_spec.conj()), n=size)[..., :length])
        return prod.sum(1) if prod.shape[1] > 1 else prod[:, 0]


def _to_chunks(x: Tensor, plan: _ScanPlan, dtype: torch.dtype) -> Tensor:
    """Per-head ``(B, H, L, d)`` (any strides) -> the chunks ``(C, (a, h, b), t)`` of :func:`_scan_chunks` in
    ``dtype``, zero-padded to whole groups: one copy (the layout change and the cast together)."""
    bsz, heads, length, dim = x.shape
    total = plan.groups * plan.per_group * plan.t
    if total != length:
        x = F.pad(x, (0, 0, 0, total - length))
    src = x.view(bsz, heads, plan.groups, plan.per_group, plan.t, dim).permute(1, 5, 3, 2, 0, 4)
    flat = _contiguous_as(src, dtype)
    return flat.view(heads * dim, -1, plan.t)


def _from_chunks(y: Tensor, plan: _ScanPlan, shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """The transpose of :func:`_to_chunks`: chunks -> per-head ``shape`` ``(B, H, L, d)`` in ``dtype``, a view of
    a time-first ``(L, B, H, d)`` tensor (what the output projection reads without another copy)."""
    bsz, heads, length, dim = shape
    g, big, t = plan.per_group, plan.groups, plan.t
    out = y.new_empty(big, g, t, bsz, heads, dim, dtype=dtype)
    out.permute(4, 5, 1, 0, 3, 2).copy_(y.view(heads, dim, g, big, bsz, t))
    out = out.view(big * g * t, bsz, heads, dim)
    return (out if big * g * t == length else out[:length]).permute(1, 2, 0, 3)


def _correlate_chunks(grad: Tensor, u: Tensor, plan: _ScanPlan, dtype: torch.dtype) -> Tensor:
    """:func:`_correlate` (whole batch, one FFT: the short-sequence path) of the gradient in chunks
    ``(C, (a, h, b), t)`` with per-head ``u`` ``(B, H, L, d)``, both written zero-padded and channel first
    straight from those layouts (no time-contiguous copy of either first).  ``(C, size)``."""
    bsz, heads, length, dim = u.shape
    channels, g, big, t = grad.shape[0], plan.per_group, plan.groups, plan.t
    size, total = _fft_size(length), big * g * t
    assert total <= size, "the chunks' padding fits in the FFT's"
    g_buf, u_buf = grad.new_zeros(2, channels, bsz, size, dtype=dtype).unbind(0)
    g_buf[..., :total].view(channels, bsz, big, g, t).copy_(grad.view(channels, g, big, bsz, t).permute(0, 3, 2, 1, 4))
    u_buf[..., :length].view(heads, dim, bsz, length).copy_(u.permute(1, 3, 0, 2))
    prod = torch.fft.rfft(u_buf).conj_physical_().mul_(torch.fft.rfft(g_buf))
    return torch.fft.irfft(prod.sum(1) if bsz > 1 else prod[:, 0], n=size)


@functools.lru_cache(maxsize=64)
def _scan_weights(t: int, per_group: int, groups: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Per entry of the plan's table: the exponent of ``λ`` in positions for the chunk's own powers ``λ^0..λ^t``,
    in chunks for the rest (``λ^{t·k}``: ``k``); 0 for the zero entry.  ``(4|E|+1,)``."""
    exps = _scan_indices(t, per_group, groups, torch.device("cpu"))[0].to(dtype)
    weights = torch.where(torch.arange(exps.numel()) <= t, exps, exps / t)
    return F.pad(weights.repeat(4), (0, 1)).to(device)


def _scan_param_grads(grad: Tensor, inputs: List[Tensor], plan: _ScanPlan) -> Tuple[Tensor, Tensor, Tensor]:
    """``S0 = Σ_s ∂K_s·λ^s``, ``S1 = Σ_s s·∂K_s·λ^s`` (complex ``(C, n)``) and ``∂K_0`` ``(C,)`` of the causal
    convolution, where ``∂K_s = Σ_{b,l} grad_l·u_{l-s}``: what :func:`_kernel_backward` needs from the kernel
    gradient, without it (no FFT).  ``grad`` in chunks ``(C, (a, h, b), t)``; ``inputs`` the list ``[u]``, the
    inputs per head ``(B, H, L, d)``, emptied here: their chunks (in ``grad``'s dtype) are made here and dropped
    after their three products, before the scan's full-size intermediates, and ``u`` itself once its chunks exist
    (with no other reference left: an argument would stay alive in the caller's frame).

    Pairs ``j <= l`` in one chunk: ``M = Σ_rows u ⊗ grad`` (one product), summed along its diagonals (lags).
    Pairs across chunks: ``Σ_l grad_l λ^{i+1}·s_m`` with ``s_m`` the chunk start states (the forward scan's),
    and for ``S1`` the lag ``l - j = (i + 1) + (t - 1 - i_j) + t·(m - 1 - k)`` split the same way: start states
    of the lag-weighted chunk ends and the scan with its matrices weighted by their chunk lags (exact, no
    cancellation)."""
    flat = _to_chunks(inputs.pop(), plan, grad.dtype)
    channels, rows, t = flat.shape
    g, big, n = plan.per_group, plan.groups, plan.lam.shape[1]
    cn, cols = channels * n, rows // g
    bsz = cols // big
    steps = torch.arange(1, t + 1, device=flat.device, dtype=flat.dtype)
    # within a chunk: Mt[j, i] = Σ_rows u_j grad_i, lags i - j >= 0 on its upper triangle, summed by diagonal
    mt = torch.bmm(flat.transpose(1, 2), grad).triu_()
    lags_sum = F.pad(mt.flatten(1), (0, t)).view(channels, t, t + 1)[..., :t].sum(1)  # (C, t): ∂K_0..∂K_{t-1}
    del mt
    both = torch.stack([lags_sum, lags_sum * (steps - 1.0)], 1).to(plan.lam.dtype)  # (C, 2, t)
    inside = torch.bmm(both, plan.lam[..., :t].transpose(1, 2))  # (C, 2, n)
    # the weighted matrices: the plan's table times each entry's exponent, gathered like the plan's
    weights = (_scan_weights.__wrapped__ if torch.compiler.is_compiling() else _scan_weights)(
        t, g, big, flat.device, flat.dtype
    )
    gather = _scan_indices(t, g, big, flat.device)[1]
    sizes = [2 * big * (2 * big + 2), (2 * g + 2) * 2 * g, 4 * big * big, 4 * g, 2 * t]
    used = gather[sizes[0] :]  # (the first of the plan's matrices has no weighted counterpart here)
    # gathered, then weighted in place (no product of the whole table, nothing of the unused matrix), in two parts:
    # the inner scan's matrices (as large as the rest of the plan together) only while they are used
    inner_idx, rest_idx = used.split([sizes[1], sum(sizes[2:])])
    rest = plan.table.index_select(1, rest_idx).mul_(weights[rest_idx])
    across_w, offsets_w, back_w = rest.split(sizes[2:], 1)
    across_w, offsets_w = across_w.view(cn, 2 * big, 2 * big), offsets_w.view(cn, 2 * g, 2)
    back_w = back_w.reshape(channels, 2 * n, t)
    # the chunk ends of u and their lag-weighted counterpart, then u's chunks go: the scans below are full-size
    ends = torch.bmm(plan.back, flat.transpose(1, 2)).view(cn, 2 * g, cols)
    ends_w = torch.bmm(back_w, flat.transpose(1, 2)).view(cn, 2 * g, cols)
    del flat
    # s'_m = Σ_{j < start_m} (start_m - 1 - j) λ^{start_m-1-j} u_j: the scan of the lag-weighted chunk ends, plus
    # t times the scan with chunk-lag-weighted matrices (product rule over inner, across, offsets); both its inner
    # products before the plain scan's, `ends_w`'s first, so that `ends_w` goes before the weighted matrices and
    # the plain scan's full-size states are made (they were alive together: the peak of a causal step, 461 MiB at
    # 8k in CAB's setting on an H200; CPU replica after this and the inputs dropped in the backward: 389)
    inner_s = torch.bmm(plan.inner, ends_w).mul_(1 / t)
    del ends_w
    inner_w = plan.table.index_select(1, inner_idx).mul_(weights[inner_idx]).view(cn, 2 * g + 2, 2 * g)
    inner_s = inner_s.baddbmm_(inner_w, ends)
    del inner_w
    # the forward scan's chunk start states (its internals dropped as soon as used: they are full-size)
    inner = torch.bmm(plan.inner, ends)
    del ends
    group_ends = inner[:, 2 * g :].reshape(cn, 2 * big, bsz).clone()  # (its own: `inner` goes after `starts`)
    group_starts = torch.bmm(plan.across_zero, group_ends)
    starts = torch.baddbmm(inner[:, : 2 * g], plan.offsets, group_starts.view(cn, 2, cols))
    del inner
    gs_w = torch.bmm(plan.across_zero, inner_s[:, 2 * g :].reshape(cn, 2 * big, bsz))
    gs_w = gs_w.baddbmm_(across_w, group_ends)
    del group_ends
    starts_w = torch.baddbmm(inner_s[:, : 2 * g], plan.offsets, gs_w.view(cn, 2, cols))
    del inner_s
    starts_w = starts_w.baddbmm_(offsets_w, group_starts.view(cn, 2, cols)).view(cn, 2, rows)  # s' / t
    del rest, across_w, offsets_w, back_w
    starts = starts.view(cn, 2, rows)
    # R = Σ_i grad_i λ^{i+1} and R' = Σ_i grad_i (i+1) λ^{i+1} per chunk, real pairs (Cn, re/im, rows); the
    # complex Σ_rows R·s as a 2x2 real product per mode: [[Rr·sr, Rr·si], [Ri·sr, Ri·si]]
    lam1 = _as_pairs(plan.lam[..., 1:].transpose(1, 2)).transpose(1, 2)  # (C, 2n, t)
    r = torch.bmm(lam1, grad.transpose(1, 2)).view(cn, 2, rows)
    m0 = torch.bmm(r, starts.transpose(1, 2))
    m1 = torch.bmm(r, starts_w.transpose(1, 2)).mul_(float(t))
    del r, starts_w
    m1 = m1.baddbmm_(torch.bmm(lam1 * steps, grad.transpose(1, 2)).view(cn, 2, rows), starts.transpose(1, 2))
    m = torch.stack([m0, m1])  # (2, Cn, 2, 2): for S0 R·s, for S1 R·s' + R'·s
    cross = torch.complex(m[..., 0, 0] - m[..., 1, 1], m[..., 0, 1] + m[..., 1, 0]).view(2, channels, n)
    return inside[:, 0] + cross[0], inside[:, 1] + cross[1], lags_sum[:, 0]


# The longest sequence on which the Triton kernels beat the PyTorch forms, by kernel count (1: causal, 2: the
# bidirectional noncausal form).  What the kernels save is host time (about 240 ATen ops a step); their GPU time is
# above the PyTorch forms' (each program walks its segments chunk after chunk, one channel per program, at low
# occupancy: 255 registers a thread), so the ATen ops win once the step is GPU-bound.  H200, CAB's setting
# (benchmarks/results/h200/session14, walks in segments): causal 1.60x faster at 4k, 1.21x at 8k, 0.81x at 32k
# (GPU time 4.10 against 2.95 ms at 8k).  Bidirectional: 0.84x at 2k and 0.39x at 32k before the segments
# (session 13); off.
FUSED_MAX_LENGTH = {1: 8192, 2: 0}


def _fused_scan(u: Tensor, log_dt: Tensor, modes: int, activation: str) -> bool:
    """Whether the convolution runs on the Triton kernels of ``kernels/_triton_s4d.py``
    (:class:`_FusedConvolution`: one launch each way per kernel, where the chunked scan of :class:`_CausalScan` is
    about 250 ATen ops a training step and the FFT of :class:`_FFTConvolution` about 210): CUDA (CPU tensors under
    Triton's interpreter), fp16 / bf16 / fp32 inputs, fp32 parameters, at most 32 modes (the power tables are held
    in registers), at most :data:`FUSED_MAX_LENGTH` positions, not under ``torch.compile`` (which traces the
    PyTorch forms), and the kernels compile and run here (tried once per configuration: a failure is logged and
    the PyTorch form runs)."""
    ok = (
        (u.device.type == "cuda" or triton_interpreted())
        and u.dtype in TRITON_DTYPES
        and log_dt.dtype == torch.float32
        and modes <= 32
        and 0 < u.shape[2] <= FUSED_MAX_LENGTH[log_dt.shape[0]]
        and not torch.compiler.is_compiling()
        and triton_reason() is None
    )
    if not ok:
        return False
    from ..kernels import _triton_s4d

    kernels = log_dt.shape[0]
    key = ("s4d", u.device, u.dtype, activation, kernels, modes)
    return triton_probe(key, lambda: _triton_s4d.probe_s4d(u.device, u.dtype, activation, kernels, modes), "S4D")


class _FusedConvolution(torch.autograd.Function):
    """``act(K * u + D·u)`` (and, with ``kernels = 2``, the second kernel over the strictly later positions) on the
    Triton kernels of ``kernels/_triton_s4d.py``: the exact recurrence in chunks, causal in each direction (a
    future input gets exactly zero gradient from a causal kernel).  Same arguments and result as
    :class:`_CausalScan` and :class:`_FFTConvolution`; the output is time-first in ``u``'s dtype.  The
    discretisation and its gradient are kernels too (six launches a training step in all).  Keeps ``u`` and the
    pre-activation (in ``u``'s dtype, on ``ctx``: dropped once read), the raw parameters and their tables."""

    @staticmethod
    def forward(
        ctx, u: Tensor, log_dt: Tensor, log_a_real: Tensor, a_imag: Tensor, c: Tensor, d: Tensor, activation: str
    ) -> Tensor:
        from ..kernels._triton_s4d import s4d_forward, s4d_tables

        tables = s4d_tables(log_dt, log_a_real, a_imag, c)
        out, pre = s4d_forward(u, tables, d, activation, any(ctx.needs_input_grad) and activation != "identity")
        ctx.u, ctx.pre = u, pre
        ctx.params, ctx.tables, ctx.d, ctx.activation = (log_dt, log_a_real, a_imag, c), tables, d, activation
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        from ..kernels._triton_s4d import s4d_backward, s4d_param_grads

        u, pre = take_inputs(ctx, "u", "pre")
        with torch.autocast(grad.device.type, enabled=False):
            g_u, sums = s4d_backward(grad, pre, u, ctx.tables, ctx.d, ctx.activation)
            del u, pre
            # the parameters' gradients through the discretisation (_discretise_backward's math), one launch
            return (g_u, *s4d_param_grads(sums, *ctx.params), None)


def _param_grads_by_scan(channels: int, bsz: int, length: int) -> bool:
    """Whether the causal backward takes its parameter gradients by the scan (:func:`_scan_param_grads`, ~40 ops
    more, no FFT of size 2L): where the FFT's spectra would not fit :data:`_FFT_CHUNK_BYTES` in one piece."""
    return len(_batch_chunks(channels, bsz, _fft_size(length))) > 1


class _CausalScan(torch.autograd.Function):
    """``act(K * u + D·u)`` causal (one kernel, ``(1, C, n)`` parameters, ``d`` ``(C,)``) by the exact chunked
    scan, on per-head ``u`` ``(B, H, L, d)`` (channel ``h·d + i``, any strides and float dtype; the math runs in
    the dtype of the parameters); the output is in ``u``'s dtype, a view of a time-first tensor.

    The inputs go to the scan's chunk layout in one copy and the output comes back in one, so nothing is
    flipped, padded or permuted on the way.  Backward: ``∂u`` is the transposed scan (:func:`_scan_chunks_backward`,
    same plan, same layout), so a future input gets exactly zero gradient.  The parameters' gradients: short
    sequences by the correlation of the gradient with ``u`` by FFT (fewest ops), then :func:`_param_grads`;
    long ones (where that FFT would need batch slices) by :func:`_scan_param_grads` on the chunks (no FFT of
    size 2L: less time and memory).  Saved:
    ``u`` as given (not a float copy) and the pre-activation in chunks, in ``u``'s dtype."""

    @staticmethod
    def forward(
        ctx, u: Tensor, log_dt: Tensor, log_a_real: Tensor, a_imag: Tensor, c: Tensor, d: Tensor, activation: str
    ) -> Tensor:
        ssm = _discretise(log_dt, log_a_real, a_imag, c)
        plan = _scan_plan(ssm.dt_a[0], ssm.c_bar[0], u.shape[2], d=d)
        pre = _scan_chunks(_to_chunks(u, plan, log_dt.dtype), plan)[0]
        out = _from_chunks(_ACTIVATIONS[activation](pre), plan, u.shape, u.dtype)
        # the pre-activation (for act') kept in u's precision: half the memory under autocast; it and u ride on
        # ctx, not in save_for_backward, so that the backward drops each once read (saved tensors live until the
        # backward returns: both were alive at its peak, the scan's parameter gradients)
        kept = (u, None if activation == "identity" else pre.to(u.dtype))
        if torch.compiler.is_compiling():  # Dynamo cannot delete a ctx attribute (take_inputs): kept to the end
            ctx.save_for_backward(*kept)
        else:
            ctx.u, ctx.pre = kept
        # a long sequence's plan is kept without its matrices (regathered in the backward: memory, for 8 ops)
        long = _param_grads_by_scan(plan.lam.shape[0], u.shape[0], u.shape[2])
        ctx.ssm, ctx.plan, ctx.activation = ssm, _without_matrices(plan) if long else plan, activation
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        # fp32/fp64 math even if the backward is called inside an autocast region
        with torch.autocast(grad.device.type, enabled=False):
            return _CausalScan._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad: Tensor):
        u, pre = ctx.saved_tensors if torch.compiler.is_compiling() else take_inputs(ctx, "u", "pre")
        ssm: _SSM = ctx.ssm
        plan: _ScanPlan = ctx.plan if ctx.plan.inner is not None else _with_matrices(ctx.plan)
        shape, dtype, real = u.shape, u.dtype, ctx.ssm.dt.dtype
        length = shape[2]
        g = _activation_backward(ctx.activation, _to_chunks(grad, plan, real), pre)
        del pre
        # the parameters first, the input gradient after: their full-size temporaries never coexist
        if not _param_grads_by_scan(g.shape[0], shape[0], length):  # short: by FFT, fewer ops
            g_kern = _correlate_chunks(g, u, plan, real)[None, :, :length]
            del u
            g_params = (*_param_grads(ssm, g_kern), g_kern[0, :, 0])
        else:  # long (the FFT would need batch slices): by the scan, no FFT and nothing of size 2L
            inputs = [u]
            del u  # (the list's is the last reference: _scan_param_grads drops it)
            s0, s1, g_d = _scan_param_grads(g, inputs, plan)
            # conjugated ∂/∂C̃ = 2·S0, ∂/∂dtA = 2·C̃·S1 (see _kernel_backward)
            g_params = (*_discretise_backward(ssm, 2.0 * ssm.c_bar * s1, 2.0 * s0[None]), g_d)
        g_u = None
        if ctx.needs_input_grad[0]:
            g_u = _from_chunks(_scan_chunks_backward(g, plan), plan, shape, dtype)
        return (g_u, *g_params, None)


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

    capabilities = Capabilities(
        patterns=SELF_PATTERNS, incremental=True, constant_state=True, backends=("triton", "torch")
    )
    Options = S4DOptions
    ignores_key_value = True

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
        ssm = _discretise(self.log_dt.to(real), self.log_a_real.to(real), self.a_imag.to(real), self.c.to(real))
        return ssm.dt_a, ssm.c_bar

    def _inputs(self, q: Tensor, kpm: Optional[Tensor]) -> Tensor:
        """Per-head ``(B, H, T, d)`` -> channels first ``(C, B, T)`` (channel ``h·d + i``), fp32+, padding zeroed."""
        bsz, heads, length, dim = q.shape
        u, real = q.permute(1, 3, 0, 2), acc_dtype(q.dtype)
        u = _contiguous_as(u, real).view(heads * dim, bsz, length)
        if kpm is not None:
            u = u.masked_fill(as_bool_mask(kpm, "key_padding_mask")[None], 0.0)
        return u

    def _finish(self, y: Tensor, u: Tensor, like: Tensor) -> Tensor:
        """``act(y + D·u)`` with dropout, back to per-head ``(B, H, T, d)`` (the paths outside the two Functions)."""
        return self._output(_ACTIVATIONS[self.activation](torch.addcmul(y, self.d.to(y.dtype)[:, None, None], u)), like)

    def _output(self, y: Tensor, like: Tensor) -> Tensor:
        """Dropout on the activated ``(C, B, T)``, back to per-head ``(B, H, T, d)``."""
        y = F.dropout(y, self.dropout_p, training=self.training)
        _, bsz, length = y.shape
        return y.to(like.dtype).view(self.num_heads, self.head_dim, bsz, length).permute(2, 0, 3, 1)

    def _discrete_for_steps(self, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """:meth:`_discrete` kept between decoding steps without autograd, until a parameter changes (its
        version counter moves with every in-place update, an optimizer step included)."""
        if torch.is_grad_enabled() or not may_keep_derived(self.log_dt):  # (captured: computed at every replay)
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
        real = acc_dtype(q.dtype)
        params = tuple(p.to(real) for p in (self.log_dt, self.log_a_real, self.a_imag, self.c, self.d))
        # on q in its layout and dtype: on CUDA the Triton kernels; else noncausal one FFT convolution, causal the
        # exact scan (a future input gets exactly zero gradient)
        if masks.key_padding is not None:
            q = q.masked_fill(as_bool_mask(masks.key_padding, "key_padding_mask")[:, None, :, None], 0.0)
        if _fused_scan(q, params[0], self.d_state, self.activation):
            y = _FusedConvolution.apply(q, *params, self.activation)
        else:
            y = (_CausalScan if self.causal else _FFTConvolution).apply(q, *params, self.activation)
        if self.training and self.dropout_p > 0:
            y = F.dropout(y, self.dropout_p, training=True)
        return y, None

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
