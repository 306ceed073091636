"""ABC (causal and noncausal), LARA and Nystrom on the GPU: checked against float64, timed against SDPA.

    PYTHONPATH=$PWD python benchmarks/abcfam_gpu.py --out DIR [--budget 50]   # H200: under a minute

Three parts, one process:

* ``check`` -- each module (eval, so LARA draws no noise) in float64 on the GPU against the same weights in fp32
  and under bf16 autocast, B = 2: L = 1000 with 8 padded keys in row 1 for the noncausal mechanisms (their
  general path), and L = 2048 unpadded (the equal-segment paths, the length in chunks): max |out - ref| / max
  |ref| and the same for the gradients of the input and of every parameter (worst one);
* ``train`` -- CAB's efficiency setting (issue 13): self attention on ``(L, B=4, 512)``, 8 heads of 64, fp32
  weights under bf16 autocast, train mode, ``loss = out.sum()``, forward + backward, module level (projections
  included) through :mod:`efficient_attention.benchmark.timing`, L in 4k, 8k, 32k, with SDPA (``vanilla``,
  noncausal and causal) in the same run; median ms and peak memory (GiB, on top of what was live); LARA and
  Nystrom also without :class:`~efficient_attention.functional.LengthChunks` (``nosplit``);
* ``decode`` -- one ABC decoding step against vanilla's (``benchmarks/decode_step_gpu.py``'s harness, context 8k).

The timings run first, then the checks, the ``nosplit`` variants (4k, 8k) and the decoding step; a line is printed
after every case, and past ``--budget`` seconds the remaining cases are recorded as skipped.  Writes
``DIR/abcfam_gpu.json`` and prints the tables.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from efficient_attention.benchmark import timing  # noqa: E402
from efficient_attention.functional import LengthChunks  # noqa: E402
from efficient_attention.registry import get_attention_class  # noqa: E402

EMBED, HEADS, BATCH = 512, 8, 4
LENGTHS = (4096, 8192, 32768)
CASES = [  # (label, mechanism, causal)
    ("vanilla nc", "vanilla", False),
    ("vanilla c", "vanilla", True),
    ("abc nc", "abc", False),
    ("abc c", "abc", True),
    ("lara", "lara", False),
    ("nystrom", "nystrom", False),
]
NOSPLIT = [("lara nosplit", "lara", False), ("nystrom nosplit", "nystrom", False)]  # LengthChunks off: its gain
PADDED = {"abc", "lara", "nystrom"}


def build(name: str, causal: bool, device, dtype=torch.float32):
    torch.manual_seed(0)
    cls = get_attention_class(name)
    return cls(EMBED, HEADS, self_attention=True, causal=causal).to(device=device, dtype=dtype)


def _fwd_bwd(m, x, kpm, autocast: bool):
    x = x.detach().requires_grad_(True)
    m.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out, _ = m(x, x, x, key_padding_mask=kpm, need_weights=False)
    weight = torch.linspace(-1, 1, out.numel(), device=out.device, dtype=torch.float64).view_as(out)
    (out.double() * weight).sum().backward()
    grads = [x.grad] + [p.grad for p in m.parameters() if p.grad is not None]
    return out.detach(), grads


def check(name: str, causal: bool, device, length: int, padded: bool) -> dict:
    bsz = 2
    kpm = None
    if padded and name in PADDED and not causal:
        kpm = torch.zeros(bsz, length, dtype=torch.bool, device=device)
        kpm[1, -8:] = True
    ref_m = build(name, causal, device, torch.float64).eval()
    x = torch.randn(length, bsz, EMBED, device=device, dtype=torch.float64)
    ref, ref_g = _fwd_bwd(ref_m, x, kpm, False)
    res = {}
    for key, autocast in (("fp32", False), ("bf16", True)):
        m = build(name, causal, device).eval()
        m.load_state_dict({k: v.float() for k, v in ref_m.state_dict().items()})
        out, grads = _fwd_bwd(m, x.float(), kpm, autocast)
        keep = slice(None) if kpm is None else ~kpm.t()  # padded rows: no output to compare
        err = float((out.double() - ref)[keep].abs().max() / ref[keep].abs().max())
        floor = 1e-3 * max(float(r.abs().max()) for r in ref_g)  # a gradient that is ~0 exactly (k's bias): absolute
        gerr = max(float((g.double() - r).abs().max()) / max(float(r.abs().max()), floor) for g, r in zip(grads, ref_g))
        res[key] = (err, gerr)
    return res


def train(name: str, causal: bool, length: int, device) -> dict:
    m = build(name, causal, device)
    call, reset = timing.train_case(m, length, BATCH, EMBED, device, torch.bfloat16)
    out = timing.run_timed(call, reset, device, warmup=3, repeats=10, budget=2.0)
    out.update(timing.peak_bytes(call, reset, device))
    return {"ms": out["time_s"] * 1e3, "gib": out.get("mem_peak_bytes", 0) / 2**30}


def decode(device) -> dict:
    spec = importlib.util.spec_from_file_location("decode_step_gpu", ROOT / "benchmarks" / "decode_step_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = {name: mod.run(name, (8192,), device, 3.0) for name in ("vanilla", "abc")}
    return {
        name: {"ms": r["ms"].get(8192), "err": r.get("err"), "err_bf16": r.get("err_bf16")} for name, r in rows.items()
    }


def _step(result: dict, part: str, key: str, fn, t0: float, budget: float) -> None:
    """Run one case into ``result[part][key]`` (a failure or the budget is recorded, not raised) and print a line."""
    if time.perf_counter() - t0 > budget:
        result[part][key] = f"skipped: past the {budget:.0f} s budget"
        return
    t1 = time.perf_counter()
    try:
        result[part][key] = fn()
    except Exception as exc:  # noqa: BLE001 - a failure is data
        traceback.print_exc()
        result[part][key] = f"{type(exc).__name__}: {str(exc)[:200]}"
    print(f"[{time.perf_counter() - t0:5.1f} s] {part} {key}: {result[part][key]} ({time.perf_counter() - t1:.1f} s)")
    sys.stdout.flush()


def _nosplit(fn):
    def run():
        split = LengthChunks.MIN_LENGTH
        LengthChunks.MIN_LENGTH = 1 << 62
        try:
            return fn()
        finally:
            LengthChunks.MIN_LENGTH = split

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--budget", type=float, default=50.0, help="seconds after which the remaining cases are skipped")
    p.add_argument("--device", default="cuda", help="cuda (the benchmark); cpu only to smoke-test this script")
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    args = p.parse_args()
    device = torch.device(args.device)
    lengths = tuple(args.lengths)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result: dict = {"device": device_name, "torch": torch.__version__, "check": {}, "train": {}}
    # most important first: the timings, then the checks, the no-split variants, the decoding step
    for length in lengths:
        for label, name, causal in CASES:
            _step(result, "train", f"{label}@{length}", lambda: train(name, causal, length, device), t0, args.budget)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for label, name, causal in CASES[2:]:
        for length, padded in ((1000, True), (2048, False)):  # the general path; the unpadded (chunked) one
            key = f"{label}@{length}{' padded' if padded and not causal else ''}"
            _step(result, "check", key, lambda: check(name, causal, device, length, padded), t0, args.budget)
    for length in lengths[:2]:
        for label, name, causal in NOSPLIT:
            run = _nosplit(lambda: train(name, causal, length, device))
            _step(result, "train", f"{label}@{length}", run, t0, args.budget)
    result["decode"] = {}
    _step(result, "decode", "8k", lambda: decode(device), t0, args.budget)
    result["seconds"] = time.perf_counter() - t0
    (out / "abcfam_gpu.json").write_text(json.dumps(result, indent=1, default=str))

    print(f"\n{result['device']}, torch {torch.__version__}, {result['seconds']:.0f} s")
    print(
        "check (max err / max |ref|, out and worst grad): "
        + "; ".join(
            f"{k}: " + (" ".join(f"{d} {e[0]:.1e}/{e[1]:.1e}" for d, e in v.items()) if isinstance(v, dict) else v)
            for k, v in result["check"].items()
        )
    )
    print("| case | " + " | ".join(f"{n} ms (GiB)" for n in lengths) + " |")
    print("|---|" + "---|" * len(lengths))
    for label, _, _ in CASES + NOSPLIT:
        cells = []
        for n in lengths:
            r = result["train"].get(f"{label}@{n}", "-")
            cells.append(f"{r['ms']:.2f} ({r['gib']:.2f})" if isinstance(r, dict) else str(r)[:40])
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(f"decode @8k: {result['decode']}")


if __name__ == "__main__":
    main()
