"""One decoding step of one layer, for every causal mechanism that decodes, against vanilla's cached step.

Setting (issue 14's): causal self attention, ``embed_dim=512``, 8 heads of 64, batch 4, eval, bf16
autocast, one new token after a context of 512, 8k and 64k tokens.  For each mechanism:

* ``err``: decoding is checked first (fp32, then both under bf16 autocast; 160 tokens, batch 2): a prompt of
  100 tokens in one call, then 60 single-token steps, against the full pass over the 160 tokens (max abs
  difference of the last 60 rows; a mechanism whose prompt call fails decodes every token step by step);
* ``ms``: the wall time of one step (host included: these steps are launch-bound) -- the mean of 20
  consecutive steps after 3 warm-up steps, synchronised at both ends;
* ``kernels``: CUDA kernels one step launches (profiled at the first context);
* ``x vanilla``: the step time over vanilla's at the same context (the target is <= 2).

Contexts come from a prompt call over random tokens, except for mechanisms on the base's key/value
cache, whose cache is filled with random keys directly (their prompt would be a full pass at 64k).
A step slower than ``--slow`` seconds stops that mechanism (reported as ``slow``).

    python benchmarks/decode_step_gpu.py --out DIR [--contexts 512 8192 65536] [--mechanisms performer local]

Writes ``DIR/decode_step.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from efficient_attention.base import EfficientAttention  # noqa: E402
from efficient_attention.capabilities import Pattern  # noqa: E402
from efficient_attention.registry import available_attentions, get_attention_class  # noqa: E402

EMBED, HEADS, BATCH = 512, 8, 4
CONTEXTS = (512, 8192, 65536)
STEPS, WARMUP = 20, 3
OPTIONS = {"cosformer": {"max_len": max(CONTEXTS) + 256}}


def causal_mechanisms():
    """The registry's causal decoders, one name per class, vanilla first and abc last (it once crashed the GPU)."""
    names, seen = [], set()
    for name in sorted(available_attentions()):
        cls = get_attention_class(name)
        if cls in seen or not cls.capabilities.incremental or Pattern.CAUSAL_SELF not in cls.capabilities.patterns:
            continue
        seen.add(cls)
        names.append(name)
    return sorted(names, key=lambda n: (n != "vanilla", n == "abc", n))


def build(name: str, device, max_len: int) -> EfficientAttention:
    opts = dict(OPTIONS.get(name, {}))
    if "max_len" in opts:
        opts["max_len"] = max_len
    torch.manual_seed(0)
    return get_attention_class(name)(EMBED, HEADS, self_attention=True, causal=True, **opts).to(device).eval()


def own_state(module: EfficientAttention) -> bool:
    return type(module)._attend_step is not EfficientAttention._attend_step


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(module, x, inc):
    module(x, x, x, incremental_state=inc, need_weights=False)


@torch.no_grad()
def check(name: str, device, autocast: bool = False) -> float:
    """Max abs difference between decoding (prompt + single steps) and the full pass (fp32, or both under bf16
    autocast)."""
    m = build(name, device, 256)
    length, prompt = 160, 100
    x = torch.randn(length, 2, EMBED, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        return _check(m, x, prompt)


def _check(m, x, prompt: int) -> float:
    length = x.shape[0]
    full, _ = m(x, x, x, need_weights=False)
    inc: dict = {}
    try:
        out, _ = m(x[:prompt], x[:prompt], x[:prompt], incremental_state=inc, need_weights=False)
        outs, start = [out], prompt
    except Exception:  # noqa: BLE001 - a mechanism may only decode one token at a time
        inc, outs, start = {}, [], 0
    for t in range(start, length):
        outs.append(m(x[t:t + 1], x[t:t + 1], x[t:t + 1], incremental_state=inc, need_weights=False)[0])
    return float((torch.cat(outs)[prompt:].float() - full[prompt:].float()).abs().max())


@torch.no_grad()
def prefill(module, context: int, device) -> dict:
    inc: dict = {}
    if own_state(module):
        x = torch.randn(context, BATCH, EMBED, device=device)
        step(module, x, inc)
    else:
        shape = (BATCH, module.num_kv_heads, context, module.head_dim)
        module._set_input_buffer(inc, {"prev_key": torch.randn(shape, device=device, dtype=torch.bfloat16),
                                       "prev_value": torch.randn(shape, device=device, dtype=torch.bfloat16),
                                       "prev_key_padding_mask": None})
    return inc


@torch.no_grad()
def time_steps(module, inc, device, slow: float) -> float:
    xs = torch.randn(WARMUP + STEPS, 1, BATCH, EMBED, device=device)
    for i in range(WARMUP):
        t0 = time.perf_counter()
        step(module, xs[i], inc)
        sync(device)
        if time.perf_counter() - t0 > slow:
            raise TimeoutError(f"a step took {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    for i in range(WARMUP, WARMUP + STEPS):
        step(module, xs[i], inc)
    sync(device)
    return (time.perf_counter() - t0) / STEPS * 1e3


@torch.no_grad()
def count_kernels(module, inc, device) -> int:
    x = torch.randn(1, BATCH, EMBED, device=device)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        step(module, x, inc)
        sync(device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def run(name: str, contexts, device, slow: float) -> dict:
    row = {"mechanism": name, "ms": {}, "notes": []}
    for key, autocast in (("err", False), ("err_bf16", True)):
        try:
            row[key] = check(name, device, autocast)
        except Exception as exc:  # noqa: BLE001
            row["notes"].append(f"{key}: {type(exc).__name__}: {str(exc)[:160]}")
            traceback.print_exc()
    m = build(name, device, max(contexts) + 256)
    for context in contexts:
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                inc = prefill(m, context, device)
                sync(device)
                row["ms"][context] = time_steps(m, inc, device, slow)
                if "kernels" not in row:
                    try:
                        row["kernels"] = count_kernels(m, inc, device)
                    except Exception as exc:  # noqa: BLE001 - the profiler may be unavailable
                        row["kernels"] = "-"
                        row["notes"].append(f"profiler: {type(exc).__name__}: {str(exc)[:100]}")
        except Exception as exc:  # noqa: BLE001
            kind = "slow" if isinstance(exc, TimeoutError) else type(exc).__name__
            row["ms"][context] = kind
            row["notes"].append(f"{context}: {kind}: {str(exc)[:160]}")
            if kind != "OutOfMemoryError":
                traceback.print_exc()
            if kind == "slow" or "illegal" in str(exc):  # an illegal access leaves the context unusable
                break
        finally:
            inc = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"{name}: {row}", flush=True)
    return row


def table(rows, contexts) -> str:
    base = next((r["ms"] for r in rows if r["mechanism"] == "vanilla"), {})
    cols = " | ".join(f"{c} ms (x vanilla)" for c in contexts)
    head = f"| mechanism | err fp32 / bf16 | {cols} | last/first | kernels |"
    lines = [head, "|" + "---|" * (len(contexts) + 4)]
    for r in rows:
        cells = []
        for c in contexts:
            t = r["ms"].get(c)
            if isinstance(t, float):
                ratio = f" ({t / base[c]:.2f}x)" if isinstance(base.get(c), float) else ""
                cells.append(f"{t:.3f}{ratio}")
            else:
                cells.append(str(t))
        first, last = r["ms"].get(contexts[0]), r["ms"].get(contexts[-1])
        growth = f"{last / first:.2f}" if isinstance(first, float) and isinstance(last, float) else "-"
        err = " / ".join(f"{r[k]:.1e}" if k in r else "-" for k in ("err", "err_bf16"))
        lines.append(f"| {r['mechanism']} | {err} | " + " | ".join(cells) + f" | {growth} | {r.get('kernels', '-')} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for decode_step.json")
    p.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS))
    p.add_argument("--mechanisms", nargs="+", default=None, help="registry names (default: every causal decoder)")
    p.add_argument("--slow", type=float, default=3.0, help="seconds after which one step stops a mechanism")
    p.add_argument("--device", default="cuda", help="cuda (the benchmark); cpu only to smoke-test this script")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("decode_step_gpu.py needs a CUDA device")
    names = args.mechanisms or causal_mechanisms()
    t0 = time.perf_counter()
    rows = [run(n, args.contexts, device, args.slow) for n in names]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "batch": BATCH, "embed_dim": EMBED, "heads": HEADS, "dtype": "bf16 autocast", "steps": STEPS,
              "rows": rows, "seconds": time.perf_counter() - t0}
    (out / "decode_step.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"\n{result['device']}, torch {torch.__version__}, {result['seconds']:.0f} s")
    print(table(rows, args.contexts))
    for r in rows:
        for note in r["notes"]:
            print(f"- {r['mechanism']}: {note}")


if __name__ == "__main__":
    main()
