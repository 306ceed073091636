"""Bad input gets a clear error naming the argument, never a silent wrong answer."""

import pytest
import torch

from efficient_attention import MultiheadAttention, UnsupportedInputError

E, H, B = 16, 4, 2


def _m(**kw):
    return MultiheadAttention(E, H, **kw).eval()


def test_num_heads_must_divide_embed_dim():
    with pytest.raises(ValueError, match=r"num_heads \(5\) must divide embed_dim \(16\)"):
        MultiheadAttention(16, 5)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(embed_dim=0, num_heads=1), "embed_dim"),
        (dict(embed_dim=8, num_heads=-2), "num_heads"),
        (dict(embed_dim=8, num_heads=2, dropout=1.5), "dropout"),
        (dict(embed_dim=8, num_heads=2, kdim=0), "kdim"),
        (dict(embed_dim=8, num_heads=2, num_kv_heads=3), "num_kv_heads"),
        (dict(embed_dim=8, num_heads=2, q_noise=0.1, qn_block_size=3), "qn_block_size"),
        (dict(embed_dim=8, num_heads=2, self_attention=True, kdim=4), "self_attention"),
        (dict(embed_dim=8, num_heads=2, self_attention=True, encoder_decoder_attention=True), "self_attention"),
    ],
)
def test_constructor_errors_name_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        MultiheadAttention(**kw)


def test_unknown_constructor_option():
    with pytest.raises(TypeError, match="window"):
        MultiheadAttention(E, H, window=3)


def test_wrong_rank():
    with pytest.raises(ValueError, match=r"query must be 3-D.*\(5, 16\)"):
        _m()(torch.randn(5, E))


def test_embed_dim_mismatch():
    with pytest.raises(ValueError, match="expected embed_dim=16"):
        _m()(torch.randn(5, B, 12))
    with pytest.raises(ValueError, match="key has 12 features, expected kdim=16"):
        _m(cross=True)(torch.randn(5, B, E), torch.randn(4, B, 12), torch.randn(4, B, 12))


def test_key_value_length_mismatch():
    with pytest.raises(ValueError, match="key and value lengths differ"):
        _m(cross=True)(torch.randn(5, B, E), torch.randn(4, B, E), torch.randn(6, B, E))


def test_self_attention_needs_equal_lengths():
    with pytest.raises(ValueError, match="as many keys as queries"):
        _m(cross=False)(torch.randn(5, B, E), torch.randn(4, B, E), torch.randn(4, B, E))  # explicitly self attention


def test_batch_mismatch():
    with pytest.raises(ValueError, match="batch 3 differs from query batch 2"):
        _m(cross=True)(torch.randn(5, B, E), torch.randn(4, 3, E), torch.randn(4, 3, E))


@pytest.mark.parametrize("shape", [(B, 4), (3, 5), (B, 5, 1)])
def test_key_padding_mask_shape(shape):
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(batch, src_len\) = \(2, 5\)"):
        _m()(torch.randn(5, B, E), key_padding_mask=torch.zeros(shape, dtype=torch.bool))


def test_key_padding_mask_dtype():
    with pytest.raises(TypeError, match="key_padding_mask must be bool, uint8 or floating point"):
        _m()(torch.randn(5, B, E), key_padding_mask=torch.zeros(B, 5, dtype=torch.int64))


@pytest.mark.parametrize("shape", [(5, 4), (B, 5, 5), (H, 5, 5), (1, 5, 5)])
def test_attn_mask_shape(shape):
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(tgt_len, src_len\) = \(5, 5\)"):
        _m()(torch.randn(5, B, E), attn_mask=torch.zeros(shape, dtype=torch.bool))


def test_query_padding_mask_shape():
    with pytest.raises(ValueError, match="must have shape"):
        _m()(torch.randn(5, B, E), query_padding_mask=torch.zeros(B, 4, dtype=torch.bool))


def test_dtype_mismatch():
    with pytest.raises(TypeError, match="key dtype torch.float64 differs from query dtype torch.float32"):
        _m(cross=True)(
            torch.randn(5, B, E), torch.randn(4, B, E, dtype=torch.float64), torch.randn(4, B, E, dtype=torch.float64)
        )


def test_integer_query():
    with pytest.raises(TypeError, match="query must be floating point"):
        _m()(torch.ones(5, B, E, dtype=torch.long))


def test_device_mismatch():
    meta = torch.randn(4, B, E, device="meta")
    with pytest.raises(ValueError, match="key is on meta, query on cpu"):
        _m(cross=True)(torch.randn(5, B, E), meta, meta)


def test_static_kv_without_cross_attention():
    with pytest.raises(ValueError, match="static_kv=True needs cross attention"):
        _m()(torch.randn(5, B, E), static_kv=True)


def test_cross_attention_needs_keys():
    with pytest.raises(ValueError, match="pass key and value"):
        _m(cross=True)(torch.randn(5, B, E))


def test_key_without_value():
    with pytest.raises(ValueError, match="key and value must both be given"):
        _m(cross=True)(torch.randn(5, B, E), torch.randn(4, B, E), None)


def test_additive_float_key_padding_mask_is_additive():
    m = _m()
    x = torch.randn(5, B, E)
    kpm = torch.zeros(B, 5)
    kpm[0, 1] = -2.0  # a bias, not a padding flag
    out, w = m(x, key_padding_mask=kpm)
    assert torch.isfinite(out).all() and w[0, :, 1].gt(0).all()
    ref, w2 = m(x)
    assert not torch.allclose(w[0, :, 1], w2[0, :, 1])


def test_bias_kv_unsupported_by_default_mechanisms():
    from efficient_attention import EfficientAttention
    from efficient_attention.capabilities import Capabilities

    class Plain(EfficientAttention):
        """A test-only mechanism without bias_kv or grouped_kv support."""

        capabilities = Capabilities()

    with pytest.raises(ValueError, match="does not support add_bias_kv"):
        Plain(E, H, add_bias_kv=True)
    with pytest.raises(ValueError, match="does not support num_kv_heads"):
        Plain(E, H, num_kv_heads=2)
    m = Plain(E, H)
    with pytest.raises(UnsupportedInputError, match="need_weights=False"):
        m(torch.randn(3, B, E))
    with pytest.raises(UnsupportedInputError, match="before_softmax"):
        m(torch.randn(3, B, E), need_weights=False, before_softmax=True)
    with pytest.raises(UnsupportedInputError, match="attn_mask"):
        m(torch.randn(3, B, E), need_weights=False, attn_mask=torch.zeros(3, 3, dtype=torch.bool))
