"""cosFormer as an explicit (T, S) matrix of act(q)·act(k) cos(π (p_i - p_j) / 2M)."""

import math

import torch
import torch.nn.functional as F

from . import merge_and_project, project_heads, reference


def cosformer_scores(m, q, k, padding=None):
    """(T, S) re-weighted similarities of one head, with M and the positions the module uses.

    ``padding`` (S,) bool: without ``max_len``, positions count the real keys only and M is the longer
    of the real lengths (self attention: the queries are the same tokens as the last T keys).
    """
    tgt_len, src_len = q.shape[0], k.shape[0]
    act = F.relu if m.act_fun == "relu" else (lambda x: 1 + F.elu(x))
    i = torch.arange(tgt_len, dtype=q.dtype, device=q.device)[:, None]
    j = torch.arange(src_len, dtype=q.dtype, device=q.device)[None, :]
    big_m = m.max_len or max(tgt_len, src_len)
    if m.max_len is None and padding is not None:
        real = int((~padding).sum())
        rank = (torch.cumsum((~padding).to(q.dtype), 0) - 1).clamp_min(0)
        j = rank[None, :]
        if m.cross:
            big_m = max(tgt_len, real, 1)
        else:
            i, big_m = rank[src_len - tgt_len :, None], max(real, 1)
    return (act(q) @ act(k).t()) * torch.cos(math.pi * (i - j) / (2 * big_m))


# max_len fixes M so that causal decoding is possible; "elu" because with relu a query whose every
# product with the keys is exactly 0 outputs 0, and half-precision rounding can flip such a zero
# (tests/test_cosformer.py checks relu and max_len=None against this reference in float64)
@reference("cosformer", options=dict(max_len=64, act_fun="elu"))
def cosformer_reference(m, query, key, value, *, key_padding_mask=None, attn_mask=None):
    q, k, v = project_heads(m, query, key, value)
    bsz, heads, tgt_len, _ = q.shape
    src_len = k.shape[2]
    out = torch.zeros_like(q)
    for b in range(bsz):
        for h in range(heads):
            s = cosformer_scores(m, q[b, h], k[b, h], None if key_padding_mask is None else key_padding_mask[b])
            for i in range(tgt_len):
                for j in range(src_len):
                    if (m.causal and j > i + src_len - tgt_len) or (
                        key_padding_mask is not None and key_padding_mask[b, j]
                    ):
                        s[i, j] = 0.0
                if s[i].sum() > 0:
                    out[b, h, i] = s[i] @ v[b, h] / s[i].sum()
    return merge_and_project(m, out)
