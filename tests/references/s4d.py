"""S4D by its definition: explicit kernel powers and an O(L^2) convolution, in float64."""

import torch

from . import merge_and_project, project_heads, reference

ACT = {
    "gelu": torch.nn.functional.gelu,
    "relu": torch.relu,
    "silu": torch.nn.functional.silu,
    "tanh": torch.tanh,
    "identity": lambda x: x,
}


def s4d_kernel(m, which, length):
    """K[c, l] = 2 Re sum_n Cbar[c, n] exp(dt A[c, n])^l, in complex128."""
    a = -torch.exp(m.log_a_real[which].double()) + 1j * m.a_imag[which].double()
    dt = torch.exp(m.log_dt[which].double())[:, None]
    c = m.c[which].double()[..., 0] + 1j * m.c[which].double()[..., 1]
    cbar = c * (torch.exp(dt * a) - 1) / a
    lam = torch.exp(dt * a)
    return torch.stack([2 * (cbar * lam**l).sum(-1).real for l in range(length)], -1)  # (C, L)


@reference("s4d", options=dict(d_state=4))
def s4d_reference(m, query, key, value, *, key_padding_mask=None, attn_mask=None):
    q, _, _ = project_heads(m, query, query, query)
    bsz, heads, length, d = q.shape
    u = q.permute(0, 1, 3, 2).reshape(bsz, heads * d, length)  # (B, C, L) channel = h * d + i
    if key_padding_mask is not None:
        u = u.masked_fill(key_padding_mask[:, None, :], 0.0)
    kf = s4d_kernel(m, 0, length)
    kb = s4d_kernel(m, 1, length) if m.bidirectional else None
    y = torch.zeros_like(u)
    for i in range(length):
        for j in range(length):
            if j <= i:
                y[..., i] += kf[:, i - j] * u[..., j]
            elif kb is not None:
                y[..., i] += kb[:, j - i - 1] * u[..., j]
    y = ACT[m.activation](y + m.d.double()[:, None] * u)
    out = y.reshape(bsz, heads, d, length).permute(0, 1, 3, 2)
    return merge_and_project(m, out)
