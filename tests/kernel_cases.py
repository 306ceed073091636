"""Shared cases for the kernel tests (CPU and GPU): windows, layouts, float64 references."""

from __future__ import annotations

import torch

from efficient_attention.kernels import reference
from efficient_attention.local_window import LocalWindow

WINDOWS = [
    LocalWindow.sliding(17, 5),
    LocalWindow.sliding(40, 0, causal=True),
    LocalWindow.from_blocks(16, 1, 1),
    LocalWindow.from_blocks(16, 2, 0, causal=True),
    LocalWindow.from_blocks(7, 2, 0, causal=True, exact_windowsize=True),
    LocalWindow.sliding(0, 0),
]


def make_qkv(B, H, T, S, d, dtype, device="cpu", hkv=None, seed=0, dv=None):
    g = torch.Generator().manual_seed(seed)
    hkv = hkv or H
    q = torch.randn(B, H, T, d, generator=g, dtype=torch.float64)
    k = torch.randn(B, hkv, S, d, generator=g, dtype=torch.float64)
    v = torch.randn(B, hkv, S, dv or d, generator=g, dtype=torch.float64)
    return [x.to(device=device, dtype=dtype).requires_grad_() for x in (q, k, v)]


def padding(B, S, device="cpu", full_row=False):
    kpm = torch.zeros(B, S, dtype=torch.bool, device=device)
    kpm[-1, -5:] = True
    kpm[0, :2] = True
    if full_row:
        kpm[0] = True  # every key of batch 0 is padding: all its rows see nothing
    return kpm


def random_layout(H, nq, nk, density=0.35, seed=0, empty_row=True):
    g = torch.Generator().manual_seed(seed)
    layout = torch.rand(H, nq, nk, generator=g) < density
    layout[:, :, 0] |= torch.rand(H, nq, generator=g) < 0.5
    if empty_row and nq > 1:
        layout[0, 1] = False
    return layout


def loss_and_grads(out, lse, inputs, seed=1):
    """A scalar using both outputs (lse where finite), and its gradients w.r.t. ``inputs``."""
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device)
    gl = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(out.device)
    lse = lse.double().masked_fill(torch.isinf(lse), 0.0)
    loss = (out.double() * go).sum() + (lse * gl).sum()
    return torch.autograd.grad(loss, inputs)


def ref_sliding(q, k, v, window, **kw):
    d = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out, lse = reference.sliding_window_attention(*d, window, **kw)
    return out, lse, d


def ref_block(q, k, v, layout, bs, **kw):
    d = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out, lse = reference.block_sparse_attention(*d, layout, bs, **kw)
    return out, lse, d
