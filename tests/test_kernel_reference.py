"""The reference paths of the sparse ops against dense masked float64 attention."""

import pytest
import torch

from efficient_attention.functional import dense_attention
from efficient_attention.kernels.reference import block_sparse_attention, sliding_window_attention
from efficient_attention.local_window import LocalWindow


def _dense(q, k, v, blocked, kpm=None):
    mask = blocked[None, None] if blocked.dim() == 2 else blocked[None] if blocked.dim() == 3 else blocked
    if kpm is not None:
        mask = mask | kpm[:, None, None, :]
    out, probs = dense_attention(q, k, v, mask)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(scores.masked_fill(mask, float("-inf")), -1)
    return out, lse


WINDOWS = [
    LocalWindow.from_blocks(4, 1, 1),
    LocalWindow.from_blocks(4, 1, 0, causal=True),
    LocalWindow.from_blocks(3, 2, 0, causal=True, exact_windowsize=True),
    LocalWindow.sliding(5, 2),
    LocalWindow.sliding(0, 0),
]


def test_exclude_self_hides_only_the_diagonal():
    plain = LocalWindow.from_blocks(4, 1, 1).dense_mask(13, 13)
    shared = LocalWindow.from_blocks(4, 1, 1, exclude_self=True).dense_mask(13, 13)
    assert torch.equal(shared, plain | torch.eye(13, dtype=torch.bool))


@pytest.mark.parametrize(
    "window",
    [
        LocalWindow.from_blocks(4, 1, 1, exclude_self=True),
        LocalWindow.from_blocks(3, 1, 0, causal=True, exclude_self=True),
    ],
    ids=str,
)
def test_sliding_window_excluding_self_matches_dense(window):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 19, 8, generator=g, dtype=torch.float64) for _ in range(3))
    out, lse = sliding_window_attention(q, k, v, window)
    ref, ref_lse = _dense(q, k, v, window.dense_mask(19, 19))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)
    if window.causal:  # the first query sees nothing but itself: an empty row, lse -inf, output 0
        assert torch.isneginf(lse[..., 0]).all() and (out[..., 0, :] == 0).all()


@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("q_offset", [0, 5])
def test_sliding_window_matches_dense(window, q_offset):
    g = torch.Generator().manual_seed(0)
    B, H, S, d = 2, 3, 19, 8
    T = S - q_offset
    q = torch.randn(B, H, T, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, H, S, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, H, S, d, generator=g, dtype=torch.float64, requires_grad=True)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1, -4:] = True
    out, lse = sliding_window_attention(q, k, v, window, q_offset=q_offset, key_padding_mask=kpm)
    ref, ref_lse = _dense(q, k, v, window.dense_mask(T, S, q_offset), kpm)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)
    assert (
        torch.autograd.gradcheck(
            lambda q, k, v: sliding_window_attention(q, k, v, window, key_padding_mask=kpm[1:])[0],
            (
                q[1:, :1, :7].detach().requires_grad_(),
                k[1:, :1].detach().requires_grad_(),
                v[1:, :1].detach().requires_grad_(),
            ),
        )
        if q_offset == 0
        else True
    )


@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("order", ["ascending", "any"])
def test_sliding_window_rows_at_their_own_positions_match_dense(window, order):
    """``q_pos``: each query row at its own position (gathered rows, repeats, position 0, GQA k/v heads, chunks of
    rows whose positions span most keys; the reference needs no order) against the dense mask of those positions."""
    g = torch.Generator().manual_seed(1)
    B, H, T, S, d = 2, 4, 23, 40, 8
    q = torch.randn(B, H, T, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, 2, S, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, 2, S, d, generator=g, dtype=torch.float64, requires_grad=True)
    pos = torch.randint(0, S, (B, H, T), generator=g)
    pos[:, :, :2] = 0
    pos[0, 1, 5:9] = 17
    if order == "ascending":
        pos = pos.sort(-1).values
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1, -4:] = True
    out, lse = sliding_window_attention(q, k, v, window, key_padding_mask=kpm, q_pos=pos.int(), chunk=8)
    blocked = ~window.allowed(pos[..., None], torch.arange(S))  # (B, H, T, S)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    ref, ref_lse = _dense(q, kk, vv, blocked | kpm[:, None, None, :])
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)
    grads = torch.autograd.grad((out * ref.detach()).sum(), (q, k, v))
    want = torch.autograd.grad((ref * ref.detach()).sum(), (q, k, v))
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [(32, 32), (29, 29), (16, 40)])
def test_block_sparse_matches_dense(causal, lengths):
    g = torch.Generator().manual_seed(1)
    T, S = lengths
    B, H, d, bs = 2, 3, 8, 8
    nq, nk = -(-T // bs), -(-S // bs)
    layout = torch.rand(H, nq, nk, generator=g) < 0.5
    layout[:, :, 0] = True
    layout[1, 1] = False  # an empty row: its queries see nothing -> 0
    q = torch.randn(B, H, T, d, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, S, d, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, S, d, generator=g, dtype=torch.float64)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0, :3] = True
    out, lse = block_sparse_attention(q, k, v, layout, bs, causal=causal, key_padding_mask=kpm)
    blocked = ~layout.repeat_interleave(bs, 1).repeat_interleave(bs, 2)[:, :T, :S]
    if causal:
        blocked = blocked | (torch.arange(S)[None, None, :] > torch.arange(T)[None, :, None] + (S - T))
    ref, ref_lse = _dense(q, k, v, blocked, kpm)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)


def test_block_sparse_rejects_bad_layout():
    q = torch.randn(1, 2, 16, 4)
    with pytest.raises(ValueError, match="layout must have shape"):
        block_sparse_attention(q, q, q, torch.ones(2, 3, 2, dtype=torch.bool), 8)
    with pytest.raises(ValueError, match="layout must be bool"):
        block_sparse_attention(q, q, q, torch.full((2, 2, 2), 0.5), 8)


@pytest.mark.parametrize("window", WINDOWS[:3], ids=str)
def test_sliding_window_half_inputs_of_large_magnitude_stay_finite(window):
    """Scaled before the product and formed in fp32: fp16 scores of inputs x100 would overflow to inf (then NaN)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = ((torch.randn(1, 2, 30, 32, generator=g) * 100).half() for _ in range(3))
    out, lse = sliding_window_attention(q, k, v, window)
    want, want_lse = sliding_window_attention(q.double(), k.double(), v.double(), window)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-3, rtol=1e-5)  # fp32 scores: exact to fp32 rounding
    torch.testing.assert_close(out.double(), want, atol=0.1, rtol=1e-2)  # (out rounded to fp16: ~0.06 at 100)


@pytest.mark.parametrize("chunk", [None, 3, 6])
@pytest.mark.parametrize("window", WINDOWS, ids=str)
def test_sliding_window_band_width_is_static_and_exact(window, chunk):
    """The keys a chunk needs come from Python ints (LocalWindow.chunk_span, no tensor, no host sync, nothing
    data-dependent for Dynamo), equal to the widest chunk's band; compiled in one graph, the path gives the same."""
    chunk_len = chunk or (window.group if window.group > 1 else max(16, window.left + window.right))
    for q_offset, n_chunks in ((0, 7), (5, 4), (11, 1)):
        first = q_offset + chunk_len * torch.arange(n_chunks)
        widest = (window.hi(first + chunk_len - 1) - window.lo(first)).max().item() + 1
        assert window.chunk_span(q_offset, chunk_len, n_chunks) == widest
    q, k, v = (torch.randn(1, 2, 23, 8) for _ in range(3))
    torch._dynamo.reset()
    compiled = torch.compile(sliding_window_attention, fullgraph=True, backend="eager")
    for got, want in zip(
        compiled(q, k, v, window, chunk=chunk), sliding_window_attention(q, k, v, window, chunk=chunk)
    ):
        torch.testing.assert_close(got, want)
