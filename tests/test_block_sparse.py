"""Block-sparse attention (functional and module) against dense masked float64 attention."""

import pytest
import torch
from sparse_reference import causal, dense_reference, rand_qkv

import efficient_attention as ea
from efficient_attention import layouts as L
from efficient_attention.sparse.block_sparse import block_layout_attention

PATTERNS = [
    ("local", dict(local_attn_ctx=10)),
    ("strided", dict(local_attn_ctx=6)),
    ("fixed", dict(local_attn_ctx=16, num_verts=2, vertsize=1)),
    ("sliding", dict(window=5)),
    ("dilated", dict(window=16, dilation=2)),
    ("global", dict(num_global=3)),
    ("all", {}),
]


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("name,kw", PATTERNS, ids=[p[0] for p in PATTERNS])
def test_functional_token_patterns_match_dense(name, kw, is_causal):
    B, H, N, d, bs = 2, 4, 45, 8, 8
    q, k, v = rand_qkv(B, H, N, N, d, Hkv=2)
    mod = L.make_mask_mod(name, heads=H, block_size=bs, causal=is_causal, **kw)
    layout = L.layout_from_mask_mod(mod, H, N, N, bs)
    kpm = torch.zeros(B, N, dtype=torch.bool)
    kpm[1, -5:] = True
    out, lse = block_layout_attention(
        q, k, v, layout, bs, causal=is_causal, key_padding_mask=kpm, mask_mod=mod, return_lse=True
    )
    allowed = L.create_mask(mod, 1, H, N, N) & ~kpm[:, None, None, :]
    torch.testing.assert_close(out, dense_reference(q, k, v, allowed))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["random", "bigbird"])
@pytest.mark.parametrize("bs", [16, 32])
def test_functional_block_patterns_match_dense(name, bs):
    B, H, N, d = 1, 2, 4 * bs, 8
    q, k, v = rand_qkv(B, H, N, N, d)
    layout = L.make_layout(name, N, bs, H, causal=True, seed=3, num_random_blocks=1)
    out = ea.block_layout_attention(q, k, v, layout, bs, causal=True)
    allowed = L.expand_layout(layout, bs, N, N)[None] & causal(N, N)
    torch.testing.assert_close(out, dense_reference(q, k, v, allowed))


def test_shared_layout_and_empty_rows_are_zero_not_nan():
    B, H, N, d, bs = 2, 3, 32, 4, 16
    q, k, v = rand_qkv(B, H, N, N, d, requires_grad=True)
    layout = torch.tensor([[1, 0], [0, 0]], dtype=torch.bool)  # second query block sees nothing
    out = ea.block_layout_attention(q, k, v, layout, bs)
    assert torch.all(out[:, :, bs:] == 0)
    allowed = L.expand_layout(layout, bs)[None]
    torch.testing.assert_close(out, dense_reference(q, k, v, allowed))
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_gradients_match_dense():
    B, H, N, d, bs = 1, 2, 24, 4, 8
    q, k, v = rand_qkv(B, H, N, N, d, requires_grad=True)
    mod = L.make_mask_mod("fixed", heads=H, block_size=bs, causal=True, local_attn_ctx=16, num_verts=2)
    layout = L.layout_from_mask_mod(mod, H, N, N, bs)
    g = torch.randn(B, H, N, d, dtype=torch.float64)
    grads = torch.autograd.grad((block_layout_attention(q, k, v, layout, bs, mask_mod=mod) * g).sum(), (q, k, v))
    ref = torch.autograd.grad((dense_reference(q, k, v, L.create_mask(mod, 1, H, N, N)) * g).sum(), (q, k, v))
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)


def test_bad_input():
    q, k, v = rand_qkv(1, 2, 30, 30, 4)
    with pytest.raises(ValueError, match="not multiples of block_size"):
        ea.block_layout_attention(q, k, v, torch.ones(2, 2, 2, dtype=torch.bool), 16, pad=False)
    with pytest.raises(ValueError, match="layout must have shape"):
        ea.block_layout_attention(q, k, v, torch.ones(2, 3, 2, dtype=torch.bool), 16)
    with pytest.raises(ValueError, match="layout must be bool"):
        ea.block_layout_attention(q, k, v, torch.full((2, 2, 2), 0.5), 16)
    with pytest.raises(ValueError, match="block_size"):
        ea.block_layout_attention(q, k, v, torch.ones(1, 1, 1, dtype=torch.bool), 0)
    with pytest.raises(ValueError, match="4-D"):
        ea.block_layout_attention(q[0], k, v, torch.ones(2, 2, 2, dtype=torch.bool), 16)


# ------------------------------------------------------------------- module
def _module_allowed(m, n):
    """The module's token pattern, from layouts, as (H, n, n)."""
    if m.layout == "user":
        allowed = L.expand_layout(m._user_layout, m.block_size, n, n).expand(m.num_heads, n, n)
    elif m.layout in L.BLOCK_LEVEL_PATTERNS:
        allowed = L.expand_layout(
            L.make_layout(m.layout, n, m.block_size, m.num_heads, causal=m.causal, **m.block_kw), m.block_size, n, n
        )
    else:
        mod = L.make_mask_mod(m.layout, heads=m.num_heads, block_size=m.block_size, causal=m.causal, **m.pattern_kw)
        allowed = L.create_mask(mod, 1, m.num_heads, n, n)[0]
    return allowed & causal(n, n) if m.causal else allowed


@pytest.mark.parametrize("layout", ["local", "strided", "sliding", "dilated", "global", "random", "bigbird", "all"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_module_patterns_match_dense(layout, is_causal):
    torch.manual_seed(0)
    m = ea.build_attention(
        "block_sparse",
        embed_dim=16,
        num_heads=4,
        causal=is_causal,
        layout=layout,
        block_size=4,
        local_attn_ctx=6,
        window=4,
        num_random_blocks=1,
    ).double()
    x = torch.randn(18, 2, 16, dtype=torch.float64)
    out, _ = m(x, x, x, need_weights=False)
    from references import merge_and_project, project_heads

    q, k, v = project_heads(m, x, x, x)
    want = merge_and_project(m, dense_reference(q, k, v, _module_allowed(m, 18)[None]))
    torch.testing.assert_close(out, want)


def test_module_user_layout_and_errors():
    lay = torch.zeros(4, 4, dtype=torch.bool)
    lay[:, 0] = True
    lay[torch.arange(4), torch.arange(4)] = True
    m = ea.BlockSparseAttention(16, 4, layout=lay, block_size=4, causal=True).double()
    x = torch.randn(14, 1, 16, dtype=torch.float64)
    out, _ = m(x, x, x, need_weights=False)
    from references import merge_and_project, project_heads

    q, k, v = project_heads(m, x, x, x)
    torch.testing.assert_close(out, merge_and_project(m, dense_reference(q, k, v, _module_allowed(m, 14)[None])))
    with pytest.raises(ValueError, match="needs 5 blocks"):
        m(torch.randn(17, 1, 16, dtype=torch.float64), need_weights=False)
    with pytest.raises(ValueError, match="autopad"):
        ea.BlockSparseAttention(16, 4, block_size=4, autopad=False)(torch.randn(10, 1, 16), need_weights=False)
    with pytest.raises(ValueError, match="num_verts"):
        ea.BlockSparseAttention(16, 4, layout="fixed", block_size=4, local_attn_ctx=8, num_verts=3)
    with pytest.raises(ValueError, match="layout must be one of"):
        ea.BlockSparseAttention(16, 4, layout="nope")
    with pytest.raises(ValueError, match="layout tensor"):
        ea.BlockSparseAttention(16, 4, layout=torch.ones(3, 2, 2, dtype=torch.bool))


@pytest.mark.parametrize("layout", ["local", "strided", "fixed", "dilated", "random", "bigbird"])
def test_module_decoding_equals_full(layout):
    from helpers import decode

    torch.manual_seed(0)
    m = ea.build_attention(
        "block_sparse",
        embed_dim=16,
        num_heads=4,
        causal=True,
        layout=layout,
        block_size=4,
        local_attn_ctx=8 if layout == "fixed" else 6,
        window=8,
        num_random_blocks=1,
    ).eval()
    x = torch.randn(21, 2, 16)
    full, _ = m(x, x, x, need_weights=False)
    for prefix in (0, 6):
        steps, _ = decode(m, x, prefix=prefix)
        torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pattern", ["random", "bigbird", "fixed"])
def test_layout_rows_built_alone_match_the_full_layout(pattern):
    kw = dict(local_attn_ctx=16) if pattern == "fixed" else dict(num_random_blocks=2, seed=3)
    from efficient_attention.block_mask import BlockMask

    full = BlockMask.from_pattern(pattern, 70, 8, 2, causal=True, **kw)
    rows = BlockMask.from_pattern(pattern, 70, 8, 2, causal=True, q_block_start=6, **kw)
    assert torch.equal(rows.to_mask(), full.to_mask()[:, 48:])


def test_decoding_steps_inside_one_block_share_one_mask():
    """A step builds only its query block's row, once per block of steps (not the whole layout per step)."""
    from helpers import decode

    m = ea.build_attention("bigbird", embed_dim=16, num_heads=4, causal=True, block_size=4).eval()
    x = torch.randn(12, 1, 16)
    decode(m, x, prefix=4)
    assert sorted(key[:2] for key in m._masks) == [(4, 0), (8, 1), (12, 2)]  # the prompt's, then one per block
    assert all(bm.shape[0] == 1 for key, bm in m._masks.items() if key[1])


def test_layout_rows_from_a_block_onwards():
    mod = L.make_mask_mod("fixed", heads=2, block_size=8, causal=True, local_attn_ctx=16, num_verts=2)
    full = L.layout_from_mask_mod(mod, 2, 70, 70, 8)
    assert torch.equal(L.layout_from_mask_mod(mod, 2, 70, 70, 8, q_block_start=5), full[:, 5:])


@pytest.mark.parametrize("layout", L.PATTERNS)
def test_module_pickles_with_every_named_layout(layout, tmp_path):
    import io

    m = ea.build_attention(
        "block_sparse", embed_dim=16, num_heads=4, causal=True, layout=layout, block_size=4, local_attn_ctx=8, window=4
    ).double()
    x = torch.randn(13, 1, 16, dtype=torch.float64)
    want, _ = m(x, x, x, need_weights=False)  # builds (and caches) its block mask first
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    got, _ = again(x, x, x, need_weights=False)
    torch.testing.assert_close(got, want)


def test_bigbird_alias_builds_the_bigbird_layout():
    m = ea.build_attention("bigbird", embed_dim=16, num_heads=4, block_size=4)
    assert m.layout == "bigbird"
    bb = L.make_layout("bigbird", 32, 4, 4)
    assert torch.equal(m.full_layout(32).expand_as(bb), bb)
    assert ea.build_attention("block_sparse", embed_dim=16, num_heads=4).layout == "fixed"


@pytest.mark.parametrize(
    "layout,kw",
    [("fixed", dict(local_attn_ctx=16)), ("strided", dict(local_attn_ctx=5)), ("dilated", dict(window=12, dilation=3))],
)
def test_token_layouts_overflow_free_in_fp16(layout, kw):
    q, k, v = ((x * 100).half().double() for x in rand_qkv(1, 2, 40, 40, 16, dtype=torch.float64))
    lay = L.make_layout(layout, 40, 8, 2, causal=True, **kw)
    mod = L.make_mask_mod(layout, heads=2, block_size=8, causal=True, **kw)
    want = block_layout_attention(q, k, v, lay, 8, mask_mod=mod)
    got = block_layout_attention(q.half(), k.half(), v.half(), lay, 8, mask_mod=mod)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, atol=0.5, rtol=2e-2)  # near one-hot softmax of x100 inputs


def test_openai_shim_needs_local_attn_ctx():
    from efficient_attention.compat.openai import blocksparse_attention_impl

    x = torch.randn(1, 32, 16)
    with pytest.raises(ValueError, match="local_attn_ctx"):
        blocksparse_attention_impl(x, x, x, 2, "local", None)
    with pytest.raises(ValueError, match="blocksize"):
        blocksparse_attention_impl(x, x, x, 2, "local", 16, blocksize=4.5)


@pytest.mark.parametrize("name", ["block_sparse", "dilated"])
def test_a_shorter_length_crops_the_cached_mask_without_syncs(name, monkeypatch):
    """Training with lengths that vary: a length below one already seen takes the longer mask cropped -- no
    mask evaluation and no host synchronisation -- and computes what a fresh module computes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from efficient_attention.block_mask import BlockMask
    from efficient_attention.kernels._loader import cpu_extension, cpu_extension_reason

    if cpu_extension() is None:  # the kernels never sync; the readable reference path reads its block counts
        pytest.skip(f"the claim is the C++ kernels' (CPU tensors here): {cpu_extension_reason()}")
    opts = dict(block_size=16, local_attn_ctx=32) if name == "block_sparse" else dict(segment_lengths=(16, 32))
    if name == "dilated":
        opts["dilation_rates"] = (1, 2)
    torch.manual_seed(0)
    m = ea.build_attention(name, embed_dim=16, num_heads=4, causal=True, **opts).train()
    torch.manual_seed(0)
    fresh = ea.build_attention(name, embed_dim=16, num_heads=4, causal=True, **opts).train()
    m(torch.randn(150, 2, 16), need_weights=False)  # a long batch first

    class Syncs(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Syncs.count += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    built = []
    monkeypatch.setattr(BlockMask, "from_mask_mod", classmethod(lambda cls, *a, **kw: built.append(a)))
    x = torch.randn(97, 2, 16, requires_grad=True)
    with Syncs():
        out, _ = m(x, need_weights=False)
        out.sum().backward()
    assert Syncs.count == 0 and not built
    monkeypatch.undo()
    want, _ = fresh(x, need_weights=False)
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("n,kw", [(250, {}), (320, dict(block_size=32, local_attn_ctx=128, vertsize=2))])
@pytest.mark.parametrize("padded", [False, True])
def test_fixed_split_into_own_chunk_and_summary_parts_is_exact(n, kw, padded):
    """The long-sequence path of the ``fixed`` pattern (own chunk + gathered summary columns, merged by their
    log-sum-exp; CUDA from SPLIT_MIN_LEN on) gives the one-mask path's output and gradients."""
    from efficient_attention.base import AttentionMasks

    torch.manual_seed(0)
    m = ea.build_attention("block_sparse", embed_dim=32, num_heads=4, causal=True, self_attention=True, **kw)
    split = m._split_masks(n, torch.device("cpu"))
    assert split is not None and split[2].numel() < n
    q, k, v = (torch.randn(2, 4, n, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    kpm = None
    if padded:
        kpm = torch.zeros(2, n, dtype=torch.bool)
        kpm[1, -9:] = True
        kpm[0, 20:40] = True
    out = m._attend_split(q, k, v, kpm, split)
    ref, _ = m._attend(q, k, v, AttentionMasks(key_padding=kpm), False)
    go = torch.randn_like(out)
    grads = torch.autograd.grad((out * go).sum(), (q, k, v))
    rgrads = torch.autograd.grad((ref * go).sum(), (q, k, v))
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, rgrads):
        torch.testing.assert_close(a, b)


def test_fixed_split_only_where_it_applies():
    m = ea.build_attention("block_sparse", embed_dim=32, num_heads=4, causal=True, self_attention=True, num_verts=2)
    assert m._split_masks(256, None) is None  # heads rotate their summary columns: one mask
    m = ea.build_attention("block_sparse", embed_dim=32, num_heads=4, causal=False, self_attention=True)
    assert m._split_masks(256, None) is None
