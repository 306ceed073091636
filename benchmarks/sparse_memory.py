"""Activation memory and time of the exact and sparse attention paths (CPU).

Memory is measured deterministically as the bytes autograd saves for the
backward pass (``torch.autograd.graph.saved_tensors_hooks``): the activation
memory a training step keeps between forward and backward.

    PYTHONPATH=. python benchmarks/sparse_memory.py [--lengths 1024 2048 4096]
"""

import argparse
import time

import torch

from efficient_attention import blockwise_attention, layouts
from efficient_attention.functional import dense_attention
from efficient_attention.sparse.block_sparse import block_layout_attention


def saved_bytes(fn):
    total, seen = 0, set()

    def pack(t):  # count each storage once (views and repeated saves share memory)
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def fwd_bwd_time(fn, reps=1):
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn().sum().backward()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a loaded machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"B=1 H={args.heads} d={args.dim} fp32, causal; saved-for-backward MiB / fwd+bwd seconds "
        f"({torch.get_num_threads()} threads)"
    )
    print(
        f"{'N':>6} | {'dense':>16} | {'blockwise (Function)':>22} | {'blockwise (checkpoint)':>24} | "
        f"{'block-sparse local 256':>24}"
    )
    for n in args.lengths:
        q, k, v = (torch.randn(1, args.heads, n, args.dim, requires_grad=True) for _ in range(3))
        bs = 64
        mod = layouts.local_mask_mod(256, causal=True)
        lay = layouts.layout_from_mask_mod(mod, 1, n, n, bs)
        runs = {
            "dense": lambda: dense_attention(q, k, v, causal=True)[0],
            "fn": lambda: blockwise_attention(q, k, v, causal=True, q_chunk_size=args.chunk, k_chunk_size=args.chunk),
            "ckpt": lambda: blockwise_attention(q, k, v, causal=True, q_chunk_size=args.chunk, dropout_p=1e-9),
            "sparse": lambda: block_layout_attention(q, k, v, lay, bs, causal=True, mask_mod=mod),
        }
        cells = []
        for fn in runs.values():
            _, mem = saved_bytes(fn)
            cells.append(f"{mem / 2**20:8.1f} MiB {fwd_bwd_time(fn):6.2f}s")
        print(f"{n:>6} | " + " | ".join(f"{c:>{w}}" for c, w in zip(cells, (16, 22, 24, 24))))


if __name__ == "__main__":
    main()
