"""Triton kernels of S4D's convolution for training (imported only when Triton is installed).

Per channel ``c`` (``d_state`` complex modes ``m``, ``λ_m = e^{dtA_m}``, ``C̃_m``, skip ``D``) and batch row ``b``:
``x_l = λ x_{l-1} + u_l``, ``pre_l = 2 Re(Σ_m C̃_m x_{l,m}) + D u_l``, ``out = act(pre)``: the causal convolution
with ``K_k = 2 Re(Σ_m C̃_m λ_m^k)``.  Bidirectional (noncausal) S4D adds a second kernel over the strictly later
positions, ``Σ_{j>l} K'_{j-l-1} u_j``: the same walk backwards in time (``REVERSE``), each output reading the state
before its own position (``SHIFT``), added to the first pass's fp32 result before the activation.  The PyTorch
forms (``attentions/s4d.py``: the chunked scan, the FFT convolution) take about 250 / 210 ATen ops a training
step (host-bound on an H200 up to 8k tokens); here it is one or two kernels each way.

One program per (channel, block of ``BB`` batch rows) walks the positions in chunks of ``T``: inside a chunk the
Toeplitz product ``K[t - j - SHIFT] (T x T) @ u (T x BB)``, across chunks the state ``x`` ``(modes x BB)``, as
real and imaginary parts, through four small products (``λ^{t+1-SHIFT}`` rows into the chunk's outputs,
``λ^{T-1-j}`` columns into the next state).  The power tables are made once per program; the products run in
IEEE fp32 for fp32 inputs and on the tensor cores in tf32 for half inputs (whose own rounding is coarser), both
accumulating in fp32.

A program's ``BB`` columns are batch rows, and with few of them (CAB's setting has 4) the walk is split into
``S`` segments of ``LSEG`` positions that fill the columns instead (:data:`WALK`): column ``j`` walks
segment ``j % S`` of batch row ``j // S``.  A first launch (:func:`_s4d_ends`) takes each segment's own end state
from a zero start; each walk then starts from the true state, ``Σ_{s'<s} λ^{(s-1-s')·LSEG} E_{s'}``
(:func:`_seg_init`; backward also the lag-weighted state and, for ``∂u``, the adjoint state from the later
segments).  Before it, a program with 4 batch rows computed 16 columns for 4 and walked every chunk in turn
(session 13: slower than the ATen ops from 8k on).

Backward, from ``g = act'(pre) ∘ dout``:

* ``∂u`` -- the same convolution the other way in time (``du_j = Σ_{l>=j+SHIFT} K_{l-j-SHIFT} g_l + D g_j``):
  the adjoint state ``h_j = λ h_{j+1} + g_j`` carried from the last chunk to the first;
* the parameters, through ``S0_m = Σ_{b,l} g_l x_{l-SHIFT,m}`` and ``S1_m = Σ_{b,l} g_l x'_{l-SHIFT,m}`` with the
  lag-weighted state ``x'_l = Σ_{j<=l} (l-j) λ^{l-j} u_j = λ (x'_{l-1} + x_{l-1})`` (what ``_kernel_backward``
  calls ``S0``, ``S1``: conjugated ``∂/∂C̃ = 2 S0``, ``∂/∂dtA = 2 C̃ S1``) and ``∂D = Σ g u``: a walk with both
  states for the terms across chunks, and the terms inside a chunk from ``G = Σ_chunks g uᵀ`` ``(T x T)``,
  reduced against ``λ^{t-j-SHIFT}`` once at the end.  Per batch block, summed by the caller.

The discretisation (``A = -e^{log_a_real} + i a_imag``, ``Δ = e^{log_dt}``, ``λ = e^{ΔA}``, ``C̃ = C (λ - 1) / A``)
and its backward (``attentions/s4d._discretise_backward``'s math from ``S0, S1``) are one small kernel each,
one program per (kernel, channel): with them a training step's S4D core is six launches and a few allocations
(it was about 40 ATen ops of complex arithmetic on ``(K, C, n)`` tensors around the two big kernels).

Activations (``ACT``): 0 identity, 1 gelu (erf), 2 relu, 3 silu, 4 tanh.
"""

import torch
import triton
import triton.language as tl

from ._triton_common import launch

ACTIVATIONS = ("identity", "gelu", "relu", "silu", "tanh")
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _act(x, ACT: tl.constexpr):
    if ACT == 1:
        return 0.5 * x * (1.0 + tl.math.erf(x * _SQRT1_2))
    elif ACT == 2:
        return tl.maximum(x, 0.0)
    elif ACT == 3:
        return x / (1.0 + tl.exp(-x))
    elif ACT == 4:
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
    else:
        return x


@triton.jit
def _act_grad(x, ACT: tl.constexpr):
    """``act'(x)``."""
    if ACT == 1:
        return 0.5 * (1.0 + tl.math.erf(x * _SQRT1_2)) + x * _INV_SQRT_2PI * tl.exp(-0.5 * x * x)
    elif ACT == 2:
        return tl.where(x > 0, 1.0, 0.0)
    elif ACT == 3:
        s = 1.0 / (1.0 + tl.exp(-x))
        return s * (1.0 + x * (1.0 - s))
    elif ACT == 4:
        t = 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
        return 1.0 - t * t
    else:
        return tl.full(x.shape, 1.0, tl.float32)


@triton.jit
def _power(k, a_re, a_im):
    """``λ^k = e^{k dtA}`` as ``(re, im)``, broadcast ``k`` against ``a_re``, ``a_im``."""
    mag = tl.exp(k * a_re)
    return mag * tl.cos(k * a_im), mag * tl.sin(k * a_im)


@triton.jit
def _times(l_re, l_im, x_re, x_im):
    """``l x`` for per-mode complex ``l`` ``(NP,)`` against complex states ``x`` ``(NP, BB)``, as ``(re, im)``."""
    return l_re[:, None] * x_re - l_im[:, None] * x_im, l_im[:, None] * x_re + l_re[:, None] * x_im


@triton.jit
def _advance_lagged(x_re, x_im, xw_re, xw_im, lt_re, lt_im, vu_re, vu_im, vwu_re, vwu_im, T: tl.constexpr):
    """One chunk of the state and the lag-weighted state: ``x' <- λ^T x' + T λ^T x + Σ_j (T-1-j) λ^{T-1-j} u_j``,
    then ``x <- λ^T x + Σ_j λ^{T-1-j} u_j`` (the sums given: ``vwu``, ``vu``)."""
    lx_re, lx_im = _times(lt_re, lt_im, x_re, x_im)
    dw_re, dw_im = _times(lt_re, lt_im, xw_re, xw_im)
    return lx_re + vu_re, lx_im + vu_im, dw_re + T * lx_re + vwu_re, dw_im + T * lx_im + vwu_im


@triton.jit
def _tables(TAB, N):
    """The four ``(C, n)`` fp32 tables in ``TAB`` (``(4, C, n)``, one program per channel on axis 0): re and im of
    ``dtA``, then of ``C̃``."""
    cn = tl.num_programs(0) * N
    return TAB, TAB + cn, TAB + 2 * cn, TAB + 3 * cn


@triton.jit
def _modes(DTA_RE, DTA_IM, CB_RE, CB_IM, c, N, NP: tl.constexpr):
    offs_n = tl.arange(0, NP)
    mask_n = offs_n < N
    a_re = tl.load(DTA_RE + c * N + offs_n, mask=mask_n, other=0.0)
    a_im = tl.load(DTA_IM + c * N + offs_n, mask=mask_n, other=0.0)
    cb_re = tl.load(CB_RE + c * N + offs_n, mask=mask_n, other=0.0)
    cb_im = tl.load(CB_IM + c * N + offs_n, mask=mask_n, other=0.0)
    return offs_n, mask_n, a_re, a_im, cb_re, cb_im


@triton.jit
def _toeplitz(DTA_RE, DTA_IM, CB_RE, CB_IM, c, N, T: tl.constexpr, TRANSPOSED: tl.constexpr, SHIFT: tl.constexpr):
    """``K[t - j - SHIFT]`` for ``t >= j + SHIFT`` (else 0), ``(T, T)`` fp32; ``TRANSPOSED``: ``K[j - t - SHIFT]``."""
    offs_t = tl.arange(0, T)
    if TRANSPOSED:
        lag = (offs_t[None, :] - offs_t[:, None] - SHIFT).to(tl.float32)
    else:
        lag = (offs_t[:, None] - offs_t[None, :] - SHIFT).to(tl.float32)
    lag_ok = lag >= 0
    lag = tl.where(lag_ok, lag, 0.0)
    toep = tl.zeros((T, T), tl.float32)
    for m in range(0, N):
        a_re = tl.load(DTA_RE + c * N + m)
        a_im = tl.load(DTA_IM + c * N + m)
        cb_re = tl.load(CB_RE + c * N + m)
        cb_im = tl.load(CB_IM + c * N + m)
        p_re, p_im = _power(lag, a_re, a_im)
        toep += 2.0 * (cb_re * p_re - cb_im * p_im)
    return tl.where(lag_ok, toep, 0.0)


@triton.jit
def _tile(c, j0, l0, L, B, S, LSEG, DH, s_b, s_h, s_l, s_i, T: tl.constexpr, BB: tl.constexpr, REVERSE: tl.constexpr):
    """Element offsets and mask of the ``(T, BB)`` tile of channel ``c`` (head ``c // DH``, column ``c % DH``) at
    rows ``l0..`` of each walk segment, columns ``j0..``: column ``j`` is batch row ``j // S`` in segment ``j % S``
    (the walk's positions ``(j % S)·LSEG + l0..``; ``REVERSE``: positions counted from ``L - 1`` down)."""
    offs_t = tl.arange(0, T)
    cols = j0 + tl.arange(0, BB)
    b = cols // S
    row_in = l0 + offs_t[:, None]
    rows = (cols % S)[None, :] * LSEG + row_in
    mask = (row_in < LSEG) & (rows < L) & (b[None, :] < B)
    if REVERSE:
        rows = L - 1 - rows
    offs = (c // DH) * s_h + (c % DH) * s_i + rows.to(tl.int64) * s_l + b[None, :].to(tl.int64) * s_b
    return offs, mask


@triton.jit
def _ends_offsets(ENDS, c, q, part, cols, N, NP: tl.constexpr, BS):
    """Pointers to the ``(NP, len(cols))`` slice ``q`` (0: ``x``, 1: ``x'``, 2: ``h``), ``part`` (0 re, 1 im) of
    channel ``c`` in :func:`_s4d_ends`' ``(C, 3, 2, NP, B·S)`` fp32 buffer, with its mask (real modes, columns)."""
    offs_n = tl.arange(0, NP)
    base = ENDS + ((c * 3 + q) * 2 + part).to(tl.int64) * NP * BS
    return base + offs_n[:, None] * BS + cols[None, :], (offs_n[:, None] < N) & (cols[None, :] < BS)


@triton.jit
def _seg_init(ENDS, c, j0, B, S, LSEG, N, a_re, a_im, Q: tl.constexpr, NP: tl.constexpr, BB: tl.constexpr):
    """The states a walk segment starts from, from every segment's own end state (:func:`_s4d_ends`): ``Q = 0``
    the state ``x`` before the segment, ``Σ_{s'<s} λ^{D} E_{s'}`` with ``D = (s-1-s')·LSEG``; ``Q = 1`` also the
    lag-weighted ``x' = Σ_{s'<s} λ^{D} (E'_{s'} + D E_{s'})``; ``Q = 2`` the adjoint state after the segment,
    ``Σ_{s'>s} λ^{(s'-s-1)·LSEG} F_{s'}``.  Returns ``(re, im)`` pairs ``(NP, BB)``: one pair, two for ``Q = 1``."""
    cols = j0 + tl.arange(0, BB)
    b = cols // S
    s = cols % S
    bs = B * S
    r0 = tl.zeros((NP, BB), tl.float32)
    i0 = tl.zeros((NP, BB), tl.float32)
    r1 = tl.zeros((NP, BB), tl.float32)
    i1 = tl.zeros((NP, BB), tl.float32)
    for sp in range(0, S):
        if Q == 2:
            k = sp - s - 1
        else:
            k = s - 1 - sp
        lag = (tl.maximum(k, 0) * LSEG).to(tl.float32)
        p_re, p_im = _power(lag[None, :], a_re[:, None], a_im[:, None])
        w = (k >= 0)[None, :]
        p_re = tl.where(w, p_re, 0.0)
        p_im = tl.where(w, p_im, 0.0)
        src = b * S + sp
        ptr, mask = _ends_offsets(ENDS, c, Q if Q == 2 else 0, 0, src, N, NP, bs)
        e_re = tl.load(ptr, mask=mask, other=0.0)
        e_im = tl.load(ptr + NP * bs, mask=mask, other=0.0)
        r0 += p_re * e_re - p_im * e_im
        i0 += p_re * e_im + p_im * e_re
        if Q == 1:
            ptr, _ = _ends_offsets(ENDS, c, 1, 0, src, N, NP, bs)
            f_re = tl.load(ptr, mask=mask, other=0.0) + lag[None, :] * e_re
            f_im = tl.load(ptr + NP * bs, mask=mask, other=0.0) + lag[None, :] * e_im
            r1 += p_re * f_re - p_im * f_im
            i1 += p_re * f_im + p_im * f_re
    return r0, i0, r1, i1


@triton.jit
def _grad_tile(GO, PRE, offs, mask, ACT: tl.constexpr):
    """``g = act'(pre) ∘ dout`` of one tile (0 outside the sequence and the batch)."""
    g = tl.load(GO + offs, mask=mask, other=0.0).to(tl.float32)
    if ACT != 0:
        g = g * _act_grad(tl.load(PRE + offs, mask=mask, other=0.0).to(tl.float32), ACT)
    return g


@triton.jit
def _s4d_ends(
    U,
    GO,
    PRE,
    ENDS,
    TAB,
    L,
    B,
    S,
    LSEG,
    N,
    DH,
    su_b,
    su_h,
    su_l,
    su_i,
    so_b,
    so_h,
    so_l,
    so_i,
    T: tl.constexpr,
    BB: tl.constexpr,
    NP: tl.constexpr,
    ACT: tl.constexpr,
    REVERSE: tl.constexpr,
    BWD: tl.constexpr,
    PREC: tl.constexpr,
):
    """Each walk segment's own end states from a zero start, into ``ENDS`` ``(C, 3, 2, NP, B·S)`` (slices ``x``;
    with ``BWD`` also ``x'`` and, from ``g = act'(pre) ∘ dout``, ``F = Σ_t λ^{t - start} g_t``), for
    :func:`_seg_init`.  Same grid as the walks: one program per (channel, block of ``BB`` columns)."""
    c = tl.program_id(0)
    j0 = tl.program_id(1) * BB
    DTA_RE, DTA_IM, CB_RE, CB_IM = _tables(TAB, N)
    offs_t = tl.arange(0, T).to(tl.float32)
    offs_n, mask_n, a_re, a_im, cb_re, cb_im = _modes(DTA_RE, DTA_IM, CB_RE, CB_IM, c, N, NP)
    lt_re, lt_im = _power(T * 1.0, a_re, a_im)  # λ^T
    v_re, v_im = _power((T - 1.0) - offs_t[None, :], a_re[:, None], a_im[:, None])  # λ^{T-1-j}
    vw_re, vw_im = ((T - 1.0) - offs_t[None, :]) * v_re, ((T - 1.0) - offs_t[None, :]) * v_im
    e_re, e_im = _power(offs_t[None, :], a_re[:, None], a_im[:, None])  # λ^t
    x_re = tl.zeros((NP, BB), tl.float32)
    x_im = tl.zeros((NP, BB), tl.float32)
    xw_re = tl.zeros((NP, BB), tl.float32)
    xw_im = tl.zeros((NP, BB), tl.float32)
    f_re = tl.zeros((NP, BB), tl.float32)
    f_im = tl.zeros((NP, BB), tl.float32)
    pw_re = tl.full((NP,), 1.0, tl.float32)  # λ^{l0}
    pw_im = tl.zeros((NP,), tl.float32)
    for l0 in range(0, LSEG, T):
        u_offs, mask = _tile(c, j0, l0, L, B, S, LSEG, DH, su_b, su_h, su_l, su_i, T, BB, REVERSE)
        u = tl.load(U + u_offs, mask=mask, other=0.0).to(tl.float32)
        vu_re = tl.dot(v_re, u, input_precision=PREC)
        vu_im = tl.dot(v_im, u, input_precision=PREC)
        if BWD:
            vwu_re = tl.dot(vw_re, u, input_precision=PREC)
            vwu_im = tl.dot(vw_im, u, input_precision=PREC)
            x_re, x_im, xw_re, xw_im = _advance_lagged(
                x_re, x_im, xw_re, xw_im, lt_re, lt_im, vu_re, vu_im, vwu_re, vwu_im, T
            )
            o_offs, _ = _tile(c, j0, l0, L, B, S, LSEG, DH, so_b, so_h, so_l, so_i, T, BB, REVERSE)
            g = _grad_tile(GO, PRE, o_offs, mask, ACT)
            eg_re = tl.dot(e_re, g, input_precision=PREC)
            eg_im = tl.dot(e_im, g, input_precision=PREC)
            f_re += pw_re[:, None] * eg_re - pw_im[:, None] * eg_im
            f_im += pw_re[:, None] * eg_im + pw_im[:, None] * eg_re
            pw_re, pw_im = pw_re * lt_re - pw_im * lt_im, pw_re * lt_im + pw_im * lt_re
        else:
            lx_re, lx_im = _times(lt_re, lt_im, x_re, x_im)
            x_re, x_im = lx_re + vu_re, lx_im + vu_im
    cols = j0 + tl.arange(0, BB)
    bs = B * S
    ptr, m = _ends_offsets(ENDS, c, 0, 0, cols, N, NP, bs)
    tl.store(ptr, x_re, mask=m)
    tl.store(ptr + NP * bs, x_im, mask=m)
    if BWD:
        ptr, m = _ends_offsets(ENDS, c, 1, 0, cols, N, NP, bs)
        tl.store(ptr, xw_re, mask=m)
        tl.store(ptr + NP * bs, xw_im, mask=m)
        ptr, m = _ends_offsets(ENDS, c, 2, 0, cols, N, NP, bs)
        tl.store(ptr, f_re, mask=m)
        tl.store(ptr + NP * bs, f_im, mask=m)


@triton.jit
def _s4d_fwd(
    U,
    PART,
    PRE,
    OUT,
    TAB,
    DD,
    ENDS,
    L,
    B,
    S,
    LSEG,
    N,
    DH,
    su_b,
    su_h,
    su_l,
    su_i,
    so_b,
    so_h,
    so_l,
    so_i,
    T: tl.constexpr,
    BB: tl.constexpr,
    NP: tl.constexpr,
    ACT: tl.constexpr,
    STORE_PRE: tl.constexpr,
    HAS_D: tl.constexpr,
    REVERSE: tl.constexpr,
    SHIFT: tl.constexpr,
    ADD_PART: tl.constexpr,
    FINAL: tl.constexpr,
    PREC: tl.constexpr,
    INIT: tl.constexpr,
):
    """``FINAL``: ``act(pre)`` into ``OUT`` (and ``pre`` into ``PRE`` with ``STORE_PRE``), else the fp32 result into
    ``PART``; ``ADD_PART``: ``PART`` (a first pass's result) added first.  ``PART``, ``PRE``, ``OUT`` share strides.
    ``INIT``: the walk is split into ``S`` segments of ``LSEG`` positions (columns = batch rows × segments,
    :func:`_tile`), each starting from the state :func:`_seg_init` makes of :func:`_s4d_ends`' results in ``ENDS``."""
    c = tl.program_id(0)
    j0 = tl.program_id(1) * BB
    DTA_RE, DTA_IM, CB_RE, CB_IM = _tables(TAB, N)
    offs_t = tl.arange(0, T).to(tl.float32)
    offs_n, mask_n, a_re, a_im, cb_re, cb_im = _modes(DTA_RE, DTA_IM, CB_RE, CB_IM, c, N, NP)
    toep = _toeplitz(DTA_RE, DTA_IM, CB_RE, CB_IM, c, N, T, False, SHIFT)
    # the state's part of a chunk's outputs: 2 Re(C̃ λ^{t+1-SHIFT} x) = W_re x_re + W_im x_im  (T, NP)
    p_re, p_im = _power(offs_t[:, None] + (1.0 - SHIFT), a_re[None, :], a_im[None, :])
    w_re = 2.0 * (cb_re[None, :] * p_re - cb_im[None, :] * p_im)
    w_im = -2.0 * (cb_re[None, :] * p_im + cb_im[None, :] * p_re)
    # the chunk's part of the next state: λ^{T-1-j} u_j  (NP, T); padded modes stay 0
    v_re, v_im = _power((T - 1.0) - offs_t[None, :], a_re[:, None], a_im[:, None])
    v_re = tl.where(mask_n[:, None], v_re, 0.0)
    v_im = tl.where(mask_n[:, None], v_im, 0.0)
    lt_re, lt_im = _power(T * 1.0, a_re, a_im)  # λ^T
    if INIT:
        x_re, x_im = _seg_init(ENDS, c, j0, B, S, LSEG, N, a_re, a_im, 0, NP, BB)[:2]
    else:
        x_re = tl.zeros((NP, BB), tl.float32)
        x_im = tl.zeros((NP, BB), tl.float32)
    for l0 in range(0, LSEG, T):
        u_offs, mask = _tile(c, j0, l0, L, B, S, LSEG, DH, su_b, su_h, su_l, su_i, T, BB, REVERSE)
        u = tl.load(U + u_offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.dot(toep, u, input_precision=PREC)
        y += tl.dot(w_re, x_re, input_precision=PREC) + tl.dot(w_im, x_im, input_precision=PREC)
        if HAS_D:
            y += tl.load(DD + c) * u
        o_offs, _ = _tile(c, j0, l0, L, B, S, LSEG, DH, so_b, so_h, so_l, so_i, T, BB, REVERSE)
        if ADD_PART:
            y += tl.load(PART + o_offs, mask=mask, other=0.0)
        if FINAL:
            tl.store(OUT + o_offs, _act(y, ACT).to(OUT.dtype.element_ty), mask=mask)
            if STORE_PRE:
                tl.store(PRE + o_offs, y.to(PRE.dtype.element_ty), mask=mask)
        else:
            tl.store(PART + o_offs, y, mask=mask)
        vu_re = tl.dot(v_re, u, input_precision=PREC)
        vu_im = tl.dot(v_im, u, input_precision=PREC)
        lx_re, lx_im = _times(lt_re, lt_im, x_re, x_im)
        x_re, x_im = lx_re + vu_re, lx_im + vu_im


@triton.jit
def _s4d_bwd(
    GO,
    PRE,
    U,
    DU,
    SOUT,
    TAB,
    DD,
    ENDS,
    L,
    B,
    S,
    LSEG,
    N,
    DH,
    su_b,
    su_h,
    su_l,
    su_i,
    so_b,
    so_h,
    so_l,
    so_i,
    sd_b,
    sd_h,
    sd_l,
    sd_i,
    T: tl.constexpr,
    BB: tl.constexpr,
    NP: tl.constexpr,
    ACT: tl.constexpr,
    HAS_D: tl.constexpr,
    REVERSE: tl.constexpr,
    SHIFT: tl.constexpr,
    ADD_DU: tl.constexpr,
    PREC: tl.constexpr,
    INIT: tl.constexpr,
):
    """``ADD_DU``: ``∂u`` added to what ``DU`` holds (fp32: a first pass's), else written.  ``GO``, ``PRE`` share
    strides.  ``INIT``: segmented walks as in :func:`_s4d_fwd`, the states ``x``, ``x'`` and
    ``h`` each segment starts from made by :func:`_seg_init`."""
    c = tl.program_id(0)
    blk = tl.program_id(1)
    j0 = blk * BB
    DTA_RE, DTA_IM, CB_RE, CB_IM = _tables(TAB, N)
    offs_t = tl.arange(0, T).to(tl.float32)
    offs_n, mask_n, a_re, a_im, cb_re, cb_im = _modes(DTA_RE, DTA_IM, CB_RE, CB_IM, c, N, NP)
    lt_re, lt_im = _power(T * 1.0, a_re, a_im)  # λ^T
    # -- the parameters: a walk with x and x' ---------------------------------------------------------------
    # λ^{t+1-SHIFT} and (t+1-SHIFT) λ^{t+1-SHIFT} as (NP, T): a chunk's g against them meets the start states
    r_re, r_im = _power(offs_t[None, :] + (1.0 - SHIFT), a_re[:, None], a_im[:, None])
    rw_re, rw_im = (offs_t[None, :] + (1.0 - SHIFT)) * r_re, (offs_t[None, :] + (1.0 - SHIFT)) * r_im
    # λ^{T-1-j} and (T-1-j) λ^{T-1-j} (NP, T): a chunk's u into the next states; padded modes 0
    v_re, v_im = _power((T - 1.0) - offs_t[None, :], a_re[:, None], a_im[:, None])
    v_re = tl.where(mask_n[:, None], v_re, 0.0)
    v_im = tl.where(mask_n[:, None], v_im, 0.0)
    vw_re, vw_im = ((T - 1.0) - offs_t[None, :]) * v_re, ((T - 1.0) - offs_t[None, :]) * v_im
    if INIT:
        x_re, x_im, xw_re, xw_im = _seg_init(ENDS, c, j0, B, S, LSEG, N, a_re, a_im, 1, NP, BB)
    else:
        x_re = tl.zeros((NP, BB), tl.float32)
        x_im = tl.zeros((NP, BB), tl.float32)
        xw_re = tl.zeros((NP, BB), tl.float32)
        xw_im = tl.zeros((NP, BB), tl.float32)
    s0_re = tl.zeros((NP,), tl.float32)
    s0_im = tl.zeros((NP,), tl.float32)
    s1_re = tl.zeros((NP,), tl.float32)
    s1_im = tl.zeros((NP,), tl.float32)
    gd = tl.zeros((T, BB), tl.float32)
    inner = tl.zeros((T, T), tl.float32)  # Σ over chunks and batch rows of g_t u_j
    for l0 in range(0, LSEG, T):
        o_offs, mask = _tile(c, j0, l0, L, B, S, LSEG, DH, so_b, so_h, so_l, so_i, T, BB, REVERSE)
        g = _grad_tile(GO, PRE, o_offs, mask, ACT)
        u_offs, _ = _tile(c, j0, l0, L, B, S, LSEG, DH, su_b, su_h, su_l, su_i, T, BB, REVERSE)
        u = tl.load(U + u_offs, mask=mask, other=0.0).to(tl.float32)
        gd += g * u
        inner += tl.dot(g, tl.trans(u), input_precision=PREC)
        ga_re = tl.dot(r_re, g, input_precision=PREC)  # Σ_t g_t λ^{t+1-SHIFT}  (NP, BB)
        ga_im = tl.dot(r_im, g, input_precision=PREC)
        gw_re = tl.dot(rw_re, g, input_precision=PREC)  # Σ_t g_t (t+1-SHIFT) λ^{t+1-SHIFT}
        gw_im = tl.dot(rw_im, g, input_precision=PREC)
        s0_re += tl.sum(ga_re * x_re - ga_im * x_im, 1)
        s0_im += tl.sum(ga_re * x_im + ga_im * x_re, 1)
        s1_re += tl.sum(ga_re * xw_re - ga_im * xw_im + gw_re * x_re - gw_im * x_im, 1)
        s1_im += tl.sum(ga_re * xw_im + ga_im * xw_re + gw_re * x_im + gw_im * x_re, 1)
        vu_re = tl.dot(v_re, u, input_precision=PREC)
        vu_im = tl.dot(v_im, u, input_precision=PREC)
        vwu_re = tl.dot(vw_re, u, input_precision=PREC)
        vwu_im = tl.dot(vw_im, u, input_precision=PREC)
        x_re, x_im, xw_re, xw_im = _advance_lagged(
            x_re, x_im, xw_re, xw_im, lt_re, lt_im, vu_re, vu_im, vwu_re, vwu_im, T
        )
    # the pairs inside a chunk: Σ inner[t, j] λ^{t-j-SHIFT} (and its lag times it) over t >= j + SHIFT, by mode
    lag = offs_t[:, None] - offs_t[None, :] - SHIFT
    inner = tl.where(lag >= 0, inner, 0.0)
    lag = tl.where(lag >= 0, lag, 0.0)
    for m in range(0, N):
        p_re, p_im = _power(lag, tl.load(DTA_RE + c * N + m), tl.load(DTA_IM + c * N + m))
        q_re, q_im = tl.sum(tl.sum(inner * p_re, 1), 0), tl.sum(tl.sum(inner * p_im, 1), 0)
        qw_re, qw_im = tl.sum(tl.sum(inner * lag * p_re, 1), 0), tl.sum(tl.sum(inner * lag * p_im, 1), 0)
        here = offs_n == m
        s0_re += tl.where(here, q_re, 0.0)
        s0_im += tl.where(here, q_im, 0.0)
        s1_re += tl.where(here, qw_re, 0.0)
        s1_im += tl.where(here, qw_im, 0.0)
    out = SOUT + (blk * tl.num_programs(0) + c) * (4 * N + 1)
    tl.store(out + offs_n, s0_re, mask=mask_n)
    tl.store(out + N + offs_n, s0_im, mask=mask_n)
    tl.store(out + 2 * N + offs_n, s1_re, mask=mask_n)
    tl.store(out + 3 * N + offs_n, s1_im, mask=mask_n)
    tl.store(out + 4 * N, tl.sum(tl.sum(gd, 1), 0))
    # -- ∂u: the convolution the other way, the adjoint state h from the walk's last chunk to its first --------------
    toep_t = _toeplitz(DTA_RE, DTA_IM, CB_RE, CB_IM, c, N, T, True, SHIFT)  # (j, t): du_j += K[t-j-SHIFT] g_t
    # the state's part: 2 Re(C̃ λ^{T-j-SHIFT} h_next) (T, NP); the chunk's part of h: λ^t g_t (NP, T)
    p_re, p_im = _power((T - SHIFT) - offs_t[:, None], a_re[None, :], a_im[None, :])
    w_re = 2.0 * (cb_re[None, :] * p_re - cb_im[None, :] * p_im)
    w_im = -2.0 * (cb_re[None, :] * p_im + cb_im[None, :] * p_re)
    e_re, e_im = _power(offs_t[None, :], a_re[:, None], a_im[:, None])
    e_re = tl.where(mask_n[:, None], e_re, 0.0)
    e_im = tl.where(mask_n[:, None], e_im, 0.0)
    if INIT:
        h_re, h_im = _seg_init(ENDS, c, j0, B, S, LSEG, N, a_re, a_im, 2, NP, BB)[:2]
    else:
        h_re = tl.zeros((NP, BB), tl.float32)
        h_im = tl.zeros((NP, BB), tl.float32)
    n_chunks = tl.cdiv(LSEG, T)
    for idx in range(0, n_chunks):
        l0 = (n_chunks - 1 - idx) * T
        o_offs, mask = _tile(c, j0, l0, L, B, S, LSEG, DH, so_b, so_h, so_l, so_i, T, BB, REVERSE)
        g = _grad_tile(GO, PRE, o_offs, mask, ACT)
        du = tl.dot(toep_t, g, input_precision=PREC)
        du += tl.dot(w_re, h_re, input_precision=PREC) + tl.dot(w_im, h_im, input_precision=PREC)
        if HAS_D:
            du += tl.load(DD + c) * g
        d_offs, _ = _tile(c, j0, l0, L, B, S, LSEG, DH, sd_b, sd_h, sd_l, sd_i, T, BB, REVERSE)
        if ADD_DU:
            du += tl.load(DU + d_offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DU + d_offs, du.to(DU.dtype.element_ty), mask=mask)
        eg_re = tl.dot(e_re, g, input_precision=PREC)
        eg_im = tl.dot(e_im, g, input_precision=PREC)
        lh_re, lh_im = _times(lt_re, lt_im, h_re, h_im)
        h_re, h_im = lh_re + eg_re, lh_im + eg_im


@triton.jit
def _cdiv(x_re, x_im, y_re, y_im):
    """``x / y`` for complex numbers as (re, im) pairs."""
    den = y_re * y_re + y_im * y_im
    return (x_re * y_re + x_im * y_im) / den, (x_im * y_re - x_re * y_im) / den


@triton.jit
def _cmul(x_re, x_im, y_re, y_im):
    return x_re * y_re - x_im * y_im, x_re * y_im + x_im * y_re


@triton.jit
def _ssm(LOG_DT, LAR, AIM, CC, row, N, NP: tl.constexpr):
    """The discretised modes of one (kernel, channel) ``row`` (``attentions/s4d._discretise``):
    ``A = -e^{log_a_real} + i a_imag``, ``Δ = e^{log_dt}``, ``λ = e^{ΔA}``, ``C̃ = C (λ - 1) / A``."""
    offs_n = tl.arange(0, NP)
    mask_n = offs_n < N
    dt = tl.exp(tl.load(LOG_DT + row))
    a_re = -tl.exp(tl.load(LAR + row * N + offs_n, mask=mask_n, other=0.0))
    a_im = tl.load(AIM + row * N + offs_n, mask=mask_n, other=0.0)
    c_re = tl.load(CC + (row * N + offs_n) * 2, mask=mask_n, other=0.0)
    c_im = tl.load(CC + (row * N + offs_n) * 2 + 1, mask=mask_n, other=0.0)
    mag = tl.exp(a_re * dt)
    l_re, l_im = mag * tl.cos(a_im * dt), mag * tl.sin(a_im * dt)
    z_re, z_im = _cdiv(l_re - 1.0, l_im, a_re, a_im)  # zero-order hold (λ - 1) / A
    cb_re, cb_im = _cmul(c_re, c_im, z_re, z_im)
    return offs_n, mask_n, dt, a_re, a_im, c_re, c_im, l_re, l_im, z_re, z_im, cb_re, cb_im


@triton.jit
def _discretise_fwd(LOG_DT, LAR, AIM, CC, TAB, C, N, NP: tl.constexpr):
    """The tables of :func:`s4d_tables` ``(K, 4, C, n)`` from the raw parameters, one program per (kernel, channel)."""
    row = tl.program_id(0)
    k = row // C
    c = row % C
    offs_n, mask_n, dt, a_re, a_im, _, _, _, _, _, _, cb_re, cb_im = _ssm(LOG_DT, LAR, AIM, CC, row, N, NP)
    base = TAB + k * 4 * C * N + c * N + offs_n
    tl.store(base, a_re * dt, mask=mask_n)
    tl.store(base + C * N, a_im * dt, mask=mask_n)
    tl.store(base + 2 * C * N, cb_re, mask=mask_n)
    tl.store(base + 3 * C * N, cb_im, mask=mask_n)


@triton.jit
def _discretise_bwd(LOG_DT, LAR, AIM, CC, SUMS, G_LOG_DT, G_LAR, G_AIM, G_C, G_D, C, N, BLOCKS, NP: tl.constexpr):
    """The raw parameters' gradients from the kernels' per-batch-block sums ``(K, blocks, C, 4n + 1)`` (``S0``,
    ``S1`` as re / im, then ``∂D``; ``attentions/s4d._discretise_backward`` with ``h_C̃ = 2 S0``,
    ``h_ΔA = 2 C̃ S1``, conjugated gradients ``h = ∂/∂re - i ∂/∂im``), one program per (kernel, channel)."""
    row = tl.program_id(0)
    k = row // C
    c = row % C
    offs_n, mask_n, dt, a_re, a_im, c_re, c_im, l_re, l_im, z_re, z_im, cb_re, cb_im = _ssm(
        LOG_DT, LAR, AIM, CC, row, N, NP
    )
    s0_re = tl.zeros((NP,), tl.float32)
    s0_im = tl.zeros((NP,), tl.float32)
    s1_re = tl.zeros((NP,), tl.float32)
    s1_im = tl.zeros((NP,), tl.float32)
    g_d = tl.full((), 0.0, tl.float32)
    for blk in range(0, BLOCKS):
        src = SUMS + ((k * BLOCKS + blk) * C + c) * (4 * N + 1)
        s0_re += tl.load(src + offs_n, mask=mask_n, other=0.0)
        s0_im += tl.load(src + N + offs_n, mask=mask_n, other=0.0)
        s1_re += tl.load(src + 2 * N + offs_n, mask=mask_n, other=0.0)
        s1_im += tl.load(src + 3 * N + offs_n, mask=mask_n, other=0.0)
        g_d += tl.load(src + 4 * N)
    hc_re, hc_im = 2.0 * s0_re, 2.0 * s0_im  # h_C̃
    hd_re, hd_im = _cmul(2.0 * cb_re, 2.0 * cb_im, s1_re, s1_im)  # h_ΔA
    # through λ = e^{ΔA} inside C̃ too: h_w = h_ΔA + h_C̃ · C λ / A
    cl_re, cl_im = _cmul(c_re, c_im, l_re, l_im)
    t_re, t_im = _cdiv(cl_re, cl_im, a_re, a_im)
    u_re, u_im = _cmul(hc_re, hc_im, t_re, t_im)
    w_re, w_im = hd_re + u_re, hd_im + u_im
    # ∂/∂Δ = Re(h_w A), times Δ for log Δ
    g_log_dt = tl.sum(tl.where(mask_n, w_re * a_re - w_im * a_im, 0.0), 0) * dt
    # h_A = h_w Δ - h_C̃ C̃ / A
    hcb_re, hcb_im = _cmul(hc_re, hc_im, cb_re, cb_im)
    v_re, v_im = _cdiv(hcb_re, hcb_im, a_re, a_im)
    ha_re, ha_im = w_re * dt - v_re, w_im * dt - v_im
    # ∂C = conj(h_C̃ · zoh) as (re, im)
    gc_re, gc_im = _cmul(hc_re, hc_im, z_re, z_im)
    tl.store(G_LOG_DT + row, g_log_dt)
    tl.store(G_LAR + row * N + offs_n, ha_re * a_re, mask=mask_n)
    tl.store(G_AIM + row * N + offs_n, -ha_im, mask=mask_n)
    tl.store(G_C + (row * N + offs_n) * 2, gc_re, mask=mask_n)
    tl.store(G_C + (row * N + offs_n) * 2 + 1, -gc_im, mask=mask_n)
    if k == 0:
        tl.store(G_D + c, g_d)


# -- host side ---------------------------------------------------------------------------------------------------
_T = 64  # positions per chunk
# The walks' shape: (columns per program, warps per program, columns the segments fill).  A program's columns
# are batch rows x walk segments; the walk is split into segments (a power of two of them, each a whole number of
# chunks) until the batch rows and segments fill the third number of columns (0: never split).  With CAB's 4
# batch rows and (16, 4, 16): 4 segments, so a program's products are full and it walks a quarter of the chunks
# (two launches each way instead of one: the segments' end states first, :func:`_s4d_ends`).
WALK = (16, 4, 16)


def _segments(bsz: int, length: int) -> tuple:
    """``(S, LSEG)``: the number of walk segments and their length (a multiple of the chunk; the last one may be
    shorter), for :data:`WALK`."""
    want = max(1, WALK[2] // max(bsz, 1))
    want = min(1 << (want.bit_length() - 1), triton.cdiv(length, _T))
    seg_len = triton.cdiv(triton.cdiv(length, want), _T) * _T
    return triton.cdiv(length, seg_len), seg_len


def _time_first(u: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised ``(B, H, L, d)`` tensor in a time-first ``(L, B, H, d)`` memory layout."""
    bsz, heads, length, dim = u.shape
    return torch.empty(length, bsz, heads, dim, device=u.device, dtype=dtype).permute(1, 2, 0, 3)


def s4d_tables(log_dt, log_a_real, a_imag, c) -> torch.Tensor:
    """The kernels' parameter tables from the raw fp32 parameters (``log_dt (K, C)``, ``log_a_real``, ``a_imag``
    ``(K, C, n)``, ``c (K, C, n, 2)``; ``K`` kernels: 1, or 2 with the one over later positions): the discretised
    ``dtA``, ``C̃`` as one contiguous fp32 ``(K, 4, C, n)`` (re and im of ``dtA``, then of ``C̃``), one launch."""
    kernels, channels, n = log_a_real.shape
    tab = torch.empty(kernels, 4, channels, n, device=log_dt.device, dtype=torch.float32)
    params = tuple(p.contiguous() for p in (log_dt, log_a_real, a_imag, c))
    launch(_discretise_fwd, (kernels * channels,), (*params, tab), (channels, n), dict(NP=_block_n(n), num_warps=1))
    return tab


def s4d_param_grads(sums, log_dt, log_a_real, a_imag, c) -> tuple:
    """``(∂log_dt, ∂log_a_real, ∂a_imag, ∂c, ∂d)`` from :func:`s4d_backward`'s sums ``(K, blocks, C, 4n + 1)``, one
    launch."""
    kernels, blocks, channels, _ = sums.shape
    n = log_a_real.shape[-1]
    params = tuple(p.contiguous() for p in (log_dt, log_a_real, a_imag, c))
    grads = tuple(torch.empty_like(p) for p in params) + (torch.empty(channels, device=sums.device),)
    scalars = (channels, n, blocks)
    launch(_discretise_bwd, (kernels * channels,), (*params, sums, *grads), scalars, dict(NP=_block_n(n), num_warps=1))
    return grads


def _block_n(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _meta(u: torch.Tensor, n: int, activation: str) -> dict:
    """The launch parameters both directions share; the products in IEEE fp32 for fp32 inputs, in tf32 (tensor
    cores) for half ones."""
    prec = "ieee" if u.dtype == torch.float32 else "tf32"
    return dict(T=_T, BB=WALK[0], NP=_block_n(n), ACT=ACTIVATIONS.index(activation), PREC=prec, num_warps=WALK[1])


def _strides(x: torch.Tensor) -> tuple:
    return tuple(x.stride())


def _walks(u: torch.Tensor, n: int) -> tuple:
    """``(grid, S, LSEG, ENDS)``: the walks' grid (channel, column block), segments, and the fp32 end-state buffer
    ``(C, 3, 2, NP, B·S)`` of :func:`_s4d_ends` (``None`` when the walk is one segment)."""
    bsz, heads, length, dim = u.shape
    segs, seg_len = _segments(bsz, length)
    grid = (heads * dim, triton.cdiv(bsz * segs, WALK[0]))
    ends = None
    if segs > 1:
        ends = torch.empty(heads * dim, 3, 2, _block_n(n), bsz * segs, device=u.device, dtype=torch.float32)
    return grid, segs, seg_len, ends


def s4d_forward(u, tables, d, activation: str, keep_pre: bool):
    """``(out, pre or None)`` of S4D on per-head ``u (B, H, L, d)`` (channel ``h·d + i``, any strides), the
    discretised parameters' :func:`s4d_tables` ``(K, 4, C, n)`` (``K = 2``: the second kernel over later
    positions) and ``d (C,)`` fp32: both in ``u``'s dtype, time-first."""
    bsz, heads, length, dim = u.shape
    kernels, n = tables.shape[0], tables.shape[-1]
    out = _time_first(u, u.dtype)
    pre = _time_first(u, u.dtype) if keep_pre else out
    part = _time_first(u, torch.float32) if kernels == 2 else out  # the first pass's result
    grid, segs, seg_len, ends = _walks(u, n)
    scalars = (length, bsz, segs, seg_len, n, dim, *_strides(u), *_strides(out))
    common = {**_meta(u, n, activation), "INIT": ends is not None}
    for k in range(kernels):
        if ends is not None:  # each segment's own end state, then the walks from the states it makes
            meta = {key: common[key] for key in ("T", "BB", "NP", "ACT", "PREC", "num_warps")}
            launch(_s4d_ends, grid, (u, u, u, ends, tables[k]), scalars, {**meta, "REVERSE": k == 1, "BWD": False})
        flags = dict(STORE_PRE=keep_pre, HAS_D=k == 0, REVERSE=k == 1, SHIFT=k, ADD_PART=k == 1, FINAL=k == kernels - 1)
        tensors = (u, part, pre, out, tables[k], d.contiguous(), out if ends is None else ends)
        launch(_s4d_fwd, grid, tensors, scalars, {**common, **flags})
    return out, (pre if keep_pre else None)


def s4d_backward(grad, pre, u, tables, d, activation: str):
    """``(du in u's dtype and time-first layout, sums)`` for the output gradient ``grad`` ``(B, H, L, d)``, the kept
    ``pre`` (time-first; None for the identity) and ``u`` (any strides): ``sums`` ``(K, blocks, C, 4n + 1)`` fp32
    per kernel and column block, ``S0`` and ``S1`` (re, im) and ``∂D``, for :func:`s4d_param_grads`."""
    bsz, heads, length, dim = u.shape
    kernels, _, channels, n = tables.shape
    grid, segs, seg_len, ends = _walks(u, n)
    du = _time_first(u, u.dtype if kernels == 1 else torch.float32)
    sums = torch.empty(kernels, grid[1], channels, 4 * n + 1, device=u.device, dtype=torch.float32)
    if pre is not None and grad.stride() != pre.stride():  # (both are read through one set of strides)
        grad = torch.empty_like(pre, dtype=grad.dtype).copy_(grad)
    scalars = (length, bsz, segs, seg_len, n, dim, *_strides(u), *_strides(grad))
    common = {**_meta(u, n, activation), "INIT": ends is not None}
    for k in range(kernels):
        pre_k = grad if pre is None else pre
        if ends is not None:  # each segment's own end states (x, x' from u; the adjoint from g), then the walks
            meta = {key: common[key] for key in ("T", "BB", "NP", "ACT", "PREC", "num_warps")}
            launch(
                _s4d_ends, grid, (u, grad, pre_k, ends, tables[k]), scalars, {**meta, "REVERSE": k == 1, "BWD": True}
            )
        flags = dict(HAS_D=k == 0, REVERSE=k == 1, SHIFT=k, ADD_DU=k == 1)
        tensors = (grad, pre_k, u, du, sums[k], tables[k], d.contiguous(), du if ends is None else ends)
        launch(_s4d_bwd, grid, tensors, scalars + _strides(du), {**common, **flags})
    return (du if du.dtype == u.dtype else du.to(u.dtype)), sums


def probe_s4d(device: torch.device, dtype: torch.dtype, activation: str, kernels: int, n: int) -> None:
    """Launches every variant a training step of this configuration uses (forward with and without the kept
    pre-activation, backward; one walk, and walks in segments) on tiny inputs: raises what a kernel raises
    (``backends.triton_probe``)."""
    g = torch.Generator(device=device).manual_seed(0)
    params = (
        -torch.rand(kernels, 1, generator=g, device=device) * 4.0,
        -torch.rand(kernels, 1, n, generator=g, device=device),
        torch.rand(kernels, 1, n, generator=g, device=device),
        torch.randn(kernels, 1, n, 2, generator=g, device=device),
    )
    tables, d = s4d_tables(*params), torch.ones(1, device=device)
    for length in (5, 2 * _T + 1):  # one chunk: one walk; three: three segments (unless WALK[2] is 0)
        u = torch.randn(1, 1, length, 1, generator=g, device=device).to(dtype)
        s4d_forward(u, tables, d, activation, False)
        out, pre = s4d_forward(u, tables, d, activation, activation != "identity")
        s4d_param_grads(s4d_backward(torch.ones_like(out), pre, u, tables, d, activation)[1], *params)
