"""Causal Triton linear attention on the GPU: the segment-parallel kernels against float64, and old vs new speed.

    python benchmarks/linear_attention_gpu.py --out DIR             # < 90 s on an H200
    python benchmarks/linear_attention_gpu.py --out DIR --sweep     # also a few tile / segment configs at 32k
    python benchmarks/linear_attention_gpu.py --out DIR --full      # two more correctness cases

1. ``checks``: ``linear_attention`` (Triton backend) against the float64 reference path, output, final state and
   the gradients of q, k, v and the initial state, at shapes that cut the length into several segments (lengths
   that do not divide into them), one segment, several value blocks, decay / no decay, fp32 / bf16 / fp16.
2. ``op``: the causal op forward + backward, B = 4, H = 8, d = 64 (the normaliser in-kernel), bf16, m = 16
   (Performer, with decay) and m = 128 (cosFormer, no decay), L = 8k and 32k: the ``new`` kernels (segments
   in parallel, one value block) against the ``old`` schedule (one program per batch*head walking the whole
   length, value columns in blocks of 16-64 with partial fp32 dq/dk buffers), which is the same kernels run
   with the old tile rule and one segment -- selectable here only (``--paths``), not in the library.
   Time: median of 5 CUDA-event-timed calls after 2 warm-ups; memory: ``max_memory_allocated`` above what
   was live before the call.
3. ``modules``: CAB's efficiency setting (self-attention on ``(L, B=4, 512)``, 8 heads of 64, bf16 autocast over
   fp32 weights, train mode, forward + backward of ``out.sum()``), causal Performer, cosFormer and ABC at 8k and
   32k on both paths, and ``vanilla`` (SDPA); peak memory the same way as ``benchmarks/mechanisms_gpu.py``.

Writes ``DIR/linear_attention_gpu.json`` after each part; stays within ``--budget`` seconds by skipping later
points.  Needs CUDA and Triton; no fairseq.  ``--device cpu`` smoke-tests the script (chunked backend).
"""

from __future__ import annotations

import argparse
import contextlib
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
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 6e-3}
NEW_CONFIG = LA._triton_config


def old_config(m: int, d: int, dtype: torch.dtype, bh: int, sms: int, seq: int) -> dict:
    """The tile rule before the segments (main at dc234cc): one segment, value columns in blocks of 64, 32 or 16,
    the widest that still gives about two programs per SM."""
    block_m = max(16, 1 << (m - 1).bit_length())
    block_c = 64 if block_m * (4 if dtype == torch.float32 else 2) <= 256 else 32
    block_d = 16
    for width in (64, 32):
        if width <= max(16, 1 << (d - 1).bit_length()) and bh * -(-d // width) >= 2 * sms:
            block_d = width
            break
    chunks = max(1, -(-seq // block_c))
    return dict(BLOCK_C=block_c, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4, SEG=chunks * block_c)


@contextlib.contextmanager
def kernel_path(path: str, override: dict | None = None):
    """``new``: the library's config; ``old``: :func:`old_config`; ``override`` changes keys of the new one
    (``SEG_SCALE`` multiplies the number of segments)."""
    if path == "old":
        LA._triton_config = old_config
    elif override:

        def cfg(m, d, dtype, bh, sms, seq):
            c = NEW_CONFIG(m, d, dtype, bh, sms, seq)
            scale = override.get("SEG_SCALE", 1.0)
            c.update({k: v for k, v in override.items() if k != "SEG_SCALE"})
            chunks = -(-seq // c["BLOCK_C"])
            nseg = max(1, round(-(-seq // c["SEG"]) * scale))
            c["SEG"] = -(-chunks // nseg) * c["BLOCK_C"]
            return c

        LA._triton_config = cfg
    try:
        yield
    finally:
        LA._triton_config = NEW_CONFIG


def rel(got, ref):
    got, ref = got.double(), ref.double()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def segments(T, m, d, dtype, B, H):
    """(segments, value blocks) the library picks on this device."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else 1
    c = NEW_CONFIG(max(m, 16), d, dtype, B * H, sms, T)
    return -(-T // c["SEG"]), -(-d // c["BLOCK_D"])


# ------------------------------------------------------------------------------------------ checks
def op_case(B, H, T, m, d, dtype, decay, state, normalize, S=None, seed=0):
    """Errors of the Triton path against the float64 reference: out, final state, dq, dk, dv, d initial state."""
    S = T if S is None else S
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.rand(B, H, T, m, device=DEV, generator=g).to(dtype)
    k = torch.rand(B, H, S, m, device=DEV, generator=g).to(dtype)
    v = torch.randn(B, H, S, d, device=DEV, generator=g).to(dtype)
    log_decay = -torch.rand(B, H, S, device=DEV, generator=g) * 0.05 if decay else None
    kpm = torch.zeros(B, S, dtype=torch.bool, device=DEV)
    kpm[-1, S - S // 5 :] = True
    init = None
    if state:
        init = (torch.rand(B, H, m, d, device=DEV, generator=g), torch.rand(B, H, m, device=DEV, generator=g) + 1)
    results = []
    fast = "triton" if DEV == "cuda" else "chunked"
    for backend, cast in ((fast, lambda x: x), ("reference", lambda x: x.double())):
        ins = [cast(x).detach().requires_grad_() for x in (q, k, v)]
        st = None if init is None else [cast(x).detach().requires_grad_() for x in init]
        out, (hf, _) = linear_attention(
            *ins,
            causal=True,
            log_decay=None if log_decay is None else cast(log_decay),
            key_padding_mask=kpm,
            normalize=normalize,
            initial_state=None if st is None else (st[0], st[1] if normalize else None),
            return_state=True,
            backend=backend,
        )
        gen = torch.Generator(device=DEV).manual_seed(1)
        go = torch.randn(out.shape, device=DEV, generator=gen, dtype=torch.float64)
        gh = torch.randn(hf.shape, device=DEV, generator=gen, dtype=torch.float64)
        loss = (out.double() * go).sum() + (hf.double() * gh).sum()
        wrt = ins + ([st[0]] if st is not None else [])
        results.append([out, hf, *torch.autograd.grad(loss, wrt)])
    names = ["out", "state", "dq", "dk", "dv"] + (["dh0"] if state else [])
    return {n: rel(a, b) for n, a, b in zip(names, *results)}


def run_checks(full=False, deadline=lambda: False):
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    cases = [  # several segments on an H200 (B*H small), lengths that do not divide into chunks or segments
        dict(B=1, H=2, T=3001, m=128, d=64, dtype=bf16, decay=False, state=True, normalize=True),
        dict(B=2, H=2, T=4099, m=16, d=64, dtype=bf16, decay=True, state=True, normalize=True),
    ]
    if full:  # checked on the H200 on 2026-12-03 (results in benchmarks/README.md); each case compiles 5 kernels
        cases += [
            dict(B=2, H=2, T=700, m=64, d=16, dtype=f32, decay=True, state=False, normalize=False, S=2100),
            dict(B=1, H=2, T=1800, m=256, d=128, dtype=f16, decay=True, state=True, normalize=True),  # value blocks
        ]
    rows = []
    for c in cases:
        if deadline():
            print(f"checks: out of time budget, skipping {c}", flush=True)
            continue
        if DEV == "cpu":
            c = dict(c, T=min(c["T"], 150), S=None if c.get("S") is None else 200)
        nseg, n_d = segments(c.get("S") or c["T"], c["m"], c["d"], c["dtype"], c["B"], c["H"])
        label = (
            f"{str(c['dtype'])[6:]:>8} T={c['T']:>4} S={c.get('S') or c['T']:>4} m={c['m']:>3} d={c['d']:>3} "
            f"decay={c['decay']:d} state={c['state']:d} norm={c['normalize']:d} segments={nseg} vblocks={n_d}"
        )
        try:
            errs = op_case(**c)
            ok = max(errs.values()) < TOL[c["dtype"]]
            rows.append(dict(case=label, errors=errs, ok=ok))
            print(f"{'ok  ' if ok else 'FAIL'} {label} max {max(errs.values()):.1e} {errs}", flush=True)
        except Exception as exc:  # report and go on
            rows.append(dict(case=label, error=repr(exc), ok=False))
            print(f"FAIL {label} {exc!r}", flush=True)
            traceback.print_exc()
    return rows


# ------------------------------------------------------------------------------------------ timing
def timed(fn, reps=5):
    """(median ms over ``reps`` calls after two warm-ups, peak MiB above what was live); (None, None) on error."""
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
        mem = peak_bytes(fn, lambda: None, torch.device(DEV)).get("mem_peak_bytes", 0) / 2**20
        return sorted(times)[len(times) // 2], mem
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None
    except Exception:  # one broken point must not hide the others
        traceback.print_exc()
        return None, None


def op_speed(points, deadline):
    """``points``: ``(T, m, path, override)``; m = 16 with decay (Performer), m = 128 without (cosFormer)."""
    rows = []
    B, H, d = 4, 8, 64
    inputs: dict = {}
    for T, m, path, override in points:
        if deadline():
            print(f"op speed: out of time budget, skipping T={T} m={m} {path} {override}", flush=True)
            continue
        if (T, m) not in inputs:
            inputs.clear()  # free the previous shape's tensors
            if DEV == "cuda":
                torch.cuda.empty_cache()
            g = torch.Generator(device=DEV).manual_seed(0)
            q = torch.rand(B, H, T, m, device=DEV, generator=g, dtype=torch.bfloat16).requires_grad_()
            k = torch.rand(B, H, T, m, device=DEV, generator=g, dtype=torch.bfloat16).requires_grad_()
            v = torch.randn(B, H, T, d, device=DEV, generator=g, dtype=torch.bfloat16).requires_grad_()
            log_decay = -torch.rand(B, H, T, device=DEV, generator=g) * 0.01 if m == 16 else None
            inputs[(T, m)] = (q, k, v, log_decay)

        def fn(T=T, m=m):
            q, k, v, log_decay = inputs[(T, m)]
            linear_attention(q, k, v, causal=True, log_decay=log_decay).sum().backward()
            q.grad = k.grad = v.grad = None

        with kernel_path(path, override):
            ms, mib = timed(fn)
        nseg = segments(T, m, d, torch.bfloat16, B, H)[0] if path == "new" and not override else ""
        rows.append(dict(T=T, m=m, decay=m == 16, path=path, config=override, ms=ms, peak_mib=mib, seg=nseg))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def module_speed(points, deadline):
    """``points``: ``(L, mechanism, path)``; ``vanilla`` runs SDPA (path ``sdpa``)."""
    rows = []
    B, E, H = 4, 512, 8
    device = torch.device(DEV)
    for L, name, path in points:
        if deadline():
            print(f"modules: out of time budget, skipping {name} {path} L={L}", flush=True)
            continue
        torch.manual_seed(0)
        if name == "vanilla":
            mod = MultiheadAttention(E, H, self_attention=True, causal=True).to(DEV)
        else:
            mod = build_attention(name, embed_dim=E, num_heads=H, self_attention=True, causal=True).to(DEV)
        call, reset = train_case(mod, L, B, E, device, torch.bfloat16 if DEV == "cuda" else None)

        def fn():
            reset()
            call()

        with kernel_path(path if path != "sdpa" else "new"):
            ms, mib = timed(fn, reps=3)
        rows.append(dict(mechanism=name, L=L, path=path, ms=ms, peak_mib=mib))
        print(json.dumps(rows[-1]), flush=True)
        mod = call = reset = None
        if DEV == "cuda":
            torch.cuda.empty_cache()
    return rows


def fmt(x, digits=2):
    return "err" if x is None else f"{x:.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for linear_attention_gpu.json")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: smoke-test this script")
    parser.add_argument("--lengths", default="8192,32768", help="comma-separated sequence lengths")
    parser.add_argument("--paths", default="new,old", help="kernel schedules to time: new, old (old: see the doc)")
    parser.add_argument("--budget", type=float, default=82.0, help="seconds: later points are skipped past it")
    parser.add_argument("--sweep", action="store_true", help="also a few tile / segment configs of the new path")
    parser.add_argument("--full", action="store_true", help="two more correctness cases (fp32, fp16 value blocks)")
    args = parser.parse_args()
    global DEV
    DEV = args.device
    lengths = tuple(int(x) for x in args.lengths.split(","))
    paths = [p for p in args.paths.split(",") if p]
    if DEV == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available")
        return 1
    if DEV == "cpu":
        paths, lengths = ["new"], (256,)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    result = dict(device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu", torch=torch.__version__)
    path = os.path.join(args.out, "linear_attention_gpu.json")

    def save(key, value):
        result[key] = value
        with open(path, "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"[{time.time() - t0:.0f} s] {key} done", flush=True)

    def left():
        return args.budget - (time.time() - t0)

    # most important first; every point checks the deadline (a first call compiles its kernels, 1-3 s each)
    save("checks", run_checks(args.full, deadline=lambda: left() < 60))
    ops = [(T, m, p, None) for T in sorted(lengths, reverse=True) for m in (16, 128) for p in paths]
    save("op", op_speed(ops, deadline=lambda: left() < 30))
    mods = [(L, "vanilla", "sdpa") for L in lengths]
    mods += [(L, name, "new") for L in lengths for name in ("performer", "cosformer", "abc") if "new" in paths]
    if "old" in paths:  # the old schedule's modules at the longest length only (the budget)
        mods += [(max(lengths), name, "old") for name in ("performer", "cosformer", "abc")]
    save("modules", module_speed(mods, deadline=lambda: left() < (3 if not args.sweep else 15)))
    if args.sweep and DEV == "cuda":  # segment counts first (no recompiling), then tiles
        sweep = [(16, dict(SEG_SCALE=s)) for s in (0.5, 2.0)] + [(128, dict(SEG_SCALE=s)) for s in (0.5, 2.0, 4.0)]
        sweep += [(128, dict(num_warps=4)), (16, dict(num_warps=8))]
        sweep += [(128, dict(BLOCK_C=32)), (16, dict(BLOCK_C=32))]
        save("sweep", op_speed([(32768, m, "new", o) for m, o in sweep], deadline=lambda: left() < 3))
    print(f"\n# {result['device']}, torch {result['torch']}, {time.time() - t0:.0f} s")
    failed = [r for r in result["checks"] if not r["ok"]]
    print(f"checks against float64: {len(result['checks']) - len(failed)} ok, {len(failed)} failed")
    for r in result["checks"]:
        err = max(r["errors"].values()) if "errors" in r else float("nan")
        print(f"  {'ok  ' if r['ok'] else 'FAIL'} {r['case']} max rel err {err:.1e}")
    print("\n## op fwd+bwd, B=4 H=8 d=64 bf16: ms / peak MiB above inputs (new: segments)")
    print("| T | m | " + " | ".join(paths) + " | old/new |")
    for T in lengths:
        for m in (16, 128):
            cells = {r["path"]: r for r in result["op"] if r["T"] == T and r["m"] == m and not r["config"]}
            if not cells:
                continue
            txt = [f"{fmt(cells[p]['ms'])} / {fmt(cells[p]['peak_mib'], 0)}" if p in cells else "-" for p in paths]
            ratio = "-"
            if "old" in cells and "new" in cells and cells["old"]["ms"] and cells["new"]["ms"]:
                ratio = f"{cells['old']['ms'] / cells['new']['ms']:.2f}"
            print(f"| {T} | {m} (seg {cells.get('new', {}).get('seg', '')}) | " + " | ".join(txt) + f" | {ratio} |")
    for r in result.get("sweep", []):
        print(f"sweep T={r['T']} m={r['m']} {r['config']}: {fmt(r['ms'])} ms, {fmt(r['peak_mib'], 0)} MiB")
    print("\n## modules, causal, CAB setting (L, 4, 512), fwd+bwd: ms / peak MiB")
    print("| mechanism | path | " + " | ".join(str(L) for L in lengths) + " |")
    for name in ("vanilla", "performer", "cosformer", "abc"):
        for p in ["sdpa"] if name == "vanilla" else paths:
            cells = []
            for L in lengths:
                r = [x for x in result["modules"] if x["mechanism"] == name and x["path"] == p and x["L"] == L]
                cells.append(f"{fmt(r[0]['ms'])} / {fmt(r[0]['peak_mib'], 0)}" if r else "skipped")
            print(f"| {name} | {p} | " + " | ".join(cells) + " |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
