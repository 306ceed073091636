"""Issue 13's CPU check: every mechanism and pattern, forward + backward, fp32, 2 threads, B = 1, N = 4096.

    python benchmarks/mechanisms_cpu.py --out DIR                        # writes DIR/mechanisms_cpu.json
    python benchmarks/mechanisms_cpu.py --out DIR --compare BEFORE.json  # and prints after / before

Self-attention on ``(N, B, 512)``, 8 heads of 64, fp32, dropout 0, train mode,
``loss = out.sum()``, module level -- the GPU script's step
(``efficient_attention/benchmark/timing.py``) without autocast -- for every
registered mechanism in noncausal self and causal self (``vanilla``, our
module on SDPA, is the baseline), with the GPU script's option overrides
(``benchmarks/mechanisms_gpu.py``: ``OPTIONS``).

The repeats are interleaved: every series is built and warmed up once, then
each round times one call of every series in turn, so load from other
processes on a shared machine spreads over all series instead of hitting a
few.  The median and the minimum over the rounds are reported, with the load
average before and after.  A series whose warm-up call takes longer than
``--budget`` seconds is timed once (its warm-up) and left out of the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from mechanisms_gpu import OPTIONS  # noqa: E402

from efficient_attention.benchmark.measure import _build, parse_pattern, resolve_mechanism  # noqa: E402
from efficient_attention.benchmark.sweep import SweepConfig, machine_info, plan_series  # noqa: E402
from efficient_attention.benchmark.timing import classify_exception, train_case  # noqa: E402

PATTERNS = ("noncausal self", "causal self")


def build_series(names, length: int, batch: int, heads: int, dim: int) -> list:
    config = SweepConfig(mechanisms=names, baselines=("vanilla",), patterns=list(PATTERNS), modes=("backward",))
    series = []
    for s in plan_series(config):
        name, pattern = s["mechanism"], s["pattern"]
        rec = {"mechanism": name, "pattern": pattern, "options": dict(OPTIONS.get(name, {})), "times_s": []}
        try:
            torch.manual_seed(0)
            module = _build(
                resolve_mechanism(name),
                parse_pattern(pattern),
                heads * dim,
                heads,
                torch.device("cpu"),
                torch.float32,
                rec["options"],
            )
            rec["call"], rec["reset"] = train_case(module, length, batch, heads * dim, torch.device("cpu"), None)
        except Exception as exc:  # noqa: BLE001 - recorded
            rec["status"], rec["detail"] = classify_exception(exc)
        series.append(rec)
    return series


def _timed(rec) -> float:
    rec["reset"]()
    t0 = time.perf_counter()
    rec["call"]()
    return time.perf_counter() - t0


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    result = {
        "script": "benchmarks/mechanisms_cpu.py",
        "machine": machine_info(("cpu",)),
        "setting": {
            "length": args.length,
            "batch": args.batch,
            "heads": args.heads,
            "dim": args.dim,
            "dtype": "float32",
            "threads": args.threads,
            "rounds": args.rounds,
            "budget_s": args.budget,
            "loss": "out.sum()",
            "interleaved": True,
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }
    series = build_series(args.mechanisms, args.length, args.batch, args.heads, args.dim)
    for rec in series:  # warm-up, once each
        if "call" not in rec:
            continue
        try:
            rec["warmup_s"] = _timed(rec)
            rec["status"] = "ok"
            if rec["warmup_s"] > args.budget:
                rec["times_s"].append(rec["warmup_s"])
                rec["detail"] = f"warm-up took {rec['warmup_s']:.2f} s > budget {args.budget:g} s: timed once"
        except Exception as exc:  # noqa: BLE001 - recorded
            rec["status"], rec["detail"] = classify_exception(exc)
        print(
            f"warm-up {rec['mechanism']} {rec['pattern']}: {rec.get('warmup_s', float('nan')) * 1e3:.0f} ms "
            f"{rec.get('detail', '')}",
            file=sys.stderr,
            flush=True,
        )
    for r in range(args.rounds):
        for rec in series:
            if rec.get("status") == "ok" and rec["warmup_s"] <= args.budget:
                rec["times_s"].append(_timed(rec))
        print(f"round {r + 1}/{args.rounds} done, load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
        _write(_collect(result, series, r + 1), args.out)  # a run cut short keeps its finished rounds
    return _collect(result, series, args.rounds)


def _collect(result: dict, series: list, rounds_done: int) -> dict:
    points = []
    for rec in series:
        p = {k: rec[k] for k in ("mechanism", "pattern", "options", "times_s") if k in rec}
        p["status"] = rec.get("status", "error")
        if rec.get("detail"):
            p["detail"] = rec["detail"]
        if p["status"] == "ok" and rec["times_s"]:
            p["time_s"], p["min_s"] = statistics.median(rec["times_s"]), min(rec["times_s"])
        points.append(p)
    return {
        **result,
        "points": points,
        "rounds_done": rounds_done,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
    }


def _write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "mechanisms_cpu.json").write_text(json.dumps(result, indent=1, default=str))


def markdown(result: dict, before=None) -> str:
    """The table as Markdown (``mechanisms_cpu.md``)."""
    base = {p["pattern"]: p for p in result["points"] if p["mechanism"] == "vanilla" and "time_s" in p}
    prev = {(p["mechanism"], p["pattern"]): p for p in (before or {}).get("points", []) if "time_s" in p}
    head = "| mechanism | pattern | median ms | min ms | SDPA / ours |"
    head += " before ms | after / before |" if before else ""
    lines = [head, "|---|---|---|---|---|" + ("---|---|" if before else "")]
    for p in result["points"]:
        if "time_s" not in p:
            lines.append(f"| `{p['mechanism']}` | {p['pattern']} | {p['status']} | | |" + (" | |" if before else ""))
            continue
        b = base.get(p["pattern"])
        once = " (1 call)" if len(p["times_s"]) == 1 else ""
        line = (
            f"| `{p['mechanism']}` | {p['pattern']} | {p['time_s'] * 1e3:,.0f}{once} | {p['min_s'] * 1e3:,.0f} | "
            + (f"{b['time_s'] / p['time_s']:.2f} |" if b else "- |")
        )
        if before:
            q = prev.get((p["mechanism"], p["pattern"]))
            line += f" {q['time_s'] * 1e3:,.0f} | {p['time_s'] / q['time_s']:.2f} |" if q else " - | - |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def table(result: dict, before=None) -> str:
    base = {p["pattern"]: p for p in result["points"] if p["mechanism"] == "vanilla" and "time_s" in p}
    prev = {(p["mechanism"], p["pattern"]): p for p in (before or {}).get("points", []) if "time_s" in p}
    head = f"{'mechanism':<14} {'pattern':<15} {'median ms':>10} {'min ms':>8} {'SDPA/ours':>10}"
    if before:
        head += f" {'before ms':>10} {'after/before':>13}"
    lines = [head]
    for p in result["points"]:
        if "time_s" not in p:
            lines.append(f"{p['mechanism']:<14} {p['pattern']:<15} {p['status']}: {p.get('detail', '')[:70]}")
            continue
        b = base.get(p["pattern"])
        line = f"{p['mechanism']:<14} {p['pattern']:<15} {p['time_s'] * 1e3:>10.1f} {p['min_s'] * 1e3:>8.1f} "
        line += f"{b['time_s'] / p['time_s']:>10.2f}" if b else f"{'-':>10}"
        if before:
            q = prev.get((p["mechanism"], p["pattern"]))
            line += f" {q['time_s'] * 1e3:>10.1f} {p['time_s'] / q['time_s']:>13.2f}" if q else f" {'-':>10} {'-':>13}"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench-cpu"))
    p.add_argument("--compare", type=Path, default=None, help="an earlier mechanisms_cpu.json: print after / before")
    p.add_argument("--mechanisms", nargs="+", default=None, help="only these (space- or comma-separated)")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds")
    p.add_argument("--budget", type=float, default=10.0, help="seconds: a slower warm-up call is the only timing")
    args = p.parse_args(argv)
    if args.mechanisms:
        args.mechanisms = [t for v in args.mechanisms for t in v.replace(",", " ").split()]
    result = run(args)
    _write(result, args.out)
    before = json.loads(args.compare.read_text()) if args.compare else None
    (args.out / "mechanisms_cpu.md").write_text(markdown(result, before))
    print(
        f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}; load "
        f"{result['load_average_start']} -> {result['load_average_end']}"
    )
    print(table(result, before))
    return 0 if any("time_s" in q for q in result["points"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
