"""Triton kernels of causal ABC's slot weights and slot read for training (imported only when Triton is installed).

Causal ABC (``attentions/abc.py``) runs two chunked linear attentions (``_triton_linear.py``); between them sit
elementwise and scan work on ``(B, H, S, n)`` slot tensors (``n`` slots, 16 by default).  As ATen ops it was about
37 kernels a training step (two ``logcumsumexp`` scans among them); on an H200 each costs ~20 us of host time, the
step's bound at 8k tokens.  Here it is four (six with the scans' segment aggregates):

* :func:`slot_weights` -- from the slot scores ``a (B, H, S, n)``: the running max over every slot so far
  ``c_i = max_{j<=i, l} a_jl``, the weights ``e = exp(a - c)`` (in ``a``'s dtype), the negated log normalisers
  ``nl = c - logcumsumexp_j(a)`` (fp32) and the log decays ``c_{i-1} - c_i`` (fp32, 0 at ``i = 0``).
* :func:`slot_weights_grad` -- the scores' gradient ``da = de ∘ e - Σ_{i>=j} dnl_i e^{a_j - lse_i}`` (``lse = c -
  nl``), the sum scanned in the log domain: each term is carried as a pair ``(m, s)`` meaning ``s·e^m``.
* :func:`slot_read` / :func:`slot_read_grad` -- ``r = softmax_l(num e^{nl} scale) e^{nl}`` (times a dropout mask)
  and its gradients, a row of ``n`` slots per thread block row; slots whose normaliser is at or below ``empty``
  (``nl >= bound``) get weight 0.

One program per (batch, head, segment) walks the segment's positions in blocks of ``BLOCK_S`` for the scans
(each block scanned with ``tl.associative_scan``, the carry combined after), starting from the carry of the
other segments (:data:`SCAN_PROGRAMS`); the row kernels take ``BLOCK_S`` rows of one head per program.
Every tensor is contiguous ``(B, H, S, n)`` (or ``(B, H, S)``); arithmetic in fp32.  Scores must be finite (a
fresh causal sequence without padding, the only caller).
"""

import torch
import triton
import triton.language as tl

from ._triton_common import launch

_PAD = tl.constexpr(
    -1.0e30
)  # a finite "minus infinity" for padded rows and slots: exp(_PAD - m) is 0, exp(_PAD - _PAD) is 1


@triton.jit
def _log_combine(m1, s1, m2, s2):
    """``s1·e^{m1} + s2·e^{m2}`` as a pair ``(m, s)`` (``m`` the larger exponent)."""
    m = tl.maximum(m1, m2)
    return m, s1 * tl.exp(m1 - m) + s2 * tl.exp(m2 - m)


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _agg_ptr(AGG, bh, seg_id, G, BLOCK_N: tl.constexpr):
    """Segment ``seg_id``'s aggregates in ``AGG`` ``(B·H, G, 2·BLOCK_N + 1)``: per slot ``(m, s)``, then a
    scalar."""
    return AGG + (bh * G + seg_id) * (2 * BLOCK_N + 1)


@triton.jit
def _slot_weights_agg(A, AGG, S, N, SEG, G, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, SCAN: tl.constexpr):
    """Per (batch·head, segment of ``SEG`` positions): the max of the segment's scores and (``SCAN``) each slot's
    log-sum-exp over it as ``(m, s)``, for the walks of :func:`_slot_weights_fwd` to start from."""
    bh = tl.program_id(0).to(tl.int64)
    seg_id = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_n = tl.arange(0, BLOCK_N)
    col = offs_n[None, :] < N
    c_acc = tl.full((), _PAD, tl.float32)
    m_acc = tl.full((BLOCK_N,), _PAD, tl.float32)
    s_acc = tl.zeros((BLOCK_N,), tl.float32)
    for start in range(seg_id * SEG, tl.minimum(seg_id * SEG + SEG, S), BLOCK_S):
        rows = start + offs_s
        mask = (rows < S)[:, None] & col
        a = tl.load(A + bh * S * N + rows[:, None].to(tl.int64) * N + offs_n[None, :], mask=mask, other=_PAD)
        a = a.to(tl.float32)
        c_acc = tl.maximum(c_acc, tl.max(tl.max(a, 1), 0))
        if SCAN:
            m_blk, s_blk = tl.reduce((a, tl.where(mask, 1.0, 0.0)), 0, _log_combine)
            m_acc, s_acc = _log_combine(m_acc, s_acc, m_blk, s_blk)
    out = _agg_ptr(AGG, bh, seg_id, G, BLOCK_N)
    tl.store(out + offs_n, m_acc)
    tl.store(out + BLOCK_N + offs_n, s_acc)
    tl.store(out + 2 * BLOCK_N, c_acc)


@triton.jit
def _slot_weights_fwd(
    A,
    E,
    NL,
    DECAY,
    C,
    AGG,
    S,
    N,
    SEG,
    G,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SCAN: tl.constexpr,
    INIT: tl.constexpr,
):
    """One program per (batch·head, segment of ``SEG`` positions; ``G`` segments); ``INIT``: the running max and
    normalisers start from the earlier segments' :func:`_slot_weights_agg` results in ``AGG``."""
    bh = tl.program_id(0).to(tl.int64)
    seg_id = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_n = tl.arange(0, BLOCK_N)
    col = offs_n[None, :] < N
    base = bh * S * N
    c_run = tl.full((), _PAD, tl.float32)  # max of every score before the block
    m_run = tl.full((BLOCK_N,), _PAD, tl.float32)  # per slot: logcumsumexp of the scores before the block, as (m, s)
    s_run = tl.zeros((BLOCK_N,), tl.float32)
    if INIT:
        for gp in range(0, seg_id):
            src = _agg_ptr(AGG, bh, gp, G, BLOCK_N)
            c_run = tl.maximum(c_run, tl.load(src + 2 * BLOCK_N))
            if SCAN:
                m_run, s_run = _log_combine(m_run, s_run, tl.load(src + offs_n), tl.load(src + BLOCK_N + offs_n))
    for start in range(seg_id * SEG, tl.minimum(seg_id * SEG + SEG, S), BLOCK_S):
        rows = start + offs_s
        in_s = rows < S
        mask = in_s[:, None] & col
        ptr = base + rows[:, None].to(tl.int64) * N + offs_n[None, :]
        a = tl.load(A + ptr, mask=mask, other=_PAD).to(tl.float32)
        c = tl.maximum(tl.associative_scan(tl.max(a, 1), 0, _max_combine), c_run)
        # c_{i-1}: the same scan over the rows shifted by one (row start-1 is at most c_run)
        prev = tl.load(A + ptr - N, mask=mask & (rows[:, None] > 0), other=_PAD).to(tl.float32)
        c_prev = tl.maximum(tl.associative_scan(tl.max(prev, 1), 0, _max_combine), c_run)
        decay = tl.where(rows == 0, 0.0, c_prev - c)
        tl.store(DECAY + bh * S + rows, decay, mask=in_s)
        tl.store(C + bh * S + rows, c, mask=in_s)
        tl.store(E + ptr, tl.exp(a - c[:, None]).to(E.dtype.element_ty), mask=mask)
        if SCAN:
            ones = tl.where(mask, 1.0, 0.0)
            m, s = tl.associative_scan((a, ones), 0, _log_combine)
            m, s = _log_combine(m_run[None, :], s_run[None, :], m, s)
            tl.store(NL + ptr, c[:, None] - (m + tl.log(s)), mask=mask)
            m_blk, s_blk = tl.reduce((a, ones), 0, _log_combine)
            m_run, s_run = _log_combine(m_run, s_run, m_blk, s_blk)
        c_run = tl.maximum(c_run, tl.max(c, 0))


@triton.jit
def _slot_weights_grad_agg(C, NL, DNL, AGG, S, N, SEG, G, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per (batch·head, segment): each slot's ``Σ_i dnl_i e^{-lse_i}`` over the segment as ``(m, s)``, for the
    walks of :func:`_slot_weights_bwd` to start from."""
    bh = tl.program_id(0).to(tl.int64)
    seg_id = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_n = tl.arange(0, BLOCK_N)
    col = offs_n[None, :] < N
    m_acc = tl.full((BLOCK_N,), _PAD, tl.float32)
    s_acc = tl.zeros((BLOCK_N,), tl.float32)
    for start in range(seg_id * SEG, tl.minimum(seg_id * SEG + SEG, S), BLOCK_S):
        rows = start + offs_s
        in_s = rows < S
        mask = in_s[:, None] & col
        ptr = bh * S * N + rows[:, None].to(tl.int64) * N + offs_n[None, :]
        c = tl.load(C + bh * S + rows, mask=in_s, other=0.0)
        m = tl.where(mask, tl.load(NL + ptr, mask=mask, other=0.0) - c[:, None], _PAD)
        m_blk, s_blk = tl.reduce((m, tl.load(DNL + ptr, mask=mask, other=0.0).to(tl.float32)), 0, _log_combine)
        m_acc, s_acc = _log_combine(m_acc, s_acc, m_blk, s_blk)
    out = _agg_ptr(AGG, bh, seg_id, G, BLOCK_N)
    tl.store(out + offs_n, m_acc)
    tl.store(out + BLOCK_N + offs_n, s_acc)


@triton.jit
def _slot_weights_bwd(
    A,
    C,
    NL,
    DNL,
    DE,
    DA,
    AGG,
    S,
    N,
    SEG,
    G,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_DNL: tl.constexpr,
    HAS_DE: tl.constexpr,
    INIT: tl.constexpr,
):
    """One program per (batch·head, segment); ``INIT``: the carried sums start from the later segments'
    :func:`_slot_weights_grad_agg` results in ``AGG``."""
    bh = tl.program_id(0).to(tl.int64)
    seg_id = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_n = tl.arange(0, BLOCK_N)
    col = offs_n[None, :] < N
    base = bh * S * N
    m_run = tl.full((BLOCK_N,), _PAD, tl.float32)  # per slot: Σ_{i after the block} dnl_i e^{-lse_i}, as (m, s)
    s_run = tl.zeros((BLOCK_N,), tl.float32)
    if INIT:
        for gp in range(seg_id + 1, G):
            src = _agg_ptr(AGG, bh, gp, G, BLOCK_N)
            m_run, s_run = _log_combine(m_run, s_run, tl.load(src + offs_n), tl.load(src + BLOCK_N + offs_n))
    first = seg_id * SEG // BLOCK_S
    n_blocks = tl.cdiv(tl.minimum(seg_id * SEG + SEG, S), BLOCK_S) - first
    for idx in range(0, n_blocks):
        start = (first + n_blocks - 1 - idx) * BLOCK_S
        rows = start + offs_s
        in_s = rows < S
        mask = in_s[:, None] & col
        ptr = base + rows[:, None].to(tl.int64) * N + offs_n[None, :]
        a = tl.load(A + ptr, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(C + bh * S + rows, mask=in_s, other=0.0)
        da = tl.zeros((BLOCK_S, BLOCK_N), tl.float32)
        if HAS_DNL:
            nl = tl.load(NL + ptr, mask=mask, other=0.0)
            g = tl.load(DNL + ptr, mask=mask, other=0.0).to(tl.float32)
            m = tl.where(mask, nl - c[:, None], _PAD)  # -lse_i
            m, s = tl.associative_scan((m, g), 0, _log_combine, reverse=True)
            m, s = _log_combine(m_run[None, :], s_run[None, :], m, s)
            da -= tl.exp(tl.minimum(a + m, 0.0)) * s  # a_j + max_{i>=j}(-lse_i) <= a_j - lse_j <= 0
            m_blk, s_blk = tl.reduce((tl.where(mask, nl - c[:, None], _PAD), g), 0, _log_combine)
            m_run, s_run = _log_combine(m_run, s_run, m_blk, s_blk)
        if HAS_DE:
            de = tl.load(DE + ptr, mask=mask, other=0.0).to(tl.float32)
            da += de * tl.exp(a - c[:, None])
        tl.store(DA + ptr, da.to(DA.dtype.element_ty), mask=mask)


@triton.jit
def _row_tile(S, N, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr):
    """Offsets and mask of this program's ``(BLOCK_S, BLOCK_N)`` rows of one head (grid: row blocks, heads)."""
    bh = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_n = tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < S) & (offs_n[None, :] < N)
    return bh * S * N + rows[:, None].to(tl.int64) * N + offs_n[None, :], mask


@triton.jit
def _read_probs(NUM, NL, ptr, mask, scale, bound):
    """``(p, inv, x, empty)`` of one block of rows: the slot softmax, ``e^{nl}`` (0 on empty slots), the logits."""
    nl = tl.load(NL + ptr, mask=mask, other=0.0)
    empty = (nl >= bound) | (mask == 0)
    inv = tl.where(empty, 0.0, tl.exp(tl.where(empty, 0.0, nl)))  # (no overflow computed for empty slots)
    x = tl.where(empty, 0.0, tl.load(NUM + ptr, mask=mask, other=0.0).to(tl.float32) * inv * scale)
    logits = tl.where(empty, float("-inf"), x)
    w = tl.exp(logits - tl.max(logits, 1)[:, None])  # every row has a slot that is not empty
    return w / tl.sum(w, 1)[:, None], inv, x, empty


@triton.jit
def _slot_read_fwd(
    NUM, NL, MASK, R, S, N, scale, bound, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr
):
    ptr, mask = _row_tile(S, N, BLOCK_S, BLOCK_N)
    p, inv, x, empty = _read_probs(NUM, NL, ptr, mask, scale, bound)
    if HAS_MASK:
        p = p * tl.load(MASK + ptr, mask=mask, other=0.0).to(tl.float32)
    tl.store(R + ptr, (p * inv).to(R.dtype.element_ty), mask=mask)


@triton.jit
def _slot_read_bwd(
    G,
    NUM,
    NL,
    MASK,
    DNUM,
    DNL,
    S,
    N,
    scale,
    bound,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    ptr, mask = _row_tile(S, N, BLOCK_S, BLOCK_N)
    p, inv, x, empty = _read_probs(NUM, NL, ptr, mask, scale, bound)
    dp = tl.load(G + ptr, mask=mask, other=0.0).to(tl.float32) * inv
    if HAS_MASK:
        dp = dp * tl.load(MASK + ptr, mask=mask, other=0.0).to(tl.float32)
    dx = p * (dp - tl.sum(p * dp, 1)[:, None])  # 0 on empty slots (p = 0 there)
    tl.store(DNUM + ptr, (dx * inv * scale).to(DNUM.dtype.element_ty), mask=mask)
    tl.store(DNL + ptr, tl.where(empty, 0.0, dp * p + dx * x), mask=mask)


# -- host side ---------------------------------------------------------------------------------------------------
def _blocks(n: int, rows: int):
    """``(BLOCK_S, BLOCK_N)``: ``n`` slots padded to a power of two (at least 16), about ``rows`` x 16 elements."""
    block_n = max(16, triton.next_power_of_2(n))
    return max(16, rows * 16 // block_n), block_n


# The scans split each sequence into segments until about this many programs run (batch·heads·segments; CAB's
# setting has 32 (batch, head) pairs): a first launch takes each segment's aggregates, each segment's walk starts
# from the earlier (forward) or later (backward) ones'.  One program per (batch, head) walked the whole sequence
# before (session 13: slower than the ATen ops from 16k on).  0 never splits.
SCAN_PROGRAMS = 1024


def _segments(pairs: int, length: int, block_s: int) -> tuple:
    """``(G, SEG)``: the scans' segments per (batch, head) and their length (whole blocks; the last may be
    shorter), for :data:`SCAN_PROGRAMS`."""
    blocks = triton.cdiv(length, block_s)
    want = min(blocks, max(1, SCAN_PROGRAMS // max(pairs, 1)))
    seg = triton.cdiv(blocks, want) * block_s
    return triton.cdiv(length, seg), seg


def slot_weights(a, scan: bool):
    """``(e, nl or None, decay, c)`` of contiguous scores ``a (B, H, S, n)`` (module doc); ``e`` in ``a``'s dtype,
    ``nl`` ``(B, H, S, n)``, ``decay`` and ``c`` ``(B, H, S)`` fp32."""
    bsz, heads, length, n = a.shape
    f32 = dict(device=a.device, dtype=torch.float32)
    e = torch.empty_like(a)
    nl = torch.empty(a.shape, **f32) if scan else e
    decay, c = torch.empty(bsz, heads, length, **f32), torch.empty(bsz, heads, length, **f32)
    block_s, block_n = _blocks(n, 128)
    segs, seg = _segments(bsz * heads, length, block_s)
    meta = dict(BLOCK_S=block_s, BLOCK_N=block_n, SCAN=scan, num_warps=4)
    agg = e
    if segs > 1:  # each segment's max and normalisers, for the walks to start from
        agg = torch.empty(bsz * heads, segs, 2 * block_n + 1, **f32)
        launch(_slot_weights_agg, (bsz * heads, segs), (a, agg), (length, n, seg, segs), meta)
    grid = (bsz * heads, segs)
    launch(_slot_weights_fwd, grid, (a, e, nl, decay, c, agg), (length, n, seg, segs), {**meta, "INIT": segs > 1})
    return e, (nl if scan else None), decay, c


def slot_weights_grad(dnl, de, a, c, nl):
    """The gradient of the scores ``a`` (``a``'s dtype) for the gradients ``dnl`` of ``nl`` and ``de`` of ``e``
    (either None: no gradient; contiguous, any float dtype) given ``a``, ``c`` and ``nl`` of :func:`slot_weights`."""
    bsz, heads, length, n = a.shape
    da = torch.empty_like(a)
    block_s, block_n = _blocks(n, 128)
    segs, seg = _segments(bsz * heads, length, block_s)
    init = segs > 1 and dnl is not None  # (without dnl nothing is carried)
    meta = dict(BLOCK_S=block_s, BLOCK_N=block_n, num_warps=4)
    scalars = (length, n, seg, segs)
    agg = a
    if init:  # each segment's sums, for the walks to start from
        agg = torch.empty(bsz * heads, segs, 2 * block_n + 1, device=a.device, dtype=torch.float32)
        launch(_slot_weights_grad_agg, (bsz * heads, segs), (c, nl, dnl, agg), scalars, meta)
    meta.update(HAS_DNL=dnl is not None, HAS_DE=de is not None, INIT=init)
    args = (a, c, a if nl is None else nl, a if dnl is None else dnl, a if de is None else de, da, agg)
    launch(_slot_weights_bwd, (bsz * heads, segs), args, scalars, meta)
    return da


def slot_read(num, nl, mask, scale: float, bound: float, dtype):
    """``r (B, H, T, n)`` in ``dtype`` of contiguous ``num``, ``nl`` (fp32) and dropout ``mask`` (or None)."""
    bsz, heads, length, n = num.shape
    r = torch.empty(num.shape, device=num.device, dtype=dtype)
    block_s, block_n = _blocks(n, 128)
    grid = (triton.cdiv(length, block_s), bsz * heads)
    meta = dict(BLOCK_S=block_s, BLOCK_N=block_n, HAS_MASK=mask is not None, num_warps=4)
    launch(_slot_read_fwd, grid, (num, nl, nl if mask is None else mask, r), (length, n, scale, bound), meta)
    return r


def slot_read_grad(grad, num, nl, mask, scale: float, bound: float):
    """``(d num in num's dtype, d nl fp32)`` of :func:`slot_read` for its output's contiguous gradient ``grad``."""
    bsz, heads, length, n = num.shape
    dnum, dnl = torch.empty_like(num), torch.empty_like(nl)
    block_s, block_n = _blocks(n, 128)
    grid = (triton.cdiv(length, block_s), bsz * heads)
    meta = dict(BLOCK_S=block_s, BLOCK_N=block_n, HAS_MASK=mask is not None, num_warps=4)
    args = (grad, num, nl, nl if mask is None else mask, dnum, dnl)
    launch(_slot_read_bwd, grid, args, (length, n, scale, bound), meta)
    return dnum, dnl


def probe_slots(device: torch.device, dtype: torch.dtype, n: int) -> None:
    """Launches every variant the fused slots use (the weights with and without the scan, their gradient with
    each of its inputs, the read with and without a dropout mask, its gradient; the scans in one walk and in
    segments) on tiny inputs: raises what a kernel raises (``backends.triton_probe``)."""
    g = torch.Generator(device=device).manual_seed(0)
    block_s = _blocks(n, 128)[0]
    for length in (min(20, block_s), 2 * block_s + 1):  # one scan block: one walk; three: three segments
        a = torch.randn(1, 1, length, n, generator=g, device=device).to(dtype)
        for scan in (True, False):
            e, nl, _, c = slot_weights(a, scan)
            slot_weights_grad(None, torch.ones_like(e), a, c, nl)
            if nl is not None:
                slot_weights_grad(torch.ones_like(nl), torch.ones_like(e), a, c, nl)
                slot_weights_grad(torch.ones_like(nl), None, a, c, nl)
    num = torch.randn(1, 1, 20, n, generator=g, device=device)
    nl = -torch.rand(1, 1, 20, n, generator=g, device=device)
    for mask in (None, torch.ones_like(num)):
        r = slot_read(num, nl, mask, 0.125, 80.0, dtype)
        slot_read_grad(torch.ones_like(r), num, nl, mask, 0.125, 80.0)
