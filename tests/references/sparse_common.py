"""Shared loop for the sparse references: exact attention over an explicit allowed(b, h, i, j) set."""

import math

import torch

from . import merge_and_project, project_heads


def allowed_attention(q, k, v, allowed, *, scale=None, key_padding_mask=None):
    """Per-head float64 loop: query i attends the keys j with allowed(b, h, i, j) and not padded."""
    bsz, heads, tgt_len, d = q.shape
    src_len = k.shape[2]
    group = heads // k.shape[1]
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(bsz, heads, tgt_len, v.shape[-1], dtype=q.dtype, device=q.device)
    for b in range(bsz):
        for h in range(heads):
            for i in range(tgt_len):
                js = [
                    j
                    for j in range(src_len)
                    if allowed(b, h, i, j) and not (key_padding_mask is not None and key_padding_mask[b, j])
                ]
                if not js:
                    continue
                s = torch.stack([q[b, h, i] @ k[b, h // group, j] * scale for j in js])
                p = torch.softmax(s, 0)
                out[b, h, i] = sum(p[n] * v[b, h // group, j] for n, j in enumerate(js))
    return out


def module_reference(m, query, key, value, allowed, key_padding_mask=None):
    """Project with the module's weights, run :func:`allowed_attention` (causal offset applied), project out."""
    q, k, v = project_heads(m, query, key, value)
    off = k.shape[2] - q.shape[2]

    def rule(b, h, i, j):
        return (not m.causal or j <= i + off) and allowed(b, h, i + off, j)

    return merge_and_project(m, allowed_attention(q, k, v, rule, key_padding_mask=key_padding_mask))
