"""AttentionGrid's BlockwiseParallelJax block in PyTorch: equal to a dense float64 transformer block."""

import math

import pytest
import torch
import torch.nn.functional as F

from efficient_attention.compat.attention_grid import BlockwiseParallel, BlockwiseParallelJax


def dense_block(blk, x, attention_mask=None, position_ids=None, additive=False):
    """The same block, written out densely in float64 (whole score matrix, whole-sequence FFN)."""
    p = {n: t.detach().double() for n, t in blk.state_dict().items()}
    x = x.double()
    B, S, D = x.shape
    H, d, r = blk.num_heads, blk.head_dim, blk.rotary_dim
    eps = blk.ln_1.eps
    h = F.layer_norm(x, (D,), p["ln_1.weight"], p["ln_1.bias"], eps)
    q, k, v = ((h @ p[f"{n}_proj.weight"].T).view(B, S, H, d) for n in "qkv")
    if r is not None:  # GPT-J: sincos table, sin | cos halves, each repeated pairwise
        pos = torch.arange(S)[None].expand(B, S) if position_ids is None else position_ids.expand(B, S)
        inv = 1.0 / 10000 ** (torch.arange(0, r, 2, dtype=torch.float64) / r)
        ang = pos.double()[..., None] * inv
        sin = ang.sin().repeat_interleave(2, -1)[:, :, None]
        cos = ang.cos().repeat_interleave(2, -1)[:, :, None]

        def rope(t):
            a, rest = t[..., :r], t[..., r:]
            rot = torch.empty_like(a)
            rot[..., 0::2], rot[..., 1::2] = -a[..., 1::2], a[..., 0::2]
            return torch.cat([a * cos + rot * sin, rest], -1)

        q, k = rope(q), rope(k)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d)
    if attention_mask is not None:
        m = attention_mask.double()
        scores = scores + m if additive else scores.masked_fill(m <= 0, float("-inf"))
    if blk.causal:
        scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    attn = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).reshape(B, S, D)
    x = x + attn @ p["out_proj.weight"].T
    h = F.layer_norm(x, (D,), p["ln_2.weight"], p["ln_2.bias"], eps)
    h = F.gelu(h @ p["fc_in.weight"].T + p["fc_in.bias"])
    return x + h @ p["fc_out.weight"].T + p["fc_out.bias"]


def make(causal, rotary_dim, **kw):
    torch.manual_seed(0)
    return BlockwiseParallelJax(
        q_chunk_size=8,
        k_chunk_size=5,
        hidden_size=32,
        num_heads=4,
        rotary_dim=rotary_dim,
        intermediate_size=48,
        causal=causal,
        **kw,
    )


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("rotary_dim", [None, 6])
@pytest.mark.parametrize("mask", [None, "keep", "keep_bool", "additive", "square"])
def test_equals_dense_float64_block(causal, rotary_dim, mask):
    blk = make(causal, rotary_dim)
    B, S = 2, 21
    x = torch.randn(B, S, 32, requires_grad=True)
    am, additive = None, False
    if mask is not None:
        keep = torch.rand(B, 1, 1, S) > 0.3
        keep[..., 0] = True  # no row sees nothing
        if mask == "keep":
            am = keep.float()
        elif mask == "keep_bool":
            am = keep
        elif mask == "additive":
            am, additive = torch.zeros(B, 1, 1, S).masked_fill(~keep, float("-inf")), True
        else:  # (B, 1, S, S) random positive: all kept
            am = torch.rand(B, 1, S, S) + 0.01
    pos = torch.arange(3, 3 + S)[None]
    out = blk.forward(x, am, pos)
    assert out.shape == x.shape and out.dtype == torch.float32
    ref = dense_block(blk, x, am, pos, additive)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in blk.parameters())


def test_float64_and_gradients_match_dense():
    blk = make(True, 8, dtype=torch.float64, policy="everything_saveable")
    x = torch.randn(2, 19, 32, dtype=torch.float64, requires_grad=True)
    am = torch.ones(2, 1, 1, 19, dtype=torch.float64)
    am[1, ..., 10:] = 0
    out = blk(x, am)
    torch.testing.assert_close(out, dense_block(blk, x, am), atol=1e-10, rtol=1e-10)
    (g,) = torch.autograd.grad(out.sin().sum(), x)
    (g_ref,) = torch.autograd.grad(dense_block(blk, x, am).sin().sum(), x)
    torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=1e-10)
    # the default policy (checkpointed FFN chunks) gives the same gradients
    blk.policy = "nothing_saveable"
    (g2,) = torch.autograd.grad(blk(x, am).sin().sum(), x)
    torch.testing.assert_close(g2, g_ref, atol=1e-10, rtol=1e-10)


def test_dropout_only_when_not_deterministic():
    blk = make(True, 4, attn_pdrop=0.3, resid_pdrop=0.3)
    x = torch.randn(1, 12, 32)
    a, b = blk(x), blk(x, deterministic=True)
    torch.testing.assert_close(a, b)
    c = blk(x, deterministic=False)
    assert not torch.allclose(a, c) and torch.isfinite(c).all()
    blk.eval()
    torch.testing.assert_close(blk(x, deterministic=False), a)


def test_jax_arguments_are_checked():
    assert BlockwiseParallel is BlockwiseParallelJax
    blk = make(True, 4, dtype="float64", prevent_cse=True, float32_logits=True)
    assert blk.dtype == torch.float64 and blk.fc_in.weight.dtype == torch.float64
    with pytest.raises(ValueError, match="incremental_state"):
        blk(torch.randn(1, 4, 32), init_cache=True)
    with pytest.raises(TypeError):
        make(True, 4, unknown_option=1)
    with pytest.raises(ValueError, match="policy"):
        make(True, 4, policy="save_everything")
    with pytest.raises(ValueError, match="activation_function"):
        make(True, 4, activation_function="nope")
    with pytest.raises(TypeError, match="dtype"):
        make(True, 4, dtype=3)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        make(True, 4, max_position_embeddings=8)(torch.randn(1, 9, 32))
