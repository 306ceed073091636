"""Triton kernels of causal chunked linear attention (imported only when Triton is installed).

Layout: ``q, k`` ``(BH, T, M)`` and ``v`` ``(BH, T, D)`` read through a batch*head stride and a row stride
(``SQ_BH, SQ_T`` for both ``q`` and ``k``, ``SV_BH, SV_T`` for ``v``: contiguous rows or the heads of a time-first
``(T, B, H, ·)`` projection), one dtype (fp16/bf16/fp32); ``g`` (log decay) ``(BH, T)`` fp32; states ``H``
``(BH, M, D)`` and ``z`` ``(BH, M)`` fp32; the output ``o`` and its gradient are read and written through a row
stride and a batch*head stride too (``bh * S_BH + t * S_T + column``); ``dq, dk`` through ``SG_BH, SG_T`` (and
``SG_D`` between the partial sums of several value blocks), ``dv`` through ``SDV_BH, SDV_T``: the gradients in the
inputs' layouts, so a time-first projection's head view gets a time-first gradient (no permuting copy after).
``FEAT`` (1: relu, 2: 1 + elu) makes cosFormer's
features inside the kernels: ``q, k`` are then the raw ``(BH, T, M / 2)`` rows, each chunk's ``M`` features
``φ(x) cos θ, φ(x) sin θ`` come from them and a ``(T, 2)`` table of ``cos θ, sin θ`` (interleaved: the states
``H, z`` are in that order), and ``dq, dk`` are the raw rows' gradients: no ``(BH, T, M)`` feature tensor or
feature gradient exists.  Two levels of parallelism: the length is cut into
``NSEG`` segments of ``SEG`` positions (a multiple of ``BLOCK_C``), and one program per (block of ``BLOCK_D``
value columns, segment, batch*head) walks the chunks of ``BLOCK_C`` positions of its segment in order, with the
state ``H (M, BLOCK_D)`` (and with ``NORM`` the normaliser ``z (M)``) in registers (fp32):

    A = (q kᵀ) ∘ e^{G_i - G_j} [j <= i]        (G: cumulative log decay inside the chunk)
    num = A v + (q ∘ e^{G}) H                   H <- e^{G_last} H + (k ∘ e^{G_last - G})ᵀ v
    den = A 1 + (q ∘ e^{G}) z                   z <- e^{G_last} z + (k ∘ e^{G_last - G})ᵀ 1

``NORM``: the output is ``num / den`` (0 where ``den <= 0``: nothing attended), written in the output's dtype,
and ``den`` ``(BH, T)`` fp32 is kept for the backward; else the output is ``num``.  The normaliser is a vector
beside the state, not a ones column of ``v``: no padded copy of ``v`` and no ``(.., D + 1)`` buffers.

The state entering segment ``s`` is ``H_0`` carried through the segments before it: ``H <- e^{g_p} H + U_p``
for ``p < s``, with ``U_p`` segment ``p``'s own final state from a zero start and ``g_p`` its total log decay,
both written by ``_seg_states`` (one product per chunk) before the main pass (``z`` the same way).  With one
segment (short sequences) that pass is skipped and the kernels are the plain sequential chunk walk.

Backward (``NORM``: the gradients reaching ``num`` and ``den`` are ``dO / den`` and ``gden = -(dO · o) / den``
per row, the latter from ``_den_grad``): ``_bwd_dkdv`` walks a segment's chunks backwards carrying
``dH = ∂L/∂H`` and ``dz``, ``dH <- e^{G_last} dH + (q ∘ e^{G})ᵀ dnum``, ``dz <- e^{G_last} dz + (q ∘ e^{G})ᵀ
gden``, starting from the gradient leaving the segment (carried back through the later segments' ``W_p``,
``_seg_states``'s local gradients of their entering states) and, in segment 0, ending with the initial state's
gradient; ``_bwd_dq`` walks forwards recomputing ``H, z`` for ``dq = ((dnum vᵀ + gden) ∘ e^{G_i - G_j} [j <= i])
k + e^{G} ∘ (dnum Hᵀ + gden z)``.  With several value blocks ``dq, dk`` are partial sums over the blocks and only
block 0 adds the normaliser's terms.  Tensor-core products take the input dtype (fp32 inputs: IEEE fp32
products), accumulation is fp32.
"""

import triton
import triton.language as tl


@triton.jit
def cos_activation(x, FEAT: tl.constexpr):
    """cosFormer's ``φ(x)`` in fp32: ``FEAT`` 1 relu, 2 ``1 + elu``."""
    if FEAT == 1:
        return tl.maximum(x, 0.0)
    else:
        return tl.where(x > 0, x + 1.0, tl.exp(x))


@triton.jit
def _features(
    X, CS, bh, rows, in_t, offs_m, M, S_BH, S_T, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, FEAT: tl.constexpr
):
    """One chunk's features ``(C, BLOCK_M)``: the rows of ``X`` (``FEAT == 0``), or (``FEAT`` 1: relu, 2: 1 + elu)
    cosFormer's ``[φ(x) cos θ, φ(x) sin θ]`` made from the raw rows ``(C, M / 2)`` of ``X`` and the ``(T, 2)``
    fp32 table ``CS`` of ``cos θ, sin θ``, interleaved (feature ``2i`` is column ``i``'s cos, ``2i + 1`` its sin),
    computed in fp32 and rounded to ``X``'s dtype."""
    if FEAT == 0:
        mask = in_t[:, None] & (offs_m[None, :] < M)
        return tl.load(X + bh * S_BH + rows[:, None] * S_T + offs_m[None, :], mask=mask, other=0.0)
    else:
        offs_r = tl.arange(0, BLOCK_M // 2)
        mask = in_t[:, None] & (offs_r[None, :] < M // 2)
        x = tl.load(X + bh * S_BH + rows[:, None] * S_T + offs_r[None, :], mask=mask, other=0.0).to(tl.float32)
        a = tl.where(mask, cos_activation(x, FEAT), 0.0)  # (1 + elu(0) = 1: padding lanes made explicit)
        c = tl.load(CS + rows * 2, mask=in_t, other=0.0)
        s = tl.load(CS + rows * 2 + 1, mask=in_t, other=0.0)
        f = tl.reshape(tl.join(a * c[:, None], a * s[:, None]), (BLOCK_C, BLOCK_M))
        return f.to(X.dtype.element_ty)


@triton.jit
def _store_grad(
    DX,
    X,
    CS,
    g,
    part,
    bh,
    rows,
    in_t,
    offs_m,
    M,
    S_BH,
    S_T,
    SG_BH,
    SG_T,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    FEAT: tl.constexpr,
):
    """Stores one chunk's feature gradient ``g`` ``(C, BLOCK_M)`` fp32 at ``DX + part`` (rows ``SG_T`` apart,
    heads ``SG_BH``): as it is (``FEAT == 0``), or carried back through :func:`_features` to the raw rows
    ``(C, M / 2)`` of ``X``: ``(g_cos cos θ + g_sin sin θ) φ'(x)``."""
    if FEAT == 0:
        mask = in_t[:, None] & (offs_m[None, :] < M)
        tl.store(DX + part + bh * SG_BH + rows[:, None] * SG_T + offs_m[None, :], g, mask=mask)
    else:
        offs_r = tl.arange(0, BLOCK_M // 2)
        mask = in_t[:, None] & (offs_r[None, :] < M // 2)
        g_cos, g_sin = tl.split(tl.reshape(g, (BLOCK_C, BLOCK_M // 2, 2)))
        c = tl.load(CS + rows * 2, mask=in_t, other=0.0)
        s = tl.load(CS + rows * 2 + 1, mask=in_t, other=0.0)
        ga = g_cos * c[:, None] + g_sin * s[:, None]
        x = tl.load(X + bh * S_BH + rows[:, None] * S_T + offs_r[None, :], mask=mask, other=0.0).to(tl.float32)
        if FEAT == 1:
            gx = tl.where(x > 0, ga, 0.0)
        else:
            gx = tl.where(x > 0, ga, ga * tl.exp(x))
        tl.store(DX + part + bh * SG_BH + rows[:, None] * SG_T + offs_r[None, :], gx, mask=mask)


@triton.jit
def _chunk(
    Q,
    K,
    V,
    G,
    CS,
    bh,
    start,
    T,
    M,
    D,
    SQ_BH,
    SQ_T,
    SV_BH,
    SV_T,
    offs_c,
    offs_m,
    offs_d,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HAS_G: tl.constexpr,
    FEAT: tl.constexpr,
):
    """Loads one chunk: q, k ``(C, BLOCK_M)`` (:func:`_features`), v ``(C, BLOCK_D)``, decay weights and
    scalings."""
    rows = start + offs_c
    in_t = rows < T
    mask_v = in_t[:, None] & (offs_d[None, :] < D)
    q = _features(Q, CS, bh, rows, in_t, offs_m, M, SQ_BH, SQ_T, BLOCK_C, BLOCK_M, FEAT)
    k = _features(K, CS, bh, rows, in_t, offs_m, M, SQ_BH, SQ_T, BLOCK_C, BLOCK_M, FEAT)
    v = tl.load(V + bh * SV_BH + rows[:, None] * SV_T + offs_d[None, :], mask=mask_v, other=0.0)
    causal = offs_c[:, None] >= offs_c[None, :]
    if HAS_G:
        g = tl.load(G + bh * T + rows, mask=in_t, other=0.0)
        gc = tl.cumsum(g, 0)
        gl = tl.sum(g, 0)
        w = tl.where(causal, tl.exp(tl.where(causal, gc[:, None] - gc[None, :], 0.0)), 0.0)
        q_in = tl.exp(gc)  # what is left at row i of the state entering the chunk
        k_out = tl.exp(gl - gc)  # what is left at the chunk's end of key j
        decay = tl.exp(gl)
    else:
        gl = 0.0
        w = tl.where(causal, 1.0, 0.0)
        q_in = tl.full([BLOCK_C], 1.0, tl.float32)
        k_out = tl.full([BLOCK_C], 1.0, tl.float32)
        decay = 1.0
    return q, k, v, w, q_in, k_out, decay, gl, rows, in_t, mask_v


@triton.jit
def _segment(pid_s, SEG, T):
    """First position and length of segment ``pid_s``."""
    start = pid_s * SEG
    return start, tl.minimum(SEG, T - start)


@triton.jit
def _tiles(pid_d, M, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Offsets of the program's state tile: ``(offs_m, offs_d, h_ptr, mask_h)``."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_h = (offs_m[:, None] < M) & (offs_d[None, :] < D)
    return offs_m, offs_d, offs_m[:, None] * D + offs_d[None, :], mask_h


@triton.jit
def _out_grad(DO, DEN, GD, bh, rows, in_t, mask_v, offs_d, T, S_BH, S_T, first, dtype: tl.constexpr, NORM):
    """The gradients reaching ``num`` ``(C, BLOCK_D)`` (in ``dtype``) and ``den`` ``(C,)`` (fp32; 0 without
    ``NORM`` and in value blocks other than the first) of one chunk."""
    do = tl.load(DO + bh * S_BH + rows[:, None] * S_T + offs_d[None, :], mask=mask_v, other=0.0).to(tl.float32)
    if NORM:
        den = tl.load(DEN + bh * T + rows, mask=in_t, other=1.0)
        den = tl.where(den > 0, den, float("inf"))  # nothing attended: no gradient
        do = do / den[:, None]
        gd = tl.load(GD + bh * T + rows, mask=in_t & first, other=0.0)
    else:
        gd = tl.zeros_like(rows).to(tl.float32)
    return do.to(dtype), gd


@triton.jit
def _entering_state(
    U, UZ, GS, H0, Z0, bh, pid_s, NSEG, M, D, offs_m, h_ptr, mask_h, BLOCK_M, BLOCK_D, HAS_G, HAS_H0, NORM
):
    """The state entering segment ``pid_s`` (``(h, z)``, ``z`` 0 without ``NORM``): ``H_0`` carried through
    segments ``0 .. pid_s - 1``."""
    z = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_H0:
        h = tl.load(H0 + bh * M * D + h_ptr, mask=mask_h, other=0.0)
        if NORM:
            z = tl.load(Z0 + bh * M + offs_m, mask=offs_m < M, other=0.0)
    else:
        h = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for p in range(0, pid_s):
        if HAS_G:
            e = tl.exp(tl.load(GS + bh * NSEG + p))
            h = h * e
            z = z * e
        h += tl.load(U + (bh * NSEG + p) * M * D + h_ptr, mask=mask_h, other=0.0)
        if NORM:
            z += tl.load(UZ + (bh * NSEG + p) * M + offs_m, mask=offs_m < M, other=0.0)
    return h, z


@triton.jit
def _leaving_grad(
    W, WZ, GS, DHT, DZT, bh, pid_s, NSEG, M, D, offs_m, h_ptr, mask_h, first, BLOCK_M, BLOCK_D, HAS_G, HAS_DHT, NORM
):
    """The gradient of the state leaving segment ``pid_s`` (``(dh, dz)``): ``dH_T`` carried back through the
    later segments (``dz`` only with ``NORM`` and in the first value block, else 0)."""
    mask_z = (offs_m < M) & first
    dz = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_DHT:
        dh = tl.load(DHT + bh * M * D + h_ptr, mask=mask_h, other=0.0)
        if NORM:
            dz = tl.load(DZT + bh * M + offs_m, mask=mask_z, other=0.0)
    else:
        dh = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for idx in range(0, NSEG - 1 - pid_s):
        p = NSEG - 1 - idx
        if HAS_G:
            e = tl.exp(tl.load(GS + bh * NSEG + p))
            dh = dh * e
            dz = dz * e
        dh += tl.load(W + (bh * NSEG + p) * M * D + h_ptr, mask=mask_h, other=0.0)
        if NORM:
            dz += tl.load(WZ + (bh * NSEG + p) * M + offs_m, mask=mask_z, other=0.0)
    return dh, dz


@triton.jit
def _den_grad(DO, O, DEN, GD, T, D, S_BH, S_T, SO_BH, SO_T, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """``gden = -(dO · o) / den`` per row ``(BH, T)`` fp32 (0 where ``den <= 0``)."""
    bh = tl.program_id(1)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < T) & (offs_d[None, :] < D)
    do = tl.load(DO + bh * S_BH + rows[:, None] * S_T + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    o = tl.load(O + bh * SO_BH + rows[:, None] * SO_T + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    den = tl.load(DEN + bh * T + rows, mask=rows < T, other=1.0)
    den = tl.where(den > 0, den, float("inf"))
    tl.store(GD + bh * T + rows, -tl.sum(do * o, 1) / den, mask=rows < T)


@triton.jit
def _seg_states(
    Q,
    K,
    V,
    G,
    CS,
    DO,
    DEN,
    GD,
    U,
    UZ,
    W,
    WZ,
    GS,
    T,
    M,
    D,
    SQ_BH,
    SQ_T,
    SV_BH,
    SV_T,
    S_BH,
    S_T,
    SEG,
    NSEG,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_G: tl.constexpr,
    FEAT: tl.constexpr,
    NORM: tl.constexpr,
    STORE_W: tl.constexpr,
    PREC: tl.constexpr,
):
    """Per segment from a zero start: its final state ``U`` ``(BH, NSEG, M, D)`` (``UZ`` ``(BH, NSEG, M)``), its
    total log decay ``GS`` ``(BH, NSEG)`` and (``STORE_W``) the gradient ``W`` (``WZ``) of its entering state from
    its own outputs."""
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    bh = tl.program_id(2)
    first = pid_d == 0
    offs_c = tl.arange(0, BLOCK_C)
    offs_m, offs_d, h_ptr, mask_h = _tiles(pid_d, M, D, BLOCK_M, BLOCK_D)
    h = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    z = tl.zeros([BLOCK_M], dtype=tl.float32)
    w_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    wz = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = 0.0  # log decay from the segment's start to the chunk's start
    seg_start, seg_len = _segment(pid_s, SEG, T)
    for start in range(seg_start, seg_start + seg_len, BLOCK_C):
        q, k, v, w, q_in, k_out, decay, gl, rows, in_t, mask_v = _chunk(
            Q,
            K,
            V,
            G,
            CS,
            bh,
            start,
            T,
            M,
            D,
            SQ_BH,
            SQ_T,
            SV_BH,
            SV_T,
            offs_c,
            offs_m,
            offs_d,
            BLOCK_C,
            BLOCK_M,
            HAS_G,
            FEAT,
        )
        kd = (k * k_out[:, None]).to(k.dtype)
        h = h * decay + tl.dot(tl.trans(kd), v, input_precision=PREC)
        if NORM:
            z = z * decay + tl.sum(kd.to(tl.float32), 0)
        if STORE_W:
            dn, gd = _out_grad(DO, DEN, GD, bh, rows, in_t, mask_v, offs_d, T, S_BH, S_T, first, v.dtype, NORM)
            if HAS_G:
                qs = (q * (q_in * tl.exp(acc))[:, None]).to(q.dtype)
            else:
                qs = q
            w_acc += tl.dot(tl.trans(qs), dn, input_precision=PREC)
            if NORM:
                wz += tl.sum(qs.to(tl.float32) * gd[:, None], 0)
        acc += gl
    base = (bh * NSEG + pid_s) * M * D
    tl.store(U + base + h_ptr, h, mask=mask_h)
    if STORE_W:
        tl.store(W + base + h_ptr, w_acc, mask=mask_h)
    if NORM:
        if pid_d == 0:
            tl.store(UZ + (bh * NSEG + pid_s) * M + offs_m, z, mask=offs_m < M)
            if STORE_W:
                tl.store(WZ + (bh * NSEG + pid_s) * M + offs_m, wz, mask=offs_m < M)
    if HAS_G:
        if pid_d == 0:
            tl.store(GS + bh * NSEG + pid_s, acc)


@triton.jit
def _fwd(
    Q,
    K,
    V,
    G,
    CS,
    H0,
    Z0,
    U,
    UZ,
    GS,
    O,
    DEN,
    HT,
    ZT,
    T,
    M,
    D,
    SQ_BH,
    SQ_T,
    SV_BH,
    SV_T,
    S_BH,
    S_T,
    SEG,
    NSEG,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_G: tl.constexpr,
    FEAT: tl.constexpr,
    NORM: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    bh = tl.program_id(2)
    offs_c = tl.arange(0, BLOCK_C)
    offs_m, offs_d, h_ptr, mask_h = _tiles(pid_d, M, D, BLOCK_M, BLOCK_D)
    h, z = _entering_state(
        U, UZ, GS, H0, Z0, bh, pid_s, NSEG, M, D, offs_m, h_ptr, mask_h, BLOCK_M, BLOCK_D, HAS_G, HAS_H0, NORM
    )
    seg_start, seg_len = _segment(pid_s, SEG, T)
    for start in range(seg_start, seg_start + seg_len, BLOCK_C):
        q, k, v, w, q_in, k_out, decay, gl, rows, in_t, mask_v = _chunk(
            Q,
            K,
            V,
            G,
            CS,
            bh,
            start,
            T,
            M,
            D,
            SQ_BH,
            SQ_T,
            SV_BH,
            SV_T,
            offs_c,
            offs_m,
            offs_d,
            BLOCK_C,
            BLOCK_M,
            HAS_G,
            FEAT,
        )
        a = (tl.dot(q, tl.trans(k), input_precision=PREC) * w).to(v.dtype)
        qd = (q * q_in[:, None]).to(q.dtype)
        o = tl.dot(a, v, input_precision=PREC)
        o += tl.dot(qd, h.to(q.dtype), input_precision=PREC)
        kd = (k * k_out[:, None]).to(k.dtype)
        h = h * decay + tl.dot(tl.trans(kd), v, input_precision=PREC)
        if NORM:  # the denominator from the same rounded products as the numerator
            den = tl.sum(a.to(tl.float32), 1) + tl.sum(qd.to(tl.float32) * z.to(q.dtype).to(tl.float32)[None, :], 1)
            o = o / tl.where(den > 0, den, float("inf"))[:, None]  # nothing attended: 0
            if pid_d == 0:
                tl.store(DEN + bh * T + rows, den, mask=in_t)
            z = z * decay + tl.sum(kd.to(tl.float32), 0)
        o_ptr = O + bh * S_BH + rows[:, None] * S_T + offs_d[None, :]
        tl.store(o_ptr, o.to(O.dtype.element_ty), mask=mask_v)
    if STORE_HT:
        if pid_s == NSEG - 1:
            tl.store(HT + bh * M * D + h_ptr, h, mask=mask_h)
            if NORM:
                if pid_d == 0:
                    tl.store(ZT + bh * M + offs_m, z, mask=offs_m < M)


@triton.jit
def _bwd_dkdv(
    Q,
    K,
    V,
    G,
    CS,
    DO,
    DEN,
    GD,
    DHT,
    DZT,
    W,
    WZ,
    GS,
    DK,
    DV_,
    DH0,
    DZ0,
    T,
    M,
    D,
    SQ_BH,
    SQ_T,
    SV_BH,
    SV_T,
    SG_D,
    SG_BH,
    SG_T,
    SDV_BH,
    SDV_T,
    S_BH,
    S_T,
    SEG,
    NSEG,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_G: tl.constexpr,
    FEAT: tl.constexpr,
    NORM: tl.constexpr,
    HAS_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    bh = tl.program_id(2)
    first = pid_d == 0
    offs_c = tl.arange(0, BLOCK_C)
    offs_m, offs_d, h_ptr, mask_h = _tiles(pid_d, M, D, BLOCK_M, BLOCK_D)
    dh, dz = _leaving_grad(
        W, WZ, GS, DHT, DZT, bh, pid_s, NSEG, M, D, offs_m, h_ptr, mask_h, first, BLOCK_M, BLOCK_D, HAS_G, HAS_DHT, NORM
    )
    seg_start, seg_len = _segment(pid_s, SEG, T)
    n_chunks = tl.cdiv(seg_len, BLOCK_C)
    for idx in range(0, n_chunks):
        start = seg_start + (n_chunks - 1 - idx) * BLOCK_C
        q, k, v, w, q_in, k_out, decay, gl, rows, in_t, mask_v = _chunk(
            Q,
            K,
            V,
            G,
            CS,
            bh,
            start,
            T,
            M,
            D,
            SQ_BH,
            SQ_T,
            SV_BH,
            SV_T,
            offs_c,
            offs_m,
            offs_d,
            BLOCK_C,
            BLOCK_M,
            HAS_G,
            FEAT,
        )
        dn, gd = _out_grad(DO, DEN, GD, bh, rows, in_t, mask_v, offs_d, T, S_BH, S_T, first, v.dtype, NORM)
        a = tl.dot(q, tl.trans(k), input_precision=PREC) * w  # (i, j)
        kd = (k * k_out[:, None]).to(k.dtype)
        dv = tl.dot(tl.trans(a).to(v.dtype), dn, input_precision=PREC)
        dv += tl.dot(kd, dh.to(k.dtype), input_precision=PREC)
        tl.store(DV_ + bh * SDV_BH + rows[:, None] * SDV_T + offs_d[None, :], dv, mask=mask_v)
        da = tl.dot(dn, tl.trans(v), input_precision=PREC)  # (i, j)
        dk = tl.dot(v, tl.trans(dh.to(v.dtype)), input_precision=PREC)
        qd = (q * q_in[:, None]).to(q.dtype)
        if NORM:  # the normaliser: a ones column of v whose gradient is gden, its state gradient dz
            da += gd[:, None]
            dk += dz.to(v.dtype).to(tl.float32)[None, :]
            dz = dz * decay + tl.sum(qd.to(tl.float32) * gd[:, None], 0)
        da = da * w
        dk = dk * k_out[:, None] + tl.dot(tl.trans(da).to(q.dtype), q, input_precision=PREC)
        _store_grad(
            DK, K, CS, dk, pid_d * SG_D, bh, rows, in_t, offs_m, M, SQ_BH, SQ_T, SG_BH, SG_T, BLOCK_C, BLOCK_M, FEAT
        )
        dh = dh * decay + tl.dot(tl.trans(qd), dn, input_precision=PREC)
    if STORE_DH0:
        if pid_s == 0:
            tl.store(DH0 + bh * M * D + h_ptr, dh, mask=mask_h)
            if NORM:
                if pid_d == 0:
                    tl.store(DZ0 + bh * M + offs_m, dz, mask=offs_m < M)


@triton.jit
def _bwd_dq(
    Q,
    K,
    V,
    G,
    CS,
    H0,
    Z0,
    U,
    UZ,
    GS,
    DO,
    DEN,
    GD,
    DQ,
    T,
    M,
    D,
    SQ_BH,
    SQ_T,
    SV_BH,
    SV_T,
    SG_D,
    SG_BH,
    SG_T,
    S_BH,
    S_T,
    SEG,
    NSEG,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_G: tl.constexpr,
    FEAT: tl.constexpr,
    NORM: tl.constexpr,
    HAS_H0: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    bh = tl.program_id(2)
    first = pid_d == 0
    offs_c = tl.arange(0, BLOCK_C)
    offs_m, offs_d, h_ptr, mask_h = _tiles(pid_d, M, D, BLOCK_M, BLOCK_D)
    h, z = _entering_state(
        U, UZ, GS, H0, Z0, bh, pid_s, NSEG, M, D, offs_m, h_ptr, mask_h, BLOCK_M, BLOCK_D, HAS_G, HAS_H0, NORM
    )
    seg_start, seg_len = _segment(pid_s, SEG, T)
    for start in range(seg_start, seg_start + seg_len, BLOCK_C):
        q, k, v, w, q_in, k_out, decay, gl, rows, in_t, mask_v = _chunk(
            Q,
            K,
            V,
            G,
            CS,
            bh,
            start,
            T,
            M,
            D,
            SQ_BH,
            SQ_T,
            SV_BH,
            SV_T,
            offs_c,
            offs_m,
            offs_d,
            BLOCK_C,
            BLOCK_M,
            HAS_G,
            FEAT,
        )
        dn, gd = _out_grad(DO, DEN, GD, bh, rows, in_t, mask_v, offs_d, T, S_BH, S_T, first, v.dtype, NORM)
        da = tl.dot(dn, tl.trans(v), input_precision=PREC)
        dqh = tl.dot(dn, tl.trans(h.to(v.dtype)), input_precision=PREC)
        kd = (k * k_out[:, None]).to(k.dtype)
        if NORM:
            da += gd[:, None]
            dqh += gd[:, None] * z.to(v.dtype).to(tl.float32)[None, :]
            z = z * decay + tl.sum(kd.to(tl.float32), 0)
        da = da * w
        dq = tl.dot(da.to(k.dtype), k, input_precision=PREC) + dqh * q_in[:, None]
        _store_grad(
            DQ, Q, CS, dq, pid_d * SG_D, bh, rows, in_t, offs_m, M, SQ_BH, SQ_T, SG_BH, SG_T, BLOCK_C, BLOCK_M, FEAT
        )
        h = h * decay + tl.dot(tl.trans(kd), v, input_precision=PREC)
