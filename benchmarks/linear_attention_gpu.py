"""Chunked linear attention on the GPU: correctness against float64, then speed against SDPA.

    python benchmarks/linear_attention_gpu.py --out DIR

1. ``linear_attention`` (Triton backend) against the float64 reference, forward and gradients, over shapes,
   dtypes, causal / noncausal, decay, initial state, normalised or not.
2. The three routed modules (Performer, cosFormer, ABC) on CUDA in fp32 against themselves in float64
   (full forward, causal and noncausal), and causal decoding against the full pass.
3. Op speed, forward + backward, B = 4, H = 8, d = 64, m = 64 / 128 / 256, T = 1k .. 32k, bf16: the Triton
   op, the PyTorch chunked path, and SDPA (causal / noncausal, head dim 64).
4. Module speed (the efficiency setting of issue 13): self-attention on ``(L, B = 4, 512)``, 8 heads,
   bf16 autocast over fp32 weights, train mode, forward + backward of ``out.sum()``: Performer, cosFormer, ABC
   (causal and noncausal) against ``efficient_attention.MultiheadAttention`` (vanilla, SDPA).

Writes ``DIR/linear_attention_gpu.json`` after each part and prints as it goes, then tables; stays within
``--budget`` seconds (85) by skipping the longest timing points (``--full``/``--sweep`` add checks and a tile
sweep).  Needs CUDA and Triton; no fairseq.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from efficient_attention import MultiheadAttention, build_attention  # noqa: E402
from efficient_attention.kernels.dispatch import not_supported_reasons  # noqa: E402
from efficient_attention.kernels.linear_attention import linear_attention  # noqa: E402

DEV = "cuda"  # --device cpu: a smoke run of the script itself (chunked backend, wall-clock timing)
TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)


def rel(got, ref):
    got, ref = got.double(), ref.double()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------ checks
def op_case(B, H, T, S, m, d, dtype, causal, decay, state, normalize, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.rand(B, H, T, m, device=DEV, generator=g).to(dtype)
    k = torch.rand(B, H, S, m, device=DEV, generator=g).to(dtype)
    v = torch.randn(B, H, S, d, device=DEV, generator=g).to(dtype)
    log_decay = -torch.rand(B, H, S, device=DEV, generator=g) * 0.2 if decay else None
    kpm = torch.zeros(B, S, dtype=torch.bool, device=DEV)
    kpm[-1, S - S // 5 :] = True
    init = None
    if state:
        init = (torch.rand(B, H, m, d, device=DEV, generator=g), torch.rand(B, H, m, device=DEV, generator=g) + 1)
        if not normalize:
            init = (init[0], None)
    ins = [x.clone().requires_grad_() for x in (q, k, v)]
    out, (hf, _) = linear_attention(
        *ins,
        causal=causal,
        log_decay=log_decay,
        key_padding_mask=kpm,
        normalize=normalize,
        initial_state=init,
        return_state=True,
    )
    ref_ins = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_init = None if init is None else (init[0].double(), None if init[1] is None else init[1].double())
    ref_out, (ref_hf, _) = linear_attention(
        *ref_ins,
        causal=causal,
        log_decay=None if log_decay is None else log_decay.double(),
        key_padding_mask=kpm,
        normalize=normalize,
        initial_state=ref_init,
        return_state=True,
        backend="reference",
    )
    go = torch.randn_like(ref_out)
    gh = torch.randn_like(ref_hf)
    ((out.double() * go).sum() + (hf.double() * gh).sum()).backward()
    ((ref_out * go).sum() + (ref_hf * gh).sum()).backward()
    errs = {"out": rel(out, ref_out), "state": rel(hf, ref_hf)}
    errs.update({f"d{n}": rel(a.grad, b.grad) for n, a, b in zip("qkv", ins, ref_ins)})
    return errs


def _case_line(c, backend):
    return (
        f"{str(c['dtype']):>14} T={c['T']:>4} S={c['S']:>4} m={c['m']:>3} d={c['d']:>3} causal={c['causal']!s:<5} "
        f"decay={c['decay']!s:<5} state={c['state']!s:<5} norm={c['normalize']!s:<5} {backend}"
    )


def run_op_checks(full: bool):
    """Each case compiles its kernel variants (about 1 s each on the device): the default set is small."""
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    cases = [
        dict(B=2, H=3, T=300, S=300, m=64, d=64, dtype=f32, causal=True, decay=True, state=True, normalize=True),
        dict(B=2, H=3, T=333, S=333, m=256, d=128, dtype=bf16, causal=True, decay=True, state=True, normalize=True),
        dict(B=2, H=3, T=200, S=200, m=130, d=32, dtype=f16, causal=True, decay=False, state=False, normalize=True),
        dict(B=2, H=2, T=100, S=300, m=32, d=64, dtype=bf16, causal=True, decay=True, state=False, normalize=False),
        dict(B=1, H=2, T=1, S=1, m=1, d=16, dtype=bf16, causal=True, decay=False, state=True, normalize=False),
    ]
    if full:
        for dtype in (f32, bf16, f16):
            for T, m, d in ((63, 64, 64), (1000, 64, 64), (777, 128, 64)):
                cases.append(
                    dict(B=2, H=3, T=T, S=T, m=m, d=d, dtype=dtype, causal=True, decay=True, state=True, normalize=True)
                )
    rows = []
    for c in cases:
        q = torch.empty(1, 1, 1, c["m"], device=DEV, dtype=c["dtype"])
        backend = "chunked" if not_supported_reasons("linear_attention", q, q, q)["triton"] else "triton"
        try:
            errs = op_case(**c)
            ok = max(errs.values()) < TOL[c["dtype"]] * (3 if c["dtype"] != torch.float32 else 1)
            rows.append(dict(case={k: str(v) for k, v in c.items()}, backend=backend, errors=errs, ok=ok))
            print(f"{'ok  ' if ok else 'FAIL'} {_case_line(c, backend)} {max(errs.values()):.1e} {errs}", flush=True)
        except Exception as exc:  # report and go on
            rows.append(dict(case={k: str(v) for k, v in c.items()}, backend=backend, error=repr(exc), ok=False))
            print(f"FAIL {_case_line(c, backend)} {exc!r}", flush=True)
            traceback.print_exc()
    return rows


def run_module_checks():
    rows = []
    for name, opts in (("performer", dict(approx_attn_dim=64)), ("cosformer", dict(max_len=4096)), ("abc", {})):
        for causal in (True,):  # noncausal runs PyTorch matmuls only
            torch.manual_seed(0)
            try:
                m = build_attention(name, embed_dim=128, num_heads=4, causal=causal, self_attention=True, **opts)
                m = m.to(DEV).eval()
                x = torch.randn(700, 3, 128, device=DEV)
                kpm = torch.zeros(3, 700, dtype=torch.bool, device=DEV)
                kpm[1, 650:] = True
                out = m(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
                ref = m.double()(x.double(), x.double(), x.double(), key_padding_mask=kpm, need_weights=False)[0]
                keep = (~kpm).t().unsqueeze(-1)
                err = rel(out * keep, ref * keep)
                row = dict(name=name, causal=causal, rel_err_fp32_vs_fp64=err, ok=err < 1e-4)
                if causal:  # decoding (a prefill of 300, then steps) equals the full pass
                    m = m.float()
                    full = m(x[:340], need_weights=False)[0]
                    state = {}
                    outs = [m(x[:300], x[:300], x[:300], incremental_state=state, need_weights=False)[0]]
                    for t in range(300, 340):
                        step = x[t : t + 1]
                        outs.append(m(step, step, step, incremental_state=state, need_weights=False)[0])
                    derr = rel(torch.cat(outs), full)
                    row.update(rel_err_decode_vs_full=derr, ok=row["ok"] and derr < 1e-4)
                rows.append(row)
            except Exception as exc:
                rows.append(dict(name=name, causal=causal, error=repr(exc), ok=False))
                traceback.print_exc()
            print(f"{'ok  ' if rows[-1]['ok'] else 'FAIL'} module {rows[-1]}", flush=True)
    return rows


# ------------------------------------------------------------------------------------------ timing
def timed(fn, reps=5):
    """Median ms of ``fn`` over ``reps`` runs after two warm-ups (GPU time from CUDA events; None on OOM/error)."""
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
        return sorted(times)[len(times) // 2]
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None
    except Exception:  # report and go on: one broken point must not hide the others
        traceback.print_exc()
        return None


def op_speed(lengths, deadline=lambda: False):
    rows = []
    B, H, d = 4, 8, 64
    for T in lengths:
        if deadline():
            print(f"op speed: out of time budget, skipping T >= {T}", flush=True)
            break
        qs, ks, vs = (torch.randn(B, H, T, d, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

        def sdpa(causal):
            def fn():
                F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal).sum().backward()

            return fn

        row = dict(T=T, sdpa_causal=timed(sdpa(True)), sdpa_noncausal=timed(sdpa(False)))
        for m in (64, 128, 256):
            q = torch.rand(B, H, T, m, device=DEV, dtype=torch.bfloat16).requires_grad_()
            k = torch.rand(B, H, T, m, device=DEV, dtype=torch.bfloat16).requires_grad_()
            v = torch.randn(B, H, T, d, device=DEV, dtype=torch.bfloat16).requires_grad_()
            decay = -torch.rand(B, H, T, device=DEV) * 0.01

            def op(causal, backend, with_decay):
                def fn():
                    linear_attention(
                        q, k, v, causal=causal, log_decay=decay if with_decay else None, backend=backend
                    ).sum().backward()

                return fn

            fast = "triton" if DEV == "cuda" else "chunked"
            row[f"m{m}_triton_causal_decay"] = timed(op(True, fast, True))
            if m == 128:  # cosFormer's case: no decay
                row[f"m{m}_triton_causal"] = timed(op(True, fast, False))
            if m == 64:
                row[f"m{m}_chunked_causal_decay"] = timed(op(True, "chunked", True)) if T <= 8192 else None
            row[f"m{m}_noncausal"] = timed(op(False, None, False))
            q = k = v = None  # free them (not del: the closures above read them)
        rows.append(row)
        print(json.dumps(row), flush=True)
        qs = ks = vs = None  # free them (not del: the closures above read them)
        if DEV == "cuda":
            torch.cuda.empty_cache()
    return rows


def tile_sweep(T=8192, m=64):
    """Causal op fwd+bwd ms at one shape for a few tile configs (the pick of ``_triton_config`` is marked)."""
    import efficient_attention.kernels.linear_attention as la_mod

    B, H, d = 4, 8, 64
    q = torch.rand(B, H, T, m, device=DEV, dtype=torch.bfloat16).requires_grad_()
    k = torch.rand(B, H, T, m, device=DEV, dtype=torch.bfloat16).requires_grad_()
    v = torch.randn(B, H, T, d, device=DEV, dtype=torch.bfloat16).requires_grad_()
    decay = -torch.rand(B, H, T, device=DEV) * 0.01
    chosen = la_mod._triton_config
    picked = chosen(m, d + 1, torch.bfloat16, B * H, torch.cuda.get_device_properties(0).multi_processor_count)
    rows = []
    for cfg in (
        dict(BLOCK_C=64, BLOCK_D=16, num_warps=4),
        dict(BLOCK_C=64, BLOCK_D=32, num_warps=4),
        dict(BLOCK_C=64, BLOCK_D=64, num_warps=4),
        dict(BLOCK_C=32, BLOCK_D=16, num_warps=4),
        dict(BLOCK_C=128, BLOCK_D=16, num_warps=8),
        dict(BLOCK_C=64, BLOCK_D=16, num_warps=8),
    ):
        full = dict(cfg, BLOCK_M=max(16, m))
        la_mod._triton_config = lambda *a, full=full: full
        try:
            ms = timed(
                lambda: linear_attention(q, k, v, causal=True, log_decay=decay, backend="triton").sum().backward()
            )
        except Exception as exc:
            ms = repr(exc)[:80]
        finally:
            la_mod._triton_config = chosen
        rows.append(dict(cfg, T=T, m=m, ms=ms, picked=all(picked[k] == v for k, v in cfg.items())))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def module_speed(lengths, deadline=lambda: False):
    rows = []
    B, E, H = 4, 512, 8
    mechs = [("vanilla", {}), ("performer", {}), ("cosformer", {}), ("abc", {})]
    for causal in (True, False):
        for name, opts in mechs:
            torch.manual_seed(0)
            if name == "vanilla":
                m = MultiheadAttention(E, H, self_attention=True, causal=causal).to(DEV).train()
            else:
                m = build_attention(name, embed_dim=E, num_heads=H, self_attention=True, causal=causal, **opts)
                m = m.to(DEV).train()
            for L in lengths:
                if deadline():
                    rows.append(dict(mechanism=name, causal=causal, L=L, ms=None, peak_mib=0.0, skipped=True))
                    continue
                x = torch.randn(L, B, E, device=DEV, requires_grad=True)

                def fn():
                    with torch.autocast(DEV, dtype=torch.bfloat16):
                        out = m(x, x, x, need_weights=False)[0]
                    out.float().sum().backward()

                if DEV == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                ms = timed(fn, reps=3)
                peak = torch.cuda.max_memory_allocated() / 2**20 if DEV == "cuda" else 0.0
                rows.append(dict(mechanism=name, causal=causal, L=L, ms=ms, peak_mib=round(peak, 1)))
                print(json.dumps(rows[-1]), flush=True)
                x = None  # free it (not del: fn() reads it)
                if DEV == "cuda":
                    torch.cuda.empty_cache()
    return rows


def fmt(x):
    return "OOM/err" if x is None else f"{x:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for linear_attention_gpu.json")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: smoke-test this script")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="comma-separated sequence lengths")
    parser.add_argument("--budget", type=float, default=85.0, help="seconds: later timing points are skipped past it")
    parser.add_argument("--full", action="store_true", help="more correctness cases (each compiles kernels)")
    parser.add_argument("--sweep", action="store_true", help="also time a few tile configs at T = 8192")
    args = parser.parse_args()
    global DEV
    DEV = args.device
    lengths = tuple(int(x) for x in args.lengths.split(","))
    os.makedirs(args.out, exist_ok=True)
    if DEV == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available")
        return 1
    t0 = time.time()
    result = dict(device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu", torch=torch.__version__)
    path = os.path.join(args.out, "linear_attention_gpu.json")

    def save(key, value):
        result[key] = value
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"[{time.time() - t0:.0f} s] {key} done", flush=True)

    def left():
        return args.budget - (time.time() - t0)

    save("op_checks", run_op_checks(args.full))
    save("module_checks", run_module_checks())
    save("module_speed", module_speed(lengths, deadline=lambda: left() < 25))
    save("op_speed", op_speed(lengths, deadline=lambda: left() < 5))
    if args.sweep and DEV == "cuda":
        save("tile_sweep", tile_sweep())
    print(f"\n# {result['device']}, torch {result['torch']}, {time.time() - t0:.0f} s")
    failed = [r for r in result["op_checks"] + result["module_checks"] if not r["ok"]]
    print(f"{len(failed)} failed checks (listed above as FAIL)")
    print("\n## op fwd+bwd ms (B=4, H=8, d=64, bf16)")
    keys = [k for k in result["op_speed"][0] if k != "T"] if result["op_speed"] else []
    print("| T | " + " | ".join(keys) + " |")
    for r in result["op_speed"]:
        print(f"| {r['T']} | " + " | ".join(fmt(r[k]) for k in keys) + " |")
    for r in result.get("tile_sweep", []):
        print("tile sweep (causal, decay, T=8192, m=64, bf16, fwd+bwd ms):", r)
    print("\n## modules fwd+bwd ms / peak MiB ((L, 4, 512), 8 heads, bf16 autocast)")
    for causal in (True, False):
        print(f"\n{'causal' if causal else 'noncausal'}: | mechanism | " + " | ".join(str(L) for L in lengths) + " |")
        for name in ("vanilla", "performer", "cosformer", "abc"):
            cells = [r for r in result["module_speed"] if r["mechanism"] == name and r["causal"] == causal]
            cells = ["skipped" if r.get("skipped") else f"{fmt(r['ms'])} / {r['peak_mib']:.0f}" for r in cells]
            print(f"| {name} | " + " | ".join(cells) + " |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
