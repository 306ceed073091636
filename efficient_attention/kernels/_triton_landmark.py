"""Triton kernels of landmark attention (imported only when Triton is installed).

Fixed-period landmarks: key block ``b`` holds positions ``[b*BS, (b+1)*BS)`` and its last position is
the landmark ``L_b``.  A query at absolute position ``p`` (block ``c = p // BS``) attends

* its own block: keys ``j <= p`` that are not the landmark (the landmark query also sees itself);
* every earlier block ``b < c`` as one softmax item: logit ``s(L_b)`` (the gate), value
  ``A_b = softmax_{j in b, j != L_b}(s_j) @ v`` (the block's own softmax average).

The key tile of every kernel is one landmark block, so a block's inner softmax is local to its tile (its
max and sum are two in-tile row reductions, nothing is carried across tiles).  The forward folds each tile
into a FlashAttention-2 online softmax over "items"; the key tiles of a query tile's own blocks
(``MIXED``) apply the causal rule to rows of that block and the gated rule to rows of later blocks, every
other tile is gated for all its rows (no mask but the landmark column).  Scores stay raw (unscaled) out of
the dots; the scale (log2 units, ``exp2``) is folded into the exponent's FMA.  fp32 accumulation, the
log-sum-exp returned in natural units (``-inf`` for empty rows).

Backward (``P_b = exp(s(L_b) - lse)``, inner weights ``a_j = e_j / z_b``, ``w_j = P_b a_j``,
``E_b = sum_j a_j dp_j`` with ``dp = dO V^T``, ``delta = rowsum(dO * O) - dlse``): own keys
``ds_j = w_j (dp_j - delta)``; tokens of earlier blocks ``ds_j = w_j (dp_j - E_b)``; the landmark
``ds(L_b) = P_b (E_b - delta)``.  ``E_b`` is recomputed inside the tile, so nothing of size ``T x S/BS``
is ever stored: ``dq`` by query tile (it also stores ``delta``), then ``dk, dv`` by key block.  ``FUSED_DQ``
(a tuning alternative) has no dq pass: the dk/dv kernel adds each tile's ``ds k`` into an fp32 dq with atomics
(FlashAttention-2's first backward), ``delta`` computed before it.

Every tile is held as (queries, keys), so the per-(query, block) reductions run along a warp's own
columns (a few shuffles); the dk/dv kernel feeds the transposed weights to its two dots.  ``KEYS_FIRST``
(dk/dv only) holds its tiles as (keys, queries) instead -- the layout of FlashAttention-2's dk/dv loop,
which needs no transposes but puts the key reductions across warps (kept as a tuning alternative:
it measured 4.2 ms against 1.4 ms of dq at 8k on an H200).  ``GATE_DOT`` takes each row's landmark logit
from a 16-column dot against the landmark key instead of selecting that column out of the tile.

Tensors are ``(B, H, N, d)`` with any row stride (the module's head views of ``(N, B, H*d)`` need no
copy): ``out``/``dq`` share ``q``'s strides, ``dk`` ``k``'s, ``dv`` ``v``'s.
"""

import triton
import triton.language as tl

from ._triton_common import LOG2E, _dot, _finish, _lse2  # noqa: F401 (LOG2E: landmark.py)


@triton.jit
def _load(base, offs_r, n_rows, stride_n, offs_d):
    """Rows ``offs_r`` (zero at and past ``n_rows``) of a head whose rows are ``stride_n`` apart."""
    return tl.load(base + offs_r[:, None] * stride_n + offs_d[None, :], mask=offs_r[:, None] < n_rows, other=0.0)


@triton.jit
def _store(base, x, offs_r, n_rows, stride_n, offs_d):
    tl.store(
        base + offs_r[:, None] * stride_n + offs_d[None, :],
        x.to(base.dtype.element_ty),
        mask=offs_r[:, None] < n_rows,
    )


@triton.jit
def _qvec(x, KEY_AXIS: tl.constexpr):
    """A per-query vector broadcast along the key axis of a tile."""
    return tl.expand_dims(x, KEY_AXIS)


@triton.jit
def _kvec(x, KEY_AXIS: tl.constexpr):
    """A per-key vector broadcast along the query axis of a tile."""
    return tl.expand_dims(x, 1 - KEY_AXIS)


@triton.jit
def _gate_logit(
    s,
    q,
    k_base,
    n0,
    S,
    stride_kn,
    offs_d,
    is_mark,
    IEEE: tl.constexpr,
    GATE_DOT: tl.constexpr,
    BS: tl.constexpr,
    KEY_AXIS: tl.constexpr,
):
    """Each query's raw landmark logit ``q . k(L_b)`` of the block starting at ``n0``: the landmark column of
    the tile ``s``, or (``GATE_DOT``, queries-first tiles only) a dot against 16 copies of the landmark key."""
    if GATE_DOT:
        rows = tl.arange(0, 16)
        mark = n0 + BS - 1
        kl = tl.load(k_base + mark * stride_kn + rows[:, None] * 0 + offs_d[None, :], mask=mark < S, other=0.0)
        return tl.max(_dot(q, tl.trans(kl), IEEE), 1)
    else:
        return tl.sum(tl.where(is_mark, s, 0.0), KEY_AXIS)


@triton.jit
def _tile_weights(
    s,
    q,
    k_base,
    p,
    offs_n,
    offs_d,
    n0,
    S,
    stride_kn,
    lse2,
    qk_scale,
    kpm_ptr,
    HAS_KPM: tl.constexpr,
    MIXED: tl.constexpr,
    IEEE: tl.constexpr,
    GATE_DOT: tl.constexpr,
    BS: tl.constexpr,
    KEY_AXIS: tl.constexpr,
):
    """Weights of a raw score tile ``s`` over the ``BS`` keys of block ``n0 // BS``, given each query's position
    ``p`` and log2-normaliser ``lse2``.  Keys run along ``KEY_AXIS`` (1: (queries, keys); 0: (keys, queries)).

    Returns ``(w, e, r, P, own_row, is_mark)``: the attention weights ``w``, the block's unnormalised inner
    exponentials ``e`` (``a = e * r``, for queries of later blocks), ``r = 1 / z_b``, the gate probability ``P``
    per query, which queries are in this block (``MIXED`` tiles only; else all are in later blocks), and the
    landmark key."""
    is_mark1 = offs_n == n0 + BS - 1
    tok1 = ~is_mark1 & (offs_n < S)
    if HAS_KPM:
        pad1 = tl.load(kpm_ptr + offs_n, mask=offs_n < S, other=1) != 0
        tok1 = tok1 & ~pad1
        mark_ok = tl.sum((is_mark1 & ~pad1).to(tl.int32), 0) > 0
    is_mark = _kvec(is_mark1, KEY_AXIS)
    st = tl.where(_kvec(tok1, KEY_AXIS), s, float("-inf"))
    mb = tl.max(st, KEY_AXIS)
    mb = tl.where(mb == float("-inf"), 0.0, mb) * qk_scale
    e = tl.math.exp2(st * qk_scale - _qvec(mb, KEY_AXIS))
    zb = tl.sum(e, KEY_AXIS)
    r = tl.where(zb > 0.0, 1.0 / zb, 0.0)
    t = _gate_logit(s, q, k_base, n0, S, stride_kn, offs_d, is_mark, IEEE, GATE_DOT, BS, KEY_AXIS)
    P = tl.math.exp2(t * qk_scale - lse2)
    if HAS_KPM:
        P = tl.where(mark_ok, P, 0.0)
    if MIXED:
        blk = p // BS
        own_row = blk == n0 // BS
        P = tl.where(blk > n0 // BS, P, 0.0)
        n = _kvec(offs_n, KEY_AXIS)
        pp = _qvec(p, KEY_AXIS)
        own = _qvec(own_row, KEY_AXIS) & (n <= pp) & (~is_mark | (n == pp)) & (n < S)
        if HAS_KPM:
            own = own & _kvec(~pad1, KEY_AXIS)
        w = tl.where(own, tl.math.exp2(s * qk_scale - _qvec(lse2, KEY_AXIS)), e * _qvec(P * r, KEY_AXIS))
    else:
        own_row = p < 0
        w = e * _qvec(P * r, KEY_AXIS)
    return w, e, r, P, own_row, is_mark


@triton.jit
def _tile_ds(w, e, r, P, own_row, is_mark, dp, delta, MIXED: tl.constexpr, KEY_AXIS: tl.constexpr):
    """Score gradient (natural units) of a tile from its weights and ``dp = dO V^T`` (same orientation)."""
    E = tl.sum(e * dp, KEY_AXIS) * r  # dO . A_b
    Pr = _qvec(P * r, KEY_AXIS)
    # tokens: w (dp - E) with w = e P r, as e (dp P r - E P r) (an FMA and a product; the dq kernel needs no w)
    ds = tl.where(is_mark, _qvec(P * (E - delta), KEY_AXIS), e * (dp * Pr - _qvec(P * r * E, KEY_AXIS)))
    if MIXED:
        ds = tl.where(_qvec(own_row, KEY_AXIS), w * (dp - _qvec(delta, KEY_AXIS)), ds)
    return ds


@triton.jit
def _fwd_step(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    kb,
    p,
    offs_bs,
    offs_d,
    S,
    stride_kn,
    stride_vn,
    qk_scale,
    kpm_ptr,
    HAS_KPM: tl.constexpr,
    MIXED: tl.constexpr,
    IEEE: tl.constexpr,
    GATE_DOT: tl.constexpr,
    BS: tl.constexpr,
):
    n0 = kb * BS
    offs_n = n0 + offs_bs
    k = _load(k_base, offs_n, S, stride_kn, offs_d)
    v = _load(v_base, offs_n, S, stride_vn, offs_d)
    s = _dot(q, tl.trans(k), IEEE)  # raw scores; scaled inside the exponents
    is_mark1 = offs_n == n0 + BS - 1
    tok1 = ~is_mark1
    if HAS_KPM:
        pad1 = tl.load(kpm_ptr + offs_n, mask=offs_n < S, other=1) != 0
        tok1 = tok1 & ~pad1
        mark_ok = tl.sum((is_mark1 & ~pad1).to(tl.int32), 0) > 0
    is_mark = is_mark1[None, :]
    t = _gate_logit(s, q, k_base, n0, S, stride_kn, offs_d, is_mark, IEEE, GATE_DOT, BS, 1) * qk_scale
    if HAS_KPM:
        t = tl.where(mark_ok, t, float("-inf"))
    st = tl.where(tok1[None, :], s, float("-inf"))
    mb = tl.max(st, 1)
    mb = tl.where(mb == float("-inf"), 0.0, mb) * qk_scale
    e = tl.math.exp2(st * qk_scale - mb[:, None])
    zb = tl.sum(e, 1)
    if MIXED:
        blk = p // BS
        own_row = blk == kb
        t = tl.where(blk > kb, t, float("-inf"))
        own = own_row[:, None] & (offs_n[None, :] <= p[:, None]) & (~is_mark | (offs_n[None, :] == p[:, None]))
        own = own & (offs_n < S)[None, :]
        if HAS_KPM:
            own = own & ~pad1[None, :]
        so = tl.where(own, s * qk_scale, float("-inf"))
        cand = tl.where(own_row, tl.max(so, 1), t)
    else:
        cand = t
    m_new = tl.maximum(m_i, cand)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    g = tl.math.exp2(t - m_safe)  # the gate, relative to the running max
    w = e * (g * tl.where(zb > 0.0, 1.0 / zb, 0.0))[:, None]
    l_add = g
    if MIXED:
        po = tl.math.exp2(so - m_safe[:, None])
        w = tl.where(own_row[:, None], po, w)
        l_add = tl.where(own_row, tl.sum(po, 1), g)
    l_i = l_i * alpha + l_add
    acc = acc * alpha[:, None] + _dot(w.to(v.dtype), v, IEEE)
    return acc, m_new, l_i


@triton.jit
def _landmark_fwd_kernel(
    Q,
    K,
    V,
    KPM,
    Out,
    Lse,
    qk_scale,
    H,
    T,
    S,
    q_offset,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    HAS_KPM: tl.constexpr,
    IEEE: tl.constexpr,
    GATE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    qb = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest rows (most key blocks) first: a shorter tail
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_bs = tl.arange(0, BS)
    q_off = b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    kpm_ptr = KPM + b.to(tl.int64) * S
    q = _load(Q + q_off, offs_m, T, stride_qn, offs_d)
    p = offs_m + q_offset
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    first_blk = (qb * BLOCK_M + q_offset) // BS
    last_blk = (tl.minimum(qb * BLOCK_M + BLOCK_M, T) - 1 + q_offset) // BS
    for kb in range(0, first_blk):  # blocks before every row's own block: gated
        acc, m_i, l_i = _fwd_step(
            acc, m_i, l_i, q, k_base, v_base, kb, p, offs_bs, offs_d, S, stride_kn, stride_vn, qk_scale, kpm_ptr,
            HAS_KPM, False, IEEE, GATE_DOT, BS,
        )  # fmt: skip
    for kb in range(first_blk, last_blk + 1):  # the rows' own blocks: causal for some rows, gated for others
        acc, m_i, l_i = _fwd_step(
            acc, m_i, l_i, q, k_base, v_base, kb, p, offs_bs, offs_d, S, stride_kn, stride_vn, qk_scale, kpm_ptr,
            HAS_KPM, True, IEEE, GATE_DOT, BS,
        )  # fmt: skip
    out, lse = _finish(acc, m_i, l_i)
    _store(Out + q_off, out, offs_m, T, stride_qn, offs_d)
    tl.store(Lse + bh.to(tl.int64) * T + offs_m, lse, mask=offs_m < T)


@triton.jit
def _dq_step(
    dq,
    q,
    do,
    lse2,
    delta,
    k_base,
    v_base,
    kb,
    p,
    offs_bs,
    offs_d,
    S,
    stride_kn,
    stride_vn,
    qk_scale,
    kpm_ptr,
    HAS_KPM: tl.constexpr,
    MIXED: tl.constexpr,
    IEEE: tl.constexpr,
    GATE_DOT: tl.constexpr,
    BS: tl.constexpr,
):
    n0 = kb * BS
    offs_n = n0 + offs_bs
    k = _load(k_base, offs_n, S, stride_kn, offs_d)
    v = _load(v_base, offs_n, S, stride_vn, offs_d)
    s = _dot(q, tl.trans(k), IEEE)
    w, e, r, P, own_row, is_mark = _tile_weights(
        s, q, k_base, p, offs_n, offs_d, n0, S, stride_kn, lse2, qk_scale, kpm_ptr, HAS_KPM, MIXED, IEEE, GATE_DOT,
        BS, 1,
    )  # fmt: skip
    dp = _dot(do, tl.trans(v), IEEE)
    ds = _tile_ds(w, e, r, P, own_row, is_mark, dp, delta, MIXED, 1)
    return dq + _dot(ds.to(k.dtype), k, IEEE)


@triton.jit
def _landmark_dq_kernel(
    Q,
    K,
    V,
    KPM,
    DO,
    Out,
    DLse,
    Lse,
    Delta,
    DQ,
    qk_scale,
    sm_scale,
    H,
    T,
    S,
    q_offset,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_gb,
    stride_gh,
    stride_gn,
    HAS_KPM: tl.constexpr,
    HAS_DLSE: tl.constexpr,
    IEEE: tl.constexpr,
    GATE_DOT: tl.constexpr,
    DELTA_ONLY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """dq by query tile (and ``delta``, which the dk/dv kernel reads); ``DELTA_ONLY``: only ``delta`` (for the
    dk/dv kernel's ``FUSED_DQ``)."""
    qb = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest rows (most key blocks) first: a shorter tail
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_bs = tl.arange(0, BS)
    q_off = b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    do_off = b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    kpm_ptr = KPM + b.to(tl.int64) * S
    q = _load(Q + q_off, offs_m, T, stride_qn, offs_d)
    do = _load(DO + do_off, offs_m, T, stride_gn, offs_d)
    o = _load(Out + q_off, offs_m, T, stride_qn, offs_d)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLse + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    tl.store(Delta + bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)
    if not DELTA_ONLY:
        lse = tl.load(Lse + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=float("-inf"))
        lse2 = _lse2(lse)
        p = offs_m + q_offset
        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        first_blk = (qb * BLOCK_M + q_offset) // BS
        last_blk = (tl.minimum(qb * BLOCK_M + BLOCK_M, T) - 1 + q_offset) // BS
        for kb in range(0, first_blk):
            dq = _dq_step(
                dq, q, do, lse2, delta, k_base, v_base, kb, p, offs_bs, offs_d, S, stride_kn, stride_vn, qk_scale,
                kpm_ptr, HAS_KPM, False, IEEE, GATE_DOT, BS,
            )  # fmt: skip
        for kb in range(first_blk, last_blk + 1):
            dq = _dq_step(
                dq, q, do, lse2, delta, k_base, v_base, kb, p, offs_bs, offs_d, S, stride_kn, stride_vn, qk_scale,
                kpm_ptr, HAS_KPM, True, IEEE, GATE_DOT, BS,
            )  # fmt: skip
        _store(DQ + q_off, dq * sm_scale, offs_m, T, stride_qn, offs_d)


@triton.jit
def _dkdv_step(
    dk,
    dv,
    k,
    v,
    k_base,
    q_base,
    do_base,
    Lse,
    Delta,
    bh,
    qt,
    n0,
    offs_n,
    offs_mb,
    offs_d,
    T,
    S,
    stride_qn,
    stride_gn,
    stride_kn,
    q_offset,
    qk_scale,
    kpm_ptr,
    dq_base,
    sm_scale,
    HAS_KPM: tl.constexpr,
    MIXED: tl.constexpr,
    IEEE: tl.constexpr,
    GATE_DOT: tl.constexpr,
    KEYS_FIRST: tl.constexpr,
    FUSED_DQ: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    offs_m = qt * BLOCK_M + offs_mb
    q = _load(q_base, offs_m, T, stride_qn, offs_d)
    do = _load(do_base, offs_m, T, stride_gn, offs_d)
    lse = tl.load(Lse + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=float("-inf"))
    delta = tl.load(Delta + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    lse2 = _lse2(lse)
    tl.static_assert(not (KEYS_FIRST and FUSED_DQ), "FUSED_DQ takes (queries, keys) tiles")
    if KEYS_FIRST:  # (keys, queries) tiles: the weights feed dv and dk as they are; key reductions cross warps
        sT = _dot(k, tl.trans(q), IEEE)
        wT, eT, r, P, own_row, is_mark = _tile_weights(
            sT, q, k_base, offs_m + q_offset, offs_n, offs_d, n0, S, stride_kn, lse2, qk_scale, kpm_ptr, HAS_KPM,
            MIXED, IEEE, False, BS, 0,
        )  # fmt: skip
        dpT = _dot(v, tl.trans(do), IEEE)
        dsT = _tile_ds(wT, eT, r, P, own_row, is_mark, dpT, delta, MIXED, 0)
        dv += _dot(wT.to(do.dtype), do, IEEE)
        dk += _dot(dsT.to(q.dtype), q, IEEE)
    else:  # (queries, keys) tiles: key reductions inside a warp; the weights are transposed into the dots
        s = _dot(q, tl.trans(k), IEEE)
        w, e, r, P, own_row, is_mark = _tile_weights(
            s, q, k_base, offs_m + q_offset, offs_n, offs_d, n0, S, stride_kn, lse2, qk_scale, kpm_ptr, HAS_KPM,
            MIXED, IEEE, GATE_DOT, BS, 1,
        )  # fmt: skip
        dp = _dot(do, tl.trans(v), IEEE)
        ds = _tile_ds(w, e, r, P, own_row, is_mark, dp, delta, MIXED, 1)
        dv += _dot(tl.trans(w.to(do.dtype)), do, IEEE)
        dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)
        if FUSED_DQ:  # this tile's share of dq, added into the fp32 dq of the query rows (no dq pass)
            dq = _dot(ds.to(k.dtype), k, IEEE) * sm_scale
            tl.atomic_add(
                dq_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
                dq,
                mask=(offs_m[:, None] < T) & (offs_d[None, :] < HEAD_DIM),
                sem="relaxed",
            )
    return dk, dv


@triton.jit
def _landmark_dkdv_kernel(
    Q,
    K,
    V,
    KPM,
    DO,
    Lse,
    Delta,
    DK,
    DV,
    DQ32,
    qk_scale,
    sm_scale,
    H,
    T,
    S,
    q_offset,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_gb,
    stride_gh,
    stride_gn,
    HAS_KPM: tl.constexpr,
    IEEE: tl.constexpr,
    GATE_DOT: tl.constexpr,
    KEYS_FIRST: tl.constexpr,
    FUSED_DQ: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    kb = tl.program_id(0)  # the first blocks (seen by the most query tiles) first: a shorter tail
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    n0 = kb * BS
    offs_n = n0 + tl.arange(0, BS)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_mb = tl.arange(0, BLOCK_M)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    do_base = DO + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
    k_off = b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_off = b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    kpm_ptr = KPM + b.to(tl.int64) * S
    dq_base = DQ32 + bh.to(tl.int64) * T * HEAD_DIM  # (FUSED_DQ: fp32 (B*H, T, HEAD_DIM), contiguous)
    k = _load(K + k_off, offs_n, S, stride_kn, offs_d)
    v = _load(V + v_off, offs_n, S, stride_vn, offs_d)
    dk = tl.zeros([BS, HEAD_DIM], tl.float32)
    dv = tl.zeros([BS, HEAD_DIM], tl.float32)
    # queries at positions >= n0 see this block: those of this block (own), later ones (gated)
    q_lo = tl.maximum(n0 - q_offset, 0)
    q_gated = tl.maximum(n0 + BS - q_offset, 0)  # first query of a later block
    start = q_lo // BLOCK_M
    mid = tl.minimum(tl.cdiv(q_gated, BLOCK_M), tl.cdiv(T, BLOCK_M))  # tiles from here hold gated rows only
    for qt in range(start, mid):
        dk, dv = _dkdv_step(
            dk, dv, k, v, K + k_off, q_base, do_base, Lse, Delta, bh, qt, n0, offs_n, offs_mb, offs_d, T, S,
            stride_qn, stride_gn, stride_kn, q_offset, qk_scale, kpm_ptr, dq_base, sm_scale, HAS_KPM, True, IEEE,
            GATE_DOT, KEYS_FIRST, FUSED_DQ, BLOCK_M, BS, HEAD_DIM,
        )  # fmt: skip
    for qt in range(tl.maximum(mid, start), tl.cdiv(T, BLOCK_M)):
        dk, dv = _dkdv_step(
            dk, dv, k, v, K + k_off, q_base, do_base, Lse, Delta, bh, qt, n0, offs_n, offs_mb, offs_d, T, S,
            stride_qn, stride_gn, stride_kn, q_offset, qk_scale, kpm_ptr, dq_base, sm_scale, HAS_KPM, False, IEEE,
            GATE_DOT, KEYS_FIRST, FUSED_DQ, BLOCK_M, BS, HEAD_DIM,
        )  # fmt: skip
    _store(DK + k_off, dk * sm_scale, offs_n, S, stride_kn, offs_d)
    _store(DV + v_off, dv, offs_n, S, stride_vn, offs_d)
