"""The LocalTransformer example of the local-attention README, plus generation with the key/value cache.

The README's sizes (dim 512, depth 6, 8192 tokens) take about a minute on a 2-core CPU;
pass --small for a quick run.
"""

import sys

import torch

from efficient_attention.compat.local_attention import LocalTransformer

small = "--small" in sys.argv
model = LocalTransformer(
    num_tokens=256,
    dim=128 if small else 512,
    depth=2 if small else 6,
    max_seq_len=1024 if small else 8192,
    causal=True,
    local_attn_window_size=64 if small else 256,
).eval()

x = torch.randint(0, 256, (1, 1024 if small else 8192))

with torch.no_grad():
    logits = model(x)  # (1, 8192, 256)
print(tuple(logits.shape))

sampled = model.generate(x[:, :16], 32, temperature=1.0, filter_thres=0.9)  # (1, 32), one cached step per token
print(tuple(sampled.shape))
