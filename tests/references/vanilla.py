"""Exact softmax attention, one query and one head at a time."""

import math

import torch

from . import merge_and_project, project_heads, reference


@reference("vanilla")
def vanilla_reference(m, query, key, value, *, key_padding_mask=None, attn_mask=None):
    q, k, v = project_heads(m, query, key, value)
    bsz, heads, tgt_len, d = q.shape
    src_len = k.shape[2]
    group = heads // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(bsz):
        for h in range(heads):
            for i in range(tgt_len):
                scores = torch.stack([q[b, h, i] @ k[b, h // group, j] / math.sqrt(d) for j in range(src_len)])
                for j in range(src_len):
                    if m.causal and j > i + (src_len - tgt_len):
                        scores[j] = -math.inf
                    if key_padding_mask is not None and key_padding_mask[b, j]:
                        scores[j] = -math.inf
                    if attn_mask is not None:
                        am = attn_mask if attn_mask.dim() == 2 else attn_mask[b * heads + h]
                        scores[j] = (
                            -math.inf
                            if (am.dtype == torch.bool and am[i, j])
                            else scores[j] + (0 if am.dtype == torch.bool else am[i, j])
                        )
                if torch.isinf(scores).all():
                    continue  # nothing to attend to: output 0
                p = torch.exp(scores - scores.max())
                p = p / p.sum()
                out[b, h, i] = sum(p[j] * v[b, h // group, j] for j in range(src_len))
    return merge_and_project(m, out)
