"""A length that is not a multiple of the window, with autopad=True, as in the local-attention README."""

import torch

from efficient_attention.compat.local_attention import LocalAttention

q = torch.randn((8, 2057, 64))
k = torch.randn((8, 2057, 64))
v = torch.randn((8, 2057, 64))

attn = LocalAttention(
    window_size=512,
    causal=True,
    autopad=True,  # auto pads both inputs and mask, then truncates output appropriately
)

mask = torch.ones((1, 2057)).bool()
out = attn(q, k, v, mask=mask)  # (8, 2057, 64)
print(tuple(out.shape))
