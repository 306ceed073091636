"""GPU benchmark of the Triton sparse-attention kernels (bf16, H = 16, D = 64 / 128).

Compares, forward and forward+backward, our kernels with ``scaled_dot_product_attention``
(dense and causal) and compiled FlexAttention with the equivalent ``BlockMask`` (built
outside the timed region) and, for windows, the FA2 window kernel that PyTorch ships as
``torch.nn.attention.varlen.varlen_attn(..., window_size=(W - 1, 0))`` (on ``(B*N, H, d)`` tensors
laid out outside the timed region; skipped where PyTorch lacks it), for causal sliding windows W in {128 .. 4096} at
N in {4k, 16k, 64k} (B*N = 16k tokens; B = 1 at 64k) and for the OpenAI ``fixed`` and a
BigBird block layout at N = 16k.  Each point also checks our output against Flex's.

Reports the median time (``triton.testing.do_bench``), the ratio to Flex, and useful-FLOP
throughput (only the unmasked score entries count: 4*d FLOPs each forward, 2.5x that
backward) as a fraction of a dense bf16 matmul measured in the same run.

    python benchmarks/kernels_gpu.py --out benchmarks/results/kernels_gpu_h100.json
    # the window comparison of issue 14 (N = 64k, one head dim per run to stay near 2 minutes):
    python benchmarks/kernels_gpu.py --out DIR --dims 64 --lengths 65536 --windows 128 256 512 1024 2048 4096 \
        --skip-layouts --skip-sdpa
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from efficient_attention.kernels import block_sparse_attention, choose_backend, sliding_window_attention  # noqa: E402
from efficient_attention.local_window import LocalWindow  # noqa: E402

H = 16
TOKENS = 16384


def bench(fn, grad_of=None) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=40, grad_to_none=grad_of, return_mode="median")


def graph_ms(step, tensors) -> float:
    """Median ms of ``step`` replayed from a CUDA graph: the GPU time, without host overhead
    (grads of ``tensors`` reset to None before capture)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            for t in tensors:
                t.grad = None
            step()
    torch.cuda.current_stream().wait_stream(s)
    for t in tensors:
        t.grad = None
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    ms = bench(g.replay)
    del g
    return ms


def matmul_tflops() -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ b)
    return 2 * n**3 / ms / 1e9


def fixed_layout(nb: int, stride: int, summary: int = 1) -> torch.Tensor:
    """OpenAI Sparse Transformer 'fixed' (causal): blocks of ``stride`` blocks + their last ``summary`` blocks."""
    qb = torch.arange(nb)[:, None]
    kb = torch.arange(nb)[None, :]
    local = (qb // stride) == (kb // stride)
    summ = (kb % stride) >= stride - summary
    return ((local | summ) & (kb <= qb))[None]


def bigbird_layout(heads: int, nb: int, window: int = 1, n_global: int = 2, n_random: int = 3, seed: int = 0):
    """BigBird: a band of 2*window+1 blocks, ``n_global`` global blocks (rows and columns), random blocks per head."""
    g = torch.Generator().manual_seed(seed)
    qb = torch.arange(nb)[:, None]
    kb = torch.arange(nb)[None, :]
    base = ((qb - kb).abs() <= window) | (qb < n_global) | (kb < n_global)
    layout = base.expand(heads, nb, nb).clone()
    rand = torch.rand(heads, nb, nb, generator=g).argsort(-1)[..., :n_random]
    layout.scatter_(-1, rand, True)
    return layout


def flex_block_mask(layout: torch.Tensor, bs: int, causal: bool, N: int):
    """The exact Flex BlockMask of a block layout ``(H, nb, nb)``: kept blocks are full blocks, except the
    diagonal blocks of a causal layout, which are partial blocks with the causal mask_mod."""
    from torch.nn.attention.flex_attention import BlockMask

    def to_kv(blocks):
        num = blocks.sum(-1, dtype=torch.int32)[None]
        idx = torch.sort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).indices.to(torch.int32)[None]
        return num.contiguous(), idx.contiguous()

    if causal:
        diag = torch.eye(layout.shape[-1], dtype=torch.bool, device=layout.device)
        partial, full = layout & diag, (layout & ~diag).tril()
    else:
        partial, full = torch.zeros_like(layout), layout
    kv_num, kv_idx = to_kv(partial)
    full_num, full_idx = to_kv(full)

    def causal_mod(b, h, qi, ki):
        return ki <= qi

    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=bs, mask_mod=causal_mod if causal else None, seq_lengths=(N, N)
    )


def varlen_window_fn(B: int, N: int, W: int):
    """``fn(q, k, v)`` on ``(B*N, H, d)`` tensors: PyTorch's FA2 varlen kernel with a causal window of W keys
    (each query sees itself and the W - 1 keys before it), or ``None`` where this PyTorch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    if "window_size" not in inspect.signature(varlen_attn).parameters:
        return None
    cu = torch.arange(0, (B + 1) * N, N, device="cuda", dtype=torch.int32)

    def fn(q, k, v):
        return varlen_attn(q, k, v, cu, cu, N, N, window_size=(W - 1, 0))

    return fn


def useful_flops(kept: float, d: int, backward: bool) -> float:
    return kept * 4 * d * (3.5 if backward else 1.0)


class Runner:
    def __init__(self, args):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        torch._dynamo.config.cache_size_limit = 64
        self.flex = torch.compile(flex_attention, dynamic=False)
        self.create_block_mask = create_block_mask
        self.args = args
        self.rows = []
        self.t0 = time.time()
        props = torch.cuda.get_device_properties(0)
        self.meta = dict(
            device=torch.cuda.get_device_name(0),
            sm_count=props.multi_processor_count,
            torch=torch.__version__,
            triton=__import__("triton").__version__,
            python=platform.python_version(),
            dtype="bfloat16",
            heads=H,
            tokens_per_batch=TOKENS,
            timing="triton.testing.do_bench median, warmup 10 ms, rep 40 ms",
            useful_flops="4*d per unmasked score entry forward; x3.5 forward+backward",
        )
        self.meta["matmul_tflops"] = matmul_tflops()
        print(f"dense bf16 matmul: {self.meta['matmul_tflops']:.0f} TFLOP/s", flush=True)

    def save(self):
        with open(self.args.out, "w") as f:
            json.dump(dict(meta=self.meta, rows=self.rows), f, indent=1)

    def time_pair(self, fn, q, k, v, do):
        fwd = bench(lambda: fn(q, k, v))

        def step():
            fn(q, k, v).backward(do)

        fb = bench(step, grad_of=[q, k, v])
        return fwd, fb, graph_ms(step, [q, k, v])

    def varlen_point(self, row, varlen, q, k, v, do, ours_out):
        """Times ``varlen(q, k, v)`` on ``(B*N, H, d)`` copies of the inputs (laid out before timing)."""
        B, _, N, D = q.shape

        def packed(t, grad=True):
            t = t.detach().transpose(1, 2).reshape(B * N, H, D).contiguous()
            return t.requires_grad_() if grad else t

        qp, kp, vp, dop = packed(q), packed(k), packed(v), packed(do, grad=False)
        try:
            with torch.no_grad():
                got = varlen(qp, kp, vp).reshape(B, N, H, D).transpose(1, 2).float()
            row["rel_err_varlen_vs_ours"] = ((got - ours_out.float()).norm() / ours_out.float().norm()).item()
            fwd = bench(lambda: varlen(qp, kp, vp))

            def step():
                varlen(qp, kp, vp).backward(dop)

            row["varlen_fwd_ms"], row["varlen_fwdbwd_ms"] = fwd, bench(step, grad_of=[qp, kp, vp])
            row["speedup_vs_varlen_fwdbwd"] = row["varlen_fwdbwd_ms"] / row["ours_fwdbwd_ms"]
            row["speedup_vs_varlen_fwd"] = row["varlen_fwd_ms"] / row["ours_fwd_ms"]
            try:
                row["varlen_graph_fwdbwd_ms"] = graph_ms(step, [qp, kp, vp])
                row["speedup_vs_varlen_graph_fwdbwd"] = row["varlen_graph_fwdbwd_ms"] / row["ours_graph_fwdbwd_ms"]
            except Exception as exc:  # not capturable: eager times only
                row["varlen_graph_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        except Exception as exc:
            row["varlen_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        qp = kp = vp = dop = None  # free the copies (not del: the closures above read them)

    def point(self, name, N, D, B, kept, ours, bm, row_mask, varlen=None, **extra):
        """``bm``: Flex BlockMask; ``row_mask(rows) -> bool (H|1, len(rows), N)``, True = attend (for the check);
        ``varlen``: an optional third baseline taking ``(B*N, H, d)`` tensors (see ``varlen_window_fn``)."""
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
        flex = lambda q, k, v: self.flex(q, k, v, block_mask=bm)  # noqa: E731
        with torch.no_grad():
            a, b = ours(q, k, v), flex(q, k, v)
            err = ((a.float() - b.float()).norm() / b.float().norm()).item()
            rows = torch.cat([torch.arange(0, 128), torch.arange(N - 384, N)]).cuda()  # first and last rows
            ref = F.scaled_dot_product_attention(
                q[:, :, rows].float(), k.float(), v.float(), attn_mask=row_mask(rows)[None]
            )
            err_sdpa = ((a[:, :, rows].float() - ref).norm() / ref.norm()).item()
        row = dict(
            name=name,
            N=N,
            D=D,
            B=B,
            kept_fraction=kept / (B * H * N * N),
            rel_err_vs_flex=err,
            rel_err_vs_sdpa_rows=err_sdpa,
            backend=choose_backend("block_sparse" if "layout" in name else "sliding_window", q, k, v),
        )
        row.update(extra)
        for label, fn in (("ours", ours), ("flex", flex)):
            row[f"{label}_fwd_ms"], row[f"{label}_fwdbwd_ms"], row[f"{label}_graph_fwdbwd_ms"] = self.time_pair(
                fn, q, k, v, do
            )
        if varlen is not None:
            self.varlen_point(row, varlen, q, k, v, do, a)
        row["speedup_vs_flex_graph_fwdbwd"] = row["flex_graph_fwdbwd_ms"] / row["ours_graph_fwdbwd_ms"]
        rate = self.meta["matmul_tflops"]
        for mode, bwd in (("fwd", False), ("fwdbwd", True)):
            row[f"speedup_vs_flex_{mode}"] = row[f"flex_{mode}_ms"] / row[f"ours_{mode}_ms"]
            tflops = useful_flops(kept, D, bwd) / row[f"ours_{mode}_ms"] / 1e9
            row[f"ours_{mode}_tflops"] = tflops
            row[f"ours_{mode}_frac_matmul"] = tflops / rate
        row["ours_graph_fwdbwd_frac_matmul"] = useful_flops(kept, D, True) / row["ours_graph_fwdbwd_ms"] / 1e9 / rate
        self.rows.append(row)
        self.save()
        print(
            f"{name:28s} N={N:6d} D={D:3d} ours {row['ours_fwd_ms']:8.3f}/{row['ours_fwdbwd_ms']:8.3f} ms  "
            f"flex {row['flex_fwd_ms']:8.3f}/{row['flex_fwdbwd_ms']:8.3f} ms  x{row['speedup_vs_flex_fwd']:.2f}/"
            f"x{row['speedup_vs_flex_fwdbwd']:.2f}  "
            f"graph {row['ours_graph_fwdbwd_ms']:.3f}/{row['flex_graph_fwdbwd_ms']:.3f} "
            f"x{row['speedup_vs_flex_graph_fwdbwd']:.2f}  {row['ours_fwdbwd_frac_matmul']:.2f} of mm  "
            f"err {err:.1e}/{err_sdpa:.1e} "
            f"[{time.time() - self.t0:.0f}s]",
            flush=True,
        )
        if "varlen_fwdbwd_ms" in row:
            print(
                f"{'':28s} varlen_attn {row['varlen_fwd_ms']:8.3f}/{row['varlen_fwdbwd_ms']:8.3f} ms  "
                f"ours x{row['speedup_vs_varlen_fwd']:.2f}/x{row['speedup_vs_varlen_fwdbwd']:.2f}  graph "
                f"{row.get('varlen_graph_fwdbwd_ms', float('nan')):.3f} "
                f"x{row.get('speedup_vs_varlen_graph_fwdbwd', float('nan')):.2f}  "
                f"err vs ours {row['rel_err_varlen_vs_ours']:.1e}",
                flush=True,
            )
        elif "varlen_error" in row:
            print(f"{'':28s} varlen_attn failed: {row['varlen_error']}", flush=True)
        q = k = v = do = bm = None  # free the inputs (not del: the closures above read them)
        torch.cuda.empty_cache()

    def sdpa(self, N, D, B):
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
        row = dict(name="sdpa", N=N, D=D, B=B)
        for causal in (False, True):
            fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
            fwd, fb, _ = self.time_pair(fn, q, k, v, do)
            tag = "causal" if causal else "dense"
            row[f"{tag}_fwd_ms"], row[f"{tag}_fwdbwd_ms"] = fwd, fb
            kept = B * H * (N * (N + 1) / 2 if causal else N * N)
            row[f"{tag}_fwdbwd_frac_matmul"] = useful_flops(kept, D, True) / fb / 1e9 / self.meta["matmul_tflops"]
        self.rows.append(row)
        self.save()
        print(
            f"sdpa N={N} D={D}: dense {row['dense_fwd_ms']:.3f}/{row['dense_fwdbwd_ms']:.3f} ms, causal "
            f"{row['causal_fwd_ms']:.3f}/{row['causal_fwdbwd_ms']:.3f} ms",
            flush=True,
        )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="kernels_gpu.json")
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--windows", type=int, nargs="+", default=[128, 256, 512, 1024, 4096])
    p.add_argument("--layout-block", type=int, default=128)
    p.add_argument("--skip-windows", action="store_true")
    p.add_argument("--skip-layouts", action="store_true")
    p.add_argument("--skip-sdpa", action="store_true", help="leave out the dense/causal SDPA reference rows")
    p.add_argument("--no-varlen", action="store_true", help="leave out the varlen_attn window baseline")
    args = p.parse_args()
    if not args.out.endswith(".json"):  # a directory
        os.makedirs(args.out, exist_ok=True)
        args.out = os.path.join(args.out, "kernels_gpu.json")
    r = Runner(args)
    for D in args.dims:
        if not args.skip_windows:
            for N in args.lengths:
                B = max(1, TOKENS // N)
                if not args.skip_sdpa:
                    r.sdpa(N, D, B)
                for W in args.windows:
                    window = LocalWindow.sliding(W - 1, 0, causal=True)  # each query sees W keys (itself included)
                    w_t = torch.tensor(W, device="cuda")  # a captured tensor: one compiled Flex graph serves every W

                    def mask_mod(b, h, qi, ki, w_t=w_t):
                        return (ki <= qi) & (qi - ki < w_t)

                    bm = r.create_block_mask(mask_mod, None, None, N, N, device="cuda")

                    def row_mask(rows, W=W, N=N):
                        ki = torch.arange(N, device="cuda")[None]
                        return ((ki <= rows[:, None]) & (rows[:, None] - ki < W))[None]

                    kept = B * H * (N * W - W * (W - 1) / 2)  # sum_i min(i + 1, W)
                    varlen = None if args.no_varlen else varlen_window_fn(B, N, W)
                    r.point(
                        f"window W={W}",
                        N,
                        D,
                        B,
                        kept,
                        lambda q, k, v, w=window: sliding_window_attention(q, k, v, w)[0],
                        bm,
                        row_mask,
                        varlen=varlen,
                        W=W,
                    )
        if args.skip_layouts:
            continue
        N, bs = 16384, args.layout_block
        nb = N // bs
        for name, layout, causal in (
            ("layout fixed", fixed_layout(nb, stride=max(2, 1024 // bs)), True),
            ("layout bigbird", bigbird_layout(H, nb), False),
        ):
            lay = layout.cuda()
            full = lay.expand(H, nb, nb)
            if causal:  # diagonal blocks keep their lower triangle, blocks above it nothing
                diag = torch.eye(nb, dtype=torch.bool, device="cuda")
                kept = (
                    float((full & ~diag).tril().sum().item()) * bs * bs
                    + float((full & diag).sum().item()) * bs * (bs + 1) / 2
                )
            else:
                kept = float(full.sum().item()) * bs * bs

            bm = flex_block_mask(full, bs, causal, N)

            def row_mask(rows, full=full, causal=causal):
                keep = full[:, rows // bs].repeat_interleave(bs, -1)
                if causal:
                    keep = keep & (torch.arange(N, device="cuda")[None, None] <= rows[None, :, None])
                return keep

            r.point(
                name,
                N,
                D,
                1,
                kept,
                lambda q, k, v, lay=lay, c=causal: block_sparse_attention(q, k, v, lay, bs, causal=c)[0],
                bm,
                row_mask,
                block_size=bs,
                causal=causal,
                layout_heads=int(lay.shape[0]),
            )
    print(json.dumps(r.meta))
    windows = [row for row in r.rows if row["name"].startswith("window")]
    if windows:  # issue 14's target: >= 1.25x Flex and >= 1.5x varlen_attn, forward+backward
        print(
            f"\n{'N':>6} {'D':>4} {'W':>5} {'ours ms':>8} {'flex ms':>8} {'varlen ms':>9} "
            f"{'x flex':>7} {'x varlen':>8}  "
            f"(forward+backward, eager / CUDA graph)"
        )
        for row in windows:
            print(
                f"{row['N']:6d} {row['D']:4d} {row['W']:5d} {row['ours_fwdbwd_ms']:8.3f} {row['flex_fwdbwd_ms']:8.3f} "
                f"{row.get('varlen_fwdbwd_ms', float('nan')):9.3f} {row['speedup_vs_flex_fwdbwd']:7.2f} "
                f"{row.get('speedup_vs_varlen_fwdbwd', float('nan')):8.2f}  "
                f"graph x{row['speedup_vs_flex_graph_fwdbwd']:.2f} "
                f"x{row.get('speedup_vs_varlen_graph_fwdbwd', float('nan')):.2f}"
            )


if __name__ == "__main__":
    main()
