"""The contract fairseq users rely on, checked over the whole registry (issue 15).

* decoding: a noncausal attention given an ``incremental_state`` caches keys
  as fairseq's own ``MultiheadAttention`` does (the oracle); causal cross
  attention decoded over static keys equals its full pass;
* general attention: a module built with neither fairseq flag takes keys of
  its own dimension and length;
* rows that see nothing (left padding, an all-padding batch item, a long
  right padding) have finite gradients; fp16 inputs of large magnitude give
  finite outputs;
* bool options reject strings; empty inputs give empty outputs.
"""

from __future__ import annotations

import typing

import pytest
import torch
from conftest import require_fairseq
from helpers import (
    BSZ,
    EMBED_DIM,
    NUM_HEADS,
    assert_close,
    build,
    case_id,
    decode,
    inputs,
    mechanism_patterns,
    padding_mask,
)
from references import get_reference

from efficient_attention import (
    MultiheadAttention,
    Pattern,
    available_attentions,
    build_attention,
    check_bool,
    fsmha,
    get_attention_class,
)
from efficient_attention.compat.local_attention import LocalAttention

INFOS = available_attentions()
ALL = mechanism_patterns()
NONCAUSAL = mechanism_patterns(lambda caps, p: not p.causal)
CAUSAL_CROSS = mechanism_patterns(lambda caps, p: p is Pattern.CAUSAL_CROSS)


# fp16 overflow fixed by the helpers that own these mechanisms (drop the marks once merged)
def _fairseq_pair(**kw):
    require_fairseq()
    from fairseq.modules import MultiheadAttention as FairseqMHA

    torch.manual_seed(0)
    theirs = FairseqMHA(EMBED_DIM, NUM_HEADS, **kw).double().eval()
    ours = MultiheadAttention(EMBED_DIM, NUM_HEADS, **kw).double().eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# fairseq's softmax runs in fp32 even for fp64 inputs
FAIRSEQ_TOL = dict(atol=2e-6, rtol=1e-5)


# ------------------------------------------------------------ decoding
def _decode_with_reorder(m, x, kpm, prefix, order, reorder_at=3):
    """Feed ``x`` step by step (after an optional prefix chunk); reorder the beams after position ``reorder_at``."""
    state, steps, t = {}, [], 0
    while t < x.shape[0]:
        n = prefix if (t == 0 and prefix) else 1
        sl = slice(t, t + n)
        out, _ = m(x[sl], x[sl], x[sl], key_padding_mask=kpm[:, sl], incremental_state=state, need_weights=False)
        steps.append(out)
        t += n
        if t - 1 <= reorder_at < t:
            m.reorder_incremental_state(state, order)
            x, kpm = x[:, order], kpm[order]
    return torch.cat(steps)


@pytest.mark.parametrize("prefix", [0, 3], ids=["token-by-token", "prefill-then-steps"])
@pytest.mark.parametrize("flags", [dict(self_attention=True), dict()], ids=["self_attention", "no-flags"])
def test_noncausal_self_decoding_matches_fairseq(flags, prefix):
    """fairseq's decoder builds its self attention without ``causal``: decoding must still cache keys."""
    theirs, ours = _fairseq_pair(**flags)
    x = _x(7, BSZ, EMBED_DIM)
    kpm = torch.zeros(BSZ, 7, dtype=torch.bool)
    kpm[1, :2] = True  # left padding, as fairseq's generator pads prompts
    order = torch.tensor([2, 1, 1])
    ref = _decode_with_reorder(theirs, x, kpm, prefix, order)
    out = _decode_with_reorder(ours, x, kpm, prefix, order)
    seen = ~torch.isnan(ref)  # fairseq gives NaN where a padded row sees only padding; we give finite values
    assert torch.isfinite(out).all() and seen.float().mean() > 0.8
    torch.testing.assert_close(out[seen], ref[seen], **FAIRSEQ_TOL)


@pytest.mark.parametrize("name,pattern", NONCAUSAL, ids=case_id)
def test_noncausal_decoding_equals_the_full_pass_over_the_prefix(name, pattern):
    """Step ``t`` of a noncausal decode (keys fed step by step) is the last row of the full pass over ``0..t``."""
    m = build(name, pattern)
    q, k, v = inputs(name, pattern)
    if pattern.cross:
        k, v = k[: q.shape[0]], v[: q.shape[0]]
    state = {}
    for t in range(q.shape[0]):
        sl = slice(t, t + 1)
        out, _ = m(q[sl], k[sl], v[sl], incremental_state=state, need_weights=False)
        full, _ = m(q[: t + 1], k[: t + 1], v[: t + 1], need_weights=False)
        assert_close(out, full[-1:], msg=f"{name} {pattern}: decoding step {t} != full pass over the prefix")


def test_fsabc_built_by_build_self_attention_decodes_with_a_cache():
    """CAB-style: ``@fsmha class FSABC(ABC)`` returned by ``build_self_attention`` (no ``causal=``)."""
    require_fairseq()
    from argparse import Namespace

    from fairseq.models.transformer import TransformerConfig
    from fairseq.modules.transformer_layer import TransformerDecoderLayerBase

    @fsmha
    class FSABC(get_attention_class("abc")):
        pass

    class Layer(TransformerDecoderLayerBase):
        def build_self_attention(self, embed_dim, cfg, add_bias_kv=False, add_zero_attn=False):
            return FSABC(
                embed_dim,
                cfg.decoder.attention_heads,
                dropout=cfg.attention_dropout,
                self_attention=True,
                **get_reference("abc").options,
            )

    cfg = TransformerConfig.from_namespace(
        Namespace(
            decoder_embed_dim=EMBED_DIM,
            decoder_ffn_embed_dim=32,
            decoder_attention_heads=NUM_HEADS,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
        )
    )
    torch.manual_seed(0)
    layer = Layer(cfg, no_encoder_attn=True).eval()
    x = torch.randn(6, 2, EMBED_DIM)
    state = {}
    for t in range(x.shape[0]):
        step = layer(x[t : t + 1], incremental_state=state)[0]
        full = layer(x[: t + 1])[0]
        torch.testing.assert_close(step, full[-1:], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("prefix", [0, 4], ids=["token-by-token", "prefill-then-steps"])
@pytest.mark.parametrize("name,pattern", CAUSAL_CROSS, ids=case_id)
def test_causal_cross_static_kv_decoding_equals_full(name, pattern, prefix):
    """fairseq decodes cross attention with the whole source and ``static_kv=True``: query ``i`` sees keys ``<= i``."""
    m = build(name, pattern, dtype=torch.float32)
    q, k, v = inputs(name, pattern, dtype=torch.float32)
    kpm = padding_mask(BSZ, k.shape[0], pattern)
    full, _ = m(q, k, v, key_padding_mask=kpm, need_weights=False)
    steps, _ = decode(m, q, k, v, static_kv=True, key_padding_mask=kpm, prefix=prefix)
    assert_close(steps, full, torch.float32, msg=f"{name}: causal cross static_kv decoding != full pass")


@pytest.mark.parametrize("name,pattern", CAUSAL_CROSS, ids=case_id)
def test_causal_cross_static_kv_beam_reorder(name, pattern):
    m = build(name, pattern, dtype=torch.float32)
    q, k, v = inputs(name, pattern, dtype=torch.float32)
    order = torch.tensor([2, 0, 0])
    expected, _ = m(q[:, order], k[:, order], v[:, order], need_weights=False)
    _, state = decode(m, q[:3], k, v, static_kv=True)
    m.reorder_incremental_state(state, order)
    rest = [
        m(q[t : t + 1, order], None, None, incremental_state=state, static_kv=True, need_weights=False)[0]
        for t in range(3, q.shape[0])
    ]
    assert_close(torch.cat(rest), expected[3:], torch.float32, msg=f"{name}: beam reorder of causal cross decoding")


def test_causal_cross_decoding_weights_match_the_full_pass():
    m = build("vanilla", Pattern.CAUSAL_CROSS)
    q, k, v = inputs("vanilla", Pattern.CAUSAL_CROSS)
    _, full = m(q, k, v)
    state = {}
    steps = [m(q[t : t + 1], k, v, incremental_state=state, static_kv=True)[1] for t in range(q.shape[0])]
    assert_close(torch.cat(steps, dim=1), full)


# ------------------------------------------------------- general attention
def test_kdim_vdim_without_flags_is_general_attention_like_fairseq():
    theirs, ours = _fairseq_pair(kdim=10, vdim=12)
    assert ours.pattern is Pattern.NONCAUSAL_CROSS
    q, k, v = _x(5, BSZ, EMBED_DIM), _x(8, BSZ, 10, seed=2), _x(8, BSZ, 12, seed=3)
    kpm = torch.zeros(BSZ, 8, dtype=torch.bool)
    kpm[0, -3:] = True
    ref, ref_w = theirs(q, k, v, key_padding_mask=kpm)
    out, w = ours(q, k, v, key_padding_mask=kpm)
    torch.testing.assert_close(out, ref, **FAIRSEQ_TOL)
    torch.testing.assert_close(w, ref_w, **FAIRSEQ_TOL)


def test_module_without_flags_takes_keys_of_another_length_like_fairseq():
    theirs, ours = _fairseq_pair()
    q, kv = _x(5, BSZ, EMBED_DIM), _x(9, BSZ, EMBED_DIM, seed=2)
    torch.testing.assert_close(ours(q, kv, kv)[0], theirs(q, kv, kv)[0], **FAIRSEQ_TOL)
    with pytest.raises(ValueError, match="as many keys as queries"):  # asked for self attention explicitly
        MultiheadAttention(EMBED_DIM, NUM_HEADS, cross=False).double()(q, kv, kv)


def test_kdim_on_a_self_only_mechanism_stays_self_attention():
    m = build_attention(
        "nystrom", embed_dim=EMBED_DIM, num_heads=NUM_HEADS, kdim=10, vdim=10, **get_reference("nystrom").options
    )
    assert m.pattern is Pattern.NONCAUSAL_SELF


# ----------------------------------------------- rows that see nothing
def _nothing_to_see_masks(length: int, pattern: Pattern):
    """(label, (B, S) bool padding) cases where some query rows see no key at all."""
    left = torch.zeros(BSZ, length, dtype=torch.bool)
    left[1, :1] = True
    left[2, : length // 2] = True
    all_pad = torch.zeros(BSZ, length, dtype=torch.bool)
    all_pad[1] = True
    right = torch.zeros(BSZ, length, dtype=torch.bool)
    right[2, 2:] = True  # longer than any window + memory of the reference settings
    return [("left-padding", left), ("all-padding-item", all_pad), ("long-right-padding", right)]


@pytest.mark.parametrize("name,pattern", ALL, ids=case_id)
def test_rows_that_see_nothing_have_finite_gradients(name, pattern):
    m = build(name, pattern).train()
    m.dropout_p = 0.0
    q, k, v = inputs(name, pattern)
    for label, kpm in _nothing_to_see_masks(k.shape[0], pattern):
        m.zero_grad()
        qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
        if not pattern.cross:
            kk = vv = qq
        out, _ = m(qq, kk, vv, key_padding_mask=kpm, need_weights=False)
        assert torch.isfinite(out).all(), f"{name} {pattern} {label}: non-finite output"
        (out**2).sum().backward()
        for nm, x in (("query", qq), ("key", kk), ("value", vv)):
            assert torch.isfinite(x.grad).all(), f"{name} {pattern} {label}: non-finite {nm} gradient"
        for pname, p in m.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), f"{name} {pattern} {label}: NaN in {pname}.grad"


# ------------------------------------------------------------------ fp16
@pytest.mark.parametrize("name,pattern", ALL, ids=case_id)
def test_fp16_inputs_of_large_magnitude_stay_finite(name, pattern):
    """Inputs x100, head dim 32 in fp16 (CPU): q·kᵀ overflows fp16 unless scaled first and accumulated in fp32."""
    torch.manual_seed(0)
    m = (
        build_attention(
            name, embed_dim=64, num_heads=2, cross=pattern.cross, causal=pattern.causal, **get_reference(name).options
        )
        .half()
        .eval()
    )
    g = torch.Generator().manual_seed(1)
    tgt = get_reference(name).tgt_len
    x = (torch.randn(tgt, 2, 64, generator=g) * 100).half()
    out, _ = m(x, x, x, need_weights=False)
    assert out.dtype == torch.float16
    assert torch.isfinite(out).all(), f"{name} {pattern}: fp16 output not finite for inputs x100"


# --------------------------------------------------------- bool options
def test_check_bool():
    assert check_bool(True, "x") is True and check_bool(0, "x") is False and check_bool(1, "x") is True
    for bad in ("false", "no", "0", "True", 2, 0.0, None):
        with pytest.raises(TypeError, match="flag_name"):
            check_bool(bad, "flag_name")


def _bool_options(name):
    return [o for o, spec in INFOS[name].options.items() if spec.type in (bool, typing.Optional[bool])]


@pytest.mark.parametrize("name", sorted(INFOS))
def test_bool_options_from_strings_are_rejected(name):
    info = INFOS[name]
    pattern = next(p for p in Pattern if info.capabilities.supports(p))
    opts = dict(get_reference(name).options)
    base = dict(embed_dim=EMBED_DIM, num_heads=NUM_HEADS, **opts)
    for flag in ("causal", "cross"):
        for text in ("false", "no", "0"):
            kw = dict(base, causal=pattern.causal, cross=pattern.cross)
            kw[flag] = text
            with pytest.raises(TypeError, match=flag):
                build_attention(name, **kw)
    assert build_attention(name, **dict(base, causal=int(pattern.causal), cross=int(pattern.cross))).pattern is pattern
    for opt in _bool_options(name):
        with pytest.raises(TypeError, match=opt):
            build_attention(name, **dict(base, causal=pattern.causal, cross=pattern.cross, **{opt: "false"}))


def test_lucidrains_shim_rejects_string_bools():
    for kw in (dict(causal="false"), dict(autopad="no"), dict(exact_windowsize="0"), dict(shared_qk="False")):
        with pytest.raises(TypeError, match=next(iter(kw))):
            LocalAttention(window_size=4, **kw)


# ----------------------------------------------------------- empty inputs
def _empty_cases(pattern: Pattern):
    cases = [("B=0", 5, 5, 0), ("T=0", 0, 0, 2)]
    if pattern.cross:
        cases += [("S=0", 5, 0, 2), ("T=0,S>0", 0, 5, 2)]
    return cases


@pytest.mark.parametrize("name,pattern", ALL, ids=case_id)
def test_empty_inputs_give_empty_outputs(name, pattern):
    m = build(name, pattern)
    for label, tgt, src, bsz in _empty_cases(pattern):
        q = _x(tgt, bsz, EMBED_DIM)
        k = _x(src, bsz, EMBED_DIM, seed=2)
        out, _ = m(q, k, k, need_weights=False)
        assert out.shape == (tgt, bsz, EMBED_DIM), f"{name} {pattern} {label}"
        assert torch.isfinite(out).all()
        if label == "S=0":  # nothing to see: the attention is 0, the output is out_proj's bias
            assert_close(out, m.out_proj.bias.expand_as(out))
