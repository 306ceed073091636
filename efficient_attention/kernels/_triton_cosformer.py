"""Triton kernel of cosFormer's features for its noncausal products (imported only when Triton is installed).

``[φ(x) cos θ, φ(x) sin θ]`` ``(B, H, L, 2, d)``, contiguous in the output dtype, from ``x (B, H, L, d)`` read
through its strides (the heads of a time-first projection need no copy; the last stride must be 1) and a
contiguous ``(L, 2)`` fp32 table of ``cos θ, sin θ``: one read of ``x`` and one write, the activation and the
products in fp32, rounded once (what the ATen path computes: the activation, then the product promoted to the
table's fp32).  As ATen ops it is two kernels, the second TensorIterator's generic loop (a strided bf16 input
broadcast against an fp32 table into a new layout): 168 us for one ``(4, 8, 8192, 64)`` bf16 input on an H200,
four calls in a noncausal training step (the query's and the key's features, forward and recomputed in the
backward), a quarter of the step's GPU time (``benchmarks/results/h200/session11/call1/prof_cosformer_nc8k.log``).
"""

import torch
import triton
import triton.language as tl

from ._triton_common import launch
from ._triton_linear import cos_activation


@triton.jit
def _cos_features_kernel(
    X, CS, OUT, L, H, S_B, S_H, S_T, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, FEAT: tl.constexpr
):
    pid_t = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    in_t = rows < L
    mask = in_t[:, None] & (offs_d[None, :] < D)
    src = X + (bh // H) * S_B + (bh % H) * S_H + rows[:, None].to(tl.int64) * S_T + offs_d[None, :]
    a = cos_activation(tl.load(src, mask=mask, other=0.0).to(tl.float32), FEAT)
    c = tl.load(CS + rows * 2, mask=in_t, other=0.0)
    s = tl.load(CS + rows * 2 + 1, mask=in_t, other=0.0)
    dst = OUT + bh * L * 2 * D + rows[:, None].to(tl.int64) * (2 * D) + offs_d[None, :]
    tl.store(dst, (a * c[:, None]).to(OUT.dtype.element_ty), mask=mask)
    tl.store(dst + D, (a * s[:, None]).to(OUT.dtype.element_ty), mask=mask)


def cos_features(x: torch.Tensor, table: torch.Tensor, feat: int, dtype: torch.dtype) -> torch.Tensor:
    """``(B, H, L, 2, d)`` features in ``dtype`` of ``x (B, H, L, d)`` (``x.stride(-1) == 1``) for the
    ``(L, 2)`` fp32 ``table``; ``feat`` 1 relu, 2 ``1 + elu``."""
    bsz, heads, length, dim = x.shape
    out = torch.empty(bsz, heads, length, 2, dim, dtype=dtype, device=x.device)
    block_d = max(16, triton.next_power_of_2(dim))
    block_t = max(1, 2048 // block_d)
    grid = (triton.cdiv(length, block_t), bsz * heads)
    strides = (x.stride(0), x.stride(1), x.stride(2))
    meta = dict(BLOCK_T=block_t, BLOCK_D=block_d, FEAT=feat, num_warps=4)
    launch(_cos_features_kernel, grid, (x, table, out), (length, heads) + strides + (dim,), meta)
    return out
