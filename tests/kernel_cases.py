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


# -- per-row query positions (q_pos): gathered rows, as ProbSparse's active queries ---------------------------------
def row_positions(B, H, T, S, kind, device="cpu", seed=0):
    """Nondecreasing int32 positions ``(B, H, T)`` in ``[0, S)`` of one of these kinds:

    * ``"spread"``: random distinct-ish positions, so a query tile holds rows of very different positions;
    * ``"repeats"``: few values, each repeated over many rows (tiles of one position, ties across tiles);
    * ``"fillers"``: ProbSparse's order: a head-dependent run of rows at position 0 (the fillers), then the active
      rows ascending (mostly early, as the running top-u keeps them);
    * ``"early"``: every position in the first quarter of the keys (the later key blocks see no row);
    * ``"edges"``: positions on key-tile edges only (``32 i`` and ``32 i - 1``), repeated: rows whose band ends or
      starts exactly at a key tile's first or last key, at a query tile's first or last row (the dk/dv kernel's
      search bounds).
    """
    g = torch.Generator().manual_seed(seed)
    if kind == "spread":
        pos = torch.randint(0, S, (B, H, T), generator=g)
    elif kind == "repeats":
        pos = torch.randint(0, 4, (B, H, T), generator=g) * (S // 5)
    elif kind == "fillers":
        active = (torch.rand(B, H, T, generator=g) ** 3 * S).long()
        fillers = torch.arange(T)[None, None] < torch.randint(0, T // 2 + 1, (B, H, 1), generator=g)
        pos = torch.where(fillers, 0, active)
    elif kind == "early":
        pos = torch.randint(0, max(S // 4, 1), (B, H, T), generator=g)
    elif kind == "edges":
        edges = torch.arange(1, S // 32 + 1) * 32
        edges = torch.cat([edges, edges - 1]).clamp(max=S - 1)
        pos = edges[torch.randint(0, edges.numel(), (B, H, T), generator=g)]
    else:
        raise ValueError(f"kind must be spread, repeats, fillers, early or edges, got {kind!r}")
    pos = pos.sort(-1).values
    pos[0, 0, : min(3, T)] = 0  # rows at position 0 (the causal band: the first key only)
    return pos.to(device=device, dtype=torch.int32)


def ref_positions(q, k, v, window, q_pos, key_padding_mask=None, scale=None):
    """Float64 explicit softmax of rows at positions ``q_pos``: a dense ``(B, H, T, S)`` mask from ``window``'s rule
    (keys a row cannot see, padding), ``out = 0`` and ``lse = -inf`` where a row sees nothing.  Returns
    ``(out, lse, [q, k, v] float64 leaves)``; k, v may have fewer heads (GQA)."""
    d = [x.detach().double().requires_grad_() for x in (q, k, v)]
    qd, kd, vd = d
    rep = qd.shape[1] // kd.shape[1]
    kd, vd = kd.repeat_interleave(rep, 1), vd.repeat_interleave(rep, 1)
    keys = torch.arange(kd.shape[2], device=qd.device)
    seen = window.allowed(q_pos.long()[..., None], keys)  # (B, H, T, S)
    if key_padding_mask is not None:
        seen = seen & ~key_padding_mask[:, None, None, :]
    scale = qd.shape[-1] ** -0.5 if scale is None else scale
    scores = (qd @ kd.transpose(-1, -2) * scale).masked_fill(~seen, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    return probs @ vd, lse, d
