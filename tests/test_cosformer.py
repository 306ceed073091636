"""cosFormer-specific behaviour: relu / elu, the choice of M, decoding rules, long causal inputs."""
import pytest
import torch

from efficient_attention import CosformerAttention, Pattern, build_attention, cosFormer

from helpers import BSZ, EMBED_DIM, NUM_HEADS, assert_close, decode, inputs, padding_mask
from references import get_reference

REF = get_reference("cosformer").fn
PATTERNS = [Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF, Pattern.NONCAUSAL_CROSS]


def make(pattern=Pattern.NONCAUSAL_SELF, **opts):
    torch.manual_seed(0)
    return CosformerAttention(EMBED_DIM, NUM_HEADS, causal=pattern.causal, cross=pattern.cross, **opts).double().eval()


def test_alias():
    assert cosFormer is CosformerAttention


@pytest.mark.parametrize("max_len", [None, 40])
@pytest.mark.parametrize("act_fun", ["relu", "elu"])
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_matches_reference_for_every_activation_and_m(pattern, act_fun, max_len):
    m = make(pattern, act_fun=act_fun, max_len=max_len)
    q, k, v = inputs("cosformer", pattern)
    kpm = padding_mask(BSZ, k.shape[0], pattern)
    out, _ = m(q, k, v, key_padding_mask=kpm, need_weights=False)
    expected = REF(m, q, k, v, key_padding_mask=kpm)
    if not pattern.cross:  # padded query rows are not compared
        keep = (~kpm).t().unsqueeze(-1)
        out, expected = out * keep, expected * keep
    assert_close(out, expected)


def test_m_changes_the_reweighting():
    m = make()
    x = torch.randn(10, 2, EMBED_DIM, dtype=torch.float64)
    paper, _ = m(x, need_weights=False)  # M = 10
    m.max_len = 1000  # cos ~ 1 everywhere: plain linear attention
    flat, _ = m(x, need_weights=False)
    assert (paper - flat).abs().max() > 1e-3


def test_causal_decoding_needs_max_len():
    m = make(Pattern.CAUSAL_SELF)
    x = torch.randn(5, 2, EMBED_DIM, dtype=torch.float64)
    with pytest.raises(ValueError, match="max_len"):
        decode(m, x)


def test_positions_beyond_max_len_raise():
    m = make(Pattern.CAUSAL_SELF, max_len=8)
    x = torch.randn(9, 2, EMBED_DIM, dtype=torch.float64)
    with pytest.raises(ValueError, match="max_len"):
        m(x, need_weights=False)
    with pytest.raises(ValueError, match="max_len"):
        decode(m, x)


def test_long_causal_decoding_equals_full():
    """100 positions span two chunks of the running sums; decoding uses the same fixed M."""
    m = make(Pattern.CAUSAL_SELF, max_len=128)
    x = torch.randn(100, 2, EMBED_DIM, dtype=torch.float64)
    full, _ = m(x, need_weights=False)
    steps, state = decode(m, x, prefix=33)
    assert_close(steps, full)
    assert_close(full[:12], REF(m, x[:12], x[:12], x[:12]))  # causal: a prefix gives the same outputs
    buf = next(iter(state.values()))
    assert set(buf) == {"kv_sum", "k_sum", "pos"}


def test_static_kv_without_max_len_uses_the_key_length():
    m = make(Pattern.NONCAUSAL_CROSS)
    q = torch.randn(6, 2, EMBED_DIM, dtype=torch.float64)
    kv = torch.randn(8, 2, EMBED_DIM, dtype=torch.float64)
    full, _ = m(q, kv, kv, need_weights=False)  # M = max(6, 8) = 8
    steps, _ = decode(m, q, kv, kv, static_kv=True)
    assert_close(steps, full)
    with pytest.raises(ValueError, match="max_len"):  # query position 8 needs M > 8
        decode(m, torch.randn(9, 2, EMBED_DIM, dtype=torch.float64), kv, kv, static_kv=True)


@pytest.mark.parametrize("opts,name", [
    (dict(act_fun="gelu"), "act_fun"),
    (dict(max_len=0), "max_len"),
    (dict(max_len=3.5), "max_len"),
])
def test_bad_options(opts, name):
    with pytest.raises(ValueError, match=name):
        build_attention("cosformer", embed_dim=EMBED_DIM, num_heads=NUM_HEADS, **opts)
