"""ABC: for every query, build the memory of the keys it may see and attend over its slots."""

import math

import torch

from . import merge_and_project, project_heads, reference


@reference("abc", options=dict(num_landmarks=5))
def abc_reference(m, query, key, value, *, key_padding_mask=None, attn_mask=None):
    q, k, v = project_heads(m, query, key, value)
    bsz, heads, tgt_len, d = q.shape
    src_len = k.shape[2]
    w = m.landmark_proj.double()  # (H, n, d)
    out = torch.zeros_like(q)
    rows = torch.arange(tgt_len, device=q.device)[:, None]
    cols = torch.arange(src_len, device=q.device)[None, :]
    for b in range(bsz):
        visible = (
            ~(cols > rows + src_len - tgt_len)
            if m.causal
            else torch.ones(tgt_len, src_len, dtype=torch.bool, device=q.device)
        )
        if key_padding_mask is not None:
            visible = visible & ~key_padding_mask[b][None, :]
        for h in range(heads):
            for i in range(tgt_len):
                seen = visible[i].nonzero().flatten()
                if len(seen) == 0:
                    continue
                ks, vs = k[b, h, seen], v[b, h, seen]
                alpha = torch.softmax(ks @ w[h].t(), dim=0)  # (|seen|, n): normalised over keys, per slot
                mem_k, mem_v = alpha.t() @ ks, alpha.t() @ vs  # (n, d)
                p = torch.softmax(mem_k @ q[b, h, i] / math.sqrt(d), dim=0)
                out[b, h, i] = p @ mem_v
    return merge_and_project(m, out)
