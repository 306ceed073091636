"""Peak memory and time of LARA, Nyström and ProbSparse against SDPA in CAB's setting, and ProbSparse's decode step.

Setting (issue 13's): self attention on ``(L, B=4, 512)``, 8 heads of 64, bf16 autocast over fp32 weights,
train mode, forward + backward with ``loss = out.float().sum()``, projections included.  For each module:

* ``err``: first a check against the float64 module (same weights, eval, float64 on the device): max abs
  difference of the output and of ``x``'s gradient, fp32 and bf16 autocast, at L = 256 and at 2048 (where
  :class:`~efficient_attention.functional.LengthChunks` splits the length on CUDA);
* ``ms``: median of 10 timed forward + backward steps after 3 warm-up steps;
* ``peak``: ``torch.cuda.max_memory_allocated`` over one step after ``reset_peak_memory_stats``, minus what was
  allocated before (the input and the weights), in MiB; ``x sdpa`` = SDPA's peak (``vanilla``, same pattern,
  same run) over ours (above 1: ours smaller).

Then ProbSparse's decoding step (eval, bf16 autocast, B=4, one token) at contexts 512 and 8k against vanilla's
cached step: median ms of 40 synchronised steps after 16 warm-up steps, and the step's ATen ops.

    python benchmarks/memory_gpu.py --out DIR

Writes ``DIR/memory_gpu.json`` and prints the tables.  About a minute on an H200.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from efficient_attention.benchmark.timing import peak_bytes, train_case  # noqa: E402
from efficient_attention.registry import build_attention  # noqa: E402

EMBED, HEADS, BATCH = 512, 8, 4
LENGTHS = (8192, 16384, 32768)
CASES = [("lara", False), ("nystrom", False), ("probsparse", False), ("probsparse", True)]
MIB = 2**20


def build(name: str, causal: bool, device) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_attention(name, embed_dim=EMBED, num_heads=HEADS, self_attention=True, causal=causal).to(device)


def check(name: str, causal: bool, device, length: int) -> dict:
    """Max abs errors of output and input gradient against the float64 module (eval: no sampling noise)."""
    m = build(name, causal, device).eval()
    ref_m = build(name, causal, device).double().eval()
    x = torch.randn(length, 2, EMBED, device=device, dtype=torch.float64)

    def run(module, inp, autocast):
        inp = inp.detach().requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out, _ = module(inp, inp, inp, need_weights=False)
        (out.float() * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum().backward()
        return out.double(), inp.grad.double()

    ref_out, ref_grad = run(ref_m, x, False)
    res = {}
    for key, autocast in (("fp32", False), ("bf16", True)):
        out, grad = run(m, x.float(), autocast)
        res[key] = (float((out - ref_out).abs().max()), float((grad - ref_grad).abs().max()))
    return res


def train_point(name: str, causal: bool, length: int, device) -> dict:
    m = build(name, causal, device)
    call, reset = train_case(m, length, BATCH, EMBED, device, torch.bfloat16)
    for _ in range(3):
        reset()
        call()
    times = []
    for _ in range(10):
        reset()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    mem = peak_bytes(call, reset, device)
    reset()
    del m, call, reset
    torch.cuda.empty_cache()
    return {"ms": statistics.median(times), "peak_mib": mem.get("mem_peak_bytes", float("nan")) / MIB}


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def decode_point(name: str, context: int, device) -> dict:
    """One-token steps after a context: vanilla gets a random cache, ProbSparse a 512-token prompt whose cache is
    extended with random keys (its past scores stay those of the prompt: the step's work is the same)."""
    m = build(name, True, device).eval()
    inc: dict = {}
    with torch.autocast(device.type, dtype=torch.bfloat16):
        prompt = min(context, 512)
        m(torch.randn(prompt, BATCH, EMBED, device=device), incremental_state=inc, need_weights=False)
        buf = m._get_input_buffer(inc)
        if context > prompt:
            for key in ("prev_key", "prev_value"):
                extra = torch.randn(BATCH, HEADS, context - prompt, EMBED // HEADS, device=device).to(buf[key].dtype)
                buf[key] = torch.cat([buf[key], extra], 2)
        xs = torch.randn(56, 1, BATCH, EMBED, device=device)
        times = []
        for i in range(56):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            m(xs[i], incremental_state=inc, need_weights=False)
            torch.cuda.synchronize()
            if i >= 16:
                times.append((time.perf_counter() - t0) * 1e3)
        with _CountOps() as ops:
            m(xs[0], incremental_state=inc, need_weights=False)
    return {"ms": statistics.median(times), "ops": ops.ops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="a tiny run on the CPU (checks the script only)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        global LENGTHS
        LENGTHS = (512,)
        torch.cuda.synchronize = lambda *a: None  # type: ignore[assignment]
        torch.cuda.empty_cache = lambda *a: None  # type: ignore[assignment]
        torch.cuda.get_device_name = lambda *a: "cpu"  # type: ignore[assignment]
    torch.backends.cuda.matmul.allow_tf32 = False
    results: dict = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "check": {}}
    for name, causal in CASES:
        for length in (256, 2048):
            key = f"{name}{' causal' if causal else ''} L={length}"
            try:
                results["check"][key] = check(name, causal, device, length)
            except Exception as exc:  # noqa: BLE001 - report and go on
                results["check"][key] = f"{type(exc).__name__}: {str(exc)[:200]}"
            print("check", key, results["check"][key], flush=True)
    rows = {}
    for name, causal in [("vanilla", False), ("vanilla", True)] + CASES:
        key = f"{name} {'causal' if causal else 'noncausal'}"
        rows[key] = {}
        for length in LENGTHS:
            try:
                rows[key][length] = train_point(name, causal, length, device)
            except Exception as exc:  # noqa: BLE001
                rows[key][length] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                torch.cuda.empty_cache()
            print(key, length, rows[key][length], flush=True)
    results["train"] = rows
    decode = {}
    for name in ("vanilla", "probsparse"):
        decode[name] = {}
        for context in (512, 8192):
            try:
                decode[name][context] = decode_point(name, context if not args.smoke else context // 16, device)
            except Exception as exc:  # noqa: BLE001
                decode[name][context] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            print("decode", name, context, decode[name][context], flush=True)
    results["decode"] = decode
    (args.out / "memory_gpu.json").write_text(json.dumps(results, indent=1))

    print("\n| module | " + " | ".join(f"{n // 1024}k ms / MiB / x sdpa" for n in LENGTHS) + " |")
    print("|---|" + "---|" * len(LENGTHS))
    for key, row in rows.items():
        base = rows["vanilla causal" if "causal" in key and "noncausal" not in key else "vanilla noncausal"]
        cells = []
        for n in LENGTHS:
            r, b = row[n], base[n]
            if "error" in r:
                cells.append(r["error"][:30])
            else:
                ratio = b.get("peak_mib", float("nan")) / r["peak_mib"]
                cells.append(f"{r['ms']:.2f} / {r['peak_mib']:.0f} / {ratio:.2f}")
        print(f"| {key} | " + " | ".join(cells) + " |")
    print("\n| decode step | 512 ms (ops) | 8k ms (ops) | x vanilla |")
    print("|---|---|---|---|")
    for name, row in decode.items():
        cells = [f"{row[c]['ms']:.3f} ({row[c]['ops']})" if "ms" in row[c] else row[c]["error"][:30] for c in row]
        ratio = " / ".join(
            f"{row[c]['ms'] / decode['vanilla'][c]['ms']:.2f}"
            if "ms" in row[c] and "ms" in decode["vanilla"][c]
            else "-"
            for c in row
        )
        print(f"| {name} | " + " | ".join(cells) + f" | {ratio} |")


if __name__ == "__main__":
    main()
