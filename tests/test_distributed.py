"""Context parallelism (efficient_attention.distributed) on the CPU: gloo process groups of 2 and 4 ranks.

One spawn per world size runs every case (spawning is the slow part); each rank
compares its shard of the output and of the gradients with the single-process
result computed from the full tensors (float64, atol 1e-10) and counts the bytes
it sends.  The tests below read the ranks' reports.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ATOL = 1e-10
LENGTHS = {2: (7, 12), 4: (5, 3, 9, 6)}  # odd, unequal shards (total 19 / 23)


# ------------------------------------------------------------------ references (single process, full tensors)
def _dense_ref(q, k, v, hidden):
    from efficient_attention.functional import dense_attention

    return dense_attention(q, k, v, hidden)[0]


def _window_ref(window, q, k, v, kpm):
    from efficient_attention.sparse.window import window_attention

    if window.exclude_self:  # the kernels' rule plus the shared_qk fallback (tested against dense in test_local)
        return window_attention(window, q, k, v, key_padding_mask=kpm)
    hidden = window.dense_mask(q.shape[2], k.shape[2])[None, None]
    return _dense_ref(q, k, v, hidden if kpm is None else hidden | kpm[:, None, None, :])


def _bigbird_ref(q, k, v, kpm, bs, w, ng, causal):
    from efficient_attention.layouts import bigbird_layout, expand_layout

    n = q.shape[2]
    keep = expand_layout(bigbird_layout(1, -(-n // bs), w, ng, 0, causal=causal), bs, n, n)[None]
    if causal:
        keep = keep & torch.ones(n, n, dtype=torch.bool).tril()
    hidden = ~keep if kpm is None else ~keep | kpm[:, None, None, :]
    return _dense_ref(q, k, v, hidden)


def _linear_ref(qf, kf, v):
    a = torch.matmul(qf, kf.transpose(-1, -2)).tril()
    return torch.cat([torch.matmul(a, v), a.sum(-1, keepdim=True)], -1)


# ------------------------------------------------------------------ the cases
def _qkv(seed, n, heads=2, kv_heads=2, d=4, dv=3, bsz=2):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, heads, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(bsz, kv_heads, n, d, generator=g, dtype=torch.float64)
    v = torch.randn(bsz, kv_heads, n, dv, generator=g, dtype=torch.float64)
    kpm = torch.rand(bsz, n, generator=g) < 0.25
    return q, k, v, kpm


def _compare(name, ref_fn, dist_fn, tensors, lengths, rank, results, dims=None):
    """``ref_fn(*full)`` vs ``dist_fn(*local)``: output and gradients of every tensor, this rank's slice."""
    start = sum(lengths[:rank])
    stop = start + lengths[rank]
    dims = dims or [2] * len(tensors)
    full = [t.clone().requires_grad_(t.is_floating_point()) for t in tensors]
    local = [
        t.narrow(dim, start, stop - start).clone().requires_grad_(t.is_floating_point())
        for t, dim in zip(tensors, dims)
    ]
    ref = ref_fn(*full)
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(99), dtype=ref.dtype)
    (ref * weight).sum().backward()
    out = dist_fn(*local)
    (out * weight.narrow(dims[0], start, stop - start)).sum().backward()
    errs = [(out - ref.narrow(dims[0], start, stop - start)).abs().max().item()]
    for f, loc, dim in zip(full, local, dims):
        if f.grad is not None:
            errs.append((loc.grad - f.grad.narrow(dim, start, stop - start)).abs().max().item())
    results[name] = max(errs)


def _functional_cases(rank, world, results):
    from efficient_attention.distributed import (
        context_parallel_bigbird_attention,
        context_parallel_causal_linear_attention,
        context_parallel_window_attention,
    )
    from efficient_attention.functional import safe_divide
    from efficient_attention.local_window import LocalWindow

    lengths = LENGTHS[world]
    n = sum(lengths)
    windows = {
        "sliding": LocalWindow.sliding(3, 2),
        "sliding_causal": LocalWindow.sliding(4, causal=True),
        "multi_hop": LocalWindow.sliding(11, 9),  # spans several shards
        "multi_hop_causal": LocalWindow.sliding(13, causal=True),
        "blocks": LocalWindow.from_blocks(4, look_backward=1, look_forward=1),
        "blocks_causal": LocalWindow.from_blocks(5, look_backward=2, causal=True),
        "exact": LocalWindow.from_blocks(3, 2, 1, exact_windowsize=True),
        "shared_qk": LocalWindow.from_blocks(4, 1, 0, causal=True, exclude_self=True),
    }
    for i, (wname, window) in enumerate(windows.items()):
        for padded in (False, True):
            q, k, v, kpm = _qkv(i, n, kv_heads=1 if wname == "blocks" else 2)
            mask = kpm if padded else None

            def ref(q, k, v, window=window, mask=mask):
                return _window_ref(window, q, k, v, mask)

            def run(q, k, v, window=window, mask=mask):
                local_mask = None if mask is None else mask[:, sum(lengths[:rank]) : sum(lengths[: rank + 1])]
                return context_parallel_window_attention(q, k, v, window, key_padding_mask=local_mask)[0]

            _compare(f"window/{wname}/pad={padded}", ref, run, [q, k, v], lengths, rank, results)
    for causal in (False, True):
        for bs, w, ng in ((2, 3, 1), (3, 4, 2), (4, 1, 0)):
            for padded in (False, True):
                q, k, v, kpm = _qkv(100 + bs, n)
                mask = kpm if padded else None

                def ref(q, k, v, bs=bs, w=w, ng=ng, causal=causal, mask=mask):
                    return _bigbird_ref(q, k, v, mask, bs, w, ng, causal)

                def run(q, k, v, bs=bs, w=w, ng=ng, causal=causal, mask=mask):
                    local_mask = None if mask is None else mask[:, sum(lengths[:rank]) : sum(lengths[: rank + 1])]
                    return context_parallel_bigbird_attention(
                        q,
                        k,
                        v,
                        bs,
                        num_window_blocks=w,
                        num_global_blocks=ng,
                        causal=causal,
                        key_padding_mask=local_mask,
                    )[0]

                _compare(
                    f"bigbird/bs={bs},w={w},g={ng}/causal={causal}/pad={padded}",
                    ref,
                    run,
                    [q, k, v],
                    lengths,
                    rank,
                    results,
                )
    g = torch.Generator().manual_seed(7)
    qf, kf = (
        torch.rand(2, 2, n, 5, generator=g, dtype=torch.float64),
        torch.rand(2, 2, n, 5, generator=g, dtype=torch.float64),
    )
    v = torch.randn(2, 2, n, 3, generator=g, dtype=torch.float64)
    kf[0, :, 2:9] = 0.0  # keys that are padding: zero features
    shift = torch.tensor([[0.5, -2.0], [3.0, 1.0]], dtype=torch.float64) * (rank + 1)  # per-rank stabiliser

    def run_linear(qf, kf, v):
        num, den = context_parallel_causal_linear_attention(qf, kf, v, chunk=4)
        return torch.cat([num, den[..., None]], -1)

    def run_scaled(qf, kf, v):  # num and den share the scale exp(-max log_scale): compare their ratio
        num, den = context_parallel_causal_linear_attention(
            qf, kf * torch.exp(-shift)[..., None, None], v, log_scale=shift, chunk=3
        )
        return safe_divide(num, den)

    def ratio_ref(qf, kf, v):
        out = _linear_ref(qf, kf, v)
        return safe_divide(out[..., :-1], out[..., -1])

    _compare("linear/causal", _linear_ref, run_linear, [qf, kf, v], lengths, rank, results)
    _compare("linear/causal_log_scale", ratio_ref, run_scaled, [qf, kf, v], lengths, rank, results)


def _module_cases(rank, world, results):
    from efficient_attention import build_attention
    from efficient_attention.distributed import context_parallel

    lengths = LENGTHS[world]
    n = sum(lengths)
    specs = {
        "local": dict(wsize=3, look_backward=2, look_forward=1),
        "local_causal": dict(causal=True, wsize=4, look_backward=2),
        "local_shared_qk": dict(causal=True, wsize=4, shared_qk=True),
        "bigbird": dict(
            name="bigbird",
            layout="bigbird",
            block_size=2,
            num_window_blocks=3,
            num_global_blocks=1,
            num_random_blocks=0,
        ),
        "bigbird_causal": dict(
            name="bigbird",
            layout="bigbird",
            block_size=3,
            num_window_blocks=2,
            num_global_blocks=1,
            num_random_blocks=0,
            causal=True,
        ),
        "performer_causal": dict(name="performer", causal=True, approx_attn_dim=6),
        "s4d_causal": dict(name="s4d", causal=True, d_state=4),
    }
    for i, (label, spec) in enumerate(specs.items()):
        spec = dict(spec)
        name = spec.pop("name", "local")
        torch.manual_seed(i)
        module = build_attention(name, embed_dim=8, num_heads=2, self_attention=True, **spec).double().eval()
        x = torch.randn(n, 2, 8, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        kpm = torch.rand(2, n, generator=torch.Generator().manual_seed(50 + i)) < 0.2
        params = dict(module.named_parameters())
        for padded in (False, True):
            mask = kpm if padded else None
            if os.environ.get("EA_DIST_DEBUG"):
                print(rank, label, padded, flush=True)
            module.zero_grad()
            full = x.clone().requires_grad_(True)
            ref = module(full, key_padding_mask=mask, need_weights=False)[0]
            weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(99), dtype=ref.dtype)
            (ref * weight).sum().backward()
            ref_grads = {k: p.grad.clone() for k, p in params.items() if p.grad is not None}
            module.zero_grad()
            start, stop = sum(lengths[:rank]), sum(lengths[: rank + 1])
            local = x[start:stop].clone().requires_grad_(True)
            with context_parallel(module):
                out = module(local, key_padding_mask=None if mask is None else mask[:, start:stop], need_weights=False)[
                    0
                ]
            (out * weight[start:stop]).sum().backward()
            errs = [(out - ref[start:stop]).abs().max().item(), (local.grad - full.grad[start:stop]).abs().max().item()]
            for key, g in ref_grads.items():
                mine = params[key].grad.clone()
                dist.all_reduce(mine)  # parameters: the ranks' gradients add up to the full one
                errs.append((mine - g).abs().max().item())
            results[f"module/{label}/pad={padded}"] = max(errs)


def _byte_cases(rank, world, results):
    """Bytes this rank sends (forward + backward) at two sequence lengths: equal for windows and linear attention."""
    from efficient_attention.distributed import (
        context_parallel_causal_linear_attention,
        context_parallel_window_attention,
        count_bytes,
    )
    from efficient_attention.local_window import LocalWindow

    window = LocalWindow.sliding(6, causal=True)
    for per_rank in (16, 64):
        n = per_rank * world
        q, k, v, _ = _qkv(3, n, heads=2, kv_heads=1, d=4, dv=4, bsz=1)
        sl = slice(rank * per_rank, (rank + 1) * per_rank)
        q, k, v = (t[:, :, sl].clone().requires_grad_(True) for t in (q, k, v))
        lengths = [per_rank] * world
        with count_bytes() as c:
            out, _ = context_parallel_window_attention(q, k, v, window, lengths=lengths)
            out.sum().backward()
        results[f"bytes/window/{per_rank}"] = dict(c.by_kind)
        qf, kf = (
            torch.rand(2, q.shape[1], per_rank, 5, dtype=torch.float64),
            torch.rand(2, q.shape[1], per_rank, 5, dtype=torch.float64),
        )
        vv = torch.randn(2, q.shape[1], per_rank, 4, dtype=torch.float64, requires_grad=True)
        with count_bytes() as c:
            num, den = context_parallel_causal_linear_attention(qf, kf, vv, lengths=lengths)
            (num.sum() + den.sum()).backward()
        results[f"bytes/linear/{per_rank}"] = dict(c.by_kind)


def _ddp_cases(rank, world, results):
    """Our modules under torch DistributedDataParallel (CPU, gloo): each rank half the batch = the full batch."""
    from torch.nn.parallel import DistributedDataParallel

    from efficient_attention import build_attention

    specs = {
        "local_causal": dict(name="local", causal=True, wsize=4),
        "performer_causal": dict(name="performer", causal=True, approx_attn_dim=6),
        "s4d_causal": dict(name="s4d", causal=True),
        "bigbird": dict(name="bigbird", layout="bigbird", block_size=4, num_random_blocks=0),
    }
    for i, (label, spec) in enumerate(specs.items()):
        spec = dict(spec)
        torch.manual_seed(i)
        module = build_attention(spec.pop("name"), embed_dim=8, num_heads=2, self_attention=True, **spec).double()
        module.eval()  # Performer: no feature redraw between the two runs
        x = torch.randn(13, 2 * world, 8, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
        (module(x, need_weights=False)[0] * weight).sum().backward()
        ref = {k: p.grad.clone() for k, p in module.named_parameters()}
        module.zero_grad()
        ddp = DistributedDataParallel(module)
        sl = slice(2 * rank, 2 * rank + 2)
        (ddp(x[:, sl], need_weights=False)[0] * weight[:, sl]).sum().backward()
        # DDP averages the ranks' gradients: times world = the full-batch gradient
        results[f"ddp/{label}"] = max(
            (p.grad * world - ref[k]).abs().max().item() for k, p in module.named_parameters()
        )


def _worker(rank, world, init_file, out_dir, groups):
    torch.set_num_threads(1)
    # a rank that fails leaves the others waiting in a collective: gloo's timeout ends them
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    results = {}
    try:
        for group in groups:
            {"functional": _functional_cases, "module": _module_cases, "bytes": _byte_cases, "ddp": _ddp_cases}[group](
                rank, world, results
            )
    except Exception:  # reported to the test, which fails with the traceback
        results["error"] = traceback.format_exc()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _spawn(world, groups):
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(world, init_file, tmp, groups), nprocs=world, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]


@pytest.fixture(scope="module")
def reports():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return {2: _spawn(2, ["functional", "module", "bytes", "ddp"]), 4: _spawn(4, ["functional", "module"])}


def _check(reports, world, prefix):
    for rank, res in enumerate(reports[world]):
        assert "error" not in res, f"rank {rank} failed:\n{res['error']}"
        cases = {k: e for k, e in res.items() if k.startswith(prefix)}
        assert cases, f"no {prefix} cases ran"
        bad = {k: e for k, e in cases.items() if not e <= ATOL}
        assert not bad, f"rank {rank} of {world}: errors above {ATOL}: {bad}"


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("prefix", ["window/", "bigbird/", "linear/", "module/"])
def test_exact_against_single_process(reports, world, prefix):
    _check(reports, world, prefix)


def test_modules_under_distributed_data_parallel(reports):
    _check(reports, 2, "ddp/")


def test_window_bytes_do_not_grow_with_n(reports):
    """Causal window of 6 keys, Hkv=1, d=dv=4, float64: rank r sends 6 keys to rank r+1 and gets their grads back."""
    for rank, res in enumerate(reports[2]):
        assert "error" not in res, res.get("error")
        small, large = res["bytes/window/16"], res["bytes/window/64"]
        assert small == large
        halo = 6 * 1 * 1 * (4 + 4) * 8  # W * B * Hkv * (d + dv) * 8 bytes
        assert small.get("halo_kv", 0) == (halo if rank == 0 else 0)  # forward: rank 0 -> rank 1
        assert small.get("halo_kv_grad", 0) == (halo if rank == 1 else 0)  # backward: the grads go back
        assert "lengths" not in small  # lengths were given


def test_linear_bytes_do_not_grow_with_n(reports):
    """One all-gather of (m*dv + m + 1) numbers per (batch, head), one all-reduce of the gathered grads."""
    for res in reports[2]:
        small, large = res["bytes/linear/16"], res["bytes/linear/64"]
        assert small == large
        m, dv, bh = 5, 4, 2 * 2
        assert small["all_gather"] == bh * (m * dv + m + 1) * 8 * (2 - 1)


@pytest.mark.slow
def test_gpu_benchmark_logic_on_two_cpu_ranks(tmp_path):
    """benchmarks/context_parallel_gpu.py --smoke under torchrun with 2 gloo ranks: exactness rows all pass."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        os.path.join(root, "benchmarks", "context_parallel_gpu.py"),
        "--smoke",
        "--reps",
        "1",
        "--out",
        str(tmp_path),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.load(open(tmp_path / "context_parallel_P2.json"))
    assert result["world"] == 2 and all(r["ok"] for r in result["exactness"].values()), result["exactness"]
    (row,) = result["window_steps"]
    assert row["max_bytes_sent_per_rank"] > 0 and "skipped" in row["ring_attention"]
