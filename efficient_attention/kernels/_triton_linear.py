"""Triton kernels of causal chunked linear attention (imported only when Triton is installed).

Layout: ``q, k`` ``(BH, T, M)``, ``v`` ``(BH, T, D)`` contiguous, one dtype (fp16/bf16/fp32); ``g`` (log decay)
``(BH, T)`` fp32; states ``(BH, M, D)`` fp32.  Two levels of parallelism: the length is cut into ``NSEG``
segments of ``SEG`` positions (a multiple of ``BLOCK_C``), and one program per (block of ``BLOCK_D`` value
columns, segment, batch*head) walks the chunks of ``BLOCK_C`` positions of its segment in order, with the state
``H (M, BLOCK_D)`` in registers (fp32):

    A = (q kᵀ) ∘ e^{G_i - G_j} [j <= i]        (G: cumulative log decay inside the chunk)
    o = A v + (q ∘ e^{G}) H                     H <- e^{G_last} H + (k ∘ e^{G_last - G})ᵀ v

The state entering segment ``s`` is ``H_0`` carried through the segments before it: ``H <- e^{g_p} H + U_p``
for ``p < s``, with ``U_p`` segment ``p``'s own final state from a zero start and ``g_p`` its total log decay,
both written by ``_seg_states`` (one product per chunk) before the main pass.  With one segment (short
sequences) that pass is skipped and the kernels are the plain sequential chunk walk.

Backward: ``_bwd_dkdv`` walks a segment's chunks backwards carrying ``dH = ∂L/∂H`` (``dv`` is complete per
value block, ``dk`` a partial sum over value blocks when there are several), ``dH <- e^{G_last} dH +
(q ∘ e^{G})ᵀ dO``, starting from the gradient leaving the segment (``dH_T`` carried back through the later
segments' ``W_p``, ``_seg_states``'s local gradients of their entering states) and, in segment 0, ending with
the initial state's gradient; ``_bwd_dq`` walks forwards recomputing ``H`` for
``dq = (dO vᵀ ∘ e^{G_i - G_j} [j <= i]) k + e^{G} ∘ (dO Hᵀ)``.  Tensor-core products take the input dtype
(fp32 inputs: IEEE fp32 products), accumulation is fp32.
"""

import triton
import triton.language as tl


@triton.jit
def _chunk(
    Q, K, V, G, bh, start, T, M, D, DV, offs_c, offs_m, offs_d, BLOCK_C: tl.constexpr, HAS_G: tl.constexpr, TAIL
):
    """Loads one chunk: q, k ``(C, BLOCK_M)``, v ``(C, BLOCK_D)`` (columns below ``DV``), the tail ``vt``
    ``(C, 16)`` (``TAIL``: columns ``DV ..`` up to ``D``), decay weights and scalings."""
    rows = start + offs_c
    in_t = rows < T
    mask_qk = in_t[:, None] & (offs_m[None, :] < M)
    mask_v = in_t[:, None] & (offs_d[None, :] < DV)
    q = tl.load(Q + bh * T * M + rows[:, None] * M + offs_m[None, :], mask=mask_qk, other=0.0)
    k = tl.load(K + bh * T * M + rows[:, None] * M + offs_m[None, :], mask=mask_qk, other=0.0)
    v = tl.load(V + bh * T * D + rows[:, None] * D + offs_d[None, :], mask=mask_v, other=0.0)
    if TAIL:
        offs_t = DV + tl.arange(0, 16)
        mask_vt = in_t[:, None] & (offs_t[None, :] < D)
        vt = tl.load(V + bh * T * D + rows[:, None] * D + offs_t[None, :], mask=mask_vt, other=0.0)
    else:
        vt = v
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
    return q, k, v, vt, w, q_in, k_out, decay, gl, rows, in_t


@triton.jit
def _segment(pid_s, SEG, T):
    """First position and length of segment ``pid_s``."""
    start = pid_s * SEG
    return start, tl.minimum(SEG, T - start)


@triton.jit
def _tiles(pid_d, M, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, TAIL: tl.constexpr):
    """Offsets of the program's state tiles: ``(offs_m, offs_d, DV, h_ptr, mask_h, t_ptr, mask_t)``; the block
    covers value columns below ``DV`` (``BLOCK_D`` with ``TAIL``, whose columns ``BLOCK_D .. D - 1``, at most 16,
    are a second, 16-wide tile: a normaliser column beside 64 values costs a quarter block, not a doubled one)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    if TAIL:
        DV = BLOCK_D
    else:
        DV = D
    mask_h = (offs_m[:, None] < M) & (offs_d[None, :] < DV)
    h_ptr = offs_m[:, None] * D + offs_d[None, :]
    offs_t = DV + tl.arange(0, 16)
    mask_t = (offs_m[:, None] < M) & (offs_t[None, :] < D)
    return offs_m, offs_d, DV, h_ptr, mask_h, offs_m[:, None] * D + offs_t[None, :], mask_t


@triton.jit
def _tail_grad(DO, bh, rows, in_t, T, D, DV, dtype: tl.constexpr):
    """The output gradient's tail tile ``(C, 16)``: columns ``DV ..`` up to ``D``."""
    offs_t = DV + tl.arange(0, 16)
    ptr = DO + bh * T * D + rows[:, None] * D + offs_t[None, :]
    return tl.load(ptr, mask=in_t[:, None] & (offs_t[None, :] < D), other=0.0).to(dtype)


@triton.jit
def _entering_state(
    U, GS, H0, bh, pid_s, NSEG, M, D, h_ptr, mask_h, t_ptr, mask_t, BLOCK_M, BLOCK_D, HAS_G, HAS_H0, TAIL
):
    """The state entering segment ``pid_s`` (``(h, tail)``): ``H_0`` carried through segments ``0 .. pid_s - 1``."""
    if HAS_H0:
        h = tl.load(H0 + bh * M * D + h_ptr, mask=mask_h, other=0.0)
    else:
        h = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if TAIL and HAS_H0:
        ht = tl.load(H0 + bh * M * D + t_ptr, mask=mask_t, other=0.0)
    else:
        ht = tl.zeros([BLOCK_M, 16], dtype=tl.float32)
    for p in range(0, pid_s):
        base = (bh * NSEG + p) * M * D
        if HAS_G:
            e = tl.exp(tl.load(GS + bh * NSEG + p))
            h = h * e
            ht = ht * e
        h += tl.load(U + base + h_ptr, mask=mask_h, other=0.0)
        if TAIL:
            ht += tl.load(U + base + t_ptr, mask=mask_t, other=0.0)
    return h, ht


@triton.jit
def _leaving_grad(
    W, GS, DHT, bh, pid_s, NSEG, M, D, h_ptr, mask_h, t_ptr, mask_t, BLOCK_M, BLOCK_D, HAS_G, HAS_DHT, TAIL
):
    """The gradient of the state leaving segment ``pid_s`` (``(dh, tail)``): ``dH_T`` carried back through the
    later segments."""
    if HAS_DHT:
        dh = tl.load(DHT + bh * M * D + h_ptr, mask=mask_h, other=0.0)
    else:
        dh = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if TAIL and HAS_DHT:
        dht = tl.load(DHT + bh * M * D + t_ptr, mask=mask_t, other=0.0)
    else:
        dht = tl.zeros([BLOCK_M, 16], dtype=tl.float32)
    for idx in range(0, NSEG - 1 - pid_s):
        p = NSEG - 1 - idx
        base = (bh * NSEG + p) * M * D
        if HAS_G:
            e = tl.exp(tl.load(GS + bh * NSEG + p))
            dh = dh * e
            dht = dht * e
        dh += tl.load(W + base + h_ptr, mask=mask_h, other=0.0)
        if TAIL:
            dht += tl.load(W + base + t_ptr, mask=mask_t, other=0.0)
    return dh, dht


@triton.jit
def _seg_states(
    Q,
    K,
    V,
    G,
    DO,
    U,
    W,
    GS,
    T,
    M,
    D,
    SEG,
    NSEG,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_G: tl.constexpr,
    TAIL: tl.constexpr,
    STORE_W: tl.constexpr,
    PREC: tl.constexpr,
):
    """Per segment from a zero start: its final state ``U`` ``(BH, NSEG, M, D)``, its total log decay ``GS``
    ``(BH, NSEG)`` and (``STORE_W``) the gradient ``W`` of its entering state from its own outputs."""
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    bh = tl.program_id(2)
    offs_c = tl.arange(0, BLOCK_C)
    offs_m, offs_d, DV, h_ptr, mask_h, t_ptr, mask_t = _tiles(pid_d, M, D, BLOCK_M, BLOCK_D, TAIL)
    h = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    ht = tl.zeros([BLOCK_M, 16], dtype=tl.float32)
    w_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    wt = tl.zeros([BLOCK_M, 16], dtype=tl.float32)
    acc = 0.0  # log decay from the segment's start to the chunk's start
    seg_start, seg_len = _segment(pid_s, SEG, T)
    for start in range(seg_start, seg_start + seg_len, BLOCK_C):
        q, k, v, vt, w, q_in, k_out, decay, gl, rows, in_t = _chunk(
            Q, K, V, G, bh, start, T, M, D, DV, offs_c, offs_m, offs_d, BLOCK_C, HAS_G, TAIL
        )
        kd = k * k_out[:, None]
        h = h * decay + tl.dot(tl.trans(kd.to(k.dtype)), v, input_precision=PREC)
        if TAIL:
            ht = ht * decay + tl.dot(tl.trans(kd.to(k.dtype)), vt, input_precision=PREC)
        if STORE_W:
            mask_v = in_t[:, None] & (offs_d[None, :] < DV)
            do = tl.load(DO + bh * T * D + rows[:, None] * D + offs_d[None, :], mask=mask_v, other=0.0).to(v.dtype)
            if HAS_G:
                qs = (q * (q_in * tl.exp(acc))[:, None]).to(q.dtype)
            else:
                qs = q
            w_acc += tl.dot(tl.trans(qs), do, input_precision=PREC)
            if TAIL:
                dot_t = _tail_grad(DO, bh, rows, in_t, T, D, DV, v.dtype)
                wt += tl.dot(tl.trans(qs), dot_t, input_precision=PREC)
        acc += gl
    base = (bh * NSEG + pid_s) * M * D
    tl.store(U + base + h_ptr, h, mask=mask_h)
    if TAIL:
        tl.store(U + base + t_ptr, ht, mask=mask_t)
    if STORE_W:
        tl.store(W + base + h_ptr, w_acc, mask=mask_h)
        if TAIL:
            tl.store(W + base + t_ptr, wt, mask=mask_t)
    if HAS_G:
        if pid_d == 0:
            tl.store(GS + bh * NSEG + pid_s, acc)


@triton.jit
def _fwd(
    Q,
    K,
    V,
    G,
    H0,
    U,
    GS,
    O,
    HT,
    T,
    M,
    D,
    SEG,
    NSEG,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_G: tl.constexpr,
    TAIL: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    bh = tl.program_id(2)
    offs_c = tl.arange(0, BLOCK_C)
    offs_m, offs_d, DV, h_ptr, mask_h, t_ptr, mask_t = _tiles(pid_d, M, D, BLOCK_M, BLOCK_D, TAIL)
    h, ht = _entering_state(
        U, GS, H0, bh, pid_s, NSEG, M, D, h_ptr, mask_h, t_ptr, mask_t, BLOCK_M, BLOCK_D, HAS_G, HAS_H0, TAIL
    )
    seg_start, seg_len = _segment(pid_s, SEG, T)
    for start in range(seg_start, seg_start + seg_len, BLOCK_C):
        q, k, v, vt, w, q_in, k_out, decay, gl, rows, in_t = _chunk(
            Q, K, V, G, bh, start, T, M, D, DV, offs_c, offs_m, offs_d, BLOCK_C, HAS_G, TAIL
        )
        a = tl.dot(q, tl.trans(k), input_precision=PREC) * w
        qd = q * q_in[:, None]
        o = tl.dot(a.to(v.dtype), v, input_precision=PREC)
        o += tl.dot(qd.to(q.dtype), h.to(q.dtype), input_precision=PREC)
        o_ptr = O + bh * T * D + rows * D
        tl.store(o_ptr[:, None] + offs_d[None, :], o, mask=in_t[:, None] & (offs_d[None, :] < DV))
        kd = k * k_out[:, None]
        h = h * decay + tl.dot(tl.trans(kd.to(k.dtype)), v, input_precision=PREC)
        if TAIL:
            ot = tl.dot(a.to(v.dtype), vt, input_precision=PREC)
            ot += tl.dot(qd.to(q.dtype), ht.to(q.dtype), input_precision=PREC)
            offs_t = DV + tl.arange(0, 16)
            tl.store(o_ptr[:, None] + offs_t[None, :], ot, mask=in_t[:, None] & (offs_t[None, :] < D))
            ht = ht * decay + tl.dot(tl.trans(kd.to(k.dtype)), vt, input_precision=PREC)
    if STORE_HT:
        if pid_s == NSEG - 1:
            tl.store(HT + bh * M * D + h_ptr, h, mask=mask_h)
            if TAIL:
                tl.store(HT + bh * M * D + t_ptr, ht, mask=mask_t)


@triton.jit
def _bwd_dkdv(
    Q,
    K,
    V,
    G,
    DO,
    DHT,
    W,
    GS,
    DK,
    DV_,
    DH0,
    T,
    M,
    D,
    BH,
    SEG,
    NSEG,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_G: tl.constexpr,
    TAIL: tl.constexpr,
    HAS_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    bh = tl.program_id(2)
    offs_c = tl.arange(0, BLOCK_C)
    offs_m, offs_d, DV, h_ptr, mask_h, t_ptr, mask_t = _tiles(pid_d, M, D, BLOCK_M, BLOCK_D, TAIL)
    dh, dht = _leaving_grad(
        W, GS, DHT, bh, pid_s, NSEG, M, D, h_ptr, mask_h, t_ptr, mask_t, BLOCK_M, BLOCK_D, HAS_G, HAS_DHT, TAIL
    )
    seg_start, seg_len = _segment(pid_s, SEG, T)
    n_chunks = tl.cdiv(seg_len, BLOCK_C)
    for idx in range(0, n_chunks):
        start = seg_start + (n_chunks - 1 - idx) * BLOCK_C
        q, k, v, vt, w, q_in, k_out, decay, gl, rows, in_t = _chunk(
            Q, K, V, G, bh, start, T, M, D, DV, offs_c, offs_m, offs_d, BLOCK_C, HAS_G, TAIL
        )
        mask_v = in_t[:, None] & (offs_d[None, :] < DV)
        do_ptr = DO + bh * T * D + rows * D
        do = tl.load(do_ptr[:, None] + offs_d[None, :], mask=mask_v, other=0.0).to(v.dtype)
        a = tl.dot(q, tl.trans(k), input_precision=PREC) * w  # (i, j)
        kd = (k * k_out[:, None]).to(k.dtype)
        dv = tl.dot(tl.trans(a).to(v.dtype), do, input_precision=PREC)
        dv += tl.dot(kd, dh.to(k.dtype), input_precision=PREC)
        dv_ptr = DV_ + bh * T * D + rows * D
        tl.store(dv_ptr[:, None] + offs_d[None, :], dv, mask=mask_v)
        da = tl.dot(do, tl.trans(v), input_precision=PREC)  # (i, j)
        dk = tl.dot(v, tl.trans(dh.to(v.dtype)), input_precision=PREC)
        qd = q * q_in[:, None]
        if TAIL:
            dot_t = _tail_grad(DO, bh, rows, in_t, T, D, DV, v.dtype)
            dvt = tl.dot(tl.trans(a).to(v.dtype), dot_t, input_precision=PREC)
            dvt += tl.dot(kd, dht.to(k.dtype), input_precision=PREC)
            offs_t = DV + tl.arange(0, 16)
            tl.store(dv_ptr[:, None] + offs_t[None, :], dvt, mask=in_t[:, None] & (offs_t[None, :] < D))
            da += tl.dot(dot_t, tl.trans(vt), input_precision=PREC)
            dk += tl.dot(vt, tl.trans(dht.to(v.dtype)), input_precision=PREC)
            dht = dht * decay + tl.dot(tl.trans(qd.to(q.dtype)), dot_t, input_precision=PREC)
        da = da * w
        dk = dk * k_out[:, None] + tl.dot(tl.trans(da).to(q.dtype), q, input_precision=PREC)
        dk_ptr = DK + (pid_d * BH + bh) * T * M + rows[:, None] * M + offs_m[None, :]
        tl.store(dk_ptr, dk, mask=in_t[:, None] & (offs_m[None, :] < M))
        dh = dh * decay + tl.dot(tl.trans(qd.to(q.dtype)), do, input_precision=PREC)
    if STORE_DH0:
        if pid_s == 0:
            tl.store(DH0 + bh * M * D + h_ptr, dh, mask=mask_h)
            if TAIL:
                tl.store(DH0 + bh * M * D + t_ptr, dht, mask=mask_t)


@triton.jit
def _bwd_dq(
    Q,
    K,
    V,
    G,
    H0,
    U,
    GS,
    DO,
    DQ,
    T,
    M,
    D,
    BH,
    SEG,
    NSEG,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_G: tl.constexpr,
    TAIL: tl.constexpr,
    HAS_H0: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    bh = tl.program_id(2)
    offs_c = tl.arange(0, BLOCK_C)
    offs_m, offs_d, DV, h_ptr, mask_h, t_ptr, mask_t = _tiles(pid_d, M, D, BLOCK_M, BLOCK_D, TAIL)
    h, ht = _entering_state(
        U, GS, H0, bh, pid_s, NSEG, M, D, h_ptr, mask_h, t_ptr, mask_t, BLOCK_M, BLOCK_D, HAS_G, HAS_H0, TAIL
    )
    seg_start, seg_len = _segment(pid_s, SEG, T)
    for start in range(seg_start, seg_start + seg_len, BLOCK_C):
        q, k, v, vt, w, q_in, k_out, decay, gl, rows, in_t = _chunk(
            Q, K, V, G, bh, start, T, M, D, DV, offs_c, offs_m, offs_d, BLOCK_C, HAS_G, TAIL
        )
        mask_v = in_t[:, None] & (offs_d[None, :] < DV)
        do_ptr = DO + bh * T * D + rows * D
        do = tl.load(do_ptr[:, None] + offs_d[None, :], mask=mask_v, other=0.0).to(v.dtype)
        da = tl.dot(do, tl.trans(v), input_precision=PREC)
        dqh = tl.dot(do, tl.trans(h.to(v.dtype)), input_precision=PREC)
        if TAIL:
            dot_t = _tail_grad(DO, bh, rows, in_t, T, D, DV, v.dtype)
            da += tl.dot(dot_t, tl.trans(vt), input_precision=PREC)
            dqh += tl.dot(dot_t, tl.trans(ht.to(v.dtype)), input_precision=PREC)
        da = da * w
        dq = tl.dot(da.to(k.dtype), k, input_precision=PREC) + dqh * q_in[:, None]
        dq_ptr = DQ + (pid_d * BH + bh) * T * M + rows[:, None] * M + offs_m[None, :]
        tl.store(dq_ptr, dq, mask=in_t[:, None] & (offs_m[None, :] < M))
        kd = k * k_out[:, None]
        h = h * decay + tl.dot(tl.trans(kd.to(k.dtype)), v, input_precision=PREC)
        if TAIL:
            ht = ht * decay + tl.dot(tl.trans(kd.to(k.dtype)), vt, input_precision=PREC)
