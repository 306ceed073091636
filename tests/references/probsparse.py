"""ProbSparse by its definition, one query and one head at a time (sampled key indices from the module)."""

import math

import torch

from . import merge_and_project, project_heads, reference


def _log_count(factor, n):
    return max(1, min(n, factor * math.ceil(math.log(n))))


def probsparse_rows(m, q, k, v, key_pad=None):
    bsz, heads, n, d = q.shape
    pos = torch.arange(n, device=q.device)
    n_vis = pos + 1 if m.causal else torch.full((n,), n, device=q.device)
    count = _log_count(m.factor, int(n_vis.max()))
    idx = m.sample_keys(pos, n_vis, count)
    out = torch.zeros_like(q)
    for b in range(bsz):
        pad = key_pad[b] if key_pad is not None else torch.zeros(n, dtype=torch.bool, device=q.device)
        for h in range(heads):
            scores = (q[b, h] @ k[b, h].T) / math.sqrt(d)
            sparsity = []
            for i in range(n):
                used = [int(j) for j in idx[i, : _log_count(m.factor, int(n_vis[i]))] if not pad[int(j)]]
                val = scores[i, used].max() - scores[i, used].mean() if used and not pad[i] else -math.inf
                sparsity.append(float(val.detach()) if torch.is_tensor(val) else val)
            if m.causal:
                active = [
                    sum(sparsity[j] > sparsity[i] for j in range(i)) < _log_count(m.factor, i + 1) for i in range(n)
                ]
            else:
                top = sorted(range(n), key=lambda i: -sparsity[i])[: _log_count(m.factor, n)]
                active = [i in top and sparsity[i] > -math.inf for i in range(n)]
            for i in range(n):
                vis = [j for j in range(n) if not pad[j] and (not m.causal or j <= i)]
                if not vis:
                    continue
                if active[i]:
                    p = torch.softmax(scores[i, vis], 0)
                    out[b, h, i] = sum(p[t] * v[b, h, j] for t, j in enumerate(vis))
                else:
                    out[b, h, i] = sum(v[b, h, j] for j in vis) / len(vis)
    return out


@reference("probsparse", options=dict(factor=1))
def probsparse_reference(m, query, key, value, *, key_padding_mask=None, attn_mask=None):
    q, k, v = project_heads(m, query, key, value)
    return merge_and_project(m, probsparse_rows(m, q, k, v, key_padding_mask))
