"""OpenAI sparse_attention's README example, with only the import line changed.

Original: ``from attention import attention_impl, blocksparse_attention_impl`` (TensorFlow).
The tensors are (batch, time, heads * dim).
"""

import torch

from efficient_attention.compat.openai import attention_impl, blocksparse_attention_impl

n_batch, n_ctx, n_embd = 2, 1024, 256
q = torch.randn(n_batch, n_ctx, n_embd)
k = torch.randn(n_batch, n_ctx, n_embd)
v = torch.randn(n_batch, n_ctx, n_embd)

# --- the README's lines, verbatim ---
full_attn_tf = attention_impl(q, k, v, heads=4, attn_mode="all", recompute=True)
full_attn_bs = blocksparse_attention_impl(q, k, v, heads=4, attn_mode="all", recompute=True)

# first step of strided attention
local_attn_bs = blocksparse_attention_impl(q, k, v, heads=4, attn_mode="local", local_attn_ctx=32, recompute=True)
local_attn_tf = attention_impl(q, k, v, heads=4, attn_mode="local", local_attn_ctx=32, recompute=True)

# second step of strided attention
strided_attn_bs = blocksparse_attention_impl(q, k, v, heads=4, attn_mode="strided", local_attn_ctx=32, recompute=True)
strided_attn_tf = attention_impl(q, k, v, heads=4, attn_mode="strided", local_attn_ctx=32, recompute=True)

# # the 'fixed' attention pattern
fixed = blocksparse_attention_impl(
    q, k, v, heads=4, attn_mode="fixed", local_attn_ctx=128, num_verts=4, vertsize=1, recompute=True
)
# --- end ---

for name, a, b in (
    ("all", full_attn_tf, full_attn_bs),
    ("local", local_attn_tf, local_attn_bs),
    ("strided", strided_attn_tf, strided_attn_bs),
):
    print(f"{name:8s} dense vs block-sparse max |diff| = {(a - b).abs().max().item():.2e}")
print("fixed   ", tuple(fixed.shape))
