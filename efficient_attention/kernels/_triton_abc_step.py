"""Triton kernel of ABC's decoding step (imported only when Triton is installed): one program per (batch, head).

A decoding step is a few kilobytes of work per head, so on a GPU its cost is the kernel launches (and the
host time of their ATen ops); this kernel does the whole step -- the slot scores of the new key, the rescale of
the running sums to the new running max, the sums' update, the slot softmax and the read -- in one launch.
The math is :func:`~efficient_attention.kernels.abc_step.reference_abc_step`'s (fp32 state, fp32 arithmetic).
"""

import triton
import triton.language as tl


@triton.jit
def _abc_step(
    Q,
    K,
    V,
    W,
    MK,
    MV,
    NRM,
    MX,
    KPM,
    O,
    MK2,
    MV2,
    NRM2,
    MX2,
    H,
    N,
    D,
    sq_b,
    sq_h,
    sk_b,
    sk_h,
    sv_b,
    sv_h,
    smk_b,
    smk_h,
    smk_n,
    smk_d,
    smv_b,
    smv_h,
    smv_n,
    smv_d,
    sn_b,
    sn_h,
    sn_n,
    sx_b,
    sx_h,
    scale,
    empty,
    lowest,
    HAS_KPM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
):
    """q, k, v ``(B, H, 1, D)`` (last stride 1), w ``(H, N, D)`` contiguous, sums ``MK``, ``MV`` ``(B, H, N, D)``,
    ``NRM`` ``(B, H, N)``, ``MX`` ``(B, H, 1)`` (any strides, fp32); writes ``O`` ``(B, H, 1, D)`` and the new state
    ``MK2``, ``MV2``, ``NRM2``, ``MX2`` (contiguous)."""
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    rn = tl.arange(0, BN)
    rd = tl.arange(0, BD)
    mn = rn < N
    md = rd < D
    m2 = mn[:, None] & md[None, :]
    q = tl.load(Q + b * sq_b + h * sq_h + rd, mask=md, other=0.0).to(tl.float32)
    k = tl.load(K + b * sk_b + h * sk_h + rd, mask=md, other=0.0).to(tl.float32)
    v = tl.load(V + b * sv_b + h * sv_h + rd, mask=md, other=0.0).to(tl.float32)
    w = tl.load(W + h * N * D + rn[:, None] * D + rd[None, :], mask=m2, other=0.0).to(tl.float32)
    a = tl.sum(w * k[None, :], 1)  # slot scores of the new key (N,)
    if HAS_KPM:
        a = tl.where(tl.load(KPM + b) != 0, float("-inf"), a)
    a = tl.where(mn, a, float("-inf"))
    old = tl.load(MX + b * sx_b + h * sx_h)
    run = tl.maximum(tl.max(a, 0), old)
    safe = tl.maximum(run, lowest)
    decay = tl.exp(old - safe)
    e = tl.exp(a - safe)
    mk = tl.load(MK + b * smk_b + h * smk_h + rn[:, None] * smk_n + rd[None, :] * smk_d, mask=m2, other=0.0)
    mk = mk * decay + e[:, None] * k[None, :]
    mv = tl.load(MV + b * smv_b + h * smv_h + rn[:, None] * smv_n + rd[None, :] * smv_d, mask=m2, other=0.0)
    mv = mv * decay + e[:, None] * v[None, :]
    nrm = tl.load(NRM + b * sn_b + h * sn_h + rn * sn_n, mask=mn, other=0.0) * decay + e
    num = tl.sum(mk * q[None, :], 1)
    is_empty = nrm <= empty  # also underflowed slots: weight 0, lowest logit
    inv = tl.where(is_empty, 0.0, 1.0 / tl.where(is_empty, 1.0, nrm))
    logits = tl.where(is_empty, lowest, num * inv * scale)
    logits = tl.where(mn, logits, float("-inf"))
    p = tl.exp(logits - tl.max(logits, 0))
    p = p / tl.sum(p, 0)
    o = tl.sum((p * inv)[:, None] * mv, 0)
    tl.store(O + pid * D + rd, o.to(O.dtype.element_ty), mask=md)
    base = pid * N * D + rn[:, None] * D + rd[None, :]
    tl.store(MK2 + base, mk, mask=m2)
    tl.store(MV2 + base, mv, mask=m2)
    tl.store(NRM2 + pid * N + rn, nrm, mask=mn)
    tl.store(MX2 + pid, run)
