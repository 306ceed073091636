"""Shared query/key local attention (Reformer-style), as in the local-attention README."""

import torch

from efficient_attention.compat.local_attention import LocalAttention

qk = torch.randn((2, 8, 2048, 64))
v = torch.randn((2, 8, 2048, 64))

attn = LocalAttention(dim=64, window_size=512, shared_qk=True, causal=True)

mask = torch.ones((2, 2048)).bool()
out = attn(qk, qk, v, mask=mask)  # (2, 8, 2048, 64)
print(tuple(out.shape))
