"""The reference documents' examples (OpenAI sparse_attention, AttentionGrid) run with only imports changed.

The scripts live in ``examples/sparse/``; here they run in-process.  Only
sizes outside the quoted README lines are adjusted (the LongNet example uses
CUDA only when present).  The
BlockwiseParallelJax examples also replace their JAX random calls by torch ones
(listed in the script's docstring).
"""

import contextlib
import io
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "sparse"


def run(name, replace=()):
    src = (EXAMPLES / name).read_text()
    for old, new in replace:
        assert old in src, old
        src = src.replace(old, new)
    ns = {"__name__": "__main__"}
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(src, str(EXAMPLES / name), "exec"), ns)
    return ns, buf.getvalue()


def test_openai_readme_example():
    ns, out = run("openai_sparse_attention.py", [("2, 1024, 256", "2, 256, 64")])
    for dense, sparse in (
        ("full_attn_tf", "full_attn_bs"),
        ("local_attn_tf", "local_attn_bs"),
        ("strided_attn_tf", "strided_attn_bs"),
    ):
        torch.testing.assert_close(ns[dense], ns[sparse], atol=1e-5, rtol=1e-4)
    assert ns["fixed"].shape == (2, 256, 64) and torch.isfinite(ns["fixed"]).all()
    assert "fixed" in out


def test_attention_grid_landmark_example():
    ns, out = run("attention_grid_landmark.py")
    assert ns["output"].shape == (8, 12, 128, 64)
    assert "torch.Size([8, 12, 128, 64])" in out


def test_attention_grid_longnet_example():
    ns, out = run("attention_grid_longnet.py")  # it picks CUDA only when present
    assert ns["outputs"].shape == (16, 128, 512) and ns["outputs"].dtype == torch.float16
    assert torch.isfinite(ns["outputs"]).all()


def test_attention_grid_dynamic_sparse_example():
    ns, out = run("attention_grid_dynamic_sparse.py", [("2, 512, 4, 64", "2, 128, 4, 16")])
    assert ns["out_hash"].shape == ns["out_qk"].shape == (2, 128, 4, 16)


def test_attention_grid_blockwise_parallel_examples():
    ns, out = run("attention_grid_blockwise_parallel.py")
    assert ns["output_readme"].shape == (1, 100, 768) and torch.isfinite(ns["output_readme"]).all()
    assert ns["output"].shape == (8, 128, 768) and torch.isfinite(ns["output"]).all()
    assert "torch.Size([8, 128, 768])" in out
