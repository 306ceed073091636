"""GPU check and timing of S4D, ProbSparse, Nyström and LARA against dense SDPA attention (``vanilla``).

Setting (CAB's efficiency benchmark): self attention on ``(L, B=4, 512)``, 8 heads of 64, fp32 modules
under bf16 autocast, train mode, dropout 0, forward + backward of ``out.sum()``; L = 1k .. 32k.

1. Check: every mechanism and pattern in float64 on the GPU equals the same module on the CPU (the CPU
   path is checked against the float64 references by the test suite), with padding, at L = 300.
2. Time (median of CUDA-event timings) and peak memory above the inputs, and the number of CUDA kernels
   one forward + backward launches at 8k (torch profiler).

    python benchmarks/mechanisms_s4d_gpu.py --out DIR     # about a minute on an H200

Writes ``DIR/mechanisms_s4d_gpu.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from efficient_attention import build_attention  # noqa: E402

CASES = [
    ("vanilla", False),
    ("vanilla", True),
    ("s4d", False),
    ("s4d", True),
    ("probsparse", False),
    ("probsparse", True),
    ("nystrom", False),
    ("lara", False),
]
EMBED, HEADS, BSZ = 512, 8, 4


def build(name, causal, device, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return build_attention(name, embed_dim=EMBED, num_heads=HEADS, causal=causal, dropout=0.0).to(device, dtype)


def check(length=300):
    """float64 GPU output and input gradient == the CPU ones (eval: ProbSparse samples by a hash)."""
    rows = []
    for name, causal in CASES:
        m_cpu = build(name, causal, "cpu", torch.float64).eval()
        m_gpu = build(name, causal, "cuda", torch.float64).eval()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(length, 2, EMBED, generator=g, dtype=torch.float64)
        kpm = torch.zeros(2, length, dtype=torch.bool)
        kpm[1, -7:] = True
        errs = []
        for dev, m in (("cpu", m_cpu), ("cuda", m_gpu)):
            xi = x.detach().to(dev).clone().requires_grad_(True)  # a leaf on each device
            out, _ = m(xi, key_padding_mask=kpm.to(dev), need_weights=False)
            out = out.masked_fill(kpm.to(dev).t()[..., None], 0.0)
            out.pow(2).sum().backward()
            errs.append((out.detach().cpu(), xi.grad.cpu()))
        err = max((a - b).abs().max().item() / max(b.abs().max().item(), 1e-30) for a, b in zip(*errs))
        rows.append(dict(name=name, causal=causal, rel_err=err, ok=err < 1e-9))
        verdict = "ok" if err < 1e-9 else "FAIL"
        print(f"check {name:10s} {'causal' if causal else 'noncausal':9s} rel err {err:.2e} {verdict}", flush=True)
    return rows


def fwd_bwd(m, x):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, _ = m(x, need_weights=False)
    out.float().sum().backward()


def time_case(name, causal, length, reps):
    m = build(name, causal, "cuda").train()
    x = torch.randn(length, BSZ, EMBED, device="cuda", requires_grad=True)
    try:
        fwd_bwd(m, x)  # warm-up (and lazy initialisation)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd(m, x)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        times = []
        for _ in range(reps):
            m.zero_grad(set_to_none=True)
            x.grad = None
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fwd_bwd(m, x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        times.sort()
        return dict(ms=times[len(times) // 2], peak_mib=peak)
    except torch.cuda.OutOfMemoryError:
        return dict(ms=float("nan"), peak_mib=float("nan"), error="out of memory")
    finally:
        del m, x
        torch.cuda.empty_cache()


def count_kernels(name, causal, length=8192):
    m = build(name, causal, "cuda").train()
    x = torch.randn(length, BSZ, EMBED, device="cuda", requires_grad=True)
    fwd_bwd(m, x)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fwd_bwd(m, x)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--budget", type=float, default=55.0, help="seconds; later cases are skipped past it")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    result = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        host=platform.node(),
        setting=dict(batch=BSZ, embed=EMBED, heads=HEADS, autocast="bf16", mode="forward+backward"),
        check=check(),
        timings=[],
        kernels={},
    )
    path = os.path.join(args.out, "mechanisms_s4d_gpu.json")

    def save():
        result["elapsed_s"] = time.time() - t0
        with open(path, "w") as f:
            json.dump(result, f, indent=1)

    for name, causal in CASES:  # launches per forward + backward at 8k (first: they explain the timings)
        result["kernels"][f"{name} {'causal' if causal else 'noncausal'}"] = count_kernels(name, causal)
    print("CUDA kernels per fwd+bwd at 8k:", result["kernels"], flush=True)
    for length in args.lengths:
        for name, causal in CASES:
            if time.time() - t0 > args.budget:
                r = dict(ms=float("nan"), peak_mib=float("nan"), error="skipped: over the time budget")
            else:
                r = time_case(name, causal, length, args.reps)
            result["timings"].append(dict(name=name, causal=causal, length=length, **r))
            print(
                f"{name:10s} {'causal' if causal else 'noncausal':9s} L={length:6d} {r['ms']:9.3f} ms "
                f"{r['peak_mib']:9.1f} MiB",
                flush=True,
            )
        save()

    print(f"\n{result['device']}, torch {result['torch']}: fwd+bwd ms (peak MiB), B={BSZ} embed {EMBED} bf16 autocast")
    print(f"{'mechanism':22s}" + "".join(f"{f'L={n}':>20s}" for n in args.lengths) + f"{'kernels@8k':>12s}")
    for name, causal in CASES:
        label = f"{name} {'causal' if causal else 'noncausal'}"
        cells = []
        for n in args.lengths:
            r = next(t for t in result["timings"] if t["name"] == name and t["causal"] == causal and t["length"] == n)
            cells.append(f"{r['ms']:8.2f} ({r['peak_mib']:7.0f})")
        print(f"{label:22s}" + "".join(f"{c:>20s}" for c in cells) + f"{result['kernels'][label]:12d}")
    print(f"check: {'all ok' if all(r['ok'] for r in result['check']) else 'FAILURES'}; {result['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
