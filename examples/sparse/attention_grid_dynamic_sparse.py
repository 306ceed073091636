"""AttentionGrid's dynamic sparse attention API (documented, no example in its README).

Original import: ``from AttentionGrid import dynamic_sparse_attention``.
"""

import torch

from efficient_attention.compat.attention_grid import dynamic_sparse_attention

BATCH, N_CTX, H, D_HEAD = 2, 512, 4, 64
q = torch.randn(BATCH, N_CTX, H, D_HEAD)
k = torch.randn(BATCH, N_CTX, H, D_HEAD)
v = torch.randn(BATCH, N_CTX, H, D_HEAD)

# hash-sparse: bucket ids per (batch, position, head)
q_idx = torch.randint(0, 8, (BATCH, N_CTX, H))
k_idx = torch.randint(0, 8, (BATCH, N_CTX, H))
out_hash = dynamic_sparse_attention(q, k, v, q_idx, k_idx, sparsity_mode="hash")

# qk-sparse: keep flags (float 1 = kept) per (batch, position, head)
q_keep = (torch.rand(BATCH, N_CTX, H) > 0.3).float()
k_keep = (torch.rand(BATCH, N_CTX, H) > 0.3).float()
out_qk = dynamic_sparse_attention(q, k, v, q_keep, k_keep, sparsity_mode="qk")

print(out_hash.shape, out_qk.shape)  # (2, 512, 4, 64) twice
