"""Triton kernel of one causal Performer decoding step (imported only when Triton is installed).

A decoding step does a few thousand flops per (batch, head) and is host-bound: the ~25 ATen ops of
:meth:`Performer._step <efficient_attention.attentions.performer.Performer._step>` cost ~9 us of launch time
each on an H200.  This kernel does the same math in one launch, one program per (batch, head):

* ``W' q``, ``W' k`` from ``w_t (d, m)`` (rounded to the autocast dtype when the PyTorch path's product runs in
  it, ``ROUND``), the query features ``softmax_m(W' q)``, the key logits ``W' k - s²|k|²/2``;
* the running max ``c' = max(c, max_m logits)``, the features ``exp(logits - c')`` and the decay
  ``exp(c - c')``;
* the state ``S (m, d + 1) = decay · S + φ(k) [v, 1]ᵀ`` updated in place (its last column is the normaliser
  sum), ``c`` updated in place, and ``out = φ(q) S[:, :d] / max(φ(q) S[:, d], tiny)``.

``q``, ``k``, ``v`` are ``(B, H, 1, d)`` views with any batch and head strides (the base's stacked projection);
the state ``(B, H, m, d + 1)`` and ``c`` ``(B, H, 1, 1)`` are contiguous fp32; ``out`` ``(B, H, 1, d)`` is written
in ``q``'s dtype.  No key padding (the PyTorch path takes it).
"""

import torch
import triton
import triton.language as tl

from ._triton_common import launch

FP32_TINY = tl.constexpr(1.1754943508222875e-38)  # a global a @triton.jit body reads must be constexpr


@triton.jit
def _performer_step_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    w_ptr,
    s_ptr,
    c_ptr,
    o_ptr,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_vb,
    stride_vh,
    H,
    M,
    D,
    half_sq,
    ROUND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = tl.arange(0, BLOCK_M)
    in_d = offs_d < D
    in_m = offs_m < M
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d, mask=in_d, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + b * stride_kb + h * stride_kh + offs_d, mask=in_d, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs_d[:, None] * M + offs_m[None, :], mask=in_d[:, None] & in_m[None, :], other=0.0)
    w = w.to(tl.float32)
    pq = tl.sum(q[:, None] * w, axis=0)  # (BLOCK_M,)
    pk = tl.sum(k[:, None] * w, axis=0)
    if ROUND == 1:  # the PyTorch path's product under bf16 autocast rounds its output
        pq = pq.to(tl.bfloat16).to(tl.float32)
        pk = pk.to(tl.bfloat16).to(tl.float32)
    elif ROUND == 2:
        pq = pq.to(tl.float16).to(tl.float32)
        pk = pk.to(tl.float16).to(tl.float32)
    # the query's features up to a positive factor (which cancels): a softmax over the features
    pq = tl.where(in_m, pq, float("-inf"))
    eq = tl.exp(pq - tl.max(pq, axis=0))
    qf = eq / tl.sum(eq, axis=0)
    # the key's logits and the running max
    logits = tl.where(in_m, pk - half_sq * tl.sum(k * k, axis=0), float("-inf"))
    c_old = tl.load(c_ptr + pid)
    c_new = tl.maximum(tl.max(logits, axis=0), c_old)
    kf = tl.exp(logits - c_new)  # 0 outside the features
    decay = tl.exp(c_old - c_new)  # 0 while no key was seen (c = -inf)
    # the state update with [v, 1] and the output
    offs_e = tl.arange(0, BLOCK_E)
    in_e = offs_e < D + 1
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + offs_e, mask=offs_e < D, other=0.0).to(tl.float32)
    v1 = tl.where(offs_e == D, 1.0, v)
    s_offs = pid * M * (D + 1) + offs_m[:, None] * (D + 1) + offs_e[None, :]
    s_mask = in_m[:, None] & in_e[None, :]
    s = tl.load(s_ptr + s_offs, mask=s_mask, other=0.0)
    s = s * decay + kf[:, None] * v1[None, :]
    tl.store(s_ptr + s_offs, s, mask=s_mask)
    tl.store(c_ptr + pid, c_new)
    num_den = tl.sum(qf[:, None] * s, axis=0)  # (BLOCK_E,)
    den = tl.maximum(tl.sum(tl.where(offs_e == D, num_den, 0.0), axis=0), FP32_TINY)
    out = num_den / den
    tl.store(o_ptr + pid * D + offs_e, out.to(o_ptr.dtype.element_ty), mask=offs_e < D)


_ROUND = {torch.bfloat16: 1, torch.float16: 2}


def performer_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w_t: torch.Tensor,
    state: torch.Tensor,
    c: torch.Tensor,
    half_sq: float,
    product_dtype: torch.dtype,
) -> torch.Tensor:
    """One step (see the module doc): ``state`` ``(B, H, m, d + 1)`` and ``c`` ``(B, H, 1, 1)`` updated in place;
    returns ``out (B, H, 1, d)`` in ``q.dtype``.  ``w_t (d, m)`` contiguous; ``product_dtype``: the dtype the
    PyTorch path's product ``W' x`` is rounded to (bf16 / fp16 under autocast)."""
    bsz, heads, _, d = q.shape
    m = w_t.shape[1]
    out = torch.empty((bsz, heads, 1, d), dtype=q.dtype, device=q.device)
    launch(
        _performer_step_kernel,
        (bsz * heads,),
        (q, k, v, w_t, state, c, out),
        (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), heads, m, d, half_sq),
        dict(
            ROUND=_ROUND.get(product_dtype, 0),
            BLOCK_M=max(16, triton.next_power_of_2(m)),
            BLOCK_D=max(16, triton.next_power_of_2(d)),
            BLOCK_E=max(16, triton.next_power_of_2(d + 1)),
        ),
    )
    return out
