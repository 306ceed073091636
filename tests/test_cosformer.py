"""cosFormer-specific behaviour: relu / elu, the choice of M, decoding rules, long causal inputs."""

import pytest
import torch
from helpers import BSZ, EMBED_DIM, NUM_HEADS, assert_close, decode, inputs, padding_mask
from references import get_reference

from efficient_attention import CosformerAttention, Pattern, cosFormer

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
    assert set(buf) == {"kv_sum", "k_sum", "position"}


def test_static_kv_without_max_len_uses_the_key_length():
    m = make(Pattern.NONCAUSAL_CROSS)
    q = torch.randn(6, 2, EMBED_DIM, dtype=torch.float64)
    kv = torch.randn(8, 2, EMBED_DIM, dtype=torch.float64)
    full, _ = m(q, kv, kv, need_weights=False)  # M = max(6, 8) = 8
    steps, _ = decode(m, q, kv, kv, static_kv=True)
    assert_close(steps, full)
    with pytest.raises(ValueError, match="max_len"):  # query position 8 needs M > 8
        decode(m, torch.randn(9, 2, EMBED_DIM, dtype=torch.float64), kv, kv, static_kv=True)


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_default_m_does_not_depend_on_padding(pattern):
    """Without max_len, ten real tokens give the same outputs alone or padded to fifteen (issue 15, item 8)."""
    m = make(pattern)
    torch.manual_seed(1)
    real = torch.randn(10, 1, EMBED_DIM, dtype=torch.float64)
    q = torch.randn(7, 1, EMBED_DIM, dtype=torch.float64) if pattern.cross else real
    alone, _ = m(q, real, real, need_weights=False)
    pad = torch.randn(5, 1, EMBED_DIM, dtype=torch.float64)
    for left in (False, True):  # fairseq pads encoders on the left, decoders on the right
        if pattern.causal and left:
            continue
        keys = torch.cat([pad, real] if left else [real, pad])
        kpm = torch.zeros(1, 15, dtype=torch.bool)
        kpm[0, :5] = left
        kpm[0, 10:] = not left
        padded, _ = m(q if pattern.cross else keys, keys, keys, key_padding_mask=kpm, need_weights=False)
        if not pattern.cross:
            padded = padded[5:] if left else padded[:10]
        assert_close(padded, alone)


def test_fairseq_plugin_passes_max_positions_as_max_len():
    pytest.importorskip("fairseq")
    from efficient_fairseq.modules import build_role_attention
    from efficient_fairseq.options import ROLES, RoleChoice

    built = build_role_attention(
        RoleChoice(ROLES["decoder"], "cosformer", {}), EMBED_DIM, NUM_HEADS, max_positions=128, self_attention=True
    )
    assert built.max_len == 128
    chosen = build_role_attention(
        RoleChoice(ROLES["decoder"], "cosformer", {"max_len": 256}),
        EMBED_DIM,
        NUM_HEADS,
        max_positions=128,
        self_attention=True,
    )
    assert chosen.max_len == 256  # --attn-max-len wins
    with pytest.raises(ValueError, match="max_len=64 is shorter than the model's 128 positions"):
        build_role_attention(
            RoleChoice(ROLES["decoder"], "cosformer", {"max_len": 64}),
            EMBED_DIM,
            NUM_HEADS,
            max_positions=128,
            self_attention=True,
        )
    vanilla = build_role_attention(
        RoleChoice(ROLES["decoder"], "vanilla", {}), EMBED_DIM, NUM_HEADS, max_positions=128, self_attention=True
    )
    assert not hasattr(vanilla, "max_len")


def test_paragen_plugin_passes_max_pos_so_the_decoder_can_decode():
    from efficient_transformers import EfficientDecoder

    torch.manual_seed(0)
    emb = torch.nn.Embedding(23, EMBED_DIM, padding_idx=1)
    dec = (
        EfficientDecoder(
            emb,
            1,
            self_attention="cosformer",
            cross_attention="cosformer",
            num_layers=1,
            d_model=EMBED_DIM,
            n_head=NUM_HEADS,
            dim_feedforward=32,
            max_pos=40,
        )
        .double()
        .eval()
    )
    assert dec.layers[0].self_attn.max_len == 40
    tgt = torch.randint(2, 23, (2, 9))
    mem = torch.randn(6, 2, EMBED_DIM, dtype=torch.float64)
    full = dec(tgt, mem)
    state = {}
    steps = [dec(tgt[:, :t], mem, incremental_state=state)[:, -1:] for t in range(1, 10)]
    assert_close(torch.cat(steps, dim=1), full)


@pytest.mark.slow
def test_fairseq_lm_trains_and_generates_without_max_len(tmp_path):
    """``--arch transformer_lm_cosformer`` with no ``--attn-max-len``: the plugin passes the model's max positions,
    so ``fairseq-generate`` decodes (it raised "needs a fixed M" before; issue 15, item 8)."""
    pytest.importorskip("fairseq")
    import subprocess
    import sys
    from pathlib import Path

    import fairseq_helpers as fh

    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [
            sys.executable,
            str(root / "examples/fairseq/make_corpus.py"),
            "--out",
            str(tmp_path / "raw"),
            "--min-len",
            "12",
            "--max-len",
            "40",
            "--train",
            "40",
            "--valid",
            "16",
            "--test",
            "4",
            "--seed",
            "3",
        ],
        check=True,
        env=fh.env(),
    )
    fh.run_cli(
        "fairseq-preprocess",
        [
            "--only-source",
            "--trainpref",
            tmp_path / "raw/train.txt",
            "--validpref",
            tmp_path / "raw/valid.txt",
            "--testpref",
            tmp_path / "raw/test.txt",
            "--destdir",
            tmp_path / "bin",
            "--workers",
            "1",
        ],
    )
    common = ["--tokens-per-sample", "64", "--cpu", "--num-workers", "0", "--required-batch-size-multiple", "1"]
    fh.train(
        [
            tmp_path / "bin",
            "--arch",
            "transformer_lm_cosformer",
            "--task",
            "language_modeling",
            "--decoder-layers",
            "1",
            "--decoder-embed-dim",
            "16",
            "--decoder-ffn-embed-dim",
            "32",
            "--decoder-attention-heads",
            "2",
            "--batch-size",
            "4",
            "--optimizer",
            "adam",
            "--lr",
            "0.003",
            "--max-update",
            "2",
            "--no-epoch-checkpoints",
            "--no-progress-bar",
            "--seed",
            "1",
            "--save-dir",
            tmp_path / "ckpt",
            *common,
        ]
    )
    hyps = fh.generate(
        [
            tmp_path / "bin",
            "--task",
            "language_modeling",
            "--path",
            tmp_path / "ckpt/checkpoint_last.pt",
            "--beam",
            "2",
            "--max-len-b",
            "4",
            "--batch-size",
            "2",
            "--sample-break-mode",
            "eos",
            "--prefix-size",
            "2",
            "--gen-subset",
            "test",
            *common,
        ],
        tmp_path / "gen",
    )
    assert len(hyps) == 4


@pytest.mark.parametrize("act_fun", ["relu", "elu"])
@pytest.mark.parametrize("chunks", [1, 4])
def test_noncausal_products_match_the_linear_attention_op_and_gradcheck(monkeypatch, chunks, act_fun):
    """The noncausal path's own node (features, then products whose reduction over the length is cut into
    ``chunks`` as on CUDA) against the features through the shared op's reference, including a query that
    attends nothing, and its gradients by gradcheck in float64."""
    from efficient_attention.attentions import cosformer as mod
    from efficient_attention.kernels.linear_attention import linear_attention

    monkeypatch.setattr(mod, "_state_chunks", lambda length, x: chunks)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 7, generator=g, dtype=torch.float64) for _ in range(3))
    q[0, 1, 3] = -1.0  # relu: nothing attended, 0 with a zero gradient
    f64 = torch.float64
    tables = (mod._cos_sin(16, 20, q.device, f64, f64),) * 2

    def run(a, b, c):
        return mod._Noncausal.apply(a, b, c, tables, act_fun, f64)

    out = run(q, k, v)
    qf, kf = (mod._features(x, tables[0][0], act_fun, f64) for x in (q, k))
    assert_close(out, linear_attention(qf, kf, v, causal=False, backend="reference"))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    run(q, k, v).sum().backward()
    if act_fun == "relu":
        assert out[0, 1, 3].abs().max() == 0 and q.grad[0, 1, 3].abs().max() == 0
    q = torch.randn(2, 3, 16, 7, generator=g, dtype=torch.float64, requires_grad=True)  # away from den = 0
    assert torch.autograd.gradcheck(run, (q, k, v))


def test_decoding_in_inference_mode_then_training_uses_separate_tables():
    """The cos/sin tables are cached apart for inference mode: a training step after decoding under
    ``torch.inference_mode`` (same lengths, same M) does not save an inference tensor for its backward."""
    torch.manual_seed(0)
    m = CosformerAttention(EMBED_DIM, NUM_HEADS, causal=True, max_len=8)
    x = torch.randn(8, 2, EMBED_DIM)
    with torch.inference_mode():
        state: dict = {}
        steps = [m(x[t : t + 1], incremental_state=state, need_weights=False)[0] for t in range(8)]
        full = m(x, need_weights=False)[0]
    assert_close(torch.cat(steps), full, torch.float32)
    out, _ = m(x.clone().requires_grad_(), need_weights=False)
    out.sum().backward()
    assert_close(out.detach(), full, torch.float32)


@pytest.mark.parametrize("act_fun", ["relu", "elu"])
def test_causal_features_made_in_the_cpp_kernel_match_and_gradcheck(act_fun):
    """Causal cosFormer on the CPU makes its features inside the C++ linear-attention kernel: against the features
    through the op's reference, including a query that attends nothing (chunks that do not divide the length),
    and its gradients by gradcheck in float64."""
    from efficient_attention.attentions import cosformer as mod
    from efficient_attention.kernels._loader import cpu_extension
    from efficient_attention.kernels.linear_attention import linear_attention

    if cpu_extension() is None:
        pytest.skip("the C++ kernels are not built")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 70, 5, generator=g, dtype=torch.float64) for _ in range(3))
    q[0, 1, 0] = -1.0  # relu: the first query sees only its own key, with a zero feature: nothing attended
    f64 = torch.float64
    table = mod._cos_sin(70, 80, q.device, f64, f64)[0]

    def run(a, b, c):
        return mod._causal_cpp(a, b, c, table, act_fun, f64)

    out = run(q, k, v)
    qf, kf = (mod._features(x, table, act_fun, f64) for x in (q, k))
    assert_close(out, linear_attention(qf, kf, v, causal=True, backend="reference"))
    if act_fun == "relu":
        assert out[0, 1, 0].abs().max() == 0
    q, k, v = (torch.randn(1, 2, 37, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    table = mod._cos_sin(37, 40, q.device, f64, f64)[0]
    assert torch.autograd.gradcheck(run, (q, k, v))


def test_causal_module_takes_the_cpp_features_path_on_the_cpu(monkeypatch):
    """The module routes unpadded causal self attention there (and nothing else: padding takes the op)."""
    from efficient_attention.attentions import cosformer as mod
    from efficient_attention.kernels._loader import cpu_extension

    if cpu_extension() is None:
        pytest.skip("the C++ kernels are not built")
    real, calls = mod._causal_cpp, []

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(mod, "_causal_cpp", spy)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # enough (batch, head) pairs for the C++ kernel
    m = make(Pattern.CAUSAL_SELF)
    q, k, v = inputs("cosformer", Pattern.CAUSAL_SELF)
    m(q, k, v, need_weights=False)
    assert calls == [1]
    m(q, k, v, key_padding_mask=padding_mask(BSZ, k.shape[0], Pattern.CAUSAL_SELF), need_weights=False)
    assert calls == [1]
