"""The causal linear-attention op on the GPU: Triton against float64, and its time and memory, fwd + bwd.

    python benchmarks/linear_op_gpu.py --out DIR        # < 90 s on an H200; --device cpu smoke-tests it

1. ``checks``: ``linear_attention`` on CUDA (Triton for causal, matmuls for noncausal) against the float64
   reference path: output, final ``H`` (and ``z``), gradients of q, k, v and the initial state; causal and
   noncausal, normalised (the normaliser in-kernel) or not, bf16 / fp32, the result in ``out_dtype`` (bf16,
   time-first) or fp32, lengths cut into several segments that do not divide evenly.
2. ``op``: B = 4, H = 8, d = 64, bf16, m = 16 (decay, Performer-like) / 64 / 128 (cosFormer-like), L = 8k and
   32k, forward + backward of ``out.sum()``: ``fused`` is the library (normaliser in-kernel, result in bf16);
   ``ones`` rebuilds the former scheme from the public op (a ones column appended to v, an unnormalised fp32
   ``(B, H, T, 65)`` result divided afterwards) to show its buffers -- its time is NOT the old kernel's (that
   ran a 64 + 16-wide tail tile; the old fused numbers: 3.8 ms at m = 16, 6.2-6.7 ms at m = 128, 32k);
   ``unnorm`` is ``normalize=False`` (ABC-like, m = 64).  ms: median of 5 CUDA-event-timed calls after 2
   warm-ups; MiB: ``max_memory_allocated`` above what was live before the call (inputs excluded).
3. ``chunk``: the fused op at 32k with chunks of 32 instead of the library's 64 (the tile choice).
4. ``modules``: causal Performer, cosFormer, ABC and SDPA (``vanilla``) in CAB's setting (``(L, 4, 512)``,
   8 heads of 64, bf16 autocast, train mode, fwd + bwd) at 8k and 32k: ms and peak MiB (the issue-13 target:
   memory no more than SDPA's from 8k).

Writes ``DIR/linear_op_gpu.json``; later points are skipped past ``--budget`` seconds.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from efficient_attention import MultiheadAttention, build_attention  # noqa: E402
from efficient_attention.benchmark.timing import peak_bytes, train_case  # noqa: E402
from efficient_attention.kernels.linear_attention import linear_attention  # noqa: E402

LA = importlib.import_module("efficient_attention.kernels.linear_attention")  # the module, not the function
DEV = "cuda"
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def rel(got, ref):
    got, ref = got.double(), ref.double()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_case(B, H, T, m, d, dtype, causal, normalize, decay, state, out_dtype=None, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.rand(B, H, T, m, device=DEV, generator=g).to(dtype)
    k = torch.rand(B, H, T, m, device=DEV, generator=g).to(dtype)
    v = torch.randn(B, H, T, d, device=DEV, generator=g).to(dtype)
    log_decay = -torch.rand(B, H, T, device=DEV, generator=g) * 0.05 if decay else None
    kpm = torch.zeros(B, T, dtype=torch.bool, device=DEV)
    kpm[-1, T - T // 5 :] = True
    init = (torch.rand(B, H, m, d, device=DEV, generator=g), torch.rand(B, H, m, device=DEV, generator=g) + 1)
    results = []
    for fast, cast in ((True, lambda x: x), (False, lambda x: x.double())):
        ins = [cast(x).detach().requires_grad_() for x in (q, k, v)]
        st = [cast(x).detach().requires_grad_() for x in init] if state else None
        out, (hf, zf) = linear_attention(
            *ins,
            causal=causal,
            log_decay=None if log_decay is None else cast(log_decay),
            key_padding_mask=kpm,
            normalize=normalize,
            initial_state=None if st is None else (st[0], st[1] if normalize else None),
            return_state=True,
            backend=None if fast else "reference",
            out_dtype=out_dtype if fast else None,
        )
        gen = torch.Generator(device=DEV).manual_seed(1)
        go = torch.randn(out.shape, device=DEV, generator=gen, dtype=torch.float64)
        gh = torch.randn(hf.shape, device=DEV, generator=gen, dtype=torch.float64)
        loss = (out.double() * go).sum() + (hf.double() * gh).sum() + (zf.double().sum() if normalize else 0)
        wrt = ins + (st if st is not None and normalize else st[:1] if st is not None else [])
        results.append([out, hf, *torch.autograd.grad(loss, wrt)])
    names = ["out", "H", "dq", "dk", "dv", "dH0", "dz0"]
    return {n: rel(a, b) for n, a, b in zip(names, *results)}


def run_checks(deadline):
    f32, bf16 = torch.float32, torch.bfloat16
    cases = [
        dict(
            B=2,
            H=2,
            T=4099,
            m=16,
            d=64,
            dtype=bf16,
            causal=True,
            normalize=True,
            decay=True,
            state=True,
            out_dtype=bf16,
        ),
        dict(B=1, H=2, T=3001, m=128, d=64, dtype=bf16, causal=True, normalize=True, decay=False, state=False),
        dict(
            B=1,
            H=2,
            T=2100,
            m=64,
            d=64,
            dtype=bf16,
            causal=True,
            normalize=False,
            decay=True,
            state=True,
            out_dtype=bf16,
        ),
        dict(B=1, H=2, T=1500, m=32, d=64, dtype=f32, causal=True, normalize=True, decay=True, state=True),
        dict(B=1, H=2, T=1500, m=32, d=48, dtype=f32, causal=True, normalize=False, decay=False, state=False),
        dict(B=2, H=2, T=1000, m=64, d=64, dtype=bf16, causal=False, normalize=True, decay=False, state=True),
        dict(B=2, H=2, T=1000, m=64, d=64, dtype=f32, causal=False, normalize=False, decay=False, state=False),
    ]
    rows = []
    for c in cases:
        label = " ".join(f"{k}={str(v).replace('torch.', '')}" for k, v in c.items() if k not in ("B", "H"))
        if deadline():
            print(f"checks: out of time, skipping {label}", flush=True)
            continue
        if DEV == "cpu":
            c = dict(c, T=min(c["T"], 150))
        try:
            errs = check_case(**c)
            ok = max(errs.values()) < TOL[c["dtype"]]
            rows.append(dict(case=label, errors=errs, ok=ok))
        except Exception as exc:  # report and go on
            traceback.print_exc()
            rows.append(dict(case=label, error=repr(exc), ok=False))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def timed(fn, reps=5):
    """(median ms, peak MiB above what was live, max_memory_allocated MiB); Nones on error."""
    try:
        for _ in range(2):
            fn()
        times = []
        for _ in range(reps):
            if DEV == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        mem = peak_bytes(fn, lambda: None, torch.device(DEV))
        return (
            sorted(times)[len(times) // 2],
            mem.get("mem_peak_bytes", 0) / 2**20,
            mem.get("mem_max_allocated_bytes", 0) / 2**20,
        )
    except Exception:  # one broken point (OOM included) must not hide the others
        traceback.print_exc()
        if DEV == "cuda":
            torch.cuda.empty_cache()
        return None, None, None


def op_point(T, m, path, chunk=None):
    B, H, d = 4, 8, 64
    g = torch.Generator(device=DEV).manual_seed(0)
    bf16 = torch.bfloat16
    q = torch.rand(B, H, T, m, device=DEV, generator=g, dtype=bf16).requires_grad_()
    k = torch.rand(B, H, T, m, device=DEV, generator=g, dtype=bf16).requires_grad_()
    v = torch.randn(B, H, T, d, device=DEV, generator=g, dtype=bf16).requires_grad_()
    log_decay = -torch.rand(B, H, T, device=DEV, generator=g) * 0.01 if m == 16 else None

    def fn():
        if path == "fused":
            out = linear_attention(q, k, v, causal=True, log_decay=log_decay, out_dtype=bf16)
        elif path == "unnorm":
            out = linear_attention(q, k, v, causal=True, log_decay=log_decay, normalize=False, out_dtype=bf16)
        else:  # the former scheme's buffers: ones column, fp32 (B, H, T, d + 1), a division afterwards
            ones = torch.nn.functional.pad(v, (0, 1), value=1.0)
            o = linear_attention(q, k, ones, causal=True, log_decay=log_decay, normalize=False)
            out = (o[..., :-1] / o[..., -1:]).to(bf16)
        out.float().sum().backward()
        q.grad = k.grad = v.grad = None

    base = LA._triton_config
    if chunk is not None:
        LA._triton_config = lambda *a: dict(base(*a), BLOCK_C=chunk, SEG=base(*a)["SEG"] // base(*a)["BLOCK_C"] * chunk)
    try:
        ms, peak, maxalloc = timed(fn)
    finally:
        LA._triton_config = base
    return dict(T=T, m=m, path=path, chunk=chunk, ms=ms, peak_mib=peak, max_alloc_mib=maxalloc)


def module_point(L, name):
    B, E, H = 4, 512, 8
    torch.manual_seed(0)
    if name == "vanilla":
        mod = MultiheadAttention(E, H, self_attention=True, causal=True).to(DEV)
    else:
        mod = build_attention(name, embed_dim=E, num_heads=H, self_attention=True, causal=True).to(DEV)
    call, reset = train_case(mod, L, B, E, torch.device(DEV), torch.bfloat16 if DEV == "cuda" else None)

    def fn():
        reset()
        call()

    ms, peak, maxalloc = timed(fn, reps=3)
    return dict(mechanism=name, L=L, ms=ms, peak_mib=peak, max_alloc_mib=maxalloc)


def fmt(x, digits=2):
    return "err" if x is None else f"{x:.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for linear_op_gpu.json")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: smoke-test this script")
    parser.add_argument("--budget", type=float, default=85.0, help="seconds: later points are skipped past it")
    args = parser.parse_args()
    global DEV
    DEV = args.device
    if DEV == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available")
        return 1
    lengths = (8192, 32768) if DEV == "cuda" else (256,)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    result: dict = dict(device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu", torch=torch.__version__)

    def save(key, value):
        result[key] = value
        with open(os.path.join(args.out, "linear_op_gpu.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"[{time.time() - t0:.0f} s] {key} done", flush=True)

    def over(reserve):
        return time.time() - t0 > args.budget - reserve

    def points(fn, items, reserve):
        rows = []
        for item in items:
            if over(reserve):
                print(f"out of time, skipping {item}", flush=True)
                continue
            rows.append(fn(*item))
            print(json.dumps(rows[-1]), flush=True)
            if DEV == "cuda":
                torch.cuda.empty_cache()
        return rows

    save("checks", run_checks(lambda: over(70)))
    ops = [(T, m, "fused") for T in lengths for m in (16, 64, 128)]
    ops += [(max(lengths), 16, "ones"), (max(lengths), 128, "ones"), (max(lengths), 64, "unnorm")]
    save("op", points(op_point, ops, 40))
    save("chunk", points(op_point, [(max(lengths), m, "fused", 32) for m in (16, 128)], 32))
    mods = [(L, n) for L in lengths for n in ("vanilla", "performer", "cosformer", "abc")]
    save("modules", points(module_point, mods, 3))

    print(f"\n# {result['device']}, torch {result['torch']}, {time.time() - t0:.0f} s")
    for r in result["checks"]:
        err = max(r["errors"].values()) if "errors" in r else float("nan")
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['case']} max rel err {err:.1e} {r.get('error', '')}")
    print("\n## op fwd+bwd, B=4 H=8 d=64 bf16: ms / peak MiB above inputs / max_memory_allocated MiB")
    for r in result["op"] + result["chunk"]:
        print(
            f"| {r['T']} | m={r['m']} | {r['path']}{'' if r['chunk'] is None else ' chunk=%d' % r['chunk']} | "
            f"{fmt(r['ms'])} ms | {fmt(r['peak_mib'], 0)} | {fmt(r['max_alloc_mib'], 0)} |"
        )
    print("\n## modules, causal, (L, 4, 512) bf16 autocast fwd+bwd: ms / peak MiB / max_memory_allocated MiB")
    for r in result["modules"]:
        print(
            f"| {r['mechanism']} | {r['L']} | {fmt(r['ms'])} ms | {fmt(r['peak_mib'], 0)} | "
            f"{fmt(r['max_alloc_mib'], 0)} |"
        )
    return 0 if all(r["ok"] for r in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
