"""S4D specifics: the chunked scan, the FFT convolution, the recurrence step, options and bad input."""

import pytest
import torch
from helpers import assert_close, decode

from efficient_attention import S4D, UnsupportedPatternError
from efficient_attention.attentions import s4d as s4d_module
from efficient_attention.attentions.s4d import _CausalScan, _discretise, _FFTConvolution, _kernel, _scan


def _direct_reference(u, dt_a, c_bar, back=None):
    """Convolution with the S4D kernel(s) by its definition, in complex128/float64 (u: (C, B, L))."""
    length = u.shape[-1]
    lags = torch.arange(length, dtype=torch.float64)

    def kern(dt, c):
        return 2 * (c[..., None] * torch.exp(dt[..., None] * lags)).sum(1).real  # (C, L)

    kf = kern(dt_a, c_bar)
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    toe = torch.where(i >= j, kf[:, (i - j).clamp(min=0)], torch.zeros(()).double())  # (C, L, L)
    if back is not None:
        kb = kern(*back)
        toe = toe + torch.where(j > i, kb[:, (j - i - 1).clamp(min=0)], torch.zeros(()).double())
    return torch.einsum("cij,cbj->cbi", toe, u)


def _ssm(channels=3, modes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    dt_a = torch.complex(
        -torch.rand(channels, modes, generator=g, dtype=torch.float64) * 0.1,
        torch.rand(channels, modes, generator=g, dtype=torch.float64),
    )
    c_bar = torch.complex(
        torch.randn(channels, modes, generator=g, dtype=torch.float64),
        torch.randn(channels, modes, generator=g, dtype=torch.float64),
    )
    return dt_a, c_bar


# lengths that give one chunk, a partial group, several groups with padding, exact multiples
@pytest.mark.parametrize("length,chunk", [(150, 64), (37, 5), (8, 8), (1, 64), (300, 4), (64, 4)])
def test_scan_equals_convolution(length, chunk):
    dt_a, c_bar = _ssm()
    u = torch.randn(3, 2, length, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y, x = _scan(u, dt_a, c_bar, chunk=chunk)
    assert_close(y, _direct_reference(u, dt_a, c_bar))
    assert _scan(u, dt_a, c_bar, chunk=chunk, need_state=False)[1] is None
    # the final state continues the sequence exactly, also through a multi-chunk continuation
    more = torch.randn(3, 2, 11, dtype=torch.float64)
    y_next, x_next = _scan(more, dt_a, c_bar, x, chunk=chunk)
    y_all, x_all = _scan(torch.cat([u, more], -1), dt_a, c_bar, chunk=chunk)
    assert_close(y_next, y_all[..., length:])
    assert_close(x_next, x_all)


def test_scan_gives_future_inputs_exactly_zero_gradient():
    dt_a, c_bar = _ssm()
    u = torch.randn(3, 2, 300, dtype=torch.float64, requires_grad=True)
    y, _ = _scan(u, dt_a, c_bar, chunk=4, need_state=False)
    y[..., :123].sum().backward()
    assert torch.all(u.grad[..., 123:] == 0) and torch.all(u.grad[..., :123] != 0)


@pytest.mark.parametrize("length,chunk", [(1, 64), (70, 64), (300, 64), (37, 5), (64, 4)])
def test_scan_parameter_gradients_equal_the_kernel_correlation(length, chunk):
    """The long-sequence parameter gradients by the scan (no FFT) against the kernel gradient by FFT, projected
    on ``λ^s`` and ``s·λ^s`` by definition."""
    dt_a, c_bar = _ssm()
    plan = s4d_module._scan_plan(dt_a, c_bar, length, chunk)
    g = torch.Generator().manual_seed(2)
    u, grad = (torch.randn(2, 1, length, 3, generator=g, dtype=torch.float64) for _ in range(2))  # (B, H, L, d)
    s0, s1, k0 = s4d_module._scan_param_grads(s4d_module._to_chunks(grad, plan, torch.float64), [u], plan)
    g_kern = s4d_module._correlate(grad[:, 0].permute(2, 0, 1), u[:, 0].permute(2, 0, 1), 4 * length)[:, :length]
    lags = torch.arange(length, dtype=torch.float64)
    powers = torch.exp(dt_a[..., None] * lags)
    assert_close(s0, (g_kern[:, None] * powers).sum(-1))
    assert_close(s1, (g_kern[:, None] * lags * powers).sum(-1))
    assert_close(k0, g_kern[:, 0])


def _params(kernels, channels=3, modes=4, seed=0):
    """Raw S4D parameters ``(log_dt, log_a_real, a_imag, c, d)`` in float64, requiring gradients."""
    g = torch.Generator().manual_seed(seed)
    shape = (kernels, channels, modes)
    return tuple(
        x.requires_grad_(True)
        for x in (
            torch.rand(kernels, channels, generator=g, dtype=torch.float64) * 3 - 4,
            torch.rand(*shape, generator=g, dtype=torch.float64) * 0.3 - 0.7,
            torch.arange(modes, dtype=torch.float64) * 0.7 + torch.rand(*shape, generator=g, dtype=torch.float64),
            torch.randn(*shape, 2, generator=g, dtype=torch.float64),
            torch.randn(channels, generator=g, dtype=torch.float64),
        )
    )


@pytest.mark.parametrize("length", [1, 2, 37, 200])
@pytest.mark.parametrize("kernels", [1, 2])
@pytest.mark.parametrize("split", [False, True], ids=["one-fft", "batch-chunks"])
def test_fft_convolution_equals_definition(length, kernels, split, monkeypatch):
    if split:  # one batch element per FFT
        monkeypatch.setattr(s4d_module, "_FFT_CHUNK_BYTES", 1)
    params = _params(kernels)
    u = torch.randn(3, 2, length, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # the FFT convolution takes per-head (B, H, L, d) (here 1 head of 3 channels) and returns the same layout
    y = _FFTConvolution.apply(u.permute(1, 2, 0)[:, None], *params, "identity")[:, 0].permute(2, 0, 1)
    ssm = _discretise(*params[:4])
    back = (ssm.dt_a[1], ssm.c_bar[1]) if kernels == 2 else None
    expected = _direct_reference(u, ssm.dt_a[0], ssm.c_bar[0], back) + params[4][:, None, None] * u
    assert_close(y, expected)


_GRADCHECK_CASES = [("gelu", k, split) for k in (1, 2, "causal") for split in (False, True)] + [
    (act, k, False) for act in ("relu", "silu", "tanh", "identity") for k in (2, "causal")
]


@pytest.mark.parametrize("activation,kernels,split", _GRADCHECK_CASES, ids=str)
def test_convolution_functions_gradcheck(activation, kernels, split, monkeypatch):
    """The hand-written backwards (input, the four SSM parameters, D) against finite differences, float64."""
    if split:
        monkeypatch.setattr(s4d_module, "_FFT_CHUNK_BYTES", 1)
    causal = kernels == "causal"
    fn = _CausalScan if causal else _FFTConvolution
    params = _params(1, channels=2) if causal else _params(kernels)
    for length in (1, 70, 128):  # one chunk; chunks padded to whole groups; whole groups
        # both take per-head (B, H, L, d) (here heads of 1 channel)
        shape = (2, 2, length, 1) if causal else (2, 3, length, 1)
        u = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda *a: fn.apply(*a, activation), (u, *params))


def test_kernel_by_blocks_equals_powers():
    dt_a, c_bar = _ssm()
    lags = torch.arange(100, dtype=torch.float64)
    direct = 2 * (c_bar[..., None] * torch.exp(dt_a[..., None] * lags)).sum(1).real
    for block in (1, 7, 64, 128):
        assert_close(_kernel(dt_a, c_bar, 100, block=block), direct)


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


@pytest.mark.parametrize("kw,match", [(dict(causal=True, bidirectional=True), "bidirectional"), (dict(kdim=8), "kdim")])
def test_bad_option_combinations(kw, match):
    """Single options are checked by tests/test_options.py; these rules involve the pattern or the dimensions."""
    with pytest.raises(ValueError, match=match):
        S4D(16, 4, **kw)


def test_cross_attention_raises():
    with pytest.raises(UnsupportedPatternError, match="cross"):
        S4D(16, 4, cross=True)


def test_decoding_steps_see_parameter_updates():
    """The discretised parameters kept between steps are rebuilt after an in-place update (an optimizer step)."""
    torch.manual_seed(0)
    m = S4D(16, 2, causal=True, self_attention=True).eval()
    x = torch.randn(12, 2, 16)
    with torch.no_grad():
        decode(m, x[:6])
        m.log_dt.add_(0.3)
        state = {}
        steps, _ = decode(m, x, state=state)
        full, _ = m(x, need_weights=False)
    assert_close(steps, full, torch.float32)
