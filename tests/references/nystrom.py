"""Nyströmformer on the unpadded tokens of each sequence, one head at a time."""

import math

import torch

from . import merge_and_project, project_heads, reference
from .lara import segments


def newton_schulz_pinv(a, iterations):
    """The paper's iteration: Z0 = A^T / (|A|_1 |A|_inf), Z <- Z (13 I - AZ (15 I - AZ (7 I - AZ))) / 4."""
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    z = a.t() / (a.abs().sum(0).max() * a.abs().sum(1).max())
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


@reference("nystrom", options=dict(num_landmarks=4, conv_kernel_size=3))
def nystrom_reference(m, query, key, value, *, key_padding_mask=None, attn_mask=None):
    q, k, v = project_heads(m, query, key, value)
    bsz, heads, length, d = q.shape
    out = torch.zeros_like(q)
    for b in range(bsz):
        real = [j for j in range(length) if key_padding_mask is None or not key_padding_mask[b, j]]
        for h in range(heads):
            qs, ks, vs = q[b, h, real], k[b, h, real], v[b, h, real]
            if len(real) <= m.num_landmarks:  # exact softmax attention
                out[b, h, real] = torch.softmax(qs @ ks.t() / math.sqrt(d), dim=-1) @ vs
            else:
                segs = segments(len(real), m.num_landmarks)
                q_land = torch.stack([qs[g].mean(0) for g in segs])
                k_land = torch.stack([ks[g].mean(0) for g in segs])
                f = torch.softmax(qs @ k_land.t() / math.sqrt(d), dim=-1)
                a = torch.softmax(q_land @ k_land.t() / math.sqrt(d), dim=-1)
                bm = torch.softmax(q_land @ ks.t() / math.sqrt(d), dim=-1)
                out[b, h, real] = f @ newton_schulz_pinv(a, m.pinv_iterations) @ bm @ vs
            if m.conv is not None:  # depthwise convolution of the (zero-padded) values along the sequence
                w = m.conv.weight.double()[h, 0, :, 0]
                half = w.shape[0] // 2
                vz = torch.zeros(length, d, dtype=v.dtype, device=v.device)
                vz[real] = vs
                for i in real:
                    for t in range(w.shape[0]):
                        if 0 <= i + t - half < length:
                            out[b, h, i] += w[t] * vz[i + t - half]
    return merge_and_project(m, out)
