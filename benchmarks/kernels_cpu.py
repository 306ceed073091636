"""CPU benchmark of the C++ sparse-attention kernels (fp32, 2 threads by default).

Compares our kernels (``torch.ops.efficient_attention.*`` through the dispatching
entries) with dense ``scaled_dot_product_attention`` and with our own PyTorch reference
path (``efficient_attention.kernels.reference``), forward and forward+backward, at
N in {1k, 4k, 16k}: bidirectional token windows of W in {128, 256, 512} keys
(W/2 on each side) and a 90%-sparse random block layout (block 64, per head).

    python benchmarks/kernels_cpu.py --out benchmarks/results/kernels_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from efficient_attention.kernels import block_sparse_attention, choose_backend, reference, sliding_window_attention  # noqa: E402
from efficient_attention.kernels._loader import cpu_extension  # noqa: E402
from efficient_attention.local_window import LocalWindow  # noqa: E402


def timeit(fn, reps: int, budget_s: float) -> float:
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if time.perf_counter() - start > budget_s:
            break
    return statistics.median(times) * 1e3


def random_layout(heads: int, nb: int, density: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    layout = torch.rand(heads, nb, nb, generator=g) < density
    layout |= torch.eye(nb, dtype=torch.bool)
    return layout


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="kernels_cpu.json")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--windows", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    assert cpu_extension() is not None, "build the C++ extension first: python setup.py build_ext --inplace"
    H, D, bs = args.heads, args.dim, 64
    meta = dict(
        device=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        threads=args.threads,
        torch=torch.__version__,
        dtype="float32",
        batch=1,
        heads=H,
        dim=D,
        brgemm=cpu_extension().use_brgemm(),
        loadavg_start=os.getloadavg(),
        timing="median of up to --reps runs after one warm-up (wall clock)",
    )
    rows = []

    def save():
        meta["loadavg_end"] = os.getloadavg()
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)

    for N in args.lengths:
        q, k, v = (torch.randn(1, H, N, D, requires_grad=True) for _ in range(3))
        do = torch.randn(1, H, N, D)
        budget = 20.0 if N >= 16384 else 8.0

        def run(fn, backward):
            def step():
                out = fn()
                if backward:
                    out.backward(do)
                    q.grad = k.grad = v.grad = None

            if not backward:

                def step():  # noqa: F811
                    with torch.no_grad():
                        fn()

            return timeit(step, args.reps, budget)

        dense = {m: run(lambda: F.scaled_dot_product_attention(q, k, v), m == "fwdbwd") for m in ("fwd", "fwdbwd")}
        print(f"N={N}: dense SDPA {dense['fwd']:.1f} / {dense['fwdbwd']:.1f} ms", flush=True)
        cases = [(f"window W={W}", LocalWindow.sliding(W // 2, W // 2), None) for W in args.windows]
        cases.append(("block 90% sparse", None, random_layout(H, N // bs, 0.1)))
        for name, window, layout in cases:
            if window is not None:
                ours = lambda w=window: sliding_window_attention(q, k, v, w)[0]  # noqa: E731
                ref = lambda w=window: reference.sliding_window_attention(q, k, v, w)[0]  # noqa: E731
                op = "sliding_window"
            else:
                ours = lambda: block_sparse_attention(q, k, v, layout, bs)[0]  # noqa: E731
                ref = lambda: reference.block_sparse_attention(q, k, v, layout, bs)[0]  # noqa: E731
                op = "block_sparse"
            assert choose_backend(op, q, k, v) == "cpp"
            with torch.no_grad():
                err = ((ours() - ref()).norm() / ref().norm()).item()
            row = dict(
                name=name, N=N, rel_err_vs_reference=err, dense_fwd_ms=dense["fwd"], dense_fwdbwd_ms=dense["fwdbwd"]
            )
            if layout is not None:
                row["density"] = layout.float().mean().item()
            for mode in ("fwd", "fwdbwd"):
                row[f"ours_{mode}_ms"] = run(ours, mode == "fwdbwd")
                row[f"reference_{mode}_ms"] = run(ref, mode == "fwdbwd")
                row[f"speedup_vs_dense_{mode}"] = dense[mode] / row[f"ours_{mode}_ms"]
                row[f"speedup_vs_reference_{mode}"] = row[f"reference_{mode}_ms"] / row[f"ours_{mode}_ms"]
            rows.append(row)
            save()
            print(
                f"  {name:18s} ours {row['ours_fwd_ms']:8.1f}/{row['ours_fwdbwd_ms']:8.1f} ms  ref "
                f"{row['reference_fwd_ms']:8.1f}/{row['reference_fwdbwd_ms']:8.1f} ms  vs dense "
                f"x{row['speedup_vs_dense_fwd']:.1f}/x{row['speedup_vs_dense_fwdbwd']:.1f}  vs ref "
                f"x{row['speedup_vs_reference_fwd']:.1f}/x{row['speedup_vs_reference_fwdbwd']:.1f}  err {err:.1e}",
                flush=True,
            )
    save()


if __name__ == "__main__":
    main()
