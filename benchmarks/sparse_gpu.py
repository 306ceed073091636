"""The sparse family on the GPU (issue 14): block_sparse and landmark modules checked, timed, and tuned.

    python benchmarks/sparse_gpu.py --out DIR          # about 90 s on an H200 (--budget)

1. Checks: the ``block_sparse`` (``fixed`` layout, block 64) and ``landmark`` modules under bf16 autocast
   against the same modules in float64 (the reference paths), output and input gradient, the second call
   of each (the one that takes the cached Triton launch, ``_triton_common.launch``); and the block-sparse
   kernels on a 16-block mask with token tiles (run as 64-blocks).
2. Module level, CAB's efficiency setting: self-attention on ``(L, B=4, 512)``, 8 heads of 64, fp32
   weights under bf16 autocast, train mode, causal, forward + backward (``loss = out.sum()``): causal SDPA
   (``vanilla``), ``block_sparse`` with the ``fixed`` layout at block 64 / 128 (``mechanisms_gpu.py``'s
   options, ~90% sparsity at 8k), the same with Triton's own launch path (``jit launch``: what the cached
   launch saves), its module defaults (block 16, from 4k split into own-chunk and summary parts, and as one
   mask), and ``landmark``.  Per point: ``ms`` (median of
   single steps, each from an idle GPU: what ``mechanisms_gpu.py`` reports), ``host`` (ms per step of 20
   steps queued back to back: the host's time when it is the bottleneck), peak MiB, ATen ops of a step.
3. Landmark kernels alone (bf16, B=4, H=8, d=64, block 64) at 8k and 32k under tile candidates
   (``kernels.landmark.CONFIG_OVERRIDE``), each against the default's results; forward and backward ms.

4. With ``--flex`` (instead of 1-3): the op alone against compiled FlexAttention with the same token mask
   (issue 14: block sizes 16 and 32 at least as fast as FlexAttention), the ``fixed`` layout (causal, a local
   context of 5 blocks, one summary column per block row) at block 16 / 32 / 64, B=4, H=8, d=64, bf16, forward +
   backward; each point compiles FlexAttention again (15-45 s), so ``--budget`` 300 or more.

Writes ``DIR/sparse_gpu.json`` (``--flex``: ``DIR/sparse_flex_gpu.json``) and prints a table; ``--budget`` seconds
skips what is left.
"""

from __future__ import annotations

import argparse
import copy
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
from efficient_attention.attentions import block_sparse as bsm  # noqa: E402
from efficient_attention.block_mask import BlockMask  # noqa: E402
from efficient_attention.kernels import block_sparse_attention, reference  # noqa: E402
from efficient_attention.kernels import landmark as lk  # noqa: E402

try:
    from efficient_attention.kernels import _triton_common as tc
except ImportError:
    tc = None

B, E, H = 4, 512, 8
FIXED64 = dict(block_size=64, local_attn_ctx=1024)
FIXED128 = dict(block_size=128, local_attn_ctx=2048)
# (label, mechanism, options, lengths, switches); the targets' rows first at each length.  Switches: "jit" = Triton's
# own launch path (what the cached launch saves), "one mask" = the fixed pattern without the own-chunk / summary split
JIT, ONE_MASK = dict(fast=False), dict(split=False)
MODULES = [
    ("vanilla (causal SDPA)", "vanilla", {}, (1024, 2048, 4096, 8192, 32768), {}),
    ("block_sparse fixed bs64", "block_sparse", FIXED64, (1024, 2048, 4096, 8192), {}),
    ("block_sparse fixed bs64 jit launch", "block_sparse", FIXED64, (1024, 2048, 4096, 8192), JIT),
    ("block_sparse fixed bs128", "block_sparse", FIXED128, (4096,), {}),
    ("landmark", "landmark", {}, (1024, 4096, 8192, 32768), {}),
    ("landmark jit launch", "landmark", {}, (1024, 4096), JIT),
    ("block_sparse defaults (bs16)", "block_sparse", {}, (4096, 8192, 32768), {}),  # (split from SPLIT_MIN_LEN)
    ("block_sparse defaults (bs16) one mask", "block_sparse", {}, (8192,), ONE_MASK),
]
LENGTHS = (1024, 2048, 4096, 8192, 32768)
# landmark tile candidates: one kernel changed at a time (the winners of dq and dk/dv combine); H200 18:12 runs
# already rejected dk/dv keys-first, dk/dv 128 or 32 rows, GATE_DOT, dq 128 rows on 8 warps
LANDMARK_CANDIDATES = {  # (in order of promise: the budget may cut the tail); at 32k the default and 8k's best three
    "default": {},
    "fused dq (atomics)": dict(dkdv=dict(FUSED_DQ=True)),
    "fused dq, dkdv w8": dict(dkdv=dict(FUSED_DQ=True, num_warps=8)),
    "dkdv w8": dict(dkdv=dict(num_warps=8)),
    "dq 2 stages": dict(dq=dict(num_stages=2)),
    "dkdv 2 stages": dict(dkdv=dict(num_stages=2)),
    "fwd 2 stages": dict(fwd=dict(num_stages=2)),
    "dq 4 stages": dict(dq=dict(num_stages=4)),
    "dkdv 4 stages": dict(dkdv=dict(num_stages=4)),
}


def rel(a, b):
    a, b = a.double(), b.double()
    fin = torch.isfinite(b)
    if not torch.equal(torch.isfinite(a), fin):
        return float("inf")
    return ((a[fin] - b[fin]).norm() / b[fin].norm().clamp_min(1e-30)).item()


def switch(fast: bool = True, split: bool = True) -> None:
    if tc is not None:
        tc.FAST_LAUNCH = fast
    bsm.FIXED_SPLIT = split


# -- 1. checks ---------------------------------------------------------------------------------------------------
def module_check(label, name, opts, L=320, batch=2):
    torch.manual_seed(0)
    m = ea.build_attention(name, embed_dim=E, num_heads=H, causal=True, self_attention=True, **opts).cuda().train()
    ref = copy.deepcopy(m).double()
    x = torch.randn(L, batch, E, device="cuda")
    go = torch.randn(L, batch, E, device="cuda", dtype=torch.float64)
    xr = x.double().requires_grad_()
    switch(split=False)  # the reference: one mask (the split is an optimisation of it)
    try:
        out_r, _ = ref(xr, xr, xr, need_weights=False)
    finally:
        switch()
    (gx_r,) = torch.autograd.grad((out_r * go).sum(), xr)
    errs = {}
    for call in (1, 2):  # the second call takes the cached launch
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, _ = m(xi, xi, xi, need_weights=False)
        (gx,) = torch.autograd.grad((out.double() * go).sum(), xi)
        errs[f"out{call}"], errs[f"dx{call}"] = rel(out, out_r), rel(gx, gx_r)
    ok = all(v < (3e-2 if k.startswith("out") else 6e-2) for k, v in errs.items())
    return dict(case=label, ok=ok, **{k: float(f"{v:.2e}") for k, v in errs.items()})


def split_check(L):
    """The module defaults at ``L`` through the own-chunk / summary split (whatever ``SPLIT_MIN_LEN`` says)."""
    low, bsm.SPLIT_MIN_LEN = bsm.SPLIT_MIN_LEN, L
    try:
        return module_check(f"module block_sparse defaults, {L // 1024}k (split)", "block_sparse", {}, L=L, batch=1)
    finally:
        bsm.SPLIT_MIN_LEN = low


def kernel_check(label, T=800, heads=4, d=64):
    bm = BlockMask.from_pattern("fixed", T, 16, heads, causal=True, local_attn_ctx=80).to("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = [torch.randn(2, heads, T, d, generator=g, device="cuda", dtype=torch.float64) for _ in range(3)]
    kpm = torch.zeros(2, T, dtype=torch.bool, device="cuda")
    kpm[1, -7:] = True
    hi = [x.clone().requires_grad_() for x in qkv]
    rout, rlse = reference.block_sparse_attention(*hi, bm, key_padding_mask=kpm)
    go = torch.randn(rout.shape, generator=g, device="cuda", dtype=torch.float64)
    rg = torch.autograd.grad((rout * go).sum(), hi)
    errs = {}
    for call in (1, 2):
        low = [x.to(torch.bfloat16).requires_grad_() for x in qkv]
        out, lse = block_sparse_attention(*low, bm, key_padding_mask=kpm)
        gr = torch.autograd.grad((out.double() * go).sum(), low)
        errs[f"out{call}"], errs[f"lse{call}"] = rel(out, rout), rel(lse, rlse)
        for n, a, b in zip("qkv", gr, rg):
            errs[f"d{n}{call}"] = rel(a, b)
    ok = all(v < (3e-2 if k.startswith(("out", "lse")) else 6e-2) for k, v in errs.items())
    return dict(case=label, ok=ok, **{k: float(f"{v:.2e}") for k, v in errs.items()})


def checks(deadline):
    cases = [
        ("module block_sparse fixed bs64", lambda: module_check("module block_sparse fixed bs64", "block_sparse",
                                                                dict(block_size=64, local_attn_ctx=128))),
        ("module landmark", lambda: module_check("module landmark", "landmark", {})),
        ("module block_sparse defaults, 4k (split)", lambda: split_check(4096)),
        ("kernels fixed bs16 -> 64-blocks (tiles)", lambda: kernel_check("kernels fixed bs16 -> 64-blocks (tiles)")),
    ]  # fmt: skip
    rows = []
    for label, fn in cases:
        if time.time() > deadline:
            rows.append(dict(case=label, error="skipped (time budget)"))
            continue
        try:
            rows.append(fn())
        except Exception as exc:
            traceback.print_exc()
            rows.append(dict(case=label, ok=False, error=f"{type(exc).__name__}: {str(exc)[:160]}"))
        print(rows[-1], flush=True)
    return rows


# -- 2. module level ---------------------------------------------------------------------------------------------
def bench(fn, warmup=3, rep=10):
    """ms of one call from an idle GPU (median of ``rep``), ms per call of ``2 rep`` calls queued back to back,
    and the peak MiB above what was allocated before."""
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
    return statistics.median(times), queued, (torch.cuda.max_memory_allocated() - base) / 2**20


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def module_step(name, L, **opts):
    torch.manual_seed(0)
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


def module_rows(deadline):
    rows = []
    for L in LENGTHS:
        for label, name, opts, lengths, switches in MODULES:
            if L not in lengths:
                continue
            row = dict(part="module", L=L, mechanism=label)
            if time.time() > deadline:
                rows.append(dict(row, error="skipped (time budget)"))
                continue
            switch(**switches)
            try:
                m, step = module_step(name, L, **opts)
                ms, host, mib = bench(step, rep=10 if L <= 8192 else 5)
                with CountOps() as ops:
                    step()
                row.update(ms=round(ms, 3), host_ms=round(host, 3), peak_mib=round(mib, 1), aten=ops.count)
                if name == "block_sparse":
                    row["sparsity"] = round(
                        m.block_mask(L, torch.device("cuda", torch.cuda.current_device())).sparsity(), 3
                    )
                del m, step
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
                traceback.print_exc()
            finally:
                switch()
            torch.cuda.empty_cache()
            rows.append(row)
            print(row, flush=True)
    return rows


# -- 3. landmark tiles -------------------------------------------------------------------------------------------
def cuda_ms(fn, rep):
    times = []
    for _ in range(rep):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def landmark_sweep(deadline):
    rows = []
    for L in (8192, 32768):
        g = torch.Generator(device="cuda").manual_seed(0)
        # the module's layout: (B, H, L, d) head views of (L, B, H*d) memory
        q, k, v = (
            torch.randn(L, B, H, 64, generator=g, device="cuda", dtype=torch.bfloat16).permute(1, 2, 0, 3)
            for _ in range(3)
        )
        go = torch.randn(B, H, L, 64, generator=g, device="cuda", dtype=torch.bfloat16)
        ref = None
        names = list(LANDMARK_CANDIDATES)
        if L > 8192:  # the default and the three fastest at 8k
            done = sorted((r["sum_ms"], r["config"]) for r in rows if "sum_ms" in r and r["config"] != "default")
            names = ["default"] + [n for _, n in done[:3]]
        for name in names:
            over = LANDMARK_CANDIDATES[name]
            row = dict(part="landmark", L=L, config=name)
            if time.time() > deadline:
                rows.append(dict(row, error="skipped (time budget)"))
                continue
            lk.CONFIG_OVERRIDE.clear()
            lk.CONFIG_OVERRIDE.update(over)
            try:
                qi, ki, vi = (x.detach().requires_grad_() for x in (q, k, v))
                holder = {}

                def fwd():
                    holder["out"] = lk.landmark_attention(qi, ki, vi, 64)[0]

                def bwd():
                    torch.autograd.grad(holder["out"], (qi, ki, vi), go, retain_graph=True)

                fwd()
                grads = torch.autograd.grad(holder["out"], (qi, ki, vi), go, retain_graph=True)
                torch.cuda.synchronize()
                rep = 10 if L <= 8192 else 4
                f_ms = cuda_ms(fwd, rep)
                b_ms = cuda_ms(bwd, rep)
                res = (holder["out"],) + grads
                if ref is None:
                    ref = [r.float() for r in res]
                    err = 0.0
                else:
                    err = max(rel(a, b) for a, b in zip(res, ref))
                row.update(fwd_ms=round(f_ms, 3), bwd_ms=round(b_ms, 3), sum_ms=round(f_ms + b_ms, 3), rel=err)
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
                traceback.print_exc()
            finally:
                lk.CONFIG_OVERRIDE.clear()
            rows.append(row)
            print(row, flush=True)
        q = k = v = go = ref = None  # (freed before the next length)
        torch.cuda.empty_cache()
    return rows


# (L, block size) of the FlexAttention comparison, in order (the block sizes the issue names first)
FLEX_POINTS = ((8192, 32), (8192, 16), (4096, 32), (4096, 16), (16384, 32), (8192, 64))


def flex_rows(points, deadline):
    """The ``fixed`` layout's op (ours, through :class:`BlockMask` and the Triton kernels) against compiled
    FlexAttention with the same ``mask_mod`` and causal SDPA, forward + backward."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from efficient_attention import layouts

    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    for n, (L, bs) in enumerate(points):
        row = dict(part="flex", L=L, block_size=bs)
        if n and time.time() > deadline - 30:  # a new shape or mask compiles FlexAttention again
            rows.append(dict(row, error="skipped (time budget)"))
            continue
        try:
            kw = dict(local_attn_ctx=5 * bs, vertsize=1)
            mod = layouts.make_mask_mod("fixed", heads=H, block_size=bs, causal=True, **kw)
            bm = BlockMask.from_pattern("fixed", L, bs, H, causal=True, device="cuda", **kw)
            q, k, v = (
                torch.randn(B, H, L, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
            )
            fbm = create_block_mask(lambda b, h, i, j: mod(b, h, i, j), None, H, L, L, device="cuda", _compile=True)
            got = block_sparse_attention(q, k, v, bm)[0]
            want = flex(q, k, v, block_mask=fbm)
            row["rel_vs_flex"] = rel(got, want)

            def ours():
                block_sparse_attention(q, k, v, bm)[0].sum().backward()

            def theirs():
                flex(q, k, v, block_mask=fbm).sum().backward()

            def sdpa():
                torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

            ms, queued, mib = bench(ours)
            fms, fqueued, fmib = bench(theirs)
            sms, _, _ = bench(sdpa)
            row.update(
                ms=round(ms, 3),
                queued_ms=round(queued, 3),
                peak_mib=round(mib, 1),
                flex_ms=round(fms, 3),
                flex_queued_ms=round(fqueued, 3),
                flex_peak_mib=round(fmib, 1),
                sdpa_ms=round(sms, 3),
                sparsity=round(bm.sparsity(), 3),
                flex_over_ours=round(fms / ms, 3),
            )
        except Exception as exc:  # noqa: BLE001 - one point's failure must not stop the others
            row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
            traceback.print_exc()
        torch.cuda.empty_cache()
        rows.append(row)
        print(row, flush=True)
    return rows


def flex_main(args, t0: float) -> int:
    rows = flex_rows(FLEX_POINTS, t0 + args.budget)
    device = torch.cuda.get_device_name()
    with open(os.path.join(args.out, "sparse_flex_gpu.json"), "w") as f:
        json.dump(dict(device=device, torch=torch.__version__, rows=rows), f, indent=1)
    print(f"\n{device}, torch {torch.__version__}; {time.time() - t0:.0f} s")
    print("fixed layout op, B=4, H=8, d=64, bf16, causal, fwd+bwd: ms from an idle GPU (queued); Flex/ours > 1: ours")
    for r in rows:
        if "ms" not in r:
            print(f"  L={r['L']:>6} bs{r['block_size']:<3} {r.get('error')}")
            continue
        print(
            f"  L={r['L']:>6} bs{r['block_size']:<3} ours {r['ms']:6.2f} ({r['queued_ms']:6.2f})  flex "
            f"{r['flex_ms']:6.2f} ({r['flex_queued_ms']:6.2f})  Flex/ours {r['flex_over_ours']:.2f}  sdpa "
            f"{r['sdpa_ms']:6.2f}  sparsity {r['sparsity']:.2f}  MiB {r['peak_mib']:.0f} / {r['flex_peak_mib']:.0f}"
            f"  rel {r['rel_vs_flex']:.1e}"
        )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=95.0, help="seconds; later points are skipped")
    ap.add_argument("--flex", action="store_true", help="only the op against compiled FlexAttention (part 4)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    if args.flex:
        return flex_main(args, t0)
    device = torch.cuda.get_device_name()
    check = checks(t0 + 0.25 * args.budget)
    print(f"[{time.time() - t0:.0f}s] checks done", flush=True)
    rows = module_rows(t0 + 0.62 * args.budget)
    print(f"[{time.time() - t0:.0f}s] module rows done", flush=True)
    rows += landmark_sweep(t0 + args.budget)
    with open(os.path.join(args.out, "sparse_gpu.json"), "w") as f:
        json.dump(dict(device=device, torch=torch.__version__, checks=check, rows=rows), f, indent=1)
    cached = "off" if tc is None or not tc.FAST_LAUNCH else f"on, {len(tc._launch_cache)} kernels cached"
    print(f"\n{device}, torch {torch.__version__}; {time.time() - t0:.0f} s; cached launch {cached}")
    print("checks vs float64 (relative error norms; 1 = first call, 2 = second call, the cached launch)")
    for c in check:
        body = c.get("error") or " ".join(f"{k}={v:.1e}" for k, v in c.items() if k not in ("case", "ok"))
        print(f"  {'ok  ' if c.get('ok') else 'FAIL'} {c['case']:<40} {body}")
    print(
        "module (B=4, E=512, H=8, bf16 autocast, causal, fwd+bwd): ms idle-GPU (SDPA/ours) | host ms queued | MiB | ops"
    )
    base = {
        r["L"]: r["ms"] for r in rows if r["part"] == "module" and r["mechanism"].startswith("vanilla") and "ms" in r
    }
    for r in rows:
        if r["part"] != "module":
            continue
        if "ms" not in r:
            print(f"  L={r['L']:>5} {r['mechanism']:<36} {r.get('error', '-')}")
            continue
        ratio = f"{base[r['L']] / r['ms']:.2f}" if r["L"] in base else "-"
        print(
            f"  L={r['L']:>5} {r['mechanism']:<36} {r['ms']:7.2f} ({ratio:>5}) | {r['host_ms']:6.2f} | "
            f"{r['peak_mib']:6.0f} | {r['aten']:3d}" + (f" | sparsity {r['sparsity']:.2f}" if "sparsity" in r else "")
        )
    print("landmark kernels alone (bf16, B=4, H=8, d=64, block 64, head views): ms; rel = vs the default's results")
    for r in rows:
        if r["part"] == "landmark":
            if "sum_ms" in r:
                print(
                    f"  L={r['L']:>5} {r['config']:<18} fwd {r['fwd_ms']:7.3f} bwd {r['bwd_ms']:7.3f} "
                    f"sum {r['sum_ms']:7.3f} rel {r['rel']:.1e}"
                )
            else:
                print(f"  L={r['L']:>5} {r['config']:<18} {r.get('error')}")
    return 0 if all(c.get("ok", True) for c in check) else 1


if __name__ == "__main__":
    sys.exit(main())
