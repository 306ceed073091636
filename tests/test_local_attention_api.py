"""The lucidrains-style per-head API: efficient_attention.compat.local_attention (README 002 examples, small sizes)."""

import pytest
import torch
from references.local import local_rows

from efficient_attention.compat.local_attention import LocalAttention, LocalTransformer


def _rope(x, pos, dim, zeta_power=None):
    """Independent rotary: feature pairs (i, i + dim/2) rotated by pos * 10000^(-2i/dim)."""
    half = dim // 2
    theta = 10000.0 ** (-torch.arange(half, dtype=torch.float64) * 2 / dim)
    ang = pos.double()[:, None] * theta[None]
    a, b = x[..., :half], x[..., half:dim]
    out = torch.cat([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()], -1)
    if zeta_power is not None:
        zeta = (torch.arange(0, dim, 2, dtype=torch.float64) + 0.4 * dim) / (1.4 * dim)
        out = out * torch.cat([zeta, zeta])[None] ** zeta_power[:, None]
    return torch.cat([out, x[..., dim:]], -1)


def _qkv(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(3))


def test_readme_example_causal_with_rotary():
    q, k, v = _qkv(2, 3, 48, 8)
    attn = LocalAttention(
        dim=8, window_size=16, causal=True, look_backward=1, look_forward=0, dropout=0.1, exact_windowsize=False
    ).eval()
    mask = torch.ones((2, 48)).bool()
    mask[1, -5:] = False
    out = attn(q, k, v, mask=mask)
    assert out.shape == (2, 3, 48, 8)
    pos = torch.arange(48)
    expected = local_rows(
        _rope(q, pos, 8).reshape(6, 1, 48, 8),
        _rope(k, pos, 8).reshape(6, 1, 48, 8),
        v.reshape(6, 1, 48, 8),
        wsize=16,
        look_backward=1,
        look_forward=0,
        causal=True,
        exact=False,
        shared_qk=False,
        key_pad=(~mask).repeat_interleave(3, 0),
    )
    torch.testing.assert_close(out, expected.reshape(2, 3, 48, 8))


def test_readme_example_shared_qk():
    qk, v, _ = _qkv(2, 3, 32, 8, seed=1)
    attn = LocalAttention(dim=8, window_size=8, shared_qk=True, causal=True, use_rotary_pos_emb=False)
    out = attn(qk, qk, v, mask=torch.ones((2, 32)).bool())
    expected = local_rows(
        qk.reshape(6, 1, 32, 8),
        qk.reshape(6, 1, 32, 8),
        v.reshape(6, 1, 32, 8),
        wsize=8,
        look_backward=1,
        look_forward=0,
        causal=True,
        exact=False,
        shared_qk=True,
    )
    torch.testing.assert_close(out, expected.reshape(2, 3, 32, 8))
    # the first token sees only itself: it attends to itself
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0])


def test_readme_example_autopad_three_dims_and_shared_mask():
    q, k, v = _qkv(4, 37, 8, seed=2)
    attn = LocalAttention(window_size=8, causal=True, autopad=True)
    mask = torch.ones((1, 37)).bool()
    mask[0, 3] = False
    out = attn(q, k, v, mask=mask)
    assert out.shape == (4, 37, 8)
    expected = local_rows(
        q[:, None],
        k[:, None],
        v[:, None],
        wsize=8,
        look_backward=1,
        look_forward=0,
        causal=True,
        exact=False,
        shared_qk=False,
        key_pad=(~mask).expand(4, 37),
    )
    torch.testing.assert_close(out, expected[:, 0])
    with pytest.raises(ValueError, match="not a multiple of window_size=8"):
        LocalAttention(window_size=8, causal=True)(q, k, v)


@pytest.mark.parametrize(
    "kw",
    [
        dict(causal=False),
        dict(causal=False, look_backward=0, look_forward=2),
        dict(causal=True, exact_windowsize=True, look_backward=2),
    ],
    ids=str,
)
def test_options_and_two_dim_inputs(kw):
    q, k, v = _qkv(24, 8, seed=3)
    out = LocalAttention(window_size=4, autopad=True, **kw)(q, k, v)
    expected = local_rows(
        q[None, None],
        k[None, None],
        v[None, None],
        wsize=4,
        look_backward=kw.get("look_backward", 1),
        look_forward=kw.get("look_forward", 0 if kw["causal"] else 1),
        causal=kw["causal"],
        exact=kw.get("exact_windowsize", False),
        shared_qk=False,
    )
    torch.testing.assert_close(out, expected[0, 0])


def test_xpos_scores_decay_with_distance_only():
    q, k, v = _qkv(1, 1, 16, 8, seed=4)
    attn = LocalAttention(window_size=4, causal=True, dim=8, use_xpos=True, xpos_scale_base=8)
    pos = torch.arange(16)
    qx = _rope(q[0, 0], pos, 8, pos / 8.0)
    kx = _rope(k[0, 0], pos, 8, -pos / 8.0)
    expected = local_rows(
        qx[None, None],
        kx[None, None],
        v,
        wsize=4,
        look_backward=1,
        look_forward=0,
        causal=True,
        exact=False,
        shared_qk=False,
    )
    torch.testing.assert_close(attn(q, k, v), expected)


@pytest.mark.parametrize(
    "kw", [dict(), dict(exact_windowsize=True), dict(shared_qk=True), dict(use_xpos=True)], ids=str
)
def test_step_decoding_equals_forward_with_bounded_cache(kw):
    q, k, v = _qkv(2, 2, 21, 8, seed=5)
    attn = LocalAttention(window_size=4, causal=True, dim=8, autopad=True, **kw)
    if kw.get("shared_qk"):
        k = q
    full = attn(q, k, v)
    cache, outs = None, []
    for t0, t1 in [(0, 6)] + [(t, t + 1) for t in range(6, 21)]:
        o, cache = attn.step(q[:, :, t0:t1], k[:, :, t0:t1], v[:, :, t0:t1], cache)
        outs.append(o)
        assert cache["k"].shape[2] <= 4 - 1 + 4
    torch.testing.assert_close(torch.cat(outs, 2), full)


def test_local_transformer_readme_example_and_loss():
    torch.manual_seed(0)
    model = LocalTransformer(
        num_tokens=32, dim=32, depth=2, max_seq_len=64, causal=True, local_attn_window_size=8, heads=2, dim_head=16
    )
    x = torch.randint(0, 32, (2, 40))
    logits = model(x)
    assert logits.shape == (2, 40, 32)
    loss = model(x, return_loss=True)
    loss.backward()
    assert loss.item() > 0 and all(p.grad is not None for p in model.parameters())
    # causal: a change at position 30 leaves earlier logits alone
    x2 = x.clone()
    x2[:, 30] = (x2[:, 30] + 1) % 32
    torch.testing.assert_close(model(x2)[:, :30], logits[:, :30])


def test_generate_with_cache_matches_recomputation():
    torch.manual_seed(0)
    model = LocalTransformer(
        num_tokens=32, dim=32, depth=2, max_seq_len=18, causal=True, local_attn_window_size=4, heads=2, dim_head=16
    ).eval()
    prime = torch.randint(0, 32, (2, 5))
    seq = torch.randint(0, 32, (2, 13))
    full = model(torch.cat([prime, seq], 1))
    logits, caches = model.forward_step(prime)
    steps = [logits]
    for t in range(13):
        logits, caches = model.forward_step(seq[:, t : t + 1], caches)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)
    assert caches[0]["k"].shape[2] == 4 - 1 + 4
    torch.manual_seed(1)
    a = model.generate(prime, 16, temperature=1.0, filter_thres=0.9)  # crosses max_seq_len: falls back
    torch.manual_seed(1)
    b = model.generate(prime, 16, temperature=1.0, filter_thres=0.9, use_cache=False)
    assert a.shape == (2, 16) and torch.equal(a, b)


@pytest.mark.parametrize(
    "kw,err",
    [
        (dict(window_size=0), ValueError),
        (dict(window_size=4, causal=True, look_forward=1), ValueError),
        (dict(window_size=4, look_backward=-1), ValueError),
        (dict(window_size=4, use_xpos=True), ValueError),
    ],
)
def test_bad_options(kw, err):
    with pytest.raises(err):
        LocalAttention(**kw)


def test_bad_inputs():
    attn = LocalAttention(window_size=4)
    q, k, v = _qkv(2, 8, 4)
    with pytest.raises(ValueError, match="agree in shape"):
        attn(q, k[:, :4], v)
    with pytest.raises(ValueError, match="mask must be"):
        attn(q, k, v, mask=torch.ones(3, 8, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be bool"):
        attn(q, k, v, mask=torch.ones(2, 8))
    with pytest.raises(ValueError, match="needs causal=True"):
        attn.step(q[None], k[None], v[None])


def test_input_mask_is_an_alias_of_mask():
    q, k, v = _qkv(2, 3, 32, 8, seed=5)
    attn = LocalAttention(window_size=8, causal=True).eval()
    mask = torch.ones((2, 32)).bool()
    mask[1, -4:] = False
    torch.testing.assert_close(attn(q, k, v, input_mask=mask), attn(q, k, v, mask=mask))
    with pytest.raises(ValueError, match="not both"):
        attn(q, k, v, mask=mask, input_mask=mask)
