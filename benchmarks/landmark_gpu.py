"""Landmark attention on the GPU: the Triton kernels checked and timed (under 2 minutes on an H200).

1. Times the ``landmark`` module against the ``vanilla`` module (causal SDPA) in CAB's efficiency
   setting: self-attention on (L, B=4, 512), 8 heads of 64, bf16 autocast, forward+backward, peak
   memory, L in 1k..32k.  Target: within 1.5x of vanilla's time, at most 2x its memory.
2. Checks the Triton landmark kernels (forward, dq, dk, dv) against the float64 PyTorch path
   (itself tested against the paper's formula in ``tests/test_landmark.py``), for fp16/bf16/fp32,
   head dims 64/128, landmark blocks of 16..128, key padding and queries that are the last T of S.
3. Times the kernels alone (forward, backward) against causal SDPA (B=4, H=8, d=64, bf16) at L = 8k and
   32k under the default ``landmark_config`` and a few alternatives (``KEYS_FIRST``: the previous
   (keys, queries) dk/dv tiles; ``GATE_DOT``; other query tiles), each checked against the default's
   output and gradients; the module is timed again under the fastest alternative if it beats the default.

    python benchmarks/landmark_gpu.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import efficient_attention as ea  # noqa: E402
from efficient_attention.kernels import landmark as lk  # noqa: E402
from efficient_attention.kernels.dispatch import choose_landmark_backend  # noqa: E402

REL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def bench(fn, grad_of=None, rep=60) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=rep, grad_to_none=grad_of, return_mode="median")


def rel(got, ref) -> float:
    got, ref = got.double(), ref.double()
    fin = torch.isfinite(ref)
    if not torch.equal(torch.isfinite(got), fin):
        return float("inf")
    return ((got[fin] - ref[fin]).norm() / ref[fin].norm().clamp_min(1e-30)).item()


def check(dtype, d, bs, T, S, pad, with_lse, B=2, H=3):
    g = torch.Generator().manual_seed(d + bs + T)
    q64 = torch.randn(B, H, T, d, generator=g, dtype=torch.float64)
    k64, v64 = (torch.randn(B, H, S, d, generator=g, dtype=torch.float64) for _ in range(2))
    kpm = None
    if pad:
        kpm = torch.zeros(B, S, dtype=torch.bool)
        kpm[0, :3] = True
        kpm[1, -7:] = True
        kpm[1, 2 * bs - 1] = True  # a padded landmark hides its block
        kpm = kpm.cuda()
    q, k, v = (x.cuda().to(dtype).requires_grad_() for x in (q64, k64, v64))
    out, lse = lk.landmark_attention(q, k, v, bs, key_padding_mask=kpm, backend="triton")
    rq, rk, rv = (x.detach().double().requires_grad_() for x in (q, k, v))
    rout, rlse = lk.landmark_attention(rq, rk, rv, bs, key_padding_mask=kpm, backend="torch")
    go = torch.randn(out.shape, generator=g, dtype=torch.float64).cuda()
    gl = torch.randn(lse.shape, generator=g, dtype=torch.float64).cuda()
    fin = torch.isfinite(rlse) if with_lse else torch.zeros_like(rlse, dtype=torch.bool)
    loss = (out.double() * go).sum() + (lse.double() * gl).masked_fill(~fin, 0).sum()
    rloss = (rout * go).sum() + (rlse * gl).masked_fill(~fin, 0).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    rgrads = torch.autograd.grad(rloss, (rq, rk, rv))
    errs = dict(out=rel(out, rout), lse=rel(lse, rlse), **{f"d{n}": rel(a, b) for n, a, b in zip("qkv", grads, rgrads)})
    ok = errs["out"] < REL[dtype] and errs["lse"] < 1e-4 and all(errs[f"d{n}"] < 3 * REL[dtype] for n in "qkv")
    return dict(
        dtype=str(dtype).replace("torch.", ""),
        d=d,
        block=bs,
        T=T,
        S=S,
        pad=pad,
        lse_grad=with_lse,
        ok=ok,
        **{k: float(f"{v:.2e}") for k, v in errs.items()},
    )


VARIANTS = {  # name -> overrides of landmark_config, per kernel (most telling first: the budget may cut the tail)
    # H200 18:12 (before the dq default moved to 64 rows on 4 warps), backward at 8k: default 3.03 ms, dk/dv keys
    # first 5.40, GATE_DOT 3.36 (forward 1.32 vs 0.93), dk/dv 128 rows w8 3.36, dk/dv 32 rows 5.00, dq 64 rows w4 2.86
    "default": {},
    "dkdv KEYS_FIRST (old tiles)": dict(dkdv=dict(KEYS_FIRST=True)),
    "dq 128 rows w8 (old)": dict(dq=dict(BLOCK_M=128, num_warps=8)),
    "dkdv 128 rows w4": dict(dkdv=dict(BLOCK_M=128, num_warps=4)),
    "dq+dkdv 2 stages": dict(dq=dict(num_stages=2), dkdv=dict(num_stages=2)),
    "fwd 128 rows w8": dict(fwd=dict(BLOCK_M=128, num_warps=8)),
    "GATE_DOT all": dict(fwd=dict(GATE_DOT=True), dq=dict(GATE_DOT=True), dkdv=dict(GATE_DOT=True)),
}


def kernel_split(fn, reps: int = 3) -> dict:
    """Per landmark kernel, its GPU time (ms) in one call of ``fn``, from the profiler ({} if it fails)."""
    try:
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
        split = {}
        for evt in prof.key_averages():
            if evt.key.startswith("_landmark_"):
                us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
                split[evt.key.replace("_landmark_", "").replace("_kernel", "")] = round(us / 1000 / reps, 3)
        return split
    except Exception as exc:  # the profiler is a nicety: its failure must not stop the run
        return {"error": f"{type(exc).__name__}: {str(exc)[:100]}"}


def use_variant(over: dict):
    """Installs ``landmark_config`` with ``over`` applied; returns the function that restores the default."""
    base = lk.landmark_config

    def cfg(*a):
        return {key: dict(val, **over.get(key, {})) for key, val in base(*a).items()}

    lk.landmark_config = cfg

    def restore():
        lk.landmark_config = base

    return restore


def kernel_configs(L: int, rows: list, deadline: float, names):
    """Kernels alone vs causal SDPA at one L, under tile variants (bf16, B=4, H=8, d=64, block 64), on the
    module's layout (head views of (L, B, H*d) tensors); each variant's outputs and gradients vs the default's."""
    B, H, d, bs = 4, 8, 64, 64

    def heads():
        return torch.randn(L, B, H, d, device="cuda", dtype=torch.bfloat16).permute(1, 2, 0, 3)

    q, k, v, do = heads(), heads(), heads(), heads()
    scale = d**-0.5
    qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True)
    sdpa_fwd = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    sdpa_bwd = bench(lambda: torch.autograd.grad(o, (qg, kg, vg), do, retain_graph=True))
    ref = None
    for name in names:
        if time.time() > deadline:
            print(f"budget spent: kernel variant {name!r} and later ones left out", flush=True)
            break
        restore = use_variant(VARIANTS[name])
        try:
            out, lse = lk._triton_forward(q, k, v, None, bs, scale)
            grads = lk._triton_backward(do, None, q, k, v, out, lse, None, bs, scale)
            if ref is None:
                ref = (out, *grads)
            err = max(rel(a, b) for a, b in zip((out, *grads), ref))
            fwd = bench(lambda: lk._triton_forward(q, k, v, None, bs, scale))
            bwd = bench(lambda: lk._triton_backward(do, None, q, k, v, out, lse, None, bs, scale))
            row = dict(
                part="kernel",
                config=name,
                L=L,
                fwd_ms=fwd,
                bwd_ms=bwd,
                fwdbwd_ms=fwd + bwd,
                sdpa_fwd_ms=sdpa_fwd,
                sdpa_bwd_ms=sdpa_bwd,
                ratio_fwdbwd=(fwd + bwd) / (sdpa_fwd + sdpa_bwd),
                rel_vs_default=err,
                split=kernel_split(
                    lambda: lk._triton_backward(
                        do, None, q, k, v, *lk._triton_forward(q, k, v, None, bs, scale), None, bs, scale
                    )
                ),
            )
        except Exception as exc:  # a config that does not fit (shared memory) is reported, not fatal
            row = dict(part="kernel", config=name, L=L, error=f"{type(exc).__name__}: {str(exc)[:200]}")
        finally:
            restore()
        rows.append(row)
        print(json.dumps(row), flush=True)


def module_point(name: str, L: int, opts: dict):
    B, E, H = 4, 512, 8
    torch.manual_seed(0)
    m = ea.build_attention(name, embed_dim=E, num_heads=H, self_attention=True, causal=True, **opts).cuda()
    x = torch.randn(L, B, E, device="cuda", requires_grad=True)
    dy = torch.randn(L, B, E, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, _ = m(x, x, x, need_weights=False)
        y.backward(dy)

    step()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**30
    ms = bench(step, [x] + list(m.parameters()), rep=100 if L <= 8192 else 200)
    m = x = dy = None  # free them (not del: step() reads them)
    torch.cuda.empty_cache()
    return ms, peak


def module_row(L: int, variant: str = "default") -> dict:
    row = dict(part="module", L=L, variant=variant)
    for name, opts in (("vanilla", {}), ("landmark", dict(block_size=64))):
        if name == "vanilla" and variant != "default":
            continue
        restore = use_variant(VARIANTS[variant])
        try:
            ms, gb = module_point(name, L, opts)
            row[f"{name}_ms"], row[f"{name}_gb"] = ms, gb
        except Exception as exc:
            row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            torch.cuda.empty_cache()
        finally:
            restore()
    q = torch.empty(4, 8, L, 64, device="cuda", dtype=torch.bfloat16)
    row["landmark_backend"] = choose_landmark_backend(q, q, q, 64)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="landmark_gpu_out")
    p.add_argument(
        "--budget",
        type=float,
        default=55.0,
        help="seconds for checks and tile variants after the module table (each compiles up to 3 kernels): "
        "40%% to start checks, the rest to start 8k variants, then ~8 s for 32k",
    )
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    meta = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, triton=__import__("triton").__version__)
    print(json.dumps(meta), flush=True)
    rows = []

    def save():
        with open(os.path.join(args.out, "landmark_gpu.json"), "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)

    def stamp():
        return f"[{time.time() - t0:.0f}s]"

    # 1. modules (first: the target)
    for L in (1024, 2048, 4096, 8192, 16384, 32768):
        row = module_row(L)
        rows.append(row)
        save()
        print(json.dumps(row), stamp(), flush=True)

    # 2. correctness (few tile variants: each compiles three kernels)
    cases = [  # (dtype, d, block, T, S, key padding, gradient through lse too)
        (torch.bfloat16, 64, 64, 320, 320, False, False),  # the module's kernels (lengths % 16 == 0: no recompile)
        (torch.bfloat16, 64, 64, 150, 333, True, True),  # last T of S, padding, lse gradient
        (torch.float16, 128, 64, 300, 300, True, False),
        (torch.float32, 64, 32, 300, 300, True, False),
        (torch.bfloat16, 64, 16, 1, 777, True, False),  # one decoding step
    ]
    t1 = time.time()
    for i, case in enumerate(cases):
        if time.time() - t1 > 0.4 * args.budget:
            print(f"{stamp()} 40% of the budget spent: {len(cases) - i} checks left out", flush=True)
            break
        try:
            row = dict(part="check", **check(*case))
            row["at_s"] = round(time.time() - t0)
        except Exception as exc:
            row = dict(part="check", case=str(case), ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
        rows.append(row)
        print(json.dumps(row), flush=True)
    save()

    # 3. kernel variants at 8k, then the default and the best at 32k; the module under the best
    kernel_configs(8192, rows, t1 + args.budget, list(VARIANTS))
    save()
    at8 = [r for r in rows if r["part"] == "kernel" and "fwdbwd_ms" in r and r["rel_vs_default"] < 2e-2]
    best = min(at8, key=lambda r: r["fwdbwd_ms"])["config"] if at8 else "default"
    kernel_configs(32768, rows, t1 + args.budget + 8, ["default"] + ([best] if best != "default" else []))
    save()
    if best != "default":
        for L in (8192, 32768):
            rows.append(module_row(L, best))
            save()
            print(json.dumps(rows[-1]), stamp(), flush=True)

    print(f"\n{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  {stamp()}")
    checks = [r for r in rows if r["part"] == "check"]
    bad = [r for r in checks if not r["ok"]]
    print(f"checks vs float64: {len(checks) - len(bad)} ok, {len(bad)} failed")
    for r in bad:
        print("  FAILED", r)
    print("kernels alone (bf16, B=4, H=8, d=64, block 64, head views), ms; rel = vs the default config's results")
    for r in rows:
        if r["part"] == "kernel" and "fwd_ms" in r:
            print(
                f"L={r['L']:6d} {r['config']:28s} fwd {r['fwd_ms']:7.3f} bwd {r['bwd_ms']:7.3f} "
                f"sum {r['fwdbwd_ms']:7.3f}  sdpa {r['sdpa_fwd_ms']:6.3f}/{r['sdpa_bwd_ms']:6.3f}  "
                f"x{r['ratio_fwdbwd']:.2f}  rel {r['rel_vs_default']:.1e}  {r['split']}"
            )
        elif r["part"] == "kernel":
            print(f"L={r['L']:6d} {r['config']:28s} {r['error']}")
    print(
        "module fwd+bwd, (L, B=4, 512), 8 heads of 64, bf16 autocast, causal; landmark block 64; "
        "GB = peak memory of a step above the inputs"
    )
    print(
        f"{'L':>6} {'variant':28s} {'vanilla ms':>10} {'GB':>6} {'landmark ms':>11} {'GB':>6} "
        f"{'t ratio':>7} {'m ratio':>7}"
    )
    van = {r["L"]: r for r in rows if r["part"] == "module" and r["variant"] == "default"}
    nan = float("nan")
    for r in rows:
        if r["part"] != "module":
            continue
        v = van.get(r["L"], {})
        vm, vg = v.get("vanilla_ms", nan), v.get("vanilla_gb", nan)
        lm, lg = r.get("landmark_ms", nan), r.get("landmark_gb", nan)
        print(
            f"{r['L']:6d} {r['variant']:28s} {vm:10.2f} {vg:6.2f} {lm:11.2f} {lg:6.2f} {lm / vm:7.2f} "
            f"{lg / max(vg, 1e-9):7.2f}  {r.get('landmark_backend')} {r.get('vanilla_error', '')}"
            f"{r.get('landmark_error', '')}"
        )


if __name__ == "__main__":
    main()
