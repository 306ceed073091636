"""Same-process A/B of a fast path that a switch function turns on, in CAB's setting (GPU).

A mechanism's fast path is often chosen by a small predicate (``abc._fused_slots``,
``cosformer._triton_features_ok``): replacing it with ``lambda *a: False`` runs the path it replaced.  This times
both in one process, alternating, so the host's speed (which moves between device calls) cancels:

    PYTHONPATH=$PWD python benchmarks/ab_switch_gpu.py abc:causal:abc._fused_slots \\
        cosformer:noncausal:cosformer._triton_features_ok --lengths 2048 8192 32768 --out DIR

Each spec is ``name:pattern:module.predicate`` (the module under ``efficient_attention.attentions``), or
``name:pattern:module.SETTING=v1,v2,...`` to time a module setting at each value (the module under
``efficient_attention``, values as Python literals: ``s4d:causal:kernels._triton_s4d.WALK=(16,4,0),(16,4,16)``).
``--set module.SETTING=value`` fixes a setting for the whole run (``--set
"attentions.s4d.FUSED_MAX_LENGTH={1: 1073741824, 2: 1073741824}"`` lifts S4D's length bounds).  Setting:
self attention on ``(L, B=4, 512)``, 8 heads, fp32 weights under bf16 autocast, train mode, forward + backward
(:func:`efficient_attention.benchmark.timing.train_case`).  Per length and variant: the median of 18 timed steps
(6 alternating rounds of 3), the GPU kernel time of one step (profiler) and the step's peak above what was live.
Prints a line per length and writes ``DIR/ab_switch_gpu.json``.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from efficient_attention import build_attention  # noqa: E402
from efficient_attention.benchmark.timing import train_case  # noqa: E402


def _measure(call, reset) -> tuple:
    """``(GPU kernel ms, peak MiB)`` of one step."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    call()
    reset()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        reset()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e3, peak


def _setting(target: str) -> tuple:
    """``(module, attribute, values)`` of ``module.ATTR=v1,v2`` (module under ``efficient_attention``)."""
    path, values = target.split("=", 1)
    module_name, attr = path.rsplit(".", 1)
    module = importlib.import_module(f"efficient_attention.{module_name}")
    if not hasattr(module, attr):
        raise SystemExit(f"{module.__name__} has no setting {attr!r}")
    return module, attr, values


def ab(spec: str, lengths, rounds: int = 6) -> list:
    name, pattern, target = spec.split(":", 2)
    if "=" in target:
        module, attr, values = _setting(target)
        parsed = ast.literal_eval(f"({values},)")
        variants = {f"{attr}={v!r}": v for v in parsed}
    else:
        module_name, attr = target.rsplit(".", 1)
        module = importlib.import_module(f"efficient_attention.attentions.{module_name}")
        variants = {"on": getattr(module, attr), "off": lambda *a, **k: False}
    on = getattr(module, attr)
    rows = []
    try:
        for length in lengths:
            m = build_attention(name, embed_dim=512, num_heads=8, causal=pattern == "causal", self_attention=True)
            call, reset = train_case(m.cuda(), length, 4, 512, torch.device("cuda"), torch.bfloat16)
            times: dict = {k: [] for k in variants}
            gpu, peak = {}, {}
            for key, fn in variants.items():
                setattr(module, attr, fn)
                for _ in range(3):
                    call()
                    reset()
                gpu[key], peak[key] = _measure(call, reset)
            for r in range(rounds):
                for key in list(variants) if r % 2 == 0 else list(variants)[::-1]:
                    setattr(module, attr, variants[key])
                    call()
                    reset()
                    torch.cuda.synchronize()
                    for _ in range(3):
                        t0 = time.perf_counter()
                        call()
                        reset()
                        torch.cuda.synchronize()
                        times[key].append(1e3 * (time.perf_counter() - t0))
            row = {"spec": spec, "length": length}
            for key in variants:
                row[key] = {"ms": statistics.median(times[key]), "gpu_ms": gpu[key], "peak_mib": peak[key]}
            first, last = list(variants)[0], list(variants)[-1]
            row["last_over_first"] = row[last]["ms"] / row[first]["ms"]
            rows.append(row)
            print(
                f"{spec} L={length}: "
                + ", ".join(
                    f"{k} {row[k]['ms']:.3f} ms (kernels {row[k]['gpu_ms']:.3f} ms, peak {row[k]['peak_mib']:.0f} MiB)"
                    for k in variants
                )
                + f"; {last} / {first} {row['last_over_first']:.2f}",
                flush=True,
            )
            del m, call, reset
            torch.cuda.empty_cache()
    finally:
        setattr(module, attr, on)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("specs", nargs="+", help="name:pattern:module.predicate or name:pattern:module.SETTING=v1,v2")
    p.add_argument("--set", action="append", default=[], help="module.SETTING=value for the whole run")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384, 32768])
    p.add_argument("--out", type=Path, default=None, help="folder for ab_switch_gpu.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("ab_switch_gpu.py needs a CUDA device")
    for target in args.set:
        module, attr, value = _setting(target)
        setattr(module, attr, ast.literal_eval(value))
    rows = [row for spec in args.specs for row in ab(spec, args.lengths)]
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "set": args.set, "rows": rows}
        (args.out / "ab_switch_gpu.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
