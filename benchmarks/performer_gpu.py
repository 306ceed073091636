"""Performer on one GPU, and the decoding steps of issue 14 that Performer, landmark and block_sparse missed.

Three parts, in this order, in one process (under ~90 s on an H200; ``--budget`` seconds in, what is left is
skipped and says so):

1. ``decode``: one decoding step of one layer (B = 4, 512 features, 8 heads, bf16 autocast, eval) at contexts
   512 and 8k for ``vanilla``, ``performer``, ``landmark``, ``block_sparse``, through
   ``benchmarks/decode_step_gpu.py`` (its warm-up, error check against the full pass, median of 40 steps,
   ATen ops per step; vanilla timed again last, the faster median kept); the target is <= 2x vanilla;
2. ``check``: the Performer module (causal and noncausal, L = 200, B = 2) in fp32 and under bf16 autocast
   against the same module in float64 on the same device: output and input-gradient error relative to the
   float64 output's / gradient's largest magnitude;
3. ``train``: the Performer module and SDPA (``vanilla``) forward + backward in CAB's setting (self attention
   on ``(L, 4, 512)``, 8 heads of 64, bf16 autocast over fp32 weights, train mode, ``loss = out.sum()``),
   causal and noncausal, L in 4k, 8k, 32k: median ms over 10 synchronised iterations after 3 warm-ups, peak
   memory above the inputs, and at 4k the CUDA kernels of one iteration (profiler).

    python benchmarks/performer_gpu.py --out DIR [--budget 85] [--smoke]

``--smoke``: the same code on the CPU at tiny sizes (to test this script without a GPU; numbers meaningless).

Writes ``DIR/performer_gpu.json`` and ``DIR/performer_gpu.md`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import decode_step_gpu as decode  # noqa: E402
import torch  # noqa: E402

from efficient_attention.registry import get_attention_class  # noqa: E402

EMBED, HEADS, BATCH = 512, 8, 4
DECODE = ("vanilla", "performer", "landmark", "block_sparse")
CONTEXTS = (512, 8192)
LENGTHS = (4096, 8192, 32768)
WARMUP, REPEATS = 3, 10


def build(name: str, causal: bool, device) -> torch.nn.Module:
    torch.manual_seed(0)
    return get_attention_class(name)(EMBED, HEADS, self_attention=True, causal=causal).to(device)


def check(device) -> list:
    """Errors of fp32 and bf16-autocast Performer against its float64 self (relative to the float64 maxima)."""
    rows = []
    for causal in (False, True):
        m = build("performer", causal, device).eval()
        ref_m = build("performer", causal, device).eval().double()
        ref_m.load_state_dict(m.state_dict())
        x = torch.randn(200, 2, EMBED, device=device, dtype=torch.float64)
        x64 = x.clone().requires_grad_(True)
        ref, _ = ref_m(x64, need_weights=False)
        ref.sum().backward()
        row = {"pattern": "causal" if causal else "noncausal"}
        for key, autocast in (("fp32", False), ("bf16", True)):
            x32 = x.float().requires_grad_(True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                out, _ = m(x32, need_weights=False)
            out.float().sum().backward()
            row[f"out_{key}"] = float((out.detach().double() - ref.detach()).abs().max() / ref.detach().abs().max())
            row[f"grad_{key}"] = float((x32.grad.double() - x64.grad).abs().max() / x64.grad.abs().max())
        rows.append(row)
        print(f"check {row}", flush=True)
    return rows


def train_point(name: str, causal: bool, length: int, device, kernels: bool) -> dict:
    m = build(name, causal, device).train()
    x = torch.randn(length, BATCH, EMBED, device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out, _ = m(x, need_weights=False)
        out.float().sum().backward()

    cuda = device.type == "cuda"
    for _ in range(WARMUP):
        step()
    decode.sync(device)
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        step()
        decode.sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    row = {"ms": statistics.median(times), "peak_gib": 0.0}
    if cuda:
        m.zero_grad(set_to_none=False)  # gradients stay allocated: peak above the steady state
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        row["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    if kernels and cuda:
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            step()
            torch.cuda.synchronize()
        row["kernels"] = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return row


def train(device, deadline: float, lengths) -> list:
    rows = []
    for length in lengths:
        for causal in (False, True):
            row = {"L": length, "pattern": "causal" if causal else "noncausal"}
            for name in ("vanilla", "performer"):
                if time.perf_counter() > deadline:
                    row[name] = "skipped (budget)"
                    continue
                try:
                    row[name] = train_point(name, causal, length, device, kernels=length == lengths[0])
                except Exception as exc:  # noqa: BLE001 - one failing point must not lose the others
                    row[name] = f"{type(exc).__name__}: {str(exc)[:120]}"
                    traceback.print_exc()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            print(f"train {row}", flush=True)
    return rows


def train_table(rows) -> str:
    lines = [
        "| L | pattern | SDPA ms | Performer ms | SDPA / Performer | SDPA GiB | Performer GiB | kernels SDPA / Perf |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, p = r.get("vanilla"), r.get("performer")
        if not (isinstance(s, dict) and isinstance(p, dict)):
            lines.append(f"| {r['L']} | {r['pattern']} | {s} | {p} | | | | |")
            continue
        kern = f"{s['kernels']} / {p['kernels']}" if "kernels" in s and "kernels" in p else "-"
        lines.append(
            f"| {r['L']} | {r['pattern']} | {s['ms']:.2f} | {p['ms']:.2f} | {s['ms'] / p['ms']:.2f}x | "
            f"{s['peak_gib']:.3f} | {p['peak_gib']:.3f} | {kern} |"
        )
    return "\n".join(lines)


def check_table(rows) -> str:
    lines = ["| pattern | out fp32 | grad fp32 | out bf16 | grad bf16 |", "|---|---|---|---|---|"]
    for r in rows:
        cells = " | ".join(f"{r[k]:.1e}" for k in ("out_fp32", "grad_fp32", "out_bf16", "grad_bf16"))
        lines.append(f"| {r['pattern']} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for performer_gpu.json / performer_gpu.md")
    p.add_argument("--budget", type=float, default=85.0, help="seconds after which the remaining points skip")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: a test of this script")
    args = p.parse_args()
    contexts, lengths = (CONTEXTS, LENGTHS) if not args.smoke else ((64, 128), (128,))
    if args.smoke:
        global REPEATS
        REPEATS = 2
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        sys.exit("performer_gpu.py needs a CUDA device (--smoke: the CPU)")
    else:
        device = torch.device("cuda")
        decode.PROFILE_KERNELS = True  # CUDA kernels of one step
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke test)"
    result: dict = {"device": name, "torch": torch.__version__}

    decode.warm_up(device, seconds=2.0 if device.type == "cuda" else 0.1)
    rows = [decode.run(name, contexts, device, slow=3.0) for name in DECODE]
    again = decode.run("vanilla", contexts, device, slow=3.0, check_errors=False)
    for c, t in again["ms"].items():  # the faster of vanilla's two medians (decode_step_gpu's rule)
        if isinstance(t, float) and isinstance(rows[0]["ms"].get(c), float):
            rows[0]["ms"][c] = min(rows[0]["ms"][c], t)
    result["decode"] = rows
    print(f"decode done at {time.perf_counter() - t0:.0f} s", flush=True)
    try:
        result["check"] = check(device)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        result["check"] = []
    result["train"] = train(device, t0 + args.budget, lengths)
    result["seconds"] = time.perf_counter() - t0
    text = "\n\n".join(
        [
            f"{result['device']}, torch {torch.__version__}, {result['seconds']:.0f} s",
            "Decoding step (B=4, one layer, bf16 autocast), ms (x vanilla):\n" + decode.table(rows, contexts),
            "Performer vs float64 (max abs error / max abs float64 value):\n" + check_table(result["check"]),
            "Forward + backward, CAB's setting (B=4, 512, 8 heads, bf16 autocast):\n" + train_table(result["train"]),
        ]
    )
    (out / "performer_gpu.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "performer_gpu.md").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
