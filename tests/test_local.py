"""LocalAttention specifics: options, the shared_qk rule, bounded decoding, bad input."""

import pytest
import torch
from helpers import assert_close, decode
from references.local import local_reference

from efficient_attention import LocalAttention, Pattern
from efficient_attention.local_window import cache_len

CONFIGS = [
    dict(causal=False, wsize=4, look_backward=1, look_forward=1),
    dict(causal=False, wsize=3, look_backward=2, look_forward=0),
    dict(causal=False, wsize=3, look_backward=1, look_forward=1, exact_windowsize=True),
    dict(causal=True, wsize=4, look_backward=1),
    dict(causal=True, wsize=3, look_backward=2, exact_windowsize=True),
    dict(causal=True, wsize=4, look_backward=0),
    dict(causal=False, wsize=3, shared_qk=True, self_attention=True),
    dict(causal=True, wsize=3, shared_qk=True, self_attention=True),
    dict(causal=True, wsize=2, look_backward=0, shared_qk=True, self_attention=True),
]


def _module(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    return LocalAttention(16, 2, **kw).to(dtype).eval()


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_options_match_reference(cfg):
    m = _module(**cfg)
    x = torch.randn(13, 2, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    kpm = torch.zeros(2, 13, dtype=torch.bool)
    kpm[1, -3:] = True
    out, _ = m(x, x, x, key_padding_mask=kpm, need_weights=False)
    expected = local_reference(m, x, x, x, key_padding_mask=kpm)
    assert_close(out[:, 0], expected[:, 0])
    assert_close(out[:10, 1], expected[:10, 1])


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c["causal"]], ids=str)
def test_decoding_equals_full_and_cache_is_bounded(cfg):
    m = _module(torch.float32, **cfg)
    x = torch.randn(17, 2, 16, generator=torch.Generator().manual_seed(2))
    full, _ = m(x, need_weights=False)
    for prefix in (0, 5):
        steps, state = decode(m, x, prefix=prefix)
        assert_close(steps, full, torch.float32)
    (buf,) = state.values()
    assert buf["prev_key"].shape[2] == cache_len(m.window)


def test_defaults_and_alias():
    m = LocalAttention(16, 2)
    assert (m.wsize, m.look_backward, m.look_forward, m.exact_windowsize, m.autopad, m.shared_qk) == (
        15,
        1,
        1,
        False,
        True,
        False,
    )
    assert LocalAttention(16, 2, causal=True).look_forward == 0
    assert LocalAttention(16, 2, window_size=7).wsize == 7
    assert set(LocalAttention.options()) >= {"wsize", "window_size", "look_backward", "look_forward", "shared_qk"}


def test_shared_qk_ties_projections_and_excludes_self():
    m = _module(causal=False, wsize=2, look_backward=0, look_forward=0, shared_qk=True, self_attention=True)
    assert m.k_proj is m.q_proj
    x = torch.randn(4, 1, 16, dtype=torch.float64)
    x.requires_grad_(True)
    # blocks of 2: each query sees exactly one other key -> its output is that key's value
    out, _ = m(x, need_weights=False)
    v = m.v_proj(x.detach())
    swapped = v[[1, 0, 3, 2]]
    expected = m.out_proj(swapped)
    assert_close(out.detach(), expected)


def test_autopad_off_needs_a_multiple_of_the_window():
    m = _module(wsize=4, autopad=False)
    x = torch.randn(8, 1, 16, dtype=torch.float64)
    m(x, need_weights=False)
    with pytest.raises(ValueError, match="not a multiple of wsize=4"):
        m(x[:7], need_weights=False)


def test_cross_needs_aligned_lengths():
    m = _module(cross=True)
    q = torch.randn(5, 1, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="as many keys as"):
        m(q, torch.randn(6, 1, 16, dtype=torch.float64), torch.randn(6, 1, 16, dtype=torch.float64), need_weights=False)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(causal=True, look_forward=1), "look_forward"),
        (dict(shared_qk=True, kdim=8), "shared_qk"),
    ],
)
def test_bad_option_combinations(kw, match):
    """Single options are checked by tests/test_options.py; these rules involve the pattern or the dimensions."""
    with pytest.raises(ValueError, match=match):
        LocalAttention(16, 2, **kw)


def test_causal_cross_is_unsupported():
    with pytest.raises(AssertionError, match="causal cross"):
        LocalAttention(16, 2, cross=True, causal=True)
    assert not LocalAttention.capabilities.supports(Pattern.CAUSAL_CROSS)
