"""Triton kernels of causal chunked linear attention (imported only when Triton is installed).

Layout: ``q, k`` ``(BH, T, M)``, ``v`` ``(BH, T, D)`` contiguous, one dtype (fp16/bf16/fp32); ``g`` (log decay)
``(BH, T)`` fp32; states ``(BH, M, D)`` fp32.  One program per (block of ``BLOCK_D`` value columns, batch*head)
walks the chunks of ``BLOCK_C`` positions in order, with the state ``H (M, BLOCK_D)`` in registers (fp32):

    A = (q kᵀ) ∘ e^{G_i - G_j} [j <= i]        (G: cumulative log decay inside the chunk)
    o = A v + (q ∘ e^{G}) H                     H <- e^{G_last} H + (k ∘ e^{G_last - G})ᵀ v

Backward: ``_bwd_dkdv`` walks the chunks backwards carrying ``dH = ∂L/∂H`` (``dv`` is complete per value block,
``dk`` a partial sum over value blocks, summed by the caller), ``dH <- e^{G_last} dH + (q ∘ e^{G})ᵀ dO``, and
ends with the initial state's gradient; ``_bwd_dq`` walks them forwards recomputing ``H`` for
``dq = (dO vᵀ ∘ e^{G_i - G_j} [j <= i]) k + e^{G} ∘ (dO Hᵀ)``.  Tensor-core products take the input dtype
(fp32 inputs: IEEE fp32 products), accumulation is fp32.
"""

import triton
import triton.language as tl


@triton.jit
def _chunk(Q, K, V, G, bh, start, T, M, D, offs_c, offs_m, offs_d, BLOCK_C: tl.constexpr, HAS_G: tl.constexpr):
    """Loads one chunk: q, k ``(C, BLOCK_M)``, v ``(C, BLOCK_D)``, decay weights and scalings."""
    rows = start + offs_c
    in_t = rows < T
    mask_qk = in_t[:, None] & (offs_m[None, :] < M)
    mask_v = in_t[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + bh * T * M + rows[:, None] * M + offs_m[None, :], mask=mask_qk, other=0.0)
    k = tl.load(K + bh * T * M + rows[:, None] * M + offs_m[None, :], mask=mask_qk, other=0.0)
    v = tl.load(V + bh * T * D + rows[:, None] * D + offs_d[None, :], mask=mask_v, other=0.0)
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
        w = tl.where(causal, 1.0, 0.0)
        q_in = tl.full([BLOCK_C], 1.0, tl.float32)
        k_out = tl.full([BLOCK_C], 1.0, tl.float32)
        decay = 1.0
    return q, k, v, w, q_in, k_out, decay, rows, in_t


@triton.jit
def _fwd(
    Q,
    K,
    V,
    G,
    H0,
    O,
    HT,
    T,
    M,
    D,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_G: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_d = tl.program_id(0)
    bh = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_h = (offs_m[:, None] < M) & (offs_d[None, :] < D)
    h_ptr = offs_m[:, None] * D + offs_d[None, :]
    if HAS_H0:
        h = tl.load(H0 + bh * M * D + h_ptr, mask=mask_h, other=0.0)
    else:
        h = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, T, BLOCK_C):
        q, k, v, w, q_in, k_out, decay, rows, in_t = _chunk(
            Q, K, V, G, bh, start, T, M, D, offs_c, offs_m, offs_d, BLOCK_C, HAS_G
        )
        a = tl.dot(q, tl.trans(k), input_precision=PREC) * w
        o = tl.dot(a.to(v.dtype), v, input_precision=PREC)
        o += tl.dot((q * q_in[:, None]).to(q.dtype), h.to(q.dtype), input_precision=PREC)
        tl.store(O + bh * T * D + rows[:, None] * D + offs_d[None, :], o, mask=in_t[:, None] & (offs_d[None, :] < D))
        h = h * decay + tl.dot(tl.trans((k * k_out[:, None]).to(k.dtype)), v, input_precision=PREC)
    if STORE_HT:
        tl.store(HT + bh * M * D + h_ptr, h, mask=mask_h)


@triton.jit
def _bwd_dkdv(
    Q,
    K,
    V,
    G,
    DO,
    DHT,
    DK,
    DV,
    DH0,
    T,
    M,
    D,
    BH,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_G: tl.constexpr,
    HAS_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_d = tl.program_id(0)
    bh = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_h = (offs_m[:, None] < M) & (offs_d[None, :] < D)
    h_ptr = offs_m[:, None] * D + offs_d[None, :]
    if HAS_DHT:
        dh = tl.load(DHT + bh * M * D + h_ptr, mask=mask_h, other=0.0)
    else:
        dh = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_chunks = tl.cdiv(T, BLOCK_C)
    for idx in range(0, n_chunks):
        start = (n_chunks - 1 - idx) * BLOCK_C
        q, k, v, w, q_in, k_out, decay, rows, in_t = _chunk(
            Q, K, V, G, bh, start, T, M, D, offs_c, offs_m, offs_d, BLOCK_C, HAS_G
        )
        mask_v = in_t[:, None] & (offs_d[None, :] < D)
        do = tl.load(DO + bh * T * D + rows[:, None] * D + offs_d[None, :], mask=mask_v, other=0.0).to(v.dtype)
        a = tl.dot(q, tl.trans(k), input_precision=PREC) * w  # (i, j)
        kd = (k * k_out[:, None]).to(k.dtype)
        dv = tl.dot(tl.trans(a).to(v.dtype), do, input_precision=PREC)
        dv += tl.dot(kd, dh.to(k.dtype), input_precision=PREC)
        tl.store(DV + bh * T * D + rows[:, None] * D + offs_d[None, :], dv, mask=mask_v)
        da = tl.dot(do, tl.trans(v), input_precision=PREC) * w  # (i, j)
        dk = tl.dot(tl.trans(da).to(q.dtype), q, input_precision=PREC)
        dk += tl.dot(v, tl.trans(dh.to(v.dtype)), input_precision=PREC) * k_out[:, None]
        dk_ptr = DK + (pid_d * BH + bh) * T * M + rows[:, None] * M + offs_m[None, :]
        tl.store(dk_ptr, dk, mask=in_t[:, None] & (offs_m[None, :] < M))
        dh = dh * decay + tl.dot(tl.trans((q * q_in[:, None]).to(q.dtype)), do, input_precision=PREC)
    if STORE_DH0:
        tl.store(DH0 + bh * M * D + h_ptr, dh, mask=mask_h)


@triton.jit
def _bwd_dq(
    Q,
    K,
    V,
    G,
    H0,
    DO,
    DQ,
    T,
    M,
    D,
    BH,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_G: tl.constexpr,
    HAS_H0: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_d = tl.program_id(0)
    bh = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_h = (offs_m[:, None] < M) & (offs_d[None, :] < D)
    if HAS_H0:
        h = tl.load(H0 + bh * M * D + offs_m[:, None] * D + offs_d[None, :], mask=mask_h, other=0.0)
    else:
        h = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, T, BLOCK_C):
        q, k, v, w, q_in, k_out, decay, rows, in_t = _chunk(
            Q, K, V, G, bh, start, T, M, D, offs_c, offs_m, offs_d, BLOCK_C, HAS_G
        )
        mask_v = in_t[:, None] & (offs_d[None, :] < D)
        do = tl.load(DO + bh * T * D + rows[:, None] * D + offs_d[None, :], mask=mask_v, other=0.0).to(v.dtype)
        da = tl.dot(do, tl.trans(v), input_precision=PREC) * w
        dq = tl.dot(da.to(k.dtype), k, input_precision=PREC)
        dq += tl.dot(do, tl.trans(h.to(v.dtype)), input_precision=PREC) * q_in[:, None]
        dq_ptr = DQ + (pid_d * BH + bh) * T * M + rows[:, None] * M + offs_m[None, :]
        tl.store(dq_ptr, dq, mask=in_t[:, None] & (offs_m[None, :] < M))
        h = h * decay + tl.dot(tl.trans((k * k_out[:, None]).to(k.dtype)), v, input_precision=PREC)
