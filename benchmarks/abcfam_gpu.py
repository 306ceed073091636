"""ABC (causal and noncausal), LARA and Nystrom on the GPU: checked against float64, timed against SDPA.

    PYTHONPATH=$PWD python benchmarks/abcfam_gpu.py --out DIR      # H200: about a minute

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

Writes ``DIR/abcfam_gpu.json`` and prints the tables.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    device = torch.device("cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "check": {}, "train": {}}
    for label, name, causal in CASES[2:]:
        for length, padded in ((1000, True), (2048, False)):  # the general path; the unpadded (chunked) one
            key = f"{label}@{length}{' padded' if padded and not causal else ''}"
            try:
                result["check"][key] = check(name, causal, device, length, padded)
            except Exception as exc:  # noqa: BLE001 - a failure is data
                traceback.print_exc()
                result["check"][key] = f"{type(exc).__name__}: {str(exc)[:200]}"
    for length in LENGTHS:
        for label, name, causal in CASES + NOSPLIT:
            try:
                split = LengthChunks.MIN_LENGTH
                if label.endswith("nosplit"):
                    LengthChunks.MIN_LENGTH = 1 << 62
                result["train"][f"{label}@{length}"] = train(name, causal, length, device)
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                result["train"][f"{label}@{length}"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            finally:
                LengthChunks.MIN_LENGTH = split
            torch.cuda.empty_cache()
    try:
        result["decode"] = decode(device)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        result["decode"] = f"{type(exc).__name__}: {str(exc)[:200]}"
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
    print("| case | " + " | ".join(f"{n // 1024}k ms (GiB)" for n in LENGTHS) + " |")
    print("|---|" + "---|" * len(LENGTHS))
    for label, _, _ in CASES + NOSPLIT:
        cells = []
        for n in LENGTHS:
            r = result["train"][f"{label}@{n}"]
            cells.append(f"{r['ms']:.2f} ({r['gib']:.2f})" if isinstance(r, dict) else str(r)[:40])
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(f"decode @8k: {result['decode']}")


if __name__ == "__main__":
    main()
