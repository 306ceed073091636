"""``MultiheadAttention`` against the real ``fairseq.modules.MultiheadAttention``.

fairseq computes its softmax in fp32 even for fp64 inputs, so comparisons use
fp32-level tolerances.  fairseq's fast path (``F.multi_head_attention_forward``)
ignores ``before_softmax``; its slow path is forced with
``_set_skip_embed_dim_check`` where needed.
"""

from __future__ import annotations

import pytest
import torch
from conftest import require_fairseq

from efficient_attention import MultiheadAttention

E, H, B = 16, 4, 3
TOL = dict(atol=2e-6, rtol=1e-5)


def _pair(seed=0, slow_path=False, **kw):
    require_fairseq()
    from fairseq.modules import MultiheadAttention as FairseqMHA

    torch.manual_seed(seed)
    ours_kw = dict(kw)
    theirs = FairseqMHA(E, H, **kw).double().eval()
    if slow_path:
        theirs._set_skip_embed_dim_check()
    ours = MultiheadAttention(E, H, **ours_kw).double().eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)  # both ways
    return theirs, ours


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _kpm(src_len, dtype=torch.bool):
    mask = torch.zeros(B, src_len, dtype=torch.bool)
    mask[1, -2:] = True
    mask[2, 3:4] = True
    if dtype == torch.bool:
        return mask
    if dtype == torch.uint8:
        return mask.to(torch.uint8)
    return torch.zeros(B, src_len, dtype=dtype).masked_fill(mask, float("-inf"))


def _close(a, b):
    torch.testing.assert_close(a, b, **TOL)


# fairseq's slow path adds bool masks as 0/1 numbers and cannot broadcast 3-D masks (fairseq bugs):
# those combinations are compared on fairseq's fast path only.
PARITY_CASES = [
    (slow, kpm, mask)
    for slow in (False, True)
    for kpm in (None, torch.bool, torch.uint8, torch.float64)
    for mask in (None, "bool", "float2d", "float3d")
    if not (slow and mask in ("bool", "float3d"))
]


# fairseq's reference call hands torch a bool key_padding_mask with a float attn_mask, which torch warns about
@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask and attn_mask:UserWarning")
@pytest.mark.parametrize("slow_path,kpm_dtype,mask_kind", PARITY_CASES, ids=str)
def test_self_attention_parity(slow_path, kpm_dtype, mask_kind):
    theirs, ours = _pair(self_attention=True, slow_path=slow_path)
    T = 7
    x = _x(T, B, E)
    kpm = None if kpm_dtype is None else _kpm(T, kpm_dtype)
    attn_mask = None
    if mask_kind == "bool":
        attn_mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    elif mask_kind == "float2d":
        attn_mask = _x(T, T, seed=5)
    elif mask_kind == "float3d":
        attn_mask = _x(B * H, T, T, seed=6)
    a, wa = theirs(x, x, x, key_padding_mask=kpm, attn_mask=attn_mask)
    b, wb = ours(x, x, x, key_padding_mask=kpm, attn_mask=attn_mask)
    _close(b, a)
    _close(wb, wa.to(wb.dtype))
    # weights not requested: the SDPA path gives the same output
    c, none = ours(x, x, x, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=False)
    assert none is None
    _close(c, a)


def test_head_weights_parity():
    theirs, ours = _pair(self_attention=True, slow_path=True)
    x = _x(6, B, E)
    a, wa = theirs(x, x, x, key_padding_mask=_kpm(6), need_head_weights=True)
    b, wb = ours(x, x, x, key_padding_mask=_kpm(6), need_head_weights=True)
    assert wb.shape == (H, B, 6, 6)
    _close(b, a)
    _close(wb, wa.to(wb.dtype))


def test_before_softmax_parity():
    theirs, ours = _pair(self_attention=True, slow_path=True)
    x = _x(5, B, E)
    sa, va = theirs(x, x, x, key_padding_mask=_kpm(5), before_softmax=True)
    sb, vb = ours(x, x, x, key_padding_mask=_kpm(5), before_softmax=True)
    assert sb.shape == (B * H, 5, 5) and vb.shape == (B * H, 5, E // H)
    assert torch.equal(torch.isinf(sa), torch.isinf(sb))
    finite = torch.isfinite(sa)
    _close(sb[finite], sa[finite])
    _close(vb, va)


@pytest.mark.parametrize(
    "opts",
    [dict(add_bias_kv=True), dict(add_zero_attn=True), dict(add_bias_kv=True, add_zero_attn=True)],
    ids=["bias_kv", "zero_attn", "both"],
)
def test_bias_kv_and_zero_attn_parity(opts):
    theirs, ours = _pair(self_attention=True, **opts)
    x = _x(6, B, E)
    a, wa = theirs(x, x, x, key_padding_mask=_kpm(6))
    b, wb = ours(x, x, x, key_padding_mask=_kpm(6))
    _close(b, a)
    _close(wb, wa.to(wb.dtype))


def test_kdim_vdim_parity():
    # fairseq's encoder_decoder_attention projects values from `key` (so needs kdim == vdim);
    # its general (neither flag) mode projects key and value separately, as our cross attention does.
    theirs, ours = _pair(kdim=12, vdim=10)
    ours_cross = MultiheadAttention(E, H, kdim=12, vdim=10, cross=True).double().eval()
    ours_cross.load_state_dict(theirs.state_dict(), strict=True)
    q, k, v = _x(5, B, E), _x(9, B, 12, seed=2), _x(9, B, 10, seed=3)
    a, wa = theirs(q, k, v, key_padding_mask=_kpm(9))
    b, wb = ours_cross(q, k, v, key_padding_mask=_kpm(9))
    _close(b, a)
    _close(wb, wa.to(wb.dtype))


def test_encoder_decoder_static_kv_parity():
    theirs, ours = _pair(encoder_decoder_attention=True, kdim=12, vdim=12)
    q, enc = _x(6, B, E), _x(9, B, 12, seed=2)
    kpm = _kpm(9)
    full_a, _ = theirs(q, enc, enc, key_padding_mask=kpm, static_kv=True)
    full_b, _ = ours(q, enc, enc, key_padding_mask=kpm, static_kv=True)
    _close(full_b, full_a)
    sa, sb = {}, {}
    for t in range(q.shape[0]):
        a, wa = theirs(q[t : t + 1], enc, enc, key_padding_mask=kpm, incremental_state=sa, static_kv=True)
        b, wb = ours(q[t : t + 1], enc, enc, key_padding_mask=kpm, incremental_state=sb, static_kv=True)
        _close(b, a)
        _close(wb, wa.to(wb.dtype))
        _close(b[0], full_a[t])


def test_incremental_self_attention_with_beam_reorder_parity():
    theirs, ours = _pair(self_attention=True)
    ours_causal = MultiheadAttention(E, H, self_attention=True, causal=True).double().eval()
    ours_causal.load_state_dict(theirs.state_dict())
    x = _x(8, B, E)
    sa, sb = {}, {}
    order = torch.tensor([1, 1, 0])
    for t in range(x.shape[0]):
        if t == 4:
            theirs.reorder_incremental_state(sa, order)
            ours_causal.reorder_incremental_state(sb, order)
        a, _ = theirs(x[t : t + 1], x[t : t + 1], x[t : t + 1], incremental_state=sa)
        b, _ = ours_causal(x[t : t + 1], x[t : t + 1], x[t : t + 1], incremental_state=sb, need_weights=False)
        _close(b, a)
    # the cache has fairseq's layout
    buf = ours_causal._get_input_buffer(sb)
    assert buf["prev_key"].shape == (B, H, 8, E // H)


def test_legacy_in_proj_weight_loads():
    theirs, _ = _pair(self_attention=True)
    sd = theirs.state_dict()
    legacy = {k: v for k, v in sd.items() if not k.startswith(("q_proj", "k_proj", "v_proj"))}
    legacy["in_proj_weight"] = torch.cat([sd["q_proj.weight"], sd["k_proj.weight"], sd["v_proj.weight"]])
    legacy["in_proj_bias"] = torch.cat([sd["q_proj.bias"], sd["k_proj.bias"], sd["v_proj.bias"]])
    ours = MultiheadAttention(E, H, self_attention=True).double().eval()
    ours.load_state_dict(dict(legacy), strict=True)
    x = _x(5, B, E)
    _close(ours(x, x, x)[0], theirs(x, x, x)[0])
    # fairseq's own upgrade hook works on a model-level dict too
    model_sd = {f"decoder.layers.0.self_attn.{k}": v for k, v in legacy.items()}
    ours.upgrade_state_dict_named(model_sd, "decoder.layers.0.self_attn")
    assert "decoder.layers.0.self_attn.q_proj.weight" in model_sd
    assert not any("in_proj" in k for k in model_sd)


def test_training_dropout_matches_fairseq_statistics():
    """With dropout, outputs differ per call but stay finite; eval is deterministic and equal to fairseq."""
    theirs, ours = _pair(self_attention=True, dropout=0.5)
    x = _x(6, B, E)
    ours.train()
    a, _ = ours(x, x, x, need_weights=False)
    b, _ = ours(x, x, x, need_weights=False)
    assert torch.isfinite(a).all() and not torch.equal(a, b)
    ours.eval()
    _close(ours(x, x, x)[0], theirs(x, x, x)[0])


def test_grouped_query_attention_equals_repeated_heads():
    torch.manual_seed(0)
    gqa = MultiheadAttention(E, H, num_kv_heads=2, causal=True).double().eval()
    full = MultiheadAttention(E, H, causal=True).double().eval()
    sd = gqa.state_dict()
    d = E // H
    for name in ("k_proj", "v_proj"):
        w = sd[f"{name}.weight"].view(2, d, E).repeat_interleave(2, 0).reshape(E, E)
        sd[f"{name}.weight"] = w
        sd[f"{name}.bias"] = sd[f"{name}.bias"].view(2, d).repeat_interleave(2, 0).reshape(E)
    full.load_state_dict(sd)
    x = _x(7, B, E)
    _close(gqa(x, x, x)[0], full(x, x, x)[0])
    _close(gqa(x, x, x, need_weights=False)[0], full(x, x, x)[0])
    state = {}
    for t in range(7):
        out, _ = gqa(x[t : t + 1], x[t : t + 1], x[t : t + 1], incremental_state=state, need_weights=False)
    assert gqa._get_input_buffer(state)["prev_key"].shape == (B, 2, 7, d)  # only the KV heads
    _close(out[0], full(x, x, x)[0][-1])


def test_fully_masked_rows_give_zero_where_fairseq_gives_nan():
    theirs, ours = _pair(self_attention=True)
    x = _x(4, B, E)
    kpm = torch.zeros(B, 4, dtype=torch.bool)
    kpm[0] = True  # batch 0 has nothing to attend to
    a, _ = theirs(x, x, x, key_padding_mask=kpm)
    assert torch.isnan(a[:, 0]).all()
    for need_weights in (True, False):
        b, w = ours(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b[:, 0], ours.out_proj.bias.expand(4, E))
        _close(b[:, 1:], a[:, 1:])
