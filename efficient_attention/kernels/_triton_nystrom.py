"""Triton kernels of Nyströmformer's landmark core (imported only when Triton is installed).

``small = pinv(softmax(Q̃ K̃ᵀ)) W`` for the ``C`` landmarks of one (batch, head): ``Q̃, K̃, W`` ``(C, d)``, the
pseudo-inverse ``ITERS`` Newton-Schulz steps from ``Z₀ = Aᵀ / max_j Σ_i A_ij`` (the rows of ``A`` are
probabilities).  The whole chain is ``C x C`` and ``C x d`` matrices (``C`` = 16-128): as PyTorch ops it is
about 30 ops forward and 50 backward, each a few microseconds of GPU work and ~10 us of host time; here it is one
program per (batch, head), one launch forward and one backward.  The forward keeps ``A`` and every step's ``Z``
(``(ITERS + 1, C, C)``); the backward recomputes a step's ``X = A Z`` and polynomials from them and runs the
reverse mode (:class:`~efficient_attention.attentions.nystrom._NewtonSchulz`'s, untransposed).

Inputs and outputs are contiguous fp32 ``(B·H, C, d)``; products in IEEE fp32.  ``C`` and ``d`` are padded to
powers of two (at least 16) with zeros: a zero-padded ``A`` keeps every step's matrices block diagonal (the
padding's block never mixes into the real one), and masked stores drop it.
"""

import torch
import triton
import triton.language as tl

from ._triton_common import launch


@triton.jit
def _mm(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _load(base, offs_r, offs_c, n_r, n_c):
    mask = (offs_r[:, None] < n_r) & (offs_c[None, :] < n_c)
    return tl.load(base + offs_r[:, None] * n_c + offs_c[None, :], mask=mask, other=0.0)


@triton.jit
def _store(base, x, offs_r, offs_c, n_r, n_c):
    mask = (offs_r[:, None] < n_r) & (offs_c[None, :] < n_c)
    tl.store(base + offs_r[:, None] * n_c + offs_c[None, :], x, mask=mask)


@triton.jit
def _step(a, z, eye):
    """One Newton-Schulz step's ``X = A Z``, ``P1 = 7I - X``, ``P2 = 15I - X P1``, ``P3 = (13I - X P2) / 4``."""
    x = _mm(a, z)
    p1 = 7.0 * eye - x
    p2 = 15.0 * eye - _mm(x, p1)
    p3 = 3.25 * eye - 0.25 * _mm(x, p2)
    return x, p1, p2, p3


@triton.jit
def _nystrom_core_fwd(
    ql_ptr, kl_ptr, w_ptr, out_ptr, a_ptr, z_ptr, C, D, ITERS: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr
):
    pid = tl.program_id(0).to(tl.int64)
    offs_c = tl.arange(0, BC)
    offs_d = tl.arange(0, BD)
    ql = _load(ql_ptr + pid * C * D, offs_c, offs_d, C, D)
    kl = _load(kl_ptr + pid * C * D, offs_c, offs_d, C, D)
    valid = offs_c < C
    s = tl.where(valid[None, :], _mm(ql, tl.trans(kl)), float("-inf"))
    e = tl.exp(s - tl.max(s, axis=1)[:, None])
    a = tl.where(valid[:, None], e / tl.sum(e, axis=1)[:, None], 0.0)  # (BC, BC), zero outside (C, C)
    _store(a_ptr + pid * C * C, a, offs_c, offs_c, C, C)
    eye = (offs_c[:, None] == offs_c[None, :]).to(tl.float32)
    z = tl.trans(a) / tl.max(tl.sum(a, axis=0), axis=0)  # max column sum >= 1
    z_base = z_ptr + pid * (ITERS + 1) * C * C
    for i in range(ITERS):
        _store(z_base + i * C * C, z, offs_c, offs_c, C, C)
        x, p1, p2, p3 = _step(a, z, eye)
        z = _mm(z, p3)
    _store(z_base + ITERS * C * C, z, offs_c, offs_c, C, C)
    w = _load(w_ptr + pid * C * D, offs_c, offs_d, C, D)
    _store(out_ptr + pid * C * D, _mm(z, w), offs_c, offs_d, C, D)


@triton.jit
def _nystrom_core_bwd(
    ql_ptr,
    kl_ptr,
    w_ptr,
    a_ptr,
    z_ptr,
    g_ptr,
    dql_ptr,
    dkl_ptr,
    dw_ptr,
    C,
    D,
    ITERS: tl.constexpr,
    BC: tl.constexpr,
    BD: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs_c = tl.arange(0, BC)
    offs_d = tl.arange(0, BD)
    valid = offs_c < C
    eye = (offs_c[:, None] == offs_c[None, :]).to(tl.float32)
    a = _load(a_ptr + pid * C * C, offs_c, offs_c, C, C)
    z_base = z_ptr + pid * (ITERS + 1) * C * C
    g = _load(g_ptr + pid * C * D, offs_c, offs_d, C, D)
    w = _load(w_ptr + pid * C * D, offs_c, offs_d, C, D)
    z = _load(z_base + ITERS * C * C, offs_c, offs_c, C, C)
    _store(dw_ptr + pid * C * D, _mm(tl.trans(z), g), offs_c, offs_d, C, D)
    gz = _mm(g, tl.trans(w))  # d Z_ITERS
    da = tl.zeros((BC, BC), dtype=tl.float32)
    for j in range(ITERS):
        z = _load(z_base + (ITERS - 1 - j) * C * C, offs_c, offs_c, C, C)
        x, p1, p2, p3 = _step(a, z, eye)
        dp3 = _mm(tl.trans(z), gz)
        dp2 = -0.25 * _mm(tl.trans(x), dp3)
        dx = _mm(tl.trans(x), dp2) - 0.25 * _mm(dp3, tl.trans(p2)) - _mm(dp2, tl.trans(p1))
        da += _mm(dx, tl.trans(z))
        gz = _mm(gz, tl.trans(p3)) + _mm(tl.trans(a), dx)
    # Z₀ = Aᵀ / m, m = max_j Σ_i A_ij (the gradient of the max split evenly among ties, as torch.amax's)
    col = tl.sum(a, axis=0)
    m = tl.max(col, axis=0)
    da += tl.trans(gz) / m
    dm = -tl.sum(tl.sum(gz * tl.trans(a), axis=1), axis=0) / (m * m)
    tie = ((col == m) & valid).to(tl.float32)
    da += (dm / tl.sum(tie, axis=0)) * tie[None, :]
    ds = a * (da - tl.sum(da * a, axis=1)[:, None])  # the softmax's backward (zero outside (C, C))
    ql = _load(ql_ptr + pid * C * D, offs_c, offs_d, C, D)
    kl = _load(kl_ptr + pid * C * D, offs_c, offs_d, C, D)
    _store(dql_ptr + pid * C * D, _mm(ds, kl), offs_c, offs_d, C, D)
    _store(dkl_ptr + pid * C * D, _mm(tl.trans(ds), ql), offs_c, offs_d, C, D)


def _meta(c: int, d: int, iterations: int) -> dict:
    bc = max(16, triton.next_power_of_2(c))
    return {"ITERS": iterations, "BC": bc, "BD": max(16, triton.next_power_of_2(d)), "num_warps": 8 if bc > 32 else 4}


def core_forward(ql: torch.Tensor, kl: torch.Tensor, w: torch.Tensor, iterations: int):
    """The forward launch on contiguous fp32 ``ql, kl, w`` ``(B·H, C, d)``: ``(out (B·H, C, d), A (B·H, C, C),
    Z (B·H, ITERS + 1, C, C))``, the last two for :func:`core_backward`."""
    batch, c, d = ql.shape
    out = torch.empty_like(w)
    a = torch.empty((batch, c, c), dtype=ql.dtype, device=ql.device)
    zs = torch.empty((batch, iterations + 1, c, c), dtype=ql.dtype, device=ql.device)
    launch(_nystrom_core_fwd, (batch,), (ql, kl, w, out, a, zs), (c, d), _meta(c, d, iterations))
    return out, a, zs


def core_backward(ql, kl, w, a, zs, grad: torch.Tensor):
    """The backward launch: ``(d ql, d kl, d w)`` (``(B·H, C, d)`` fp32) from :func:`core_forward`'s inputs and
    saved ``A, Z`` and the output's gradient ``grad``."""
    batch, c, d = ql.shape
    grad = grad.contiguous()
    dql, dkl, dw = torch.empty_like(ql), torch.empty_like(kl), torch.empty_like(w)
    meta = _meta(c, d, zs.shape[1] - 1)
    launch(_nystrom_core_bwd, (batch,), (ql, kl, w, a, zs, grad, dql, dkl, dw), (c, d), meta)
    return dql, dkl, dw


class NystromCore(torch.autograd.Function):
    """``pinv(softmax(ql klᵀ)) w`` (the module doc) for contiguous fp32 ``ql, kl, w`` ``(B·H, C, d)``: one Triton
    launch forward, one backward.  Returns ``(B·H, C, d)``."""

    @staticmethod
    def forward(ctx, ql: torch.Tensor, kl: torch.Tensor, w: torch.Tensor, iterations: int) -> torch.Tensor:
        out, a, zs = core_forward(ql, kl, w, iterations)
        ctx.save_for_backward(ql, kl, w, a, zs)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        ql, kl, w, a, zs = ctx.saved_tensors
        return *core_backward(ql, kl, w, a, zs, grad), None
