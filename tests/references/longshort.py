"""Transformer-LS by its definition: one softmax over window keys and compressed memories, one query at a time."""

import math

import torch

from . import merge_and_project, project_heads, reference

OPTIONS = dict(window_size=2, num_landmarks=3, chunk_size=2, chunk_rank=1)


def _compress(m, h, ks, vs, pads):
    """Memories of one group of positions (list of (d,) tensors) for head h.

    Returns (keys, values) lists, or None if all are padded.
    """
    real = [j for j in range(len(ks)) if not pads[j]]
    if not real:
        return None
    w = m.landmark_proj[h].double()  # (d, r)
    logits = torch.stack([ks[j] @ w for j in real])  # (n, r)
    p = torch.softmax(logits, 0)
    return (
        [sum(p[t, s] * ks[j] for t, j in enumerate(real)) for s in range(w.shape[1])],
        [sum(p[t, s] * vs[j] for t, j in enumerate(real)) for s in range(w.shape[1])],
    )


def longshort_rows(m, q, k, v, key_pad=None):
    bsz, heads, n, d = q.shape
    w = m.window_size
    out = torch.zeros_like(q)
    for b in range(bsz):
        pad = [bool(key_pad[b, j]) if key_pad is not None else False for j in range(n)]
        for h in range(heads):
            ks, vs = list(k[b, h]), list(v[b, h])
            if not m.causal:
                mem = _compress(m, h, ks, vs, pad)
                chunk_mem = None
            else:
                l = m.chunk_size
                chunk_mem = [
                    _compress(m, h, ks[c * l : (c + 1) * l], vs[c * l : (c + 1) * l], pad[c * l : (c + 1) * l])
                    for c in range(n // l)
                ]
            for i in range(n):
                keys, vals = [], []
                for j in range(n):
                    lo, hi = i // w - 1, i // w + (0 if m.causal else 1)
                    if lo <= j // w <= hi and not pad[j] and not (m.causal and j > i):
                        keys.append(ks[j])
                        vals.append(vs[j])
                if not m.causal:
                    mems = [mem] if mem is not None else []
                else:
                    c = i // m.chunk_size
                    mems = [
                        chunk_mem[cc]
                        for cc in range(max(0, c - m.num_landmarks // m.chunk_rank), c)
                        if chunk_mem[cc] is not None
                    ]
                for mk, mv in mems:
                    keys += mk
                    vals += mv
                if not keys:
                    continue
                p = torch.softmax(torch.stack([q[b, h, i] @ kk / math.sqrt(d) for kk in keys]), 0)
                out[b, h, i] = sum(p[t] * vals[t] for t in range(len(keys)))
    return out


def longshort_reference(m, query, key, value, *, key_padding_mask=None, attn_mask=None):
    q, k, v = project_heads(m, query, key, value)
    return merge_and_project(m, longshort_rows(m, q, k, v, key_padding_mask))


for _name in ("longshort", "attention_ls", "causal_ls"):
    reference(_name, options=OPTIONS)(longshort_reference)
