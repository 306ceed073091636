"""One decoding step of one layer, for every causal mechanism that decodes, against vanilla's cached step.

Setting (issue 14's): causal self attention, ``embed_dim=512``, 8 heads of 64, batch 4, eval, bf16
autocast, one new token after a context of 512, 8k and 64k tokens.  For each mechanism:

* ``err``: decoding is checked first, in fp32 and under bf16 autocast (96 tokens, batch 2): a prompt of
  56 tokens in one call, then 40 single-token steps, against the full pass (max abs difference of the
  last 40 rows; a mechanism whose prompt call fails decodes every token step by step);
* ``ms``: the median wall time of one step (host included: these steps are launch-bound), each step
  synchronised, over 40 consecutive steps after 16 warm-up steps at that context (the warm-up covers
  every key length mod 16, so Triton's specialisations are compiled before timing); ``mean_ms`` in the
  JSON also counts the rare steps that rebuild something (a block mask once per block of steps).  The GPU
  is warmed up (clocks, allocator, cuBLAS handles) before the first mechanism, and vanilla is timed again
  after the last one: its row and the ratios use the faster of its two medians per context (a host-bound
  step's time drifts with the host's state, which the first run of the session paid for);
* ``ops``: ATen ops one step dispatches (a TorchDispatchMode on the device; ``views`` of them are views,
  which launch nothing), at the first context and, if different, at the last: on an H200 each op that
  launches costs ~9 us of host time, so these counts decide the step time below the largest contexts;
* ``kernels`` (with ``--kernels``): CUDA kernels one step launches (profiled at the first context);
* ``x vanilla``: the step time over vanilla's at the same context (the target is <= 2).

Contexts: mechanisms on the base's key/value cache get a cache of random keys of the context's length
(their prompt would be a full pass at 64k); probsparse a 512-token prompt whose cache and scores are then
extended with random ones; constant-state mechanisms a 512-token prompt, then their position is moved
to the context (their step does the same work at any position).  ``--budget`` seconds in, the remaining
mechanisms are skipped; the JSON and the table are rewritten after every mechanism.

    python benchmarks/decode_step_gpu.py --out DIR [--contexts 512 8192 65536] [--mechanisms performer] [--kernels]

Writes ``DIR/decode_step.json`` and ``DIR/decode_step.md`` and prints the table.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from efficient_attention.base import EfficientAttention  # noqa: E402
from efficient_attention.capabilities import Pattern  # noqa: E402
from efficient_attention.registry import available_attentions, get_attention_class  # noqa: E402

EMBED, HEADS, BATCH = 512, 8, 4
CONTEXTS = (512, 8192, 65536)
PROMPT = 512
WARMUP, STEPS = 16, 40
PROFILE_KERNELS = False  # --kernels: the profiler's start costs seconds per mechanism
OPTIONS = {"cosformer": {"max_len": max(CONTEXTS) + 256}}
FIRST = [
    "vanilla",
    "probsparse",
    "landmark",
    "performer",
    "cosformer",
    "causal_ls",
    "local",
    "s4d",
    "abc",
]  # slowest first


def causal_mechanisms():
    """The registry's causal decoders, one name per class built (``longshort`` builds ``causal_ls``'s)."""
    names, seen = [], set()
    for name in FIRST + sorted(available_attentions()):
        cls = get_attention_class(name)
        if not cls.capabilities.incremental or Pattern.CAUSAL_SELF not in cls.capabilities.patterns:
            continue
        built = type(build(name, torch.device("cpu"), 64, embed=16, heads=2))
        if built not in seen:
            seen.add(built)
            names.append(name)
    return names


def build(name: str, device, max_len: int, embed: int = EMBED, heads: int = HEADS) -> EfficientAttention:
    opts = dict(OPTIONS.get(name, {}))
    if "max_len" in opts:
        opts["max_len"] = max_len
    torch.manual_seed(0)
    return get_attention_class(name)(embed, heads, self_attention=True, causal=True, **opts).to(device).eval()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(module, x, inc):
    module(x, x, x, incremental_state=inc, need_weights=False)


@torch.no_grad()
def check(name: str, device, autocast: bool) -> float:
    """Max abs difference between decoding (prompt + single steps) and the full pass."""
    m = build(name, device, 256)
    length, prompt = 96, 56
    x = torch.randn(length, 2, EMBED, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        full, _ = m(x, x, x, need_weights=False)
        inc: dict = {}
        try:
            out, _ = m(x[:prompt], x[:prompt], x[:prompt], incremental_state=inc, need_weights=False)
            outs, start = [out], prompt
        except Exception:  # noqa: BLE001 - a mechanism may only decode one token at a time
            inc, outs, start = {}, [], 0
        for t in range(start, length):
            outs.append(m(x[t : t + 1], x[t : t + 1], x[t : t + 1], incremental_state=inc, need_weights=False)[0])
    return float((torch.cat(outs)[prompt:].float() - full[prompt:].float()).abs().max())


def _random_like(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = length - t.shape[dim]
    return torch.cat([t, torch.randn(shape, device=t.device).to(t.dtype)], dim=dim)


@torch.no_grad()
def prefill(module, context: int, device) -> dict:
    """A decoding state at ``context`` tokens (see the module docstring)."""
    inc: dict = {}
    if not module._own_decoding_state():
        shape = (BATCH, module.num_kv_heads, context, module.head_dim)
        module._set_input_buffer(
            inc,
            {
                "prev_key": torch.randn(shape, device=device, dtype=torch.bfloat16),
                "prev_value": torch.randn(shape, device=device, dtype=torch.bfloat16),
                "prev_key_padding_mask": None,
            },
        )
        return inc
    prompt = min(context, PROMPT)
    x = torch.randn(prompt, BATCH, EMBED, device=device)
    step(module, x, inc)
    buf = module._get_input_buffer(inc)
    if context > prompt:
        if not module.capabilities.constant_state:  # a growing cache: extended with random keys and scores
            for key, dim in (("prev_key", 2), ("prev_value", 2)):
                if isinstance(buf.get(key), torch.Tensor):
                    buf[key] = _random_like(buf[key], context, dim)
        buf["position"] = context
    return inc


@torch.no_grad()
def time_steps(module, inc, device, slow: float):
    """``(median ms, mean ms)`` of single steps after the warm-up."""
    xs = torch.randn(WARMUP + STEPS, 1, BATCH, EMBED, device=device)
    times = []
    for i in range(WARMUP + STEPS):
        sync(device)
        t0 = time.perf_counter()
        step(module, xs[i], inc)
        sync(device)
        dt = time.perf_counter() - t0
        if i < 3 and dt > slow:
            raise TimeoutError(f"a step took {dt:.1f} s")
        if i >= WARMUP:
            times.append(dt * 1e3)
    return statistics.median(times), statistics.fmean(times)


class _CountOps(TorchDispatchMode):
    """ATen ops dispatched inside the mode, and how many of them are views (no kernel)."""

    def __init__(self):
        super().__init__()
        self.ops = self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.views += bool(getattr(func, "is_view", False))
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def count_ops(module, inc, device):
    """``(ops, views)`` of one step."""
    x = torch.randn(1, BATCH, EMBED, device=device)
    with _CountOps() as counter:
        step(module, x, inc)
    return counter.ops, counter.views


@torch.no_grad()
def count_kernels(module, inc, device) -> int:
    x = torch.randn(1, BATCH, EMBED, device=device)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts, acc_events=True) as prof:
        step(module, x, inc)
        sync(device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def run(name: str, contexts, device, slow: float, check_errors: bool = True) -> dict:
    row = {"mechanism": name, "ms": {}, "mean_ms": {}, "notes": []}
    for key, autocast in (("err", False), ("err_bf16", True)) if check_errors else ():
        try:
            row[key] = check(name, device, autocast)
        except Exception as exc:  # noqa: BLE001
            row["notes"].append(f"{key}: {type(exc).__name__}: {str(exc)[:160]}")
            traceback.print_exc()
    m = build(name, device, max(contexts) + 256)
    for context in contexts:
        inc = None
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                inc = prefill(m, context, device)
                sync(device)
                row["ms"][context], row["mean_ms"][context] = time_steps(m, inc, device, slow)
                row.setdefault("ops", {})[context] = count_ops(m, inc, device)
                if PROFILE_KERNELS and "kernels" not in row:
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


def _ops_cell(row, contexts) -> str:
    ops = row.get("ops", {})
    counts = [ops[c] for c in contexts if c in ops]
    if not counts:
        return "-"
    (first, views), last = counts[0], counts[-1][0]
    return f"{first} ({views} views)" + (f" -> {last}" if last != first else "")


def table(rows, contexts) -> str:
    base = next((r["ms"] for r in rows if r["mechanism"] == "vanilla"), {})
    cols = " | ".join(f"{c} ms (x vanilla)" for c in contexts)
    lines = [
        f"| mechanism | err fp32 / bf16 | {cols} | last/first | ATen ops per step | kernels |",
        "|" + "---|" * (len(contexts) + 5),
    ]
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
        lines.append(
            f"| {r['mechanism']} | {err} | "
            + " | ".join(cells)
            + f" | {growth} | {_ops_cell(r, contexts)} | {r.get('kernels', '-')} |"
        )
    notes = [f"- {r['mechanism']}: {note}" for r in rows for note in r["notes"]]
    return "\n".join(lines + notes)


@torch.no_grad()
def warm_up(device, seconds: float = 2.0) -> None:
    """Steps of vanilla at the first context for ``seconds``: clocks up, allocator and library handles ready."""
    m = build("vanilla", device, 1024)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        inc = prefill(m, PROMPT, device)
        x = torch.randn(1, BATCH, EMBED, device=device)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(10):  # a bounded cache: the same 10 steps again
                step(m, x, inc)
            sync(device)
            buf = m._get_input_buffer(inc)
            buf["prev_key"], buf["prev_value"] = buf["prev_key"][:, :, :PROMPT], buf["prev_value"][:, :, :PROMPT]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for decode_step.json / decode_step.md")
    p.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS))
    p.add_argument("--mechanisms", nargs="+", default=None, help="registry names (default: every causal decoder)")
    p.add_argument("--slow", type=float, default=3.0, help="seconds after which one step stops a mechanism")
    p.add_argument("--budget", type=float, default=40.0, help="seconds after which the remaining mechanisms skip")
    p.add_argument("--device", default="cuda", help="cuda (the benchmark); cpu only to smoke-test this script")
    p.add_argument("--kernels", action="store_true", help="also profile the CUDA kernels of one step (slower)")
    args = p.parse_args()
    global PROFILE_KERNELS
    PROFILE_KERNELS = args.kernels
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("decode_step_gpu.py needs a CUDA device")
    t0 = time.perf_counter()
    names = args.mechanisms or causal_mechanisms()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    warm_up(device)
    rows: list = []
    result: dict = {}

    def save() -> None:
        result.update(
            device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            torch=torch.__version__,
            batch=BATCH,
            embed_dim=EMBED,
            heads=HEADS,
            dtype="bf16 autocast",
            warmup=WARMUP,
            steps=STEPS,
            rows=rows,
            seconds=time.perf_counter() - t0,
        )
        (out / "decode_step.json").write_text(json.dumps(result, indent=1, default=str))
        (out / "decode_step.md").write_text(table(rows, args.contexts) + "\n")

    for name in names:
        if time.perf_counter() - t0 > args.budget:
            rows.append({"mechanism": name, "ms": {}, "notes": [f"skipped: past the {args.budget:.0f} s budget"]})
            continue
        rows.append(run(name, args.contexts, device, args.slow))
        save()
    first = next((r for r in rows if r["mechanism"] == "vanilla" and r["ms"]), None)
    if first is not None:  # vanilla again, last: the ratios use the faster median of the two runs
        again = run("vanilla", args.contexts, device, args.slow, check_errors=False)
        first["vanilla_runs_ms"] = [dict(first["ms"]), dict(again["ms"])]
        for c, t in again["ms"].items():
            if isinstance(t, float) and isinstance(first["ms"].get(c), float):
                first["ms"][c] = min(first["ms"][c], t)
        save()
    print(f"\n{result.get('device')}, torch {torch.__version__}, {time.perf_counter() - t0:.0f} s")
    print(table(rows, args.contexts))


if __name__ == "__main__":
    main()
