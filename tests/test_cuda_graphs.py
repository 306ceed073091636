"""A training step of every mechanism replays from a CUDA graph (``torch.cuda.make_graphed_callables``).

Below 8k tokens a training step on a GPU is bound by the host (``benchmarks/graphs_gpu.py``): a user who wants the
GPU's speed there captures the layer.  This checks that capture works and that the replayed step gives the eager
step's output and gradients, for every registered mechanism in each self pattern (skipped without CUDA).
"""

import pytest
import torch

from efficient_attention import Pattern, available_attentions, build_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CASES = [
    (name, p.causal)
    for name, info in sorted(available_attentions().items())
    for p in (Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF)
    if info.capabilities.supports(p)
]


class _Layer(torch.nn.Module):
    """What a model captures: the attention module on ``x (L, B, C)`` under bf16 autocast, output only (autocast's
    weight cache off: a replayed graph must cast the weights itself)."""

    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, x):
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            return self.attn(x, x, x, need_weights=False)[0]


def _step(layer, x, seed=None):
    if seed is not None:  # a replay draws from the generator's seed and offset as the eager step does
        torch.manual_seed(seed)
    for t in (x, *layer.parameters()):
        t.grad = None
    out = layer(x)
    out.float().square().mean().backward()
    return out.detach().clone(), [p.grad.clone() for p in layer.parameters()], x.grad.clone()


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("name,causal", CASES, ids=[f"{n}-{'causal' if c else 'noncausal'}" for n, c in CASES])
def test_training_step_replays_from_a_cuda_graph(name, causal, caplog, monkeypatch):
    from efficient_attention.attentions import probsparse

    monkeypatch.setattr(probsparse, "_CAPTURE_WARNED", [])
    torch.manual_seed(0)
    attn = build_attention(name, embed_dim=256, num_heads=4, causal=causal, self_attention=True)
    layer = _Layer(attn).cuda().train()
    x = torch.randn(1024, 2, 256, device="cuda", requires_grad=True)
    want = _step(layer, x, seed=1)
    stochastic = _rel(_step(layer, x, seed=2)[0], want[0]) > 1e-3  # training draws random numbers (LARA, ProbSparse)
    graphed = torch.cuda.make_graphed_callables(layer, (torch.randn_like(x, requires_grad=True),))
    # causal ProbSparse cannot read its active-row count while capturing: every row takes the exact pass, and it
    # says so (the same output: the inactive rows' exact results are dropped)
    warned = any("ProbSparse (causal) in a CUDA graph" in r.getMessage() for r in caplog.records)
    assert warned == (name == "probsparse" and causal)
    for _ in range(2):  # replay twice: the second replay must not see the first's state
        got = _step(graphed, x, seed=1)
    assert _rel(got[0], want[0]) < 1e-3, f"{name}: output of the replayed step"
    for g, w in zip(got[1], want[1]):
        assert _rel(g, w) < 1e-3, f"{name}: a parameter's gradient from the replayed step"
    assert _rel(got[2], want[2]) < 1e-3, f"{name}: the input's gradient from the replayed step"
    if stochastic:  # each replay draws anew
        assert _rel(_step(graphed, x)[0], _step(graphed, x)[0]) > 1e-3, f"{name}: replays repeat their random draws"
    if name == "performer":  # a replay does not count forwards: redrawing is the caller's, in place, and seen
        attn.redraw_features()
        want = _step(_Layer(attn), x)  # eager, with the new features (make_graphed_callables patched `layer`)
        assert _rel(want[0], got[0]) > 1e-2, "the redraw changed nothing"
        assert _rel(_step(graphed, x)[0], want[0]) < 1e-3, "the replayed step does not see redrawn features"
