"""Block-local softmax attention, one query and one head at a time (rule written out from the blocks)."""

import math

import torch

from . import merge_and_project, project_heads, reference


def visible(i, j, n, *, wsize, look_backward, look_forward, causal, exact):
    """Whether query ``i`` may see key ``j`` of an ``n``-long sequence (ignoring shared_qk)."""
    if not 0 <= j < n:
        return False
    if causal and j > i:
        return False
    if exact:
        return i - wsize * look_backward <= j <= i + wsize * look_forward
    return i // wsize - look_backward <= j // wsize <= i // wsize + look_forward


def local_rows(q, k, v, *, wsize, look_backward, look_forward, causal, exact, shared_qk, key_pad=None, scale=None):
    """Per-head local attention ``(B, H, N, d)`` (key_pad: ``(B, N)`` True = padded)."""
    bsz, heads, n, d = q.shape
    scale = 1 / math.sqrt(d) if scale is None else scale
    if shared_qk:
        k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    out = torch.zeros(bsz, heads, n, v.shape[-1], dtype=q.dtype, device=q.device)
    for b in range(bsz):
        for h in range(heads):
            for i in range(n):
                js = [
                    j
                    for j in range(n)
                    if visible(
                        i,
                        j,
                        n,
                        wsize=wsize,
                        look_backward=look_backward,
                        look_forward=look_forward,
                        causal=causal,
                        exact=exact,
                    )
                    and not (key_pad is not None and key_pad[b, j])
                ]
                if shared_qk:
                    others = [j for j in js if j != i]
                    js = others if others else js
                if not js:
                    continue
                scores = torch.stack([q[b, h, i] @ k[b, h, j] * scale for j in js])
                p = torch.softmax(scores, 0)
                out[b, h, i] = sum(p[t] * v[b, h, j] for t, j in enumerate(js))
    return out


@reference("local", options=dict(wsize=3, look_backward=1), tgt_len=11, src_len=11)
def local_reference(m, query, key, value, *, key_padding_mask=None, attn_mask=None):
    q, k, v = project_heads(m, query, key, value)
    out = local_rows(
        q,
        k,
        v,
        wsize=m.wsize,
        look_backward=m.look_backward,
        look_forward=m.look_forward,
        causal=m.causal,
        exact=m.exact_windowsize,
        shared_qk=m.shared_qk,
        key_pad=key_padding_mask,
    )
    return merge_and_project(m, out)
