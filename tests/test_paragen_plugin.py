"""The ParaGen plugin's model logic, without ParaGen: attention specs, layers, masks, decoding.

Mechanisms: ``vanilla`` plus every registered mechanism with the capability a
test needs (chosen from the registry at collection time, built with the
options of its float64 reference), so new mechanisms are covered as they land.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TOL
from references import REFERENCES

from efficient_attention import (
    Capabilities,
    MultiheadAttention,
    Pattern,
    UnsupportedInputError,
    UnsupportedPatternError,
    available_attentions,
)
from efficient_attention import registry as ea_registry
from efficient_transformers import AttentionSpec, EfficientDecoder, EfficientEncoder

ROOT = Path(__file__).resolve().parents[1]
V, PAD, D, H = 23, 1, 16, 4


def _options(name):
    return dict(REFERENCES[name].options) if name in REFERENCES else {}


def _lengths(name):
    ref = REFERENCES.get(name)
    return (ref.tgt_len, ref.src_len) if ref else (11, 14)


def _with(*patterns, incremental=False):
    return sorted(
        n
        for n, info in available_attentions().items()
        if all(info.capabilities.supports(p) for p in patterns) and (info.capabilities.incremental or not incremental)
    )


ENCODER_MECHS = _with(Pattern.NONCAUSAL_SELF)
DECODER_MECHS = _with(Pattern.CAUSAL_SELF, incremental=True)
CROSS_MECHS = _with(Pattern.NONCAUSAL_CROSS)


def encoder(attention="vanilla", seed=0, **kw):
    torch.manual_seed(seed)
    emb = torch.nn.Embedding(V, D, padding_idx=PAD)
    kw = {**dict(num_layers=2, d_model=D, n_head=H, dim_feedforward=32), **kw}
    return EfficientEncoder(emb, PAD, attention=attention, **kw).double().eval()


def decoder(self_attention="vanilla", cross_attention="vanilla", seed=0, **kw):
    torch.manual_seed(seed)
    emb = torch.nn.Embedding(V, D, padding_idx=PAD)
    kw = {**dict(num_layers=2, d_model=D, n_head=H, dim_feedforward=32), **kw}
    return (
        EfficientDecoder(emb, PAD, self_attention=self_attention, cross_attention=cross_attention, **kw).double().eval()
    )


def tokens(bsz, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, V, (bsz, length), generator=g)


def memory(bsz, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    mem = torch.randn(length, bsz, D, generator=g, dtype=torch.float64)
    pad = torch.zeros(bsz, length, dtype=torch.bool)
    pad[1, length - 3 :] = True
    return mem, pad


def close(a, b):
    torch.testing.assert_close(a, b, **TOL[torch.float64])


def spec(name):
    return {"name": name, **_options(name)}


@pytest.fixture
def noncausal_only(monkeypatch):
    """A registered mechanism without the causal patterns (test-local, removed afterwards)."""

    class NoncausalOnly(MultiheadAttention):
        capabilities = Capabilities(patterns=frozenset({Pattern.NONCAUSAL_SELF, Pattern.NONCAUSAL_CROSS}))

    NoncausalOnly.attention_name = "test_noncausal_only"
    monkeypatch.setitem(ea_registry._REGISTRY, "test_noncausal_only", NoncausalOnly)
    return "test_noncausal_only"


@pytest.fixture
def no_incremental(monkeypatch):
    """A registered causal mechanism without incremental decoding (test-local)."""

    class NoIncremental(MultiheadAttention):
        capabilities = Capabilities(incremental=False, need_weights=True)

    NoIncremental.attention_name = "test_no_incremental"
    monkeypatch.setitem(ea_registry._REGISTRY, "test_no_incremental", NoIncremental)
    return "test_no_incremental"


# ----------------------------------------------------------------- specs
def test_spec_parses_names_and_mappings():
    assert AttentionSpec.parse("Vanilla", "x") == AttentionSpec("vanilla", {})
    assert AttentionSpec.parse(None, "x").name == "vanilla"
    s = AttentionSpec.parse({"name": "multihead", "num_kv_heads": 2}, "x")
    assert s == AttentionSpec("vanilla", {"num_kv_heads": 2})
    assert AttentionSpec.parse(s, "x") == s


def test_unknown_mechanism_lists_registered_ones():
    with pytest.raises(ValueError, match=r"encoder attention: unknown attention 'nope'; registered: .*vanilla"):
        encoder(attention={"name": "nope"})


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match=r"decoder self_attention: attention 'vanilla' has no option 'wsize'"):
        decoder(self_attention={"name": "vanilla", "wsize": 3})


@pytest.mark.parametrize("option", ["causal", "embed_dim", "dropout"])
def test_layer_set_arguments_are_not_options(option):
    with pytest.raises(ValueError, match=f"no option '{option}'"):
        encoder(attention={"name": "vanilla", option: 1})


def test_option_type_is_checked():
    with pytest.raises(TypeError, match=r"option 'num_kv_heads' must be int, got 'two'"):
        encoder(attention={"name": "vanilla", "num_kv_heads": "two"})


def test_option_rule_is_checked_from_the_spec():
    with pytest.raises(
        ValueError,
        match=r"encoder attention: attention option approx_attn_dim must be a positive "
        r"integer, got 0",
    ):
        encoder(attention={"name": "performer", "approx_attn_dim": 0})
    with pytest.raises(ValueError, match=r"decoder self_attention: .*act_fun must be one of 'relu', 'elu', got 'gelu'"):
        decoder(self_attention={"name": "cosformer", "act_fun": "gelu"})


def test_option_value_errors_name_the_layer():
    with pytest.raises(ValueError, match=r"encoder layer 0 attention: attention 'vanilla': num_kv_heads \(3\)"):
        encoder(attention={"name": "vanilla", "num_kv_heads": 3})


def test_spec_needs_a_name():
    with pytest.raises(ValueError, match="needs a mechanism 'name'"):
        encoder(attention={"wsize": 3})
    with pytest.raises(TypeError, match="mechanism name or a mapping"):
        encoder(attention=3)


def test_options_reach_the_module_by_keyword():
    enc = encoder(attention={"name": "vanilla", "num_kv_heads": 2})
    assert all(layer.self_attn.num_kv_heads == 2 for layer in enc.layers)


def test_unsupported_pattern_names_layer_and_pattern(noncausal_only):
    with pytest.raises(
        UnsupportedPatternError,
        match=r"decoder layer 0 self_attention: attention 'test_noncausal_only' "
        r"does not support causal self attention",
    ):
        decoder(self_attention=noncausal_only)
    # the same mechanism is fine where its pattern is
    encoder(attention=noncausal_only)
    decoder(cross_attention=noncausal_only)


def test_modules_are_built_for_their_patterns():
    dec = decoder()
    layer = dec.layers[0]
    assert layer.self_attn.pattern is Pattern.CAUSAL_SELF and layer.self_attn.self_attention
    assert layer.cross_attn.pattern is Pattern.NONCAUSAL_CROSS and layer.cross_attn.encoder_decoder_attention
    assert encoder().layers[0].self_attn.pattern is Pattern.NONCAUSAL_SELF


def test_stack_arguments_are_validated():
    with pytest.raises(ValueError, match=r"n_head \(3\) must divide d_model \(16\)"):
        encoder(n_head=3)
    with pytest.raises(ValueError, match="activation must be one of"):
        encoder(activation="swishy")
    with pytest.raises(ValueError, match="num_layers must be a positive integer"):
        decoder(num_layers=0)


# --------------------------------------------------------------- encoder
@pytest.mark.parametrize("name", ENCODER_MECHS)
@pytest.mark.parametrize("normalize_before", [False, True], ids=["post-norm", "pre-norm"])
def test_encoder_padding_does_not_change_real_positions(name, normalize_before):
    length = _lengths(name)[0]
    enc = encoder(spec(name), normalize_before=normalize_before)
    src = tokens(3, length)
    n_real = length - 3
    padded = src.clone()
    padded[1, n_real:] = PAD
    x, pad = enc(padded)
    assert x.shape == (length, 3, D) and pad.shape == (3, length)
    assert pad[1, n_real:].all() and not pad[0].any()
    # row 1 alone, padded to the same length with a different number of real tokens elsewhere: same result
    alone, _ = enc(padded[1:2])
    close(x[:n_real, 1], alone[:n_real, 0])
    close(x[:, 0], enc(src[0:1])[0][:, 0])


def test_encoder_returns_seed():
    enc = encoder(return_seed=True)
    src = tokens(2, 6)
    x, pad, seed = enc(src)
    assert x.shape == (5, 2, D) and pad.shape == (2, 5) and seed.shape == (2, D)
    x2, pad2, seed2 = encoder(return_seed=True, keep_seed_in_hidden=True)(src)
    assert x2.shape == (6, 2, D)
    close(seed2, x2[0])


def test_learned_positions_respect_max_pos():
    enc = encoder(learn_pos=True, max_pos=8)
    enc(tokens(2, 8))
    with pytest.raises(ValueError, match="beyond max_pos=8"):
        enc(tokens(2, 9))


# --------------------------------------------------------------- decoder
def _decode_steps(dec, tgt, mem, mpm, prefix=1):
    state = {}
    outs = [dec(tgt[:, :prefix], mem, mpm, incremental_state=state)]
    for t in range(prefix + 1, tgt.shape[1] + 1):
        outs.append(dec(tgt[:, :t], mem, mpm, incremental_state=state))
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("prefix", [1, 4], ids=["token-by-token", "prefix-then-steps"])
@pytest.mark.parametrize("name", DECODER_MECHS)
def test_incremental_decoding_equals_full(name, prefix):
    tgt_len, src_len = _lengths(name)
    dec = decoder(spec(name), "vanilla", learn_pos=True)
    tgt = tokens(3, tgt_len)
    mem, mpm = memory(3, src_len)
    full = dec(tgt, mem, mpm)
    assert full.shape == (3, tgt_len, V)
    steps, state = _decode_steps(dec, tgt, mem, mpm, prefix)
    close(steps, full)
    assert dec.decoded_length(state) == tgt_len


@pytest.mark.parametrize("name", CROSS_MECHS)
def test_cross_attention_mechanism_decodes(name):
    tgt_len, src_len = _lengths(name)
    dec = decoder("vanilla", spec(name))
    tgt = tokens(3, tgt_len)
    mem, mpm = memory(3, src_len)
    close(_decode_steps(dec, tgt, mem, mpm)[0], dec(tgt, mem, mpm))


@pytest.mark.parametrize("name", DECODER_MECHS)
def test_decoding_continues_from_state_not_prefix(name):
    """Steps after the first only run the new position: changing earlier tokens changes nothing."""
    tgt_len, src_len = _lengths(name)
    dec = decoder(spec(name))
    tgt = tokens(2, 5)
    mem, mpm = memory(2, src_len)
    state = {}
    dec(tgt[:, :4], mem, mpm, incremental_state=state)
    scrambled = tgt.clone()
    scrambled[:, :4] = tokens(2, 4, seed=9)
    close(dec(scrambled, mem, mpm, incremental_state=state), dec(tgt, mem, mpm)[:, 4:])


@pytest.mark.parametrize("name", DECODER_MECHS)
def test_beam_reorder_equals_full_on_reordered_rows(name):
    tgt_len, src_len = _lengths(name)
    dec = decoder(spec(name), "vanilla")
    tgt = tokens(3, 8)
    mem, mpm = memory(3, src_len)
    state = {}
    for t in range(1, 5):
        dec(tgt[:, :t], mem, mpm, incremental_state=state)
    order = torch.tensor([2, 0, 0, 1])
    dec.reorder_incremental_state(state, order)
    new_tgt = tgt[order]
    new_tgt[:, 4:] = tokens(4, 4, seed=3)
    mem2, mpm2 = mem[:, order], mpm[order]
    outs = [dec(new_tgt[:, :t], mem2, mpm2, incremental_state=state) for t in range(5, 9)]
    close(torch.cat(outs, dim=1), dec(new_tgt, mem2, mpm2)[:, 4:])


def test_non_incremental_mechanism_decodes_by_recomputing_prefix(no_incremental, caplog):
    dec = decoder(no_incremental)
    tgt = tokens(3, 7)
    mem, mpm = memory(3, 9)
    steps, state = _decode_steps(dec, tgt, mem, mpm)
    close(steps, dec(tgt, mem, mpm))
    assert "has no incremental decoding" in caplog.text
    order = torch.tensor([1, 1, 0])
    dec.reorder_incremental_state(state, order)
    nxt = torch.cat([tgt[order], tokens(3, 1, seed=5)], dim=1)
    close(dec(nxt, mem[:, order], mpm[order], incremental_state=state), dec(nxt, mem[:, order], mpm[order])[:, -1:])


def test_target_padding_does_not_change_real_positions():
    dec = decoder()
    tgt = tokens(2, 7)
    mem, mpm = memory(2, 9)
    padded = tgt.clone()
    padded[1, 4:] = PAD
    close(dec(padded, mem, mpm)[1, :4], dec(tgt[1:2, :4], mem[:, 1:2], mpm[1:2])[0])


def test_decoding_needs_new_positions():
    dec = decoder()
    tgt = tokens(2, 3)
    mem, mpm = memory(2, 5)
    state = {}
    dec(tgt, mem, mpm, incremental_state=state)
    with pytest.raises(ValueError, match="3 are already decoded"):
        dec(tgt, mem, mpm, incremental_state=state)


@pytest.mark.parametrize("normalize_before", [False, True], ids=["post-norm", "pre-norm"])
def test_training_backward_reaches_every_parameter(normalize_before):
    enc, dec = encoder(normalize_before=normalize_before), decoder(normalize_before=normalize_before, output_bias=True)
    enc.train(), dec.train()
    src, tgt = tokens(2, 6), tokens(2, 5)
    mem, pad = enc(src)
    dec(tgt, mem, pad).logsumexp(-1).sum().backward()
    for module in (enc, dec):
        missing = [n for n, p in module.named_parameters() if p.grad is None]
        assert not missing, missing


def test_importing_the_library_never_imports_paragen():
    code = "import sys, efficient_attention; assert 'paragen' not in sys.modules, 'paragen imported'"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=str(ROOT))


def test_causal_mechanism_without_padding_support_takes_right_padded_targets(monkeypatch):
    """Right padding is invisible to real tokens under the causal rule; padding before tokens is an error."""

    class NoPadding(MultiheadAttention):
        capabilities = Capabilities(incremental=True, key_padding_mask=False)

    NoPadding.attention_name = "test_no_padding"
    monkeypatch.setitem(ea_registry._REGISTRY, "test_no_padding", NoPadding)
    dec = decoder("test_no_padding")
    tgt = tokens(2, 7)
    mem, mpm = memory(2, 9)
    padded = tgt.clone()
    padded[1, 4:] = PAD
    close(dec(padded, mem, mpm)[1, :4], dec(tgt[1:2, :4], mem[:, 1:2], mpm[1:2])[0])
    padded[0, 0] = PAD
    with pytest.raises(
        UnsupportedInputError,
        match="decoder layer 0 self_attention 'test_no_padding' does not support "
        "key_padding_mask and the target has padding before real tokens",
    ):
        dec(padded, mem, mpm)
