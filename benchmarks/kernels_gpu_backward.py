"""Where the time of the Triton kernels' forward+backward goes, and which backward tiles win (H100 study).

For causal sliding windows (N = 16k, H = 16, bf16) and the benchmark's block layouts it reports,
per backward tile variant (``VARIANTS``: the committed config, and other ``dq`` / ``dkdv`` tiles):

* eager forward+backward time (``do_bench`` median; what a user's training step sees),
* the same step replayed from a CUDA graph (no host overhead: the GPU time),
* the host time to issue one step (no synchronisation; when it exceeds the GPU time, the step is
  host-bound),
* the GPU time per kernel (``torch.profiler``), and the gradients' error against the committed config.

FlexAttention (compiled, BlockMask built outside) is measured the same way for the ratio.

    python benchmarks/kernels_gpu_backward.py --out benchmarks/results/kernels_gpu_backward_h100.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kernels_gpu import H, bigbird_layout, fixed_layout, flex_block_mask, graph_ms  # noqa: E402

from efficient_attention.kernels import block_sparse_attention, sliding_window_attention, triton_ops  # noqa: E402
from efficient_attention.local_window import LocalWindow  # noqa: E402

N = 16384


def bench(fn, grads=None):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=40, grad_to_none=grads, return_mode="median")


def host_ms(step, tensors, n=30):
    """Host time to issue one step (no synchronisation inside the loop)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        for t in tensors:
            t.grad = None
        step()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e3


def kernel_ms(step, tensors, n=5):
    """GPU ms per step, by kernel name (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            for t in tensors:
                t.grad = None
            step()
        torch.cuda.synchronize()
    out = collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            out[e.name[:60]] += e.device_time_total / 1e3 / n
    return {k: round(v, 4) for k, v in out.most_common(8)}


def _tile(bm, bn, nw, ns):
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns)


# (name, dq tile, dkdv tile) per head dim; None = the committed config
_PTR = dict(fwd=dict(TMA=False), dq=dict(TMA=False), dkdv=dict(TMA=False))
_TMA = dict(fwd=dict(TMA=True), dq=dict(TMA=True), dkdv=dict(TMA=True))
VARIANTS = {  # (name, overrides of the committed config per kernel); the committed config first
    64: [
        ("default", {}),
        ("pointer loads", _PTR),
        ("tma loads", _TMA),
        ("dq 64x64 / dkdv 64x64 w4", dict(dq=_tile(64, 64, 4, 3), dkdv=_tile(64, 64, 4, 3))),
    ],
    128: [
        ("default", {}),
        ("pointer loads", _PTR),
        ("tma loads", _TMA),
        ("dq 128x64 w8 / dkdv 64x128 w8", dict(dq=_tile(128, 64, 8, 3), dkdv=_tile(64, 128, 8, 3))),
    ],
}


def patched(kind, overrides):
    base = triton_ops.window_config if kind == "window" else triton_ops.block_config

    def cfg(*a):
        c = {k: dict(v) for k, v in base(*a).items()}
        for key, tile in overrides.items():
            c[key].update(tile)  # tiles of at most 128 divide the layout's 128-blocks (LUT_BLOCK)
        return c

    return cfg


def host_profile(fn, D, W, out_dir, steps=200):
    """cProfile of ``steps`` eager forward+backward steps (where the host time goes)."""
    import cProfile
    import io
    import pstats

    q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)

    def step():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).backward(do)

    for _ in range(10):
        step()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
    text = f"# cProfile of {steps} eager fwd+bwd steps, W={W}, D={D}\n" + buf.getvalue()
    with open(os.path.join(out_dir, f"host_profile_W{W}_D{D}.txt"), "w") as f:
        f.write(text)
    print("\n".join(text.splitlines()[:40]), flush=True)


def study(rows, name, D, kind, fn, flex, out_path):
    q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    ref = None
    for label, overrides in [("flex", None)] + VARIANTS[D]:
        attr = "window_config" if kind == "window" else "block_config"
        base = getattr(triton_ops, attr)
        if label != "flex":
            setattr(triton_ops, attr, patched(kind, overrides))
            call = fn
        else:
            call = flex
        try:

            def step():
                call(q, k, v).backward(do)

            row = dict(point=name, D=D, variant=label)
            with torch.no_grad():
                row["fwd_ms"] = bench(lambda: call(q, k, v))
            row["fwdbwd_ms"] = bench(step, [q, k, v])
            row["graph_fwdbwd_ms"] = graph_ms(step, [q, k, v])
            row["host_fwdbwd_ms"] = host_ms(step, [q, k, v])
            row["kernels_ms"] = kernel_ms(step, [q, k, v])
            for t in (q, k, v):
                t.grad = None
            step()
            grads = [t.grad.float() for t in (q, k, v)]
            if label == "default":
                ref = grads
            if ref is not None:
                row["grad_rel_err_vs_default"] = max(((a - b).norm() / b.norm()).item() for a, b in zip(grads, ref))
        except Exception as exc:  # out of resources for a tile etc.
            row = dict(point=name, D=D, variant=label, error=f"{type(exc).__name__}: {str(exc)[:200]}")
        finally:
            setattr(triton_ops, attr, base)
        rows.append(row)
        print(
            f"{name:16s} D={D:3d} {label:26s} "
            + (
                f"fwd {row['fwd_ms']:.3f} fwd+bwd {row['fwdbwd_ms']:.3f} graph {row['graph_fwdbwd_ms']:.3f} "
                f"host {row['host_fwdbwd_ms']:.3f} err {row.get('grad_rel_err_vs_default', 0):.1e} "
                + " ".join(f"{k.split('_kernel')[0][-18:]}={v:.3f}" for k, v in list(row["kernels_ms"].items())[:4])
                if "error" not in row
                else row["error"]
            ),
            flush=True,
        )
        with open(out_path, "w") as f:
            json.dump(
                dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, N=N, H=H, rows=rows), f, indent=1
            )


def main():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="kernels_gpu_backward.json")
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--windows", type=int, nargs="+", default=[128, 1024, 4096])
    p.add_argument("--layouts", nargs="*", default=["fixed", "bigbird"])
    p.add_argument("--host-profile", type=int, nargs=2, metavar=("W", "D"), help="cProfile eager steps at this point")
    args = p.parse_args()
    if args.host_profile:
        W, D = args.host_profile
        w = LocalWindow.sliding(W - 1, 0, causal=True)
        host_profile(lambda q, k, v: sliding_window_attention(q, k, v, w)[0], D, W, os.path.dirname(args.out) or ".")
    torch._dynamo.config.cache_size_limit = 64
    compiled = torch.compile(flex_attention, dynamic=False)
    rows = []
    for D in args.dims:
        for W in args.windows:
            w = LocalWindow.sliding(W - 1, 0, causal=True)
            bm = create_block_mask(
                lambda b, h, qi, ki, W=W: (ki <= qi) & (qi - ki < W), None, None, N, N, device="cuda"
            )
            study(
                rows,
                f"window W={W}",
                D,
                "window",
                lambda q, k, v, w=w: sliding_window_attention(q, k, v, w)[0],
                lambda q, k, v, bm=bm: compiled(q, k, v, block_mask=bm),
                args.out,
            )
        nb = N // 128
        for name in args.layouts:
            lay, causal = (fixed_layout(nb, 8), True) if name == "fixed" else (bigbird_layout(H, nb), False)
            lay = lay.cuda()
            bm = flex_block_mask(lay.expand(H, nb, nb), 128, causal, N)
            study(
                rows,
                f"layout {name}",
                D,
                "layout",
                lambda q, k, v, lay=lay, c=causal: block_sparse_attention(q, k, v, lay, 128, causal=c)[0],
                lambda q, k, v, bm=bm: compiled(q, k, v, block_mask=bm),
                args.out,
            )


if __name__ == "__main__":
    main()
