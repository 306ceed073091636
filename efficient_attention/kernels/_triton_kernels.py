"""Triton kernels of the sparse ops (imported only when Triton is installed).

One FlashAttention-2 style kernel family covers both ops.  A query block of
``BLOCK_M`` rows visits a list of key blocks of ``BLOCK_N`` keys:

* sliding window (``USE_LUT=False``): the contiguous key-block range its band
  can reach, computed in the kernel from the LocalWindow rule;
* block-sparse (``USE_LUT=True``): the kept blocks of its layout row, read from
  a lookup table ``lut (Hl, n_rows, n_cols)`` of block indices + ``cnt``
  (a :class:`~efficient_attention.block_mask.BlockMask`'s tables).  A partial block
  of a block mask (``HAS_TILES``) has a tile index in the parallel table ``tile``
  (``-1``: none) and its token mask is read from ``tiles (P, bs, bs)`` uint8.

Inside a block, a query ``i`` (absolute position ``p = i + q_offset``) sees key
``j`` iff ``lo(p) <= j <= hi(p)`` (the band; unbounded for block-sparse), ``j <= p``
if causal, ``j < S`` and the key is not padding.  A band may instead read each
row's position from ``q_pos (B*H, T)`` int32 (``HAS_QPOS``: gathered rows, ProbSparse's
active queries), nondecreasing along each row list: a query tile's key range runs from
the band of its smallest position to that of its largest, and the dk/dv kernel finds the
query tiles that see its key block by a binary search of the tiles' first and last
positions (a few scalar loads).  Blocks entirely inside the
band skip the element mask.  Scores use ``exp2`` with ``scale * log2(e)``; the
log-sum-exp is returned in natural units (fp32, ``-inf`` for empty rows).
Backward: ``dq`` by query block first (it also computes ``delta = rowsum(dO * O) - dlse``
and stores it), then ``dk, dv`` by key block, visiting the query blocks that see it.  The two
kernels recompute ``S`` and ``dP`` (7 tile matmuls per visited tile against 5 for one kernel
adding ``dq`` into an fp32 buffer).  That one-kernel backward was built and measured on an H100
with element atomics and with TMA bulk reductions: both were slower at every point (the dq
traffic costs as much as the recomputation; ``benchmarks/README.md``), so it is not used.
"""

import triton
import triton.language as tl

from ._triton_common import LOG2E, _dot, _finish, _load_rows, _lse2, _store_rows  # noqa: F401 (LOG2E: triton_ops)

LN2 = 0.6931471805599453


@triton.jit
def _band(p, group, left, right, CAUSAL: tl.constexpr):
    base = (p // group) * group
    lo = base - left
    hi = base + group - 1 + right
    if CAUSAL:
        hi = tl.minimum(hi, p)
    return lo, hi


@triton.jit
def _position_range(qpos_base, offs_m, T):
    """``(first_p, last_p)``: the smallest and largest position of the query rows ``offs_m`` below ``T`` (at least
    one), read from a ``q_pos`` row."""
    valid = offs_m < T
    p = tl.load(qpos_base + offs_m, mask=valid, other=0)
    return tl.min(tl.where(valid, p, 1 << 30), 0), tl.max(tl.where(valid, p, -(1 << 30)), 0)


@triton.jit
def _qpos_search(
    qpos_base,
    T,
    n_blocks,
    lo,
    target,
    group,
    left,
    right,
    CAUSAL: tl.constexpr,
    UPPER: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """The first query tile ``b`` in ``[lo, n_blocks]`` (``n_blocks`` if none) of a nondecreasing ``q_pos`` row for
    which, ``UPPER``: its last row's band reaches up to ``target`` (``hi(p) >= target``); else its first row's band
    starts after ``target`` (``lo(p) > target``).  Both are monotone in ``b``: a binary search of scalar loads."""
    hi = lo * 0 + n_blocks
    while lo < hi:
        mid = (lo + hi) // 2
        if UPPER:
            _, h = _band(tl.load(qpos_base + tl.minimum(mid * BLOCK_M + BLOCK_M, T) - 1), group, left, right, CAUSAL)
            go = h >= target
        else:
            low, _ = _band(tl.load(qpos_base + mid * BLOCK_M), group, left, right, CAUSAL)
            go = low > target
        hi = tl.where(go, mid, hi)
        lo = tl.where(go, lo, mid + 1)
    return lo


@triton.jit
def _mask(
    offs_m,
    qpos_base,
    T,
    offs_n,
    S,
    q_offset,
    group,
    left,
    right,
    kpm_ptr,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_QPOS: tl.constexpr,
):
    """Which keys ``offs_n`` the query rows ``offs_m`` see: their positions are read from the ``q_pos`` row at
    ``qpos_base`` with ``HAS_QPOS`` (here, not kept live across the key loop), else ``offs_m + q_offset``."""
    if HAS_QPOS:
        p = tl.load(qpos_base + offs_m, mask=offs_m < T, other=0)[:, None]
    else:
        p = offs_m[:, None] + q_offset
    keep = offs_n[None, :] < S
    if WINDOW:
        base = (p // group) * group
        keep = keep & (offs_n[None, :] >= base - left) & (offs_n[None, :] <= base + group - 1 + right)
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= p)
    if HAS_KPM:
        pad = tl.load(kpm_ptr + offs_n, mask=offs_n < S, other=1)
        keep = keep & (pad == 0)[None, :]
    return keep


@triton.jit
def _tile_keep(TILES, t, offs_m, offs_n, LUT_BLOCK: tl.constexpr):
    """The token mask of tile ``t`` of a block mask at queries ``offs_m``, keys ``offs_n`` (all True if t < 0)."""
    r = offs_m % LUT_BLOCK
    c = offs_n % LUT_BLOCK
    base = TILES + tl.maximum(t, 0).to(tl.int64) * (LUT_BLOCK * LUT_BLOCK)
    return (tl.load(base + r[:, None] * LUT_BLOCK + c[None, :]) != 0) | (t < 0)


@triton.jit
def _full_block(
    first_p,
    lo_last,
    hi_first,
    n0,
    S,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    HAS_KPM: tl.constexpr,
):
    """True when every query of a tile sees every key of [n0, n0 + BLOCK_N): no element mask needed.

    ``lo_last`` is the band's lower end for the tile's last query, ``hi_first`` its upper end for the
    first query (both only used with ``WINDOW``; loop-invariant in the forward and dq kernels)."""
    n_last = n0 + BLOCK_N - 1
    full = n_last < S
    if WINDOW:
        full = full & (n0 >= lo_last) & (n_last <= hi_first)
    elif CAUSAL:
        full = full & (n_last <= first_p)
    if HAS_KPM:
        full = full & (n0 < 0)
    return full


@triton.jit
def _rows(
    ptr, desc, bh, r0, n_rows, offs_r, offs_d, stride, TMA: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr
):
    """Rows ``r0 .. r0 + ROWS`` of head ``bh`` of a ``(B*H, n_rows, HEAD_DIM)`` view, zero past ``n_rows``:
    a TMA tile load through ``desc`` (Hopper), else masked pointer loads from ``ptr`` (this head's base,
    rows ``stride`` elements apart)."""
    if TMA:
        return desc.load([bh, r0, 0]).reshape(ROWS, HEAD_DIM)
    else:
        return _load_rows(ptr, offs_r, n_rows, offs_d, stride)


@triton.jit
def _program_tile(USE_LUT: tl.constexpr):
    """(tile, bh) of this program.  Bands run on a (tiles, B*H) grid, whose neighbouring programs share
    key tiles in L2; layouts on a (B*H, tiles) grid, which starts every head's heavy rows (BigBird's
    global tokens, a fixed layout's summary columns) together instead of one head after another:
    measured 1.1-1.35x faster forward+backward on the H100's fixed and BigBird layouts."""
    if USE_LUT:
        return tl.program_id(1), tl.program_id(0)
    else:
        return tl.program_id(0), tl.program_id(1)


@triton.jit
def _key_range(
    first_p,
    last_p,
    CNT,
    lut_base,
    S,
    group,
    left,
    right,
    CAUSAL: tl.constexpr,
    USE_LUT: tl.constexpr,
    LUT_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The key tiles a query tile (absolute positions ``first_p .. last_p``) visits: ``(start, n_iter)``
    (a band's contiguous range, or ``n_iter`` lookup-table steps), and ``lo_last``, ``hi_first`` for
    ``_full_block`` (bands only)."""
    if USE_LUT:
        return 0, tl.load(CNT + lut_base) * (LUT_BLOCK // BLOCK_N), 0, S - 1
    else:
        lo_first, hi_first = _band(first_p, group, left, right, CAUSAL)
        lo_last, hi_last = _band(last_p, group, left, right, CAUSAL)
        start = tl.maximum(lo_first, 0) // BLOCK_N
        end = (tl.minimum(hi_last, S - 1) + BLOCK_N) // BLOCK_N
        return start, tl.maximum(end - start, 0), lo_last, hi_first


@triton.jit
def _tile_at(it, start, LUT, lut_base, lut_cols, USE_LUT: tl.constexpr, LUT_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    """The tile of loop step ``it``: ``start + it`` for a band; for a layout, sub-tile ``it % sub`` of
    the ``it // sub``-th kept block of the lookup-table row (``sub`` tiles per layout block)."""
    if USE_LUT:
        sub = LUT_BLOCK // BLOCK
        return tl.load(LUT + lut_base * lut_cols + it // sub) * sub + it % sub
    else:
        return start + it


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    KD,
    VD,
    KPM,
    QPOS,
    LUT,
    CNT,
    TILE,
    TILES,
    Out,
    Lse,
    qk_scale,
    H,
    T,
    S,
    sq_bh,
    sq_row,
    sk_bh,
    sk_row,
    q_offset,
    group,
    left,
    right,
    lut_heads,
    lut_rows,
    lut_cols,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    USE_LUT: tl.constexpr,
    HAS_KPM: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    LUT_BLOCK: tl.constexpr,
    TMA: tl.constexpr,
    HAS_TILES: tl.constexpr,
    HAS_QPOS: tl.constexpr,
):
    qb, bh = _program_tile(USE_LUT)
    b = bh // H
    h = bh % H
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_nb = tl.arange(0, BLOCK_N)
    q_off = bh.to(tl.int64) * sq_bh
    k_base = K + bh.to(tl.int64) * sk_bh
    v_base = V + bh.to(tl.int64) * sk_bh
    kpm_ptr = KPM + b.to(tl.int64) * S
    q = _load_rows(Q + q_off, offs_m, T, offs_d, sq_row)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    qpos_base = QPOS + bh.to(tl.int64) * T
    if HAS_QPOS:  # per-row positions (their smallest and largest bound the tile's band)
        first_p, last_p = _position_range(qpos_base, offs_m, T)
    else:
        first_p = qb * BLOCK_M + q_offset
        last_p = tl.minimum(qb * BLOCK_M + BLOCK_M, T) - 1 + q_offset
    lut_base = ((h % lut_heads) * lut_rows + (qb * BLOCK_M) // LUT_BLOCK).to(tl.int64)
    start, n_iter, lo_last, hi_first = _key_range(
        first_p, last_p, CNT, lut_base, S, group, left, right, CAUSAL, USE_LUT, LUT_BLOCK, BLOCK_N
    )
    for it in range(0, n_iter):
        kb = _tile_at(it, start, LUT, lut_base, lut_cols, USE_LUT, LUT_BLOCK, BLOCK_N)
        n0 = kb * BLOCK_N
        offs_n = n0 + offs_nb
        k = _rows(k_base, KD, bh, n0, S, offs_n, offs_d, sk_row, TMA, BLOCK_N, HEAD_DIM)
        v = _rows(v_base, VD, bh, n0, S, offs_n, offs_d, sk_row, TMA, BLOCK_N, HEAD_DIM)
        s = _dot(q, tl.trans(k), IEEE) * qk_scale
        # blocks wholly inside every row's band (and not at the end, no padding, no tile) skip the element mask
        full = _full_block(first_p, lo_last, hi_first, n0, S, BLOCK_N, CAUSAL, WINDOW, HAS_KPM)
        t = -1
        if HAS_TILES:
            t = tl.load(TILE + lut_base * lut_cols + it // (LUT_BLOCK // BLOCK_N))
            full = full & (t < 0)
        if not full:
            keep = _mask(
                offs_m,
                qpos_base,
                T,
                offs_n,
                S,
                q_offset,
                group,
                left,
                right,
                kpm_ptr,
                CAUSAL,
                WINDOW,
                HAS_KPM,
                HAS_QPOS,
            )
            if HAS_TILES:
                keep = keep & _tile_keep(TILES, t, offs_m, offs_n, LUT_BLOCK)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    out, lse = _finish(acc, m_i, l_i)
    _store_rows(Out + q_off, out, offs_m, T, offs_d, sq_row)
    tl.store(Lse + bh.to(tl.int64) * T + offs_m, lse, mask=offs_m < T)


@triton.jit
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    QD,
    DOD,
    KPM,
    QPOS,
    LUT,
    CNT,
    TILE,
    TILES,
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
    sq_bh,
    sq_row,
    sk_bh,
    sk_row,
    q_offset,
    group,
    left,
    right,
    lut_heads,
    lut_rows,
    lut_cols,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    USE_LUT: tl.constexpr,
    HAS_KPM: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    LUT_BLOCK: tl.constexpr,
    TMA: tl.constexpr,
    HAS_TILES: tl.constexpr,
    HAS_QPOS: tl.constexpr,
):
    kb, bh = _program_tile(USE_LUT)
    b = bh // H
    h = bh % H
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_mb = tl.arange(0, BLOCK_M)
    q_base = Q + bh.to(tl.int64) * sq_bh
    do_base = DO + bh.to(tl.int64) * sq_bh
    kv_off = bh.to(tl.int64) * sk_bh
    kpm_ptr = KPM + b.to(tl.int64) * S
    k = _load_rows(K + kv_off, offs_n, S, offs_d, sk_row)
    v = _load_rows(V + kv_off, offs_n, S, offs_d, sk_row)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    n0 = kb * BLOCK_N
    n_last = n0 + BLOCK_N - 1
    lut_base = ((h % lut_heads) * lut_rows + (kb * BLOCK_N) // LUT_BLOCK).to(tl.int64)
    qpos_base = QPOS + bh.to(tl.int64) * T
    if USE_LUT:  # transposed layout: the query blocks that keep this key block
        n_iter = tl.load(CNT + lut_base) * (LUT_BLOCK // BLOCK_M)
        start = 0
    elif HAS_QPOS:  # nondecreasing positions: the query tiles from the first whose band reaches the key block
        # to the last whose band starts at or before its end, found by binary searches (the end's skipped when
        # the last row's band starts at or before it, as a causal band with an unbounded left does)
        n_blocks = (T + BLOCK_M - 1) // BLOCK_M
        start = _qpos_search(qpos_base, T, n_blocks, kb * 0, n0, group, left, right, CAUSAL, True, BLOCK_M)
        low_end, _ = _band(tl.load(qpos_base + T - 1), group, left, right, CAUSAL)
        end = _qpos_search(
            qpos_base,
            T,
            n_blocks,
            tl.where(low_end <= n_last, n_blocks, start),
            n_last,
            group,
            left,
            right,
            CAUSAL,
            False,
            BLOCK_M,
        )
        n_iter = tl.maximum(end - start, 0)
    else:  # conservative query range of the band (the element mask is exact)
        q_lo = n0 - right - group + 1 - q_offset
        q_hi = n_last + left + group - 1 - q_offset
        if CAUSAL:
            q_lo = tl.maximum(q_lo, n0 - q_offset)
        q_lo = tl.maximum(q_lo, 0)
        q_hi = tl.minimum(q_hi, T - 1)
        start = q_lo // BLOCK_M
        n_iter = tl.maximum((q_hi + BLOCK_M) // BLOCK_M - start, 0)
    for it in range(0, n_iter):
        qb = _tile_at(it, start, LUT, lut_base, lut_cols, USE_LUT, LUT_BLOCK, BLOCK_M)
        offs_m = qb * BLOCK_M + offs_mb
        q = _rows(q_base, QD, bh, qb * BLOCK_M, T, offs_m, offs_d, sq_row, TMA, BLOCK_M, HEAD_DIM)
        do = _rows(do_base, DOD, bh, qb * BLOCK_M, T, offs_m, offs_d, sq_row, TMA, BLOCK_M, HEAD_DIM)
        lse = tl.load(Lse + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=float("-inf"))
        delta = tl.load(Delta + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
        # transposed scores sT (BLOCK_N, BLOCK_M) in log2 units
        sT = _dot(k, tl.trans(q), IEEE) * qk_scale
        lse2 = _lse2(lse)
        pT = tl.math.exp2(sT - lse2[None, :])
        if HAS_QPOS:  # nondecreasing: the tile's first and last rows hold its smallest and largest position
            first_p = tl.load(qpos_base + qb * BLOCK_M)
            last_p = tl.load(qpos_base + tl.minimum(qb * BLOCK_M + BLOCK_M, T) - 1)
            lo_last, _ = _band(last_p, group, left, right, False)
        else:
            first_p = qb * BLOCK_M + q_offset
            lo_last, _ = _band(first_p + BLOCK_M - 1, group, left, right, False)
        _, hi_first = _band(first_p, group, left, right, CAUSAL)
        full = _full_block(first_p, lo_last, hi_first, n0, S, BLOCK_N, CAUSAL, WINDOW, HAS_KPM)
        t = -1
        if HAS_TILES:
            t = tl.load(TILE + lut_base * lut_cols + it // (LUT_BLOCK // BLOCK_M))
            full = full & (t < 0)
        if not full:
            keep = _mask(
                offs_m,
                qpos_base,
                T,
                offs_n,
                S,
                q_offset,
                group,
                left,
                right,
                kpm_ptr,
                CAUSAL,
                WINDOW,
                HAS_KPM,
                HAS_QPOS,
            )
            if HAS_TILES:
                keep = keep & _tile_keep(TILES, t, offs_m, offs_n, LUT_BLOCK)
            pT = tl.where(tl.trans(keep), pT, 0.0)
        dv += _dot(pT.to(do.dtype), do, IEEE)
        dpT = _dot(v, tl.trans(do), IEEE)
        dsT = pT * (dpT - delta[None, :])
        dk += _dot(dsT.to(q.dtype), q, IEEE)
    dk = dk * sm_scale
    _store_rows(DK + kv_off, dk, offs_n, S, offs_d, sk_row)
    _store_rows(DV + kv_off, dv, offs_n, S, offs_d, sk_row)


@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    KD,
    VD,
    KPM,
    QPOS,
    LUT,
    CNT,
    TILE,
    TILES,
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
    sq_bh,
    sq_row,
    sk_bh,
    sk_row,
    q_offset,
    group,
    left,
    right,
    lut_heads,
    lut_rows,
    lut_cols,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    USE_LUT: tl.constexpr,
    HAS_KPM: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    LUT_BLOCK: tl.constexpr,
    HAS_DLSE: tl.constexpr,
    TMA: tl.constexpr,
    HAS_TILES: tl.constexpr,
    HAS_QPOS: tl.constexpr,
):
    qb, bh = _program_tile(USE_LUT)
    b = bh // H
    h = bh % H
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_nb = tl.arange(0, BLOCK_N)
    q_off = bh.to(tl.int64) * sq_bh
    k_base = K + bh.to(tl.int64) * sk_bh
    v_base = V + bh.to(tl.int64) * sk_bh
    kpm_ptr = KPM + b.to(tl.int64) * S
    q = _load_rows(Q + q_off, offs_m, T, offs_d, sq_row)
    do = _load_rows(DO + q_off, offs_m, T, offs_d, sq_row)
    lse = tl.load(Lse + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=float("-inf"))
    # delta = rowsum(dO * O) - dlse, stored for the dk/dv kernel that runs next
    o = _load_rows(Out + q_off, offs_m, T, offs_d, sq_row)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLse + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    tl.store(Delta + bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)
    lse2 = _lse2(lse)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    qpos_base = QPOS + bh.to(tl.int64) * T
    if HAS_QPOS:  # per-row positions (their smallest and largest bound the tile's band)
        first_p, last_p = _position_range(qpos_base, offs_m, T)
    else:
        first_p = qb * BLOCK_M + q_offset
        last_p = tl.minimum(qb * BLOCK_M + BLOCK_M, T) - 1 + q_offset
    lut_base = ((h % lut_heads) * lut_rows + (qb * BLOCK_M) // LUT_BLOCK).to(tl.int64)
    start, n_iter, lo_last, hi_first = _key_range(
        first_p, last_p, CNT, lut_base, S, group, left, right, CAUSAL, USE_LUT, LUT_BLOCK, BLOCK_N
    )
    for it in range(0, n_iter):
        kb = _tile_at(it, start, LUT, lut_base, lut_cols, USE_LUT, LUT_BLOCK, BLOCK_N)
        offs_n = kb * BLOCK_N + offs_nb
        k = _rows(k_base, KD, bh, kb * BLOCK_N, S, offs_n, offs_d, sk_row, TMA, BLOCK_N, HEAD_DIM)
        v = _rows(v_base, VD, bh, kb * BLOCK_N, S, offs_n, offs_d, sk_row, TMA, BLOCK_N, HEAD_DIM)
        s = _dot(q, tl.trans(k), IEEE) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        full = _full_block(first_p, lo_last, hi_first, kb * BLOCK_N, S, BLOCK_N, CAUSAL, WINDOW, HAS_KPM)
        t = -1
        if HAS_TILES:
            t = tl.load(TILE + lut_base * lut_cols + it // (LUT_BLOCK // BLOCK_N))
            full = full & (t < 0)
        if not full:
            keep = _mask(
                offs_m,
                qpos_base,
                T,
                offs_n,
                S,
                q_offset,
                group,
                left,
                right,
                kpm_ptr,
                CAUSAL,
                WINDOW,
                HAS_KPM,
                HAS_QPOS,
            )
            if HAS_TILES:
                keep = keep & _tile_keep(TILES, t, offs_m, offs_n, LUT_BLOCK)
            p = tl.where(keep, p, 0.0)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, IEEE)
    dq = dq * sm_scale
    _store_rows(DQ + q_off, dq, offs_m, T, offs_d, sq_row)
