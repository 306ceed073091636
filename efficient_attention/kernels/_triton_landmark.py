"""Triton kernels of landmark attention (imported only when Triton is installed).

Fixed-period landmarks: key block ``b`` holds positions ``[b*BS, (b+1)*BS)`` and its last position is
the landmark ``L_b``.  A query at absolute position ``p`` (block ``c = p // BS``) attends

* its own block: keys ``j <= p`` that are not the landmark (the landmark query also sees itself);
* every earlier block ``b < c`` as one softmax item: logit ``s(L_b)`` (the gate), value
  ``A_b = softmax_{j in b, j != L_b}(s_j) @ v`` (the block's own softmax average).

So a query tile visits its earlier key blocks one tile of ``BS`` keys at a time (the whole block is in
the tile: its inner softmax is local) and folds each into a FlashAttention-2 online softmax over
"items"; the key tiles of the query tile's own blocks (``MIXED``) apply the causal rule to rows of
that block and the gated rule to rows of later blocks.  Scores in log2 units (``exp2``), fp32
accumulation, the log-sum-exp of the items returned in natural units (``-inf`` for empty rows).

Backward (``P_b = exp(s(L_b) - lse)``, inner weights ``a_j``, ``w_j = P_b a_j``, ``E_b = sum_j a_j dp_j``
with ``dp = dO V^T``, ``delta = rowsum(dO * O) - dlse``):
own keys ``ds_j = w_j (dp_j - delta)``; tokens of earlier blocks ``ds_j = w_j (dp_j - E_b)``; the
landmark ``ds(L_b) = P_b (E_b - delta)``.  ``E_b`` is recomputed inside the tile, so nothing of size
``T x S/BS`` is ever stored: ``dq`` by query tile (it also stores ``delta``), then ``dk, dv`` by key block.
"""

import triton
import triton.language as tl

from ._triton_common import LOG2E, _dot, _finish, _load_rows, _lse2, _store_rows  # noqa: F401 (LOG2E: landmark.py)


@triton.jit
def _qvec(x, KEY_AXIS: tl.constexpr):
    """A per-query vector broadcast along the key axis of a tile."""
    return tl.expand_dims(x, KEY_AXIS)


@triton.jit
def _kvec(x, KEY_AXIS: tl.constexpr):
    """A per-key vector broadcast along the query axis of a tile."""
    return tl.expand_dims(x, 1 - KEY_AXIS)


@triton.jit
def _tile_weights(
    s,
    p,
    offs_n,
    n0,
    S,
    lse2,
    kpm_ptr,
    HAS_KPM: tl.constexpr,
    MIXED: tl.constexpr,
    BS: tl.constexpr,
    KEY_AXIS: tl.constexpr,
):
    """Weights of a score tile ``s`` over the ``BS`` keys of block ``n0 // BS`` (log2 units), given each
    query's position ``p`` and log2-normaliser ``lse2``.  Keys run along ``KEY_AXIS`` (1: a (queries, keys)
    tile, as the dq kernel holds it; 0: (keys, queries), as the dk/dv kernel does).

    Returns ``(w, a, P, own_row, is_mark)``: the attention weights ``w``, the inner softmax ``a`` of the
    block's tokens (for queries of later blocks), the gate probability ``P`` per query, which queries are
    in this block (``MIXED`` tiles only; else all are in later blocks), and the landmark key."""
    is_mark = _kvec(offs_n == n0 + BS - 1, KEY_AXIS)
    tok = ~is_mark & _kvec(offs_n < S, KEY_AXIS)
    if HAS_KPM:
        pad = _kvec(tl.load(kpm_ptr + offs_n, mask=offs_n < S, other=1) != 0, KEY_AXIS)
        tok = tok & ~pad
        mark_ok = tl.sum((is_mark & ~pad).to(tl.int32), KEY_AXIS) > 0
    st = tl.where(tok, s, float("-inf"))
    mb = tl.max(st, KEY_AXIS)
    mb = tl.where(mb == float("-inf"), 0.0, mb)
    e = tl.math.exp2(st - _qvec(mb, KEY_AXIS))
    zb = tl.sum(e, KEY_AXIS)
    a = e * _qvec(tl.where(zb > 0.0, 1.0 / zb, 0.0), KEY_AXIS)
    t = tl.sum(tl.where(is_mark, s, 0.0), KEY_AXIS)
    P = tl.math.exp2(t - lse2)
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
            own = own & ~pad
        w = tl.where(own, tl.math.exp2(s - _qvec(lse2, KEY_AXIS)), _qvec(P, KEY_AXIS) * a)
    else:
        own_row = p < 0
        w = _qvec(P, KEY_AXIS) * a
    return w, a, P, own_row, is_mark


@triton.jit
def _tile_ds(w, a, P, own_row, is_mark, dp, delta, MIXED: tl.constexpr, KEY_AXIS: tl.constexpr):
    """Score gradient (natural units) of a tile from its weights and ``dp = dO V^T`` (same orientation)."""
    E = tl.sum(a * dp, KEY_AXIS)
    ds = w * (dp - _qvec(E, KEY_AXIS)) + tl.where(is_mark, _qvec(P * (E - delta), KEY_AXIS), 0.0)
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
    qk_scale,
    kpm_ptr,
    HAS_KPM: tl.constexpr,
    MIXED: tl.constexpr,
    IEEE: tl.constexpr,
    BS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    n0 = kb * BS
    offs_n = n0 + offs_bs
    k = _load_rows(k_base, offs_n, S, offs_d, HEAD_DIM)
    v = _load_rows(v_base, offs_n, S, offs_d, HEAD_DIM)
    s = _dot(q, tl.trans(k), IEEE) * qk_scale
    is_mark = (offs_n == n0 + BS - 1)[None, :]
    tok = ~is_mark
    if HAS_KPM:
        pad = (tl.load(kpm_ptr + offs_n, mask=offs_n < S, other=1) != 0)[None, :]
        tok = tok & ~pad
        t = tl.max(tl.where(is_mark & ~pad, s, float("-inf")), 1)
    else:
        t = tl.sum(tl.where(is_mark, s, 0.0), 1)
    st = tl.where(tok, s, float("-inf"))
    mb = tl.max(st, 1)
    mb = tl.where(mb == float("-inf"), 0.0, mb)
    e = tl.math.exp2(st - mb[:, None])
    zb = tl.sum(e, 1)
    if MIXED:
        blk = p // BS
        own_row = blk == kb
        t = tl.where(blk > kb, t, float("-inf"))
        own = own_row[:, None] & (offs_n[None, :] <= p[:, None]) & (~is_mark | (offs_n[None, :] == p[:, None]))
        own = own & (offs_n < S)[None, :]
        if HAS_KPM:
            own = own & ~pad
        so = tl.where(own, s, float("-inf"))
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
    HAS_KPM: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_bs = tl.arange(0, BS)
    q_base = Q + bh.to(tl.int64) * T * HEAD_DIM
    k_base = K + bh.to(tl.int64) * S * HEAD_DIM
    v_base = V + bh.to(tl.int64) * S * HEAD_DIM
    kpm_ptr = KPM + b.to(tl.int64) * S
    q = _load_rows(q_base, offs_m, T, offs_d, HEAD_DIM)
    p = offs_m + q_offset
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    first_blk = (qb * BLOCK_M + q_offset) // BS
    last_blk = (tl.minimum(qb * BLOCK_M + BLOCK_M, T) - 1 + q_offset) // BS
    for kb in range(0, first_blk):  # blocks before every row's own block: gated
        acc, m_i, l_i = _fwd_step(
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
            qk_scale,
            kpm_ptr,
            HAS_KPM,
            False,
            IEEE,
            BS,
            HEAD_DIM,
        )
    for kb in range(first_blk, last_blk + 1):  # the rows' own blocks: causal for some rows, gated for others
        acc, m_i, l_i = _fwd_step(
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
            qk_scale,
            kpm_ptr,
            HAS_KPM,
            True,
            IEEE,
            BS,
            HEAD_DIM,
        )
    out, lse = _finish(acc, m_i, l_i)
    _store_rows(Out + bh.to(tl.int64) * T * HEAD_DIM, out, offs_m, T, offs_d, HEAD_DIM)
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
    qk_scale,
    kpm_ptr,
    HAS_KPM: tl.constexpr,
    MIXED: tl.constexpr,
    IEEE: tl.constexpr,
    BS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    n0 = kb * BS
    offs_n = n0 + offs_bs
    k = _load_rows(k_base, offs_n, S, offs_d, HEAD_DIM)
    v = _load_rows(v_base, offs_n, S, offs_d, HEAD_DIM)
    s = _dot(q, tl.trans(k), IEEE) * qk_scale
    w, a, P, own_row, is_mark = _tile_weights(s, p, offs_n, n0, S, lse2, kpm_ptr, HAS_KPM, MIXED, BS, 1)
    dp = _dot(do, tl.trans(v), IEEE)
    ds = _tile_ds(w, a, P, own_row, is_mark, dp, delta, MIXED, 1)
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
    HAS_KPM: tl.constexpr,
    HAS_DLSE: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_bs = tl.arange(0, BS)
    q_off = bh.to(tl.int64) * T * HEAD_DIM
    k_base = K + bh.to(tl.int64) * S * HEAD_DIM
    v_base = V + bh.to(tl.int64) * S * HEAD_DIM
    kpm_ptr = KPM + b.to(tl.int64) * S
    q = _load_rows(Q + q_off, offs_m, T, offs_d, HEAD_DIM)
    do = _load_rows(DO + q_off, offs_m, T, offs_d, HEAD_DIM)
    o = _load_rows(Out + q_off, offs_m, T, offs_d, HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLse + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    tl.store(Delta + bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)
    lse = tl.load(Lse + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=float("-inf"))
    lse2 = _lse2(lse)
    p = offs_m + q_offset
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    first_blk = (qb * BLOCK_M + q_offset) // BS
    last_blk = (tl.minimum(qb * BLOCK_M + BLOCK_M, T) - 1 + q_offset) // BS
    for kb in range(0, first_blk):
        dq = _dq_step(
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
            qk_scale,
            kpm_ptr,
            HAS_KPM,
            False,
            IEEE,
            BS,
            HEAD_DIM,
        )
    for kb in range(first_blk, last_blk + 1):
        dq = _dq_step(
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
            qk_scale,
            kpm_ptr,
            HAS_KPM,
            True,
            IEEE,
            BS,
            HEAD_DIM,
        )
    _store_rows(DQ + q_off, dq * sm_scale, offs_m, T, offs_d, HEAD_DIM)


@triton.jit
def _dkdv_step(
    dk,
    dv,
    k,
    v,
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
    q_offset,
    qk_scale,
    kpm_ptr,
    HAS_KPM: tl.constexpr,
    MIXED: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    offs_m = qt * BLOCK_M + offs_mb
    q = _load_rows(q_base, offs_m, T, offs_d, HEAD_DIM)
    do = _load_rows(do_base, offs_m, T, offs_d, HEAD_DIM)
    lse = tl.load(Lse + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=float("-inf"))
    delta = tl.load(Delta + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    lse2 = _lse2(lse)
    # transposed tiles (keys, queries): the weights feed dv and dk as the first operand without a transpose
    sT = _dot(k, tl.trans(q), IEEE) * qk_scale
    wT, aT, P, own_row, is_mark = _tile_weights(
        sT, offs_m + q_offset, offs_n, n0, S, lse2, kpm_ptr, HAS_KPM, MIXED, BS, 0
    )
    dpT = _dot(v, tl.trans(do), IEEE)
    dsT = _tile_ds(wT, aT, P, own_row, is_mark, dpT, delta, MIXED, 0)
    dv += _dot(wT.to(do.dtype), do, IEEE)
    dk += _dot(dsT.to(q.dtype), q, IEEE)
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
    qk_scale,
    sm_scale,
    H,
    T,
    S,
    q_offset,
    HAS_KPM: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    kb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    n0 = kb * BS
    offs_n = n0 + tl.arange(0, BS)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_mb = tl.arange(0, BLOCK_M)
    q_base = Q + bh.to(tl.int64) * T * HEAD_DIM
    do_base = DO + bh.to(tl.int64) * T * HEAD_DIM
    kv_off = bh.to(tl.int64) * S * HEAD_DIM
    kpm_ptr = KPM + b.to(tl.int64) * S
    k = _load_rows(K + kv_off, offs_n, S, offs_d, HEAD_DIM)
    v = _load_rows(V + kv_off, offs_n, S, offs_d, HEAD_DIM)
    dk = tl.zeros([BS, HEAD_DIM], tl.float32)
    dv = tl.zeros([BS, HEAD_DIM], tl.float32)
    # queries at positions >= n0 see this block: those of this block (own), later ones (gated)
    q_lo = tl.maximum(n0 - q_offset, 0)
    q_gated = tl.maximum(n0 + BS - q_offset, 0)  # first query of a later block
    start = q_lo // BLOCK_M
    mid = tl.minimum(tl.cdiv(q_gated, BLOCK_M), tl.cdiv(T, BLOCK_M))  # tiles from here hold gated rows only
    for qt in range(start, mid):
        dk, dv = _dkdv_step(
            dk,
            dv,
            k,
            v,
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
            q_offset,
            qk_scale,
            kpm_ptr,
            HAS_KPM,
            True,
            IEEE,
            BLOCK_M,
            BS,
            HEAD_DIM,
        )
    for qt in range(tl.maximum(mid, start), tl.cdiv(T, BLOCK_M)):
        dk, dv = _dkdv_step(
            dk,
            dv,
            k,
            v,
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
            q_offset,
            qk_scale,
            kpm_ptr,
            HAS_KPM,
            False,
            IEEE,
            BLOCK_M,
            BS,
            HEAD_DIM,
        )
    _store_rows(DK + kv_off, dk * sm_scale, offs_n, S, offs_d, HEAD_DIM)
    _store_rows(DV + kv_off, dv, offs_n, S, offs_d, HEAD_DIM)
