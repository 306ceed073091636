"""Checks every registered mechanism gets, in every pattern it supports.

A mechanism added to the registry is picked up here automatically; it only
needs a float64 reference in ``tests/references/``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    BSZ,
    DEVICE,
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
from references import REFERENCES, get_reference

from efficient_attention import (
    Pattern,
    UnsupportedInputError,
    UnsupportedPatternError,
    available_attentions,
    build_attention,
)
from efficient_attention.masks import causal_mask

ALL = mechanism_patterns()
CAUSAL = mechanism_patterns(lambda caps, p: p.causal)
DECODABLE = mechanism_patterns(lambda caps, p: caps.incremental and p.causal)
STATIC_KV = mechanism_patterns(lambda caps, p: caps.incremental and p is Pattern.NONCAUSAL_CROSS)
NAMES = sorted(available_attentions())


def _real_rows(pattern, kpm):
    """(B, T) bool of query rows to compare: for self patterns, the non-padded positions."""
    return None if pattern.cross or kpm is None else ~kpm


def _compare_rows(actual, expected, rows, dtype=torch.float64, msg=""):
    if rows is not None:
        keep = rows.t().unsqueeze(-1)
        actual, expected = actual.masked_fill(~keep, 0), expected.masked_fill(~keep, 0)
    assert_close(actual, expected, dtype, msg)


@pytest.mark.parametrize("name", NAMES)
def test_every_mechanism_has_a_reference_and_documented_options(name):
    get_reference(name)
    cls = available_attentions()[name].cls
    assert cls.__doc__ and len(cls.__doc__.strip()) > 40, (
        f"{cls.__name__} needs a docstring (math, shapes, patterns, cost)"
    )
    for opt in cls.options().values():
        assert opt.help.strip(), f"option {opt.name} of {name} has no help"


def test_no_reference_without_a_mechanism():
    assert set(REFERENCES) <= set(NAMES)


@pytest.mark.parametrize("name,pattern", ALL, ids=case_id)
def test_matches_float64_reference(name, pattern):
    m = build(name, pattern)
    q, k, v = inputs(name, pattern)
    kpm = padding_mask(BSZ, k.shape[0], pattern)
    out, _ = m(q, k, v, key_padding_mask=kpm, need_weights=False)
    expected = get_reference(name).fn(m, q, k, v, key_padding_mask=kpm)
    _compare_rows(out, expected, _real_rows(pattern, kpm), msg=f"{name} {pattern} with padding")
    out, _ = m(q, k, v, need_weights=False)
    assert_close(out, get_reference(name).fn(m, q, k, v), msg=f"{name} {pattern} without padding")


@pytest.mark.parametrize("name,pattern", CAUSAL, ids=case_id)
def test_causality(name, pattern):
    m = build(name, pattern)
    q, k, v = (x.clone().requires_grad_(True) for x in inputs(name, pattern))
    if not pattern.cross:
        k = v = q
    cut = q.shape[0] // 2
    out, _ = m(q, k, v, need_weights=False)
    out[: cut + 1].sum().backward()
    for nm, x in (("query", q), ("key", k), ("value", v)):
        assert x.grad is not None
        assert torch.all(x.grad[cut + 1 :] == 0), f"{name}: gradient from the past reaches future {nm} positions"
    # perturbing the future leaves the past unchanged
    with torch.no_grad():
        q2, k2, v2 = q.detach().clone(), k.detach().clone(), v.detach().clone()
        q2[cut + 1 :] += 3.0
        k2[cut + 1 :] -= 2.0
        v2[cut + 1 :] *= -1.5
        if not pattern.cross:
            k2 = v2 = q2
        out2, _ = m(q2, k2, v2, need_weights=False)
    assert torch.equal(out[: cut + 1].detach(), out2[: cut + 1]) or torch.allclose(
        out[: cut + 1].detach(), out2[: cut + 1], atol=1e-12, rtol=0
    ), f"{name}: future tokens changed earlier outputs"


@pytest.mark.parametrize("prefix", [0, 4], ids=["token-by-token", "prefill-then-steps"])
@pytest.mark.parametrize("name,pattern", DECODABLE, ids=case_id)
def test_incremental_equals_full(name, pattern, prefix):
    m = build(name, pattern, dtype=torch.float32)
    q, k, v = inputs(name, pattern, dtype=torch.float32)
    full, _ = m(q, k, v, need_weights=False)
    steps, _ = decode(m, q, None if not pattern.cross else k, None if not pattern.cross else v, prefix=prefix)
    assert_close(steps, full, torch.float32, msg=f"{name} {pattern}: incremental != full")


@pytest.mark.parametrize("name,pattern", DECODABLE, ids=case_id)
def test_incremental_with_padding(name, pattern):
    m = build(name, pattern, dtype=torch.float32)
    q, k, v = inputs(name, pattern, dtype=torch.float32)
    kpm = padding_mask(BSZ, k.shape[0], pattern)
    full, _ = m(q, k, v, key_padding_mask=kpm, need_weights=False)
    steps, _ = decode(m, q, None if not pattern.cross else k, None if not pattern.cross else v, key_padding_mask=kpm)
    _compare_rows(steps, full, _real_rows(pattern, kpm), torch.float32, msg=f"{name} {pattern}")


@pytest.mark.parametrize("name,pattern", STATIC_KV, ids=case_id)
def test_static_kv_decoding_equals_full(name, pattern):
    m = build(name, pattern, dtype=torch.float32)
    q, k, v = inputs(name, pattern, dtype=torch.float32)
    kpm = padding_mask(BSZ, k.shape[0], pattern)
    full, _ = m(q, k, v, key_padding_mask=kpm, need_weights=False)
    steps, _ = decode(m, q, k, v, static_kv=True, key_padding_mask=kpm)
    assert_close(steps, full, torch.float32, msg=f"{name}: static_kv decoding != full")


@pytest.mark.parametrize("name,pattern", DECODABLE + STATIC_KV, ids=case_id)
def test_beam_reorder(name, pattern):
    m = build(name, pattern, dtype=torch.float32)
    q, k, v = inputs(name, pattern, dtype=torch.float32)
    order = torch.tensor([2, 0, 0], device=DEVICE)
    static = pattern is Pattern.NONCAUSAL_CROSS
    cut = 3
    expected, _ = m(q[:, order], k[:, order], v[:, order], need_weights=False)
    kk = k if pattern.cross else None
    vv = v if pattern.cross else None
    _, state = decode(
        m,
        q[:cut],
        None if kk is None else (kk if static else kk[:cut]),
        None if vv is None else (vv if static else vv[:cut]),
        static_kv=static,
    )
    m.reorder_incremental_state(state, order)
    rest_k = None if kk is None else (kk[:, order] if static else kk[cut:, order])
    rest_v = None if vv is None else (vv[:, order] if static else vv[cut:, order])
    if static:  # keys are already cached: continue with key=None
        outs = []
        for t in range(cut, q.shape[0]):
            o, _ = m(q[t : t + 1, order], None, None, incremental_state=state, static_kv=True, need_weights=False)
            outs.append(o)
        rest = torch.cat(outs)
    else:
        rest, _ = decode(m, q[cut:, order], rest_k, rest_v, state=state)
    assert_close(rest, expected[cut:], torch.float32, msg=f"{name} {pattern}: beam reorder")


@pytest.mark.parametrize("name,pattern", DECODABLE, ids=case_id)
def test_decoding_state_size(name, pattern):
    """Constant-state mechanisms keep a bounded buffer; the others at most grow linearly."""
    m = build(name, pattern, dtype=torch.float32)
    caps = available_attentions()[name].capabilities
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 1, EMBED_DIM, generator=g).to(DEVICE)
    k = v = x if pattern.cross else None
    state = {}
    sizes = []
    for t in range(x.shape[0]):
        m(
            x[t : t + 1],
            None if k is None else k[t : t + 1],
            None if v is None else v[t : t + 1],
            incremental_state=state,
            need_weights=False,
        )
        sizes.append(sum(t_.numel() for buf in state.values() for t_ in buf.values() if isinstance(t_, torch.Tensor)))
    if caps.constant_state:
        assert sizes[-1] == sizes[len(sizes) // 2], (
            f"{name}: decoding state grows ({sizes[len(sizes) // 2]} -> {sizes[-1]})"
        )
    else:
        assert sizes[-1] <= sizes[0] * x.shape[0] * 2


@pytest.mark.parametrize("name,pattern", DECODABLE + STATIC_KV, ids=case_id)
def test_decoding_state_follows_the_schema(name, pattern):
    """Every tensor of a decoding state has the batch first (beam search reorders it); ``position`` is a Python
    int counting the decoded queries (no device sync to read it)."""
    m = build(name, pattern, dtype=torch.float32)
    x = torch.randn(5, 3, EMBED_DIM, device=DEVICE)
    state = {}
    for t in range(x.shape[0]):
        k = x if pattern.cross and t == 0 else (None if pattern.cross else x[t : t + 1])
        m(x[t : t + 1], k, k, incremental_state=state, static_kv=pattern.cross, need_weights=False)
    (buf,) = state.values()
    for key, value in buf.items():
        assert value is None or isinstance(value, (torch.Tensor, int)), f"{name}: {key} is {type(value).__name__}"
        if isinstance(value, torch.Tensor):
            assert value.shape[0] == 3, f"{name}: {key} has shape {tuple(value.shape)}: batch must be dim 0"
    if m._own_decoding_state() or pattern.causal and pattern.cross:
        assert type(buf["position"]) is int and buf["position"] == x.shape[0]
    new_order = torch.tensor([2, 0, 1], device=DEVICE)
    m.reorder_incremental_state(state, new_order)  # every tensor reorders along the batch


@pytest.mark.parametrize("name,pattern", ALL, ids=case_id)
def test_padded_key_contents_do_not_matter(name, pattern):
    m = build(name, pattern)
    q, k, v = inputs(name, pattern)
    kpm = padding_mask(BSZ, k.shape[0], pattern)
    out, _ = m(q, k, v, key_padding_mask=kpm, need_weights=False)
    noise = torch.randn_like(k) * 5
    keep = ~kpm.t().unsqueeze(-1)
    k2 = torch.where(keep, k, noise)
    v2 = torch.where(keep, v, -noise)
    q2 = q if pattern.cross else k2
    if not pattern.cross:
        v2 = k2
    out2, _ = m(q2, k2, v2, key_padding_mask=kpm, need_weights=False)
    _compare_rows(out2, out, _real_rows(pattern, kpm), msg=f"{name} {pattern}: padded keys leak")


@pytest.mark.parametrize("name,pattern", ALL, ids=case_id)
def test_query_padding_mask_zeroes_rows(name, pattern):
    m = build(name, pattern)
    q, k, v = inputs(name, pattern)
    qpm = torch.zeros(BSZ, q.shape[0], dtype=torch.bool, device=DEVICE)
    qpm[0, -2:] = True
    out, _ = m(q, k, v, query_padding_mask=qpm, need_weights=False)
    assert torch.all(out[-2:, 0] == 0)
    assert out[:, 1:].abs().sum() > 0


@pytest.mark.parametrize("name,pattern", ALL, ids=case_id)
def test_batch_first_equals_time_first(name, pattern):
    m = build(name, pattern)
    q, k, v = inputs(name, pattern)
    out, _ = m(q, k, v, need_weights=False)
    out_bf, _ = m(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), need_weights=False, batch_first=True)
    assert_close(out_bf.transpose(0, 1), out)


@pytest.mark.parametrize("name,pattern", ALL, ids=case_id)
def test_every_parameter_gets_a_gradient(name, pattern):
    m = build(name, pattern).train()
    q, k, v = inputs(name, pattern)
    out, _ = m(q, k, v, need_weights=False)
    (out**2).sum().backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None, f"{name}: parameter {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: parameter {pname} has a non-finite gradient"


@pytest.mark.parametrize("name,pattern", ALL, ids=case_id)
def test_backward_twice_with_retain_graph(name, pattern):
    """A graph kept by ``retain_graph=True`` runs a second backward with the same gradients (hand-written backwards
    that free their inputs once read keep them when the graph is kept, ``functional.take_inputs``)."""
    m = build(name, pattern).train()
    q, k, v = inputs(name, pattern)
    q.requires_grad_(True)
    out, _ = m(q, k if pattern.cross else q, v if pattern.cross else q, need_weights=False)
    loss = (out**2).sum()
    first = torch.autograd.grad(loss, [q, *m.parameters()], retain_graph=True, allow_unused=True)
    second = torch.autograd.grad(loss, [q, *m.parameters()], allow_unused=True)
    for a, b in zip(first, second):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(b, a, msg=f"{name}: the second backward differs")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,pattern", ALL, ids=case_id)
def test_half_precision_is_finite_and_close(name, pattern, dtype):
    m64 = build(name, pattern)
    q, k, v = inputs(name, pattern)
    expected, _ = m64(q, k, v, need_weights=False)
    m = copy.deepcopy(m64).to(dtype)
    out, _ = m(q.to(dtype), k.to(dtype), v.to(dtype), need_weights=False)
    assert out.dtype == dtype
    assert torch.isfinite(out).all(), f"{name} {pattern}: non-finite {dtype} output"
    scale = expected.abs().max().item()
    err = (out.double() - expected).abs().max().item()
    assert err <= 0.1 * max(scale, 1.0), f"{name} {pattern}: {dtype} error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("name,pattern", ALL, ids=case_id)
def test_state_dict_round_trip(name, pattern):
    m = build(name, pattern, seed=0)
    fresh = build(name, pattern, seed=123)
    fresh.load_state_dict(m.state_dict(), strict=True)
    q, k, v = inputs(name, pattern)
    assert_close(fresh(q, k, v, need_weights=False)[0], m(q, k, v, need_weights=False)[0])


@pytest.mark.parametrize("name,pattern", ALL, ids=case_id)
def test_eval_is_deterministic(name, pattern):
    m = build(name, pattern)
    q, k, v = inputs(name, pattern)
    a, _ = m(q, k, v, need_weights=False)
    b, _ = m(q, k, v, need_weights=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_unsupported_patterns_raise(name):
    info = available_attentions()[name]
    for pattern in Pattern:
        if info.capabilities.supports(pattern):
            continue
        with pytest.raises(UnsupportedPatternError) as exc:
            build_attention(
                name,
                embed_dim=EMBED_DIM,
                num_heads=NUM_HEADS,
                cross=pattern.cross,
                causal=pattern.causal,
                **get_reference(name).options,
            )
        assert isinstance(exc.value, AssertionError)
        msg = str(exc.value)
        assert info.cls.__name__ in msg and str(pattern) in msg
        for supported in info.capabilities.pattern_names():
            assert supported in msg


@pytest.mark.parametrize("name", NAMES)
def test_unknown_option_is_a_type_error(name):
    with pytest.raises(TypeError, match="no_such_option"):
        build_attention(name, embed_dim=EMBED_DIM, num_heads=NUM_HEADS, no_such_option=3)


@pytest.mark.parametrize("name,pattern", ALL, ids=case_id)
def test_weights_returned_or_refused(name, pattern):
    m = build(name, pattern)
    q, k, v = inputs(name, pattern)
    if not available_attentions()[name].capabilities.need_weights:
        with pytest.raises(UnsupportedInputError, match="need_weights=False"):
            m(q, k, v)
        return
    _, w = m(q, k, v, need_weights=True)
    assert w.shape == (BSZ, q.shape[0], k.shape[0])
    assert_close(w.sum(-1), torch.ones(BSZ, q.shape[0], dtype=w.dtype, device=DEVICE))
    _, hw = m(q, k, v, need_head_weights=True)
    assert hw.shape == (NUM_HEADS, BSZ, q.shape[0], k.shape[0])
    assert_close(hw.mean(0), w)
    if pattern.causal:
        assert torch.all(hw.masked_select(causal_mask(q.shape[0], k.shape[0], device=DEVICE)) == 0)


@pytest.mark.parametrize("name,pattern", ALL, ids=case_id)
def test_attn_mask_honoured_or_refused(name, pattern):
    m = build(name, pattern)
    q, k, v = inputs(name, pattern)
    tgt, src = q.shape[0], k.shape[0]
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(tgt, src, generator=g) < 0.3).to(DEVICE)
    mask[:, 0] = False
    if not available_attentions()[name].capabilities.attn_mask:
        with pytest.raises(UnsupportedInputError, match="attn_mask"):
            m(q, k, v, attn_mask=mask, need_weights=False)
        if pattern.causal:  # fairseq's decoder passes the causal mask itself: accepted
            future = torch.triu(torch.full((tgt, src), float("-inf"), dtype=q.dtype, device=DEVICE), 1 + src - tgt)
            with_mask, _ = m(q, k, v, attn_mask=future, need_weights=False)
            assert_close(with_mask, m(q, k, v, need_weights=False)[0])
        return
    out, _ = m(q, k, v, attn_mask=mask, need_weights=False)
    assert_close(out, get_reference(name).fn(m, q, k, v, attn_mask=mask), msg=f"{name}: bool attn_mask")
    additive = torch.randn(BSZ * NUM_HEADS, tgt, src, generator=g, dtype=q.dtype).to(DEVICE)
    out, _ = m(q, k, v, attn_mask=additive, need_weights=False)
    assert_close(out, get_reference(name).fn(m, q, k, v, attn_mask=additive), msg=f"{name}: additive attn_mask")


@pytest.mark.parametrize("name,pattern", ALL, ids=case_id)
def test_copies_never_share_decoding_state(name, pattern):
    m = build(name, pattern)
    clone = copy.deepcopy(m)
    assert clone._incremental_state_id != m._incremental_state_id


@pytest.mark.parametrize("name,pattern", STATIC_KV, ids=case_id)
def test_static_kv_steps_may_repeat_the_source(name, pattern):
    """fairseq passes the encoder output and its padding mask at every step; the cache is what counts."""
    m = build(name, pattern, dtype=torch.float32)
    q, k, v = inputs(name, pattern, dtype=torch.float32)
    kpm = padding_mask(BSZ, k.shape[0], pattern)
    full, _ = m(q, k, v, key_padding_mask=kpm, need_weights=False)
    state, outs = {}, []
    for t in range(q.shape[0]):
        out, _ = m(
            q[t : t + 1], k, v, key_padding_mask=kpm, incremental_state=state, static_kv=True, need_weights=False
        )
        outs.append(out)
    assert_close(torch.cat(outs), full, torch.float32, msg=f"{name}: static_kv with the source repeated")


@pytest.mark.parametrize("name,pattern", ALL, ids=case_id)
def test_autocast_bf16_forward_backward_is_finite(name, pattern):
    """fairseq's --amp / --bf16 runs use torch.autocast over fp32 modules."""
    m = build(name, pattern, dtype=torch.float32).train()
    q, k, v = inputs(name, pattern, dtype=torch.float32)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out, _ = m(q, k, v, need_weights=False)
    assert torch.isfinite(out).all(), f"{name} {pattern}: non-finite output under autocast"
    out.float().pow(2).mean().backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: {pname} gradient under autocast"


@pytest.mark.parametrize("name,pattern", DECODABLE, ids=case_id)
def test_decoding_attn_mask_rules(name, pattern):
    """While decoding, the causal mask is accepted by everyone; another mask only where supported."""
    m = build(name, pattern, dtype=torch.float32)
    q, k, v = inputs(name, pattern, dtype=torch.float32)
    kk = k if pattern.cross else q
    vv = v if pattern.cross else q
    state, outs = {}, []
    for t in range(q.shape[0]):
        future = torch.zeros(1, t + 1, device=DEVICE)  # one new query against t + 1 keys: nothing is in its future
        out, _ = m(
            q[t : t + 1], kk[t : t + 1], vv[t : t + 1], incremental_state=state, attn_mask=future, need_weights=False
        )
        outs.append(out)
    full, _ = m(q, k, v, need_weights=False)
    assert_close(torch.cat(outs), full, torch.float32, msg=f"{name}: decoding with the causal mask")
    if not available_attentions()[name].capabilities.attn_mask:
        blocked = torch.zeros(1, 2, dtype=torch.bool, device=DEVICE)
        blocked[0, 0] = True  # hides a past key: not the causal mask
        with pytest.raises(UnsupportedInputError, match="attn_mask"):
            m(q[1:2], kk[1:2], vv[1:2], incremental_state={}, attn_mask=blocked, need_weights=False)
