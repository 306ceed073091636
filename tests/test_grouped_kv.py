"""Multi-query / grouped-query attention: equal to the full-head module with repeated K/V heads;
the decoding cache holds only the key/value heads."""

import pytest
import torch
from helpers import EMBED_DIM, NUM_HEADS, assert_close, build, decode, inputs

from efficient_attention import Pattern

MECHANISMS = ["vanilla", "block_sparse", "blockwise", "dilated", "landmark"]


def _repeat_proj(src, dst, kv_heads):
    group, d = NUM_HEADS // kv_heads, EMBED_DIM // NUM_HEADS
    with torch.no_grad():
        for name in ("k_proj", "v_proj"):
            s, t = getattr(src, name), getattr(dst, name)
            t.weight.copy_(s.weight.view(kv_heads, d, -1).repeat_interleave(group, 0).reshape(NUM_HEADS * d, -1))
            t.bias.copy_(s.bias.view(kv_heads, d).repeat_interleave(group, 0).reshape(-1))
        for name in ("q_proj", "out_proj"):
            getattr(dst, name).load_state_dict(getattr(src, name).state_dict())


@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("name", MECHANISMS)
def test_grouped_equals_repeated_heads(name, kv_heads):
    pattern = Pattern.CAUSAL_SELF
    gqa = build(name, pattern, num_kv_heads=kv_heads)
    full = build(name, pattern)
    _repeat_proj(gqa, full, kv_heads)
    q, k, v = inputs(name, pattern)
    assert gqa.k_proj.weight.shape[0] == kv_heads * EMBED_DIM // NUM_HEADS
    assert_close(gqa(q, k, v, need_weights=False)[0], full(q, k, v, need_weights=False)[0])


@pytest.mark.parametrize("name", MECHANISMS)
def test_cache_holds_only_kv_heads(name):
    m = build(name, Pattern.CAUSAL_SELF, dtype=torch.float32, num_kv_heads=1)
    q, _, _ = inputs(name, Pattern.CAUSAL_SELF, dtype=torch.float32)
    steps, state = decode(m, q)
    (buf,) = state.values()
    assert buf["prev_key"].shape[1] == 1 and buf["prev_value"].shape[1] == 1
    full, _ = m(q, q, q, need_weights=False)
    assert_close(steps, full, torch.float32)
