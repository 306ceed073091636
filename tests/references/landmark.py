"""Landmark attention from the paper's formula, one query at a time."""

import math

import torch

from . import merge_and_project, project_heads, reference

BLOCK = 4


def landmark_loop(q, k, v, is_mem, *, top_k=None, key_padding_mask=None, scale=None):
    """q (B, H, T, d) at the last T of S positions; is_mem (S,) bool; float64 loops."""
    bsz, heads, tgt_len, d = q.shape
    src_len = k.shape[2]
    group = heads // k.shape[1]
    scale = 1 / math.sqrt(d) if scale is None else scale
    blk = [int(is_mem[:j].sum()) for j in range(src_len)]
    out = torch.zeros(bsz, heads, tgt_len, v.shape[-1], dtype=q.dtype, device=q.device)
    for b in range(bsz):
        ok = [not (key_padding_mask is not None and key_padding_mask[b, j]) for j in range(src_len)]
        for h in range(heads):
            for t in range(tgt_len):
                i = t + src_len - tgt_len
                sc = [float((q[b, h, t] @ k[b, h // group, j]).detach()) * scale for j in range(src_len)]
                own = [j for j in range(i + 1) if ok[j] and blk[j] == blk[i] and (not is_mem[j] or j == i)]
                marks = [j for j in range(src_len) if ok[j] and is_mem[j] and blk[j] < blk[i]]
                if top_k is not None:
                    marks = sorted(marks, key=lambda j: sc[j], reverse=True)[:top_k]
                group_ = own + marks
                if not group_:
                    continue
                mx = max(sc[j] for j in group_)
                z = sum(math.exp(sc[j] - mx) for j in group_)
                acc = sum(math.exp(sc[j] - mx) / z * v[b, h // group, j] for j in own) if own else 0
                for L in marks:
                    toks = [j for j in range(src_len) if ok[j] and blk[j] == blk[L] and not is_mem[j]]
                    if not toks:
                        continue
                    m2 = max(sc[j] for j in toks)
                    zz = sum(math.exp(sc[j] - m2) for j in toks)
                    acc = acc + sum(
                        math.exp(sc[L] - mx) / z * math.exp(sc[j] - m2) / zz * v[b, h // group, j] for j in toks
                    )
                out[b, h, t] = acc
    return out


@reference("landmark", options=dict(block_size=BLOCK), tgt_len=13)
def landmark_reference(m, query, key, value, *, key_padding_mask=None, attn_mask=None):
    q, k, v = project_heads(m, query, key, value)
    is_mem = [(j + 1) % m.block_size == 0 for j in range(k.shape[2])]
    out = landmark_loop(
        q, k, v, torch.tensor(is_mem, device=q.device), top_k=m.top_k or None, key_padding_mask=key_padding_mask
    )
    return merge_and_project(m, out)
