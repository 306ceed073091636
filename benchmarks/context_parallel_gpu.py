"""Context-parallel attention on several GPUs (issue 19): exactness, step time, weak scaling, bytes, vs ring attention.

    torchrun --standalone --nproc_per_node 8 benchmarks/context_parallel_gpu.py --out DIR     # also 2 and 4
    python benchmarks/context_parallel_gpu.py --smoke --out DIR                               # 1 process, tiny

Per world size ``P`` (NCCL on CUDA, gloo on the CPU):

1. exactness against one device: every rank recomputes the full sequence alone and compares its
   slice of the output and of the q/k/v gradients -- causal window (bf16), BigBird band + global
   blocks (bf16) and causal Performer (module, fp32);
2. causal sliding window W=4096, d=128, H=16, bf16, forward+backward with N/rank = 64k and 128k:
   step time on ``P`` ranks, the same kernel on one GPU with N/rank tokens (the weak-scaling
   baseline), efficiency = t_1 / t_P, bytes each rank sent (``count_bytes``);
3. ring attention baseline: PyTorch's ``context_parallel`` (DTensor, experimental) with causal SDPA
   over the same ``P * N/rank`` tokens (exact dense attention; CUDA only).

Rank 0 prints a table and writes ``DIR/context_parallel_P{P}.json``.  No fairseq needed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Callable, Dict, List

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from efficient_attention import build_attention  # noqa: E402
from efficient_attention.distributed import (  # noqa: E402
    context_parallel,
    context_parallel_bigbird_attention,
    context_parallel_window_attention,
    count_bytes,
)
from efficient_attention.kernels import sliding_window_attention  # noqa: E402
from efficient_attention.layouts import bigbird_layout  # noqa: E402
from efficient_attention.local_window import LocalWindow  # noqa: E402
from efficient_attention.sparse import block_layout_attention  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], None], device, reps: int) -> float:
    """Median seconds of ``fn`` (after one warm-up), ranks in step (barrier before each)."""
    fn()
    times = []
    for _ in range(reps):
        dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    t = torch.tensor([sorted(times)[len(times) // 2]], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max().item())


def _shard_compare(full_fn, dist_fn, tensors, rank, world, results, name, tol):
    n = tensors[0].shape[2]
    per = n // world
    sl = slice(rank * per, (rank + 1) * per)
    full = [t.clone().requires_grad_(True) for t in tensors]
    ref = full_fn(*full)
    g = torch.randn_like(ref)
    (ref * g).sum().backward()
    local = [t[:, :, sl].clone().requires_grad_(True) for t in tensors]
    out = dist_fn(*local)
    (out * g[:, :, sl]).sum().backward()
    err = max([_err(out, ref[:, :, sl])] + [_err(loc.grad, f.grad[:, :, sl]) for loc, f in zip(local, full)])
    t = torch.tensor([err], device=ref.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    results[name] = {"max_abs_err": float(t.item()), "tol": tol, "ok": float(t.item()) <= tol}


def exactness(device, world, rank, n_per_rank, d, heads, results):
    torch.manual_seed(0)
    n = n_per_rank * world
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(1, heads, n, d, device=device, dtype=dt) for _ in range(3))
    window = LocalWindow.sliding(min(4095, n_per_rank + n_per_rank // 2), causal=True)  # spans 2 shards
    _shard_compare(
        lambda q, k, v: sliding_window_attention(q, k, v, window)[0],
        lambda q, k, v: context_parallel_window_attention(q, k, v, window)[0],
        [q, k, v],
        rank,
        world,
        results,
        "window_causal",
        3e-2 if dt == torch.bfloat16 else 1e-4,
    )
    bs = 64
    for causal in (False, True):
        lay = bigbird_layout(1, -(-n // bs), 3, 1, 0, causal=causal)
        _shard_compare(
            lambda q, k, v, lay=lay, causal=causal: block_layout_attention(q, k, v, lay, bs, causal=causal),
            lambda q, k, v, causal=causal: context_parallel_bigbird_attention(
                q, k, v, bs, num_window_blocks=3, num_global_blocks=1, causal=causal
            )[0],
            [q, k, v],
            rank,
            world,
            results,
            f"bigbird_causal={causal}",
            3e-2 if dt == torch.bfloat16 else 1e-4,
        )
    module = (
        build_attention(
            "performer", embed_dim=heads * d, num_heads=heads, self_attention=True, causal=True, approx_attn_dim=64
        )
        .to(device)
        .eval()
    )
    x = torch.randn(n, 1, heads * d, device=device)
    full = x.clone().requires_grad_(True)
    ref = module(full, need_weights=False)[0]
    g = torch.randn_like(ref)
    (ref * g).sum().backward()
    sl = slice(rank * n_per_rank, (rank + 1) * n_per_rank)
    local = x[sl].clone().requires_grad_(True)
    with context_parallel(module):
        out = module(local, need_weights=False)[0]
    (out * g[sl]).sum().backward()
    err = torch.tensor([max(_err(out, ref[sl]), _err(local.grad, full.grad[sl]))], device=device)
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    results["performer_causal_fp32"] = {"max_abs_err": float(err.item()), "tol": 1e-3, "ok": float(err.item()) <= 1e-3}


def window_step(device, world, n, window_keys, d, heads, reps) -> Dict[str, float]:
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    window = LocalWindow.sliding(window_keys - 1, causal=True)
    q, k, v = (torch.randn(1, heads, n, d, device=device, dtype=dt, requires_grad=True) for _ in range(3))
    g = torch.randn(1, heads, n, d, device=device, dtype=dt)
    lengths = [n] * world

    def multi():
        out, _ = context_parallel_window_attention(q, k, v, window, lengths=lengths)
        out.backward(g)

    def single():
        out, _ = sliding_window_attention(q, k, v, window)
        out.backward(g)

    with count_bytes() as c:
        multi()
    sent = torch.tensor([c.total], dtype=torch.float64, device=device)
    dist.all_reduce(sent, op=dist.ReduceOp.MAX)
    t_p = _time(multi, device, reps)
    t_1 = _time(single, device, reps)
    return {
        "t_single_ms": t_1 * 1e3,
        "t_context_parallel_ms": t_p * 1e3,
        "weak_scaling_efficiency": t_1 / t_p,
        "max_bytes_sent_per_rank": float(sent.item()),
    }


def ring_step(device, world, n, d, heads, reps) -> Dict[str, object]:
    if device.type != "cuda":
        return {"skipped": "PyTorch's context_parallel ring attention runs on CUDA only"}
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel as torch_cp
    except ImportError as exc:
        return {"skipped": f"torch.distributed.tensor.experimental.context_parallel unavailable: {exc}"}
    mesh = init_device_mesh("cuda", (world,))
    total = n * world
    q, k, v, g = (torch.randn(1, heads, total, d, device=device, dtype=torch.bfloat16) for _ in range(4))

    def step():  # the buffers are sharded in place on entry (and restored on exit)
        with torch_cp(mesh, buffers=[q, k, v, g], buffer_seq_dims=[2, 2, 2, 2]):
            ql, kl, vl = (t.detach().requires_grad_(True) for t in (q, k, v))
            out = torch.nn.functional.scaled_dot_product_attention(ql, kl, vl, is_causal=True)
            out.backward(g)

    try:
        t = _time(step, device, reps)
    except Exception as exc:  # an experimental API: report, do not abort the window results
        return {"skipped": f"{type(exc).__name__}: {exc}"}
    return {"t_ring_ms": t * 1e3, "tokens": total, "ring_bytes_per_rank_model": 3 * (world - 1) * n * heads * 2 * d * 2}


def run(args) -> Dict[str, object]:
    world, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    heads, d = (2, 16) if args.smoke else (16, 128)
    results: Dict[str, object] = {
        "world": world,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "backend": dist.get_backend(),
        "torch": torch.__version__,
    }
    exact: Dict[str, object] = {}
    exactness(device, world, rank, 96 if args.smoke else 4096, d, heads, exact)
    results["exactness"] = exact
    steps: List[dict] = []
    sizes = [(64, 32)] if args.smoke else [(65536, 4096), (131072, 4096)]
    for n, w in sizes:
        row = {"tokens_per_rank": n, "window": w, **window_step(device, world, n, w, d, heads, args.reps)}
        row["ring_attention"] = ring_step(device, world, n, d, heads, 1 if n >= 131072 else args.reps)
        steps.append(row)
    results["window_steps"] = steps
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU / 1 GPU logic check)")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    if not dist.is_initialized():
        if "RANK" in os.environ:  # torchrun
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend)
        else:  # one process
            store = os.path.join(tempfile.mkdtemp(), "store")
            dist.init_process_group(
                "gloo" if not torch.cuda.is_available() else "nccl", init_method=f"file://{store}", rank=0, world_size=1
            )
    results = run(args)
    if dist.get_rank() == 0:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"context_parallel_P{results['world']}.json")
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
        print(f"context parallel on {results['world']} x {results['device']} ({results['backend']})")
        for name, r in results["exactness"].items():
            verdict = "ok" if r["ok"] else "FAIL"
            print(f"  exact {name:<22} max|err| {r['max_abs_err']:.2e} (tol {r['tol']:.0e}) {verdict}")
        print(f"  {'n/rank':>7} {'W':>5} {'t_1 ms':>8} {'t_P ms':>8} {'eff':>6} {'MB sent':>8} {'ring ms':>9}")
        for r in results["window_steps"]:
            ring = r["ring_attention"]
            ring_s = f"{ring['t_ring_ms']:9.1f}" if "t_ring_ms" in ring else "  skipped"
            print(
                f"  {r['tokens_per_rank']:>7} {r['window']:>5} {r['t_single_ms']:8.2f} "
                f"{r['t_context_parallel_ms']:8.2f} "
                f"{r['weak_scaling_efficiency']:6.3f} {r['max_bytes_sent_per_rank'] / 1e6:8.2f} {ring_s}"
            )
        print(f"written {path}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
