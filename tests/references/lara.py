"""LARA in eval mode on the unpadded tokens of each sequence, one proposal at a time."""

import torch

from . import merge_and_project, project_heads, reference


def segments(length, num):
    """Token r of ``length`` belongs to segment floor(r * num / length); empty segments are dropped."""
    groups = [[r for r in range(length) if (r * num) // length == c] for c in range(num)]
    return [g for g in groups if g]


@reference("lara", options=dict(num_landmarks=4))
def lara_reference(m, query, key, value, *, key_padding_mask=None, attn_mask=None):
    assert not m.training
    q, k, v = project_heads(m, query, key, value)
    bsz, heads, length, d = q.shape
    out = torch.zeros_like(q)
    for b in range(bsz):
        real = [j for j in range(length) if key_padding_mask is None or not key_padding_mask[b, j]]
        for h in range(heads):
            qs, ks, vs = q[b, h, real] * d**-0.25, k[b, h, real] * d**-0.25, v[b, h, real]
            segs = segments(len(real), m.num_landmarks)
            mus = [qs[g].mean(0) + ks[g].mean(0) for g in segs]  # eval: omega = mu

            def log_xi(x, w):
                return x @ w - 0.5 * (x * x).sum(-1)

            log_w, stats = [], []
            for mu in mus:
                lk = log_xi(ks, mu)  # (L,)
                stats.append(torch.softmax(lk, 0) @ vs)
                log_w.append(qs @ mu + log_xi(qs, mu) + torch.logsumexp(lk, 0) - log_xi(mu[None], mu)[0])
            iw = torch.softmax(torch.stack(log_w), dim=0)  # (C, L) over proposals
            out[b, h, real] = iw.t() @ torch.stack(stats)
    return merge_and_project(m, out)
