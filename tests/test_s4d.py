"""S4D specifics: the chunked scan, the recurrence step, options and bad input."""
import pytest
import torch

from efficient_attention import S4D, UnsupportedPatternError
from efficient_attention.attentions.s4d import _scan

from helpers import assert_close, decode


def _fft_reference(u, dt_a, c_bar):
    """Causal convolution with the S4D kernel by FFT in complex128/float64."""
    length = u.shape[-1]
    kern = 2 * (c_bar[..., None] * torch.exp(dt_a[..., None] * torch.arange(length, dtype=torch.float64))).sum(1).real
    n = 2 * length
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(kern, n=n), n=n)[..., :length]


@pytest.mark.parametrize("length,chunk", [(150, 64), (37, 5), (8, 8), (1, 64)])
def test_scan_equals_convolution(length, chunk):
    g = torch.Generator().manual_seed(0)
    dt_a = torch.complex(-torch.rand(3, 4, generator=g, dtype=torch.float64) * 0.1,
                         torch.rand(3, 4, generator=g, dtype=torch.float64))
    c_bar = torch.complex(torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64))
    u = torch.randn(2, 3, length, generator=g, dtype=torch.float64)
    y, x = _scan(u, dt_a, c_bar, chunk=chunk)
    assert_close(y, _fft_reference(u, dt_a, c_bar))
    # the final state continues the sequence exactly
    y_next, _ = _scan(torch.ones(2, 3, 1, dtype=torch.float64), dt_a, c_bar, x)
    y_all, _ = _scan(torch.cat([u, torch.ones(2, 3, 1, dtype=torch.float64)], -1), dt_a, c_bar, chunk=chunk)
    assert_close(y_next[..., 0], y_all[..., -1])


def test_long_decoding_equals_full_with_constant_state():
    torch.manual_seed(0)
    m = S4D(16, 4, causal=True, d_state=8).eval()
    x = torch.randn(140, 2, 16)
    full, _ = m(x, need_weights=False)
    steps, state = decode(m, x, prefix=70)
    assert_close(steps, full, torch.float32)
    (buf,) = state.values()
    assert buf["ssm_state"].shape == (2, 16, 8, 2)


def test_key_and_value_are_ignored_and_bidirectional_follows_causal():
    torch.manual_seed(0)
    m = S4D(16, 4, d_state=4).double().eval()
    assert m.bidirectional and not S4D(16, 4, causal=True).bidirectional
    assert not S4D(16, 4, bidirectional=False).bidirectional
    q = torch.randn(9, 2, 16, dtype=torch.float64)
    a, _ = m(q, q, q, need_weights=False)
    b, _ = m(q, torch.randn_like(q), torch.randn_like(q), need_weights=False)
    assert torch.equal(a, b)
    # bidirectional: the first output depends on the last input
    q2 = q.clone()
    q2[-1] += 1
    assert not torch.allclose(m(q2, need_weights=False)[0][0], a[0])


@pytest.mark.parametrize("kw,match", [(dict(d_state=0), "d_state"), (dict(causal=True, bidirectional=True), "bidirectional"),
                                      (dict(activation="swish"), "activation"), (dict(kdim=8), "kdim")])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        S4D(16, 4, **kw)


def test_cross_attention_raises():
    with pytest.raises(UnsupportedPatternError, match="cross"):
        S4D(16, 4, cross=True)
