"""FAVOR+ with the module's random features, as an explicit (T, S) kernel matrix."""

import torch

from . import merge_and_project, project_heads, reference


@reference("performer", options=dict(approx_attn_dim=8))
def performer_reference(m, query, key, value, *, key_padding_mask=None, attn_mask=None):
    q, k, v = project_heads(m, query, key, value)
    bsz, heads, tgt_len, d = q.shape
    src_len = k.shape[2]
    w = m.projection_matrix.double()

    def phi(x):  # exp(W x' - |x'|^2 / 2), x' = x d^(-1/4); no stabilisation needed in float64
        x = x * d**-0.25
        return torch.exp(x @ w.t() - 0.5 * (x * x).sum(-1, keepdim=True))

    out = torch.zeros_like(q)
    for b in range(bsz):
        for h in range(heads):
            kernel = phi(q[b, h]) @ phi(k[b, h]).t()  # (T, S)
            for i in range(tgt_len):
                for j in range(src_len):
                    if (m.causal and j > i + src_len - tgt_len) or (
                        key_padding_mask is not None and key_padding_mask[b, j]
                    ):
                        kernel[i, j] = 0.0
                if kernel[i].sum() > 0:
                    out[b, h, i] = kernel[i] @ v[b, h] / kernel[i].sum()
    return merge_and_project(m, out)
