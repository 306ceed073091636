"""Tile-size sweep of the Triton sliding-window kernels (bf16, H = 16, B*N = 16k, causal windows).

Times the forward for several forward tiles and forward+backward for several backward
tiles, to choose ``triton_ops.window_config``.  Writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from efficient_attention.kernels import block_sparse_attention, sliding_window_attention, triton_ops  # noqa: E402
from efficient_attention.local_window import LocalWindow  # noqa: E402

FWD = [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 128, 4, 3), (128, 32, 4, 4)]
BWD = [
    ((32, 128), (128, 32), 4, 5),
    ((64, 64), (64, 64), 4, 3),
    ((64, 128), (128, 64), 8, 3),
    ((32, 64), (64, 32), 4, 4),
]


LAYOUT_FWD = [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 3), (128, 32, 4, 3)]
LAYOUT_BWD = [
    ((64, 64), (64, 64), 4, 3),
    ((64, 128), (128, 64), 8, 3),
    ((32, 128), (128, 32), 4, 3),
    ((128, 128), (128, 128), 8, 2),
    ((64, 128), (128, 64), 4, 3),
]


def sweep_layouts(args):
    """The block-sparse tiles on the benchmark's fixed / BigBird layouts (bs 128, N 16k)."""
    import triton.testing
    from kernels_gpu import H, bigbird_layout, fixed_layout

    default = triton_ops.block_config
    rows = []
    N, bs = 16384, 128
    nb = N // bs
    for D in (64, 128):
        q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        for name, lay, causal in (("fixed", fixed_layout(nb, 8), True), ("bigbird", bigbird_layout(H, nb), False)):
            lay = lay.cuda()
            base = default(bs, D, torch.bfloat16)
            for bm, bn, nw, ns in LAYOUT_FWD:
                cfg = dict(base, fwd=dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns, LUT_BLOCK=bs))
                triton_ops.block_config = lambda *a, cfg=cfg: cfg
                try:
                    with torch.no_grad():
                        ms = triton.testing.do_bench(
                            lambda: block_sparse_attention(q, k, v, lay, bs, causal=causal),
                            warmup=10,
                            rep=40,
                            return_mode="median",
                        )
                except Exception as exc:
                    ms = float("nan")
                    print("fail", exc.__class__.__name__)
                rows.append(dict(D=D, layout=name, kind="fwd", cfg=[bm, bn, nw, ns], ms=ms))
                print(f"D={D} {name} fwd {bm}x{bn} w{nw} s{ns}: {ms:.3f} ms", flush=True)
            for (m1, n1), (m2, n2), nw, ns in LAYOUT_BWD:
                cfg = dict(
                    base,
                    dkdv=dict(BLOCK_M=m1, BLOCK_N=n1, num_warps=nw, num_stages=ns, LUT_BLOCK=bs),
                    dq=dict(BLOCK_M=m2, BLOCK_N=n2, num_warps=nw, num_stages=ns, LUT_BLOCK=bs),
                )
                triton_ops.block_config = lambda *a, cfg=cfg: cfg

                def step():
                    block_sparse_attention(q, k, v, lay, bs, causal=causal)[0].backward(do)

                try:
                    ms = triton.testing.do_bench(step, warmup=10, rep=40, grad_to_none=[q, k, v], return_mode="median")
                except Exception as exc:
                    ms = float("nan")
                    print("fail", exc.__class__.__name__)
                rows.append(dict(D=D, layout=name, kind="fwdbwd", cfg=[m1, n1, m2, n2, nw, ns], ms=ms))
                print(f"D={D} {name} fwdbwd dkdv {m1}x{n1} dq {m2}x{n2} w{nw} s{ns}: {ms:.3f} ms", flush=True)
            triton_ops.block_config = default
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(0), rows=rows), f, indent=1)


def main():
    import triton.testing

    p = argparse.ArgumentParser()
    p.add_argument("--out", default="sweep.json")
    p.add_argument("--layouts", action="store_true", help="sweep the block-sparse tiles instead of the window tiles")
    args = p.parse_args()
    if args.layouts:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        return sweep_layouts(args)
    default = triton_ops.window_config
    rows = []
    N, H = 16384, 16
    for D in (64, 128):
        q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        for W in (256, 1024, 4096):
            w = LocalWindow.sliding(W - 1, 0, causal=True)
            base = default(W, D, torch.bfloat16)
            for bm, bn, nw, ns in FWD:
                cfg = dict(base, fwd=dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns, LUT_BLOCK=128))
                triton_ops.window_config = lambda *a, cfg=cfg: cfg
                try:
                    with torch.no_grad():
                        ms = triton.testing.do_bench(
                            lambda: sliding_window_attention(q, k, v, w), warmup=10, rep=40, return_mode="median"
                        )
                except Exception as exc:  # out of resources etc.
                    ms = float("nan")
                    print("fail", exc.__class__.__name__)
                rows.append(dict(D=D, W=W, kind="fwd", cfg=[bm, bn, nw, ns], ms=ms))
                print(f"D={D} W={W} fwd {bm}x{bn} w{nw} s{ns}: {ms:.3f} ms", flush=True)
            for (m1, n1), (m2, n2), nw, ns in BWD:
                if D == 128 and ns > 3:
                    ns = 3
                cfg = dict(
                    base,
                    dkdv=dict(BLOCK_M=m1, BLOCK_N=n1, num_warps=nw if D == 64 else 8, num_stages=ns, LUT_BLOCK=128),
                    dq=dict(BLOCK_M=m2, BLOCK_N=n2, num_warps=nw if D == 64 else 8, num_stages=ns, LUT_BLOCK=128),
                )
                triton_ops.window_config = lambda *a, cfg=cfg: cfg

                def step():
                    sliding_window_attention(q, k, v, w)[0].backward(do)

                try:
                    ms = triton.testing.do_bench(step, warmup=10, rep=40, grad_to_none=[q, k, v], return_mode="median")
                except Exception as exc:
                    ms = float("nan")
                    print("fail", exc.__class__.__name__)
                rows.append(dict(D=D, W=W, kind="fwdbwd", cfg=[m1, n1, m2, n2, nw, ns], ms=ms))
                print(f"D={D} W={W} fwdbwd dkdv {m1}x{n1} dq {m2}x{n2} w{nw} s{ns}: {ms:.3f} ms", flush=True)
            triton_ops.window_config = default
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(0), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
