"""The sparse family on the GPU: BlockMask kernels checked against float64, then timed (issue 14).

    python benchmarks/sparse_gpu.py --out DIR          # at most ~85 s on an H200 (--budget)

1. Module level, CAB's efficiency setting: self-attention on ``(L, B=4, 512)``, 8 heads of 64,
   fp32 weights under bf16 autocast, train mode, causal, forward + backward (``loss = out.sum()``),
   at L = 1k, 4k, 8k: causal SDPA (``vanilla``), ``block_sparse`` with the ``fixed`` layout at block
   64 / 128 (``benchmarks/mechanisms_gpu.py``'s options) and at its defaults (block 16), ``bigbird``,
   ``dilated``.  Per point: ``ms`` (median of single steps, each from an idle GPU: what
   ``mechanisms_gpu.py`` reports), ``host`` (ms per step of 20 steps queued back to back: the
   host's own time when it is the bottleneck), peak MiB, the ATen ops of one step, and whether a
   step ran under ``torch.cuda.set_sync_debug_mode("error")`` (no host-device synchronisation).
2. Checks: the Triton block-sparse kernels on block masks with partial blocks (token tiles, the
   causal rule, a 16-block mask run as 64-blocks, 128-blocks), on inputs in the time-first layout
   the modules pass, and dilated attention, forward and gradients, against the float64 reference.
3. Op level: the ``fixed`` layout at block sizes 16 and 32 on our kernels against compiled
   FlexAttention with the same token mask (run first: each point compiles FlexAttention again).

Writes ``DIR/sparse_gpu.json`` and prints a table.  A time budget (``--budget``, seconds) skips
the remaining points rather than running past it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import efficient_attention as ea  # noqa: E402
from efficient_attention import layouts  # noqa: E402
from efficient_attention.block_mask import BlockMask  # noqa: E402
from efficient_attention.kernels import block_sparse_attention, choose_backend, reference  # noqa: E402

try:
    from efficient_attention.kernels import triton_ops  # (needs Triton)
except ImportError:  # reported by the dispatcher; the TMA comparison row then measures the same path
    triton_ops = None
from efficient_attention.sparse.dilated import dilated_attention, dilated_attention_reference  # noqa: E402

LENGTHS = (1024, 4096, 8192)
# (L, block size) of the FlexAttention comparison, in order; each compiles FlexAttention again (15-45 s).  The run
# of 18:27 (sparsehost@5b7a4c9) measured (8192, 16): ours 4.32 ms, Flex 5.12 ms
FLEX_POINTS = ((8192, 32), (4096, 16), (4096, 32), (8192, 16))
B, E, H = 4, 512, 8
FIXED = {
    64: dict(local_attn_ctx=5 * 64, vertsize=1),
    128: dict(local_attn_ctx=5 * 128, vertsize=1),
    16: dict(local_attn_ctx=5 * 16, vertsize=1),
    32: dict(local_attn_ctx=5 * 32, vertsize=1),
}


def rel(a, b):
    a, b = a.double(), b.double()
    fin = torch.isfinite(b)
    if not torch.equal(torch.isfinite(a), fin):
        return float("inf")
    return ((a[fin] - b[fin]).norm() / b[fin].norm().clamp_min(1e-30)).item()


def grads(out, lse, inputs):
    g = torch.Generator(device=out.device).manual_seed(1)
    go = torch.randn(out.shape, generator=g, device=out.device, dtype=torch.float64)
    gl = torch.randn(lse.shape, generator=g, device=out.device, dtype=torch.float64)
    loss = (out.double() * go).sum() + (lse.double().masked_fill(torch.isinf(lse), 0) * gl).sum()
    return torch.autograd.grad(loss, inputs)


def check_case(name, run, ref_run, dtype, T=777, d=64, heads=4, time_first=False):
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = [torch.randn(2, heads, T, d, generator=g, device="cuda", dtype=torch.float64) for _ in range(3)]
    if time_first:  # (B, H, T, d) views of (T, B, H, d) memory, as split_heads passes them
        low = [x.permute(2, 0, 1, 3).to(dtype).contiguous().permute(1, 2, 0, 3).requires_grad_() for x in qkv]
    else:
        low = [x.to(dtype).requires_grad_() for x in qkv]
    hi = [x.clone().requires_grad_() for x in qkv]
    kpm = torch.zeros(2, T, dtype=torch.bool, device="cuda")
    kpm[1, -7:] = True
    out, lse = run(*low, kpm)
    rout, rlse = ref_run(*hi, kpm)
    errs = dict(out=rel(out, rout), lse=rel(lse, rlse))
    for n, a, b in zip("qkv", grads(out, lse, low), grads(rout, rlse, hi)):
        errs["d" + n] = rel(a, b)
    tol = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-4}[dtype]
    ok = all(e < (tol if k in ("out", "lse") else 3 * tol) for k, e in errs.items())
    backend = choose_backend("block_sparse", low[0], low[1], low[2], block_size=64)
    if time_first and backend == "triton":
        ok = ok and out.stride() == low[0].stride()  # the Triton kernels write the output in the input's layout
    return dict(
        case=name,
        dtype=str(dtype).replace("torch.", ""),
        backend=backend,
        ok=ok,
        **{k: float(f"{v:.2e}") for k, v in errs.items()},
    )


def checks(deadline):
    """Kernels vs float64 on masks with partial blocks (each case compiles kernel variants: few, chosen)."""
    T = 777
    strided = BlockMask.from_pattern("strided", T, 64, 4, causal=True, local_attn_ctx=37)
    sliding = BlockMask.from_pattern("sliding", T, 128, 4, causal=False, window=100)
    fixed16 = BlockMask.from_pattern("fixed", T, 16, 4, causal=True, local_attn_ctx=80)
    cases = [  # (all passed in the 18:27 run, with the sliding bs128 / fixed bs16 / fp16 / no-TMA variants)
        ("strided bs64 causal, time-first", strided, torch.bfloat16, True),
        ("fixed bs16 -> 64-blocks (tiles)", fixed16, torch.bfloat16, False),
        ("sliding bs128 (tiles)", sliding, torch.bfloat16, False),
    ]
    rows = []
    for name, bm, dtype, tf in cases:
        if time.time() > deadline:
            rows.append(dict(case=name, dtype=str(dtype).replace("torch.", ""), error="skipped (time budget)"))
            continue
        bm = bm.to("cuda")
        tma_ok = getattr(triton_ops, "_tma_ok", None)
        min_rows = getattr(triton_ops, "TMA_MIN_ROWS", None)
        if tma_ok is not None:  # these small cases take the TMA loads the long ones do (or none: "no TMA")
            triton_ops.TMA_MIN_ROWS = 0
            if "no TMA" in name:
                triton_ops._tma_ok = lambda *ts, **kw: False
        try:
            rows.append(
                check_case(
                    name,
                    lambda q, k, v, kpm, bm=bm: block_sparse_attention(q, k, v, bm, key_padding_mask=kpm),
                    lambda q, k, v, kpm, bm=bm: reference.block_sparse_attention(q, k, v, bm, key_padding_mask=kpm),
                    dtype,
                    time_first=tf,
                )
            )
        finally:
            if tma_ok is not None:
                triton_ops._tma_ok, triton_ops.TMA_MIN_ROWS = tma_ok, min_rows
        print(rows[-1], flush=True)
    if time.time() < deadline:
        rows.append(
            check_case(
                "dilated (64,128,256)x(1,2,4) causal",
                lambda q, k, v, kpm: dilated_attention(
                    q, k, v, (64, 128, 256), (1, 2, 4), causal=True, key_padding_mask=kpm, return_lse=True
                ),
                lambda q, k, v, kpm: dilated_attention_reference(
                    q, k, v, (64, 128, 256), (1, 2, 4), causal=True, key_padding_mask=kpm
                ),
                torch.bfloat16,
            )
        )
        print(rows[-1], flush=True)
    return rows


def bench(fn, warmup=3, rep=10):
    """ms of one call from an idle GPU (median of ``rep``, each synchronised before and after: what
    ``mechanisms_gpu.py`` measures), ms per call of ``rep`` calls queued back to back (the host's time
    when it is the bottleneck), and the peak MiB above what was allocated before."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rep):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(2 * rep):
        fn()
    torch.cuda.synchronize()
    queued = (time.perf_counter() - t0) * 1e3 / (2 * rep)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return statistics.median(times), queued, peak


class CountOps(TorchDispatchMode):
    """ATen ops run inside the mode (each one or more launches), and host syncs (``_local_scalar_dense``)."""

    def __init__(self):
        super().__init__()
        self.count = self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        self.syncs += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def module_step(name, L, **opts):
    m = ea.build_attention(name, embed_dim=E, num_heads=H, causal=True, self_attention=True, **opts).cuda().train()
    x = torch.randn(L, B, E, device="cuda", requires_grad=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, _ = m(x, x, x, need_weights=False)
        out.float().sum().backward()
        x.grad = None
        for p in m.parameters():
            p.grad = None

    return m, step


def sync_free(step) -> str:
    """ "yes" when a step runs under set_sync_debug_mode("error"), else the error (a host-device sync)."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        return "yes"
    except RuntimeError as exc:
        return f"NO: {str(exc)[:80]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


MODULES = [  # the targets' rows first: a time limit cuts the experiments at the end of each length
    ("vanilla (causal SDPA)", "vanilla", {}),
    ("block_sparse fixed bs64", "block_sparse", dict(block_size=64, local_attn_ctx=1024)),
    ("block_sparse fixed bs128", "block_sparse", dict(block_size=128, local_attn_ctx=2048)),
    ("bigbird", "bigbird", {}),
    ("dilated", "dilated", {}),
    ("block_sparse defaults bs16", "block_sparse", {}),
    # the bs64 row with TMA descriptors at every length (by default only from B*H*N >= triton_ops.TMA_MIN_ROWS:
    # 8k here), and with none (6 per step, each built on the host and encoded at launch): what they cost or save.
    # The 18:27 run (TMA always the default then): 2.57 / 2.59 / 2.90 ms with, 2.38 / 2.72 / 2.83 without
    # ("block_sparse fixed bs64 TMA always", "block_sparse", dict(block_size=64, local_attn_ctx=1024)),
    # ("block_sparse fixed bs64 noTMA", "block_sparse", dict(block_size=64, local_attn_ctx=1024)),
]


def module_rows(lengths, deadline):
    rows = []
    for L in lengths:
        for label, name, opts in MODULES:
            row = dict(part="module", L=L, mechanism=label)
            if time.time() > deadline:
                rows.append(dict(row, error="skipped (time budget)"))
                continue
            tma_ok = getattr(triton_ops, "_tma_ok", None)
            min_rows = getattr(triton_ops, "TMA_MIN_ROWS", None)
            if "noTMA" in label and tma_ok is not None:
                triton_ops._tma_ok = lambda *ts, **kw: False
            if "TMA always" in label and min_rows is not None:
                triton_ops.TMA_MIN_ROWS = 0
            try:
                m, step = module_step(name, L, **opts)
                ms, host, mib = bench(step)
                with CountOps() as ops:
                    step()
                row.update(ms=round(ms, 3), host_ms=round(host, 3), peak_mib=round(mib, 1), aten=ops.count)
                row["sync_free"] = sync_free(step) if ops.syncs == 0 else f"NO: {ops.syncs} .item()/.tolist()"
                if name in ("block_sparse", "bigbird"):
                    dev = torch.device("cuda", torch.cuda.current_device())
                    row["sparsity"] = round(m.block_mask(L, dev).sparsity(), 3)
                del m, step
            except Exception as exc:  # report the point and go on
                row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
                traceback.print_exc()
            finally:
                if tma_ok is not None:
                    triton_ops._tma_ok, triton_ops.TMA_MIN_ROWS = tma_ok, min_rows
            torch.cuda.empty_cache()
            rows.append(row)
            print(row, flush=True)
    return rows


def flex_rows(points, deadline):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    for n, (L, bs) in enumerate(points):
        row = dict(part="op", L=L, mechanism=f"fixed bs{bs}")
        # a new shape or mask compiles FlexAttention again: ~45 s for the first point, 15-20 s after it
        if n and time.time() > deadline - 18:
            rows.append(dict(row, error="skipped (time budget)"))
            continue
        try:
            kw = FIXED[bs]
            mod = layouts.make_mask_mod("fixed", heads=H, block_size=bs, causal=True, **kw)
            bm = BlockMask.from_pattern("fixed", L, bs, H, causal=True, device="cuda", **kw)
            q, k, v = (
                torch.randn(B, H, L, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
            )
            # _compile=True: FlexAttention's own way to build long masks without materialising L x L
            fbm = create_block_mask(lambda b, h, i, j: mod(b, h, i, j), None, H, L, L, device="cuda", _compile=True)

            def ours():
                block_sparse_attention(q, k, v, bm)[0].sum().backward()

            def theirs():
                flex(q, k, v, block_mask=fbm).sum().backward()

            def sdpa():
                torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

            # back-to-back calls: the kernels' throughput once the GPU is the bottleneck
            _, ms, mib = bench(ours)
            _, fms, fmib = bench(theirs)
            _, sms, _ = bench(sdpa)
            row.update(
                ms=round(ms, 3),
                peak_mib=round(mib, 1),
                flex_ms=round(fms, 3),
                flex_peak_mib=round(fmib, 1),
                sdpa_ms=round(sms, 3),
                sparsity=round(bm.sparsity(), 3),
                run_sparsity=round(bm.coarsened(64).sparsity(), 3),
                ours_over_flex=round(ms / fms, 3),
            )
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
            traceback.print_exc()
        torch.cuda.empty_cache()
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=82.0, help="seconds; later points are skipped")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    device = torch.cuda.get_device_name()
    # FlexAttention first (compiles per shape and mask: the points the last run could not reach), then the
    # module-level targets (the first length compiles our kernels' variants), then the correctness checks
    rows = flex_rows(FLEX_POINTS, t0 + 0.55 * args.budget)
    print(f"FlexAttention points done in {time.time() - t0:.0f} s", flush=True)
    rows += module_rows(LENGTHS, t0 + 0.85 * args.budget)
    check = checks(t0 + 0.95 * args.budget)
    with open(os.path.join(args.out, "sparse_gpu.json"), "w") as f:
        json.dump(dict(device=device, torch=torch.__version__, checks=check, rows=rows), f, indent=1)
    print(f"\n{device}, torch {torch.__version__}; {time.time() - t0:.0f} s")
    print("\nchecks vs float64 (relative error norms)")
    for c in check:
        if "error" in c:
            print(f"  skip {c['case']:<38} {c['dtype']:<9} {c['error']}")
            continue
        print(
            f"  {'ok  ' if c['ok'] else 'FAIL'} {c['case']:<38} {c['dtype']:<9} {c['backend']:<9} "
            + " ".join(f"{k}={c[k]:.1e}" for k in ("out", "lse", "dq", "dk", "dv"))
        )
    print(
        "\nmodule level (B=4, E=512, H=8, bf16 autocast, causal, fwd+bwd): ms from an idle GPU (SDPA/ours) | "
        "host ms per queued step | peak MiB | ATen ops | sync-free"
    )
    base = {
        r["L"]: r["ms"] for r in rows if r["part"] == "module" and r["mechanism"].startswith("vanilla") and "ms" in r
    }
    for L in LENGTHS:
        for r in rows:
            if r["part"] != "module" or r["L"] != L:
                continue
            if "ms" not in r:
                print(f"  L={L:>5} {r['mechanism']:<34} {r.get('error', '-')}")
                continue
            ratio = f"{base[L] / r['ms']:.2f}" if L in base else "-"
            print(
                f"  L={L:>5} {r['mechanism']:<34} {r['ms']:6.2f} ({ratio:>5}) | {r['host_ms']:6.2f} | "
                f"{r['peak_mib']:7.0f} | {r['aten']:4d} | {r['sync_free']}"
                + (f" | sparsity {r['sparsity']:.2f}" if "sparsity" in r else "")
            )
    print("\nop level, fixed layout at block 16 / 32 vs compiled FlexAttention (B=4, H=8, d=64, bf16, fwd+bwd)")
    for r in rows:
        if r["part"] == "op":
            if "ms" in r:
                print(
                    f"  L={r['L']:>6} {r['mechanism']:<12} ours {r['ms']:.2f} ms  flex {r['flex_ms']:.2f} ms  "
                    f"(ours/flex {r['ours_over_flex']:.2f})  sdpa {r['sdpa_ms']:.2f} ms  sparsity {r['sparsity']:.2f} "
                    f"(as 64-blocks {r['run_sparsity']:.2f})  peak MiB {r['peak_mib']:.0f} / "
                    f"flex {r['flex_peak_mib']:.0f}"
                )
            else:
                print(f"  L={r['L']:>6} {r['mechanism']:<12} {r['error']}")
    return 0 if all(c.get("ok", True) for c in check) else 1


if __name__ == "__main__":
    sys.exit(main())
