"""Dense masked float64 attention: the reference every sparse functional is checked against."""

import torch


def dense_reference(q, k, v, allowed, scale=None):
    """q (B, H, T, d), k/v (B, Hkv, S, d), allowed broadcastable to (B, H, T, S) (True = attend).

    Computed in float64; a row with nothing allowed gives 0.
    """
    heads = q.shape[1]
    k = k.double().repeat_interleave(heads // k.shape[1], 1)
    v = v.double().repeat_interleave(heads // v.shape[1], 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.double() @ k.transpose(-1, -2)) * scale
    allowed = allowed.expand_as(s)
    s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m) * allowed
    den = e.sum(-1, keepdim=True)
    p = e / torch.where(den == 0, torch.ones_like(den), den)
    return p @ v


def causal(T, S):
    return torch.arange(S)[None, :] <= torch.arange(T)[:, None] + (S - T)


def rand_qkv(B, H, T, S, d, Hkv=None, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    Hkv = H if Hkv is None else Hkv
    q = torch.randn(B, H, T, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hkv, S, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, S, d, generator=g, dtype=torch.float64).to(dtype)
    return tuple(x.requires_grad_(requires_grad) for x in (q, k, v))
