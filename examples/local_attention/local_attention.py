"""The first example of the local-attention README, with only the import changed (torch instead of mindspore ops)."""

import torch

from efficient_attention.compat.local_attention import LocalAttention

q = torch.randn((2, 8, 2048, 64))
k = torch.randn((2, 8, 2048, 64))
v = torch.randn((2, 8, 2048, 64))

attn = LocalAttention(
    dim=64,  # dimension of each head (you need to pass this in for relative positional encoding)
    window_size=512,  # window size. 512 is optimal, but 256 or 128 yields good enough results
    causal=True,  # auto-regressive or not
    look_backward=1,  # each window looks at the window before
    look_forward=0,  # for non-auto-regressive case, will default to 1, so each window looks at the window
    # before and after it
    dropout=0.1,  # post-attention dropout
    exact_windowsize=False,  # if this is set to true, in the causal setting, each query will see at maximum the
    # number of keys equal to the window size
)

mask = torch.ones((2, 2048)).bool()
out = attn(q, k, v, mask=mask)  # (2, 8, 2048, 64)
print(tuple(out.shape))
