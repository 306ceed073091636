"""Scaling model of context-parallel attention: bytes a rank sends per layer, predicted step time, efficiency.

    python benchmarks/scaling_model.py [--out benchmarks/results] [--kernels benchmarks/results/kernels_gpu_h100.json]

Per layer (forward + backward), per rank, bf16 (``b = 2`` bytes), ``H`` query and
``Hkv`` key/value heads of dimension ``d``, ``P`` ranks, ``n = N / P`` tokens a rank,
a causal window of ``W`` keys (see ``docs/distributed.md`` for the derivation):

* halo exchange (ours):    ``2 · (W - 1) · Hkv · 2d · b``           (keys+values forward, their grads back)
* ring attention:          ``3 · (P - 1) · n · Hkv · 2d · b``         (K,V around the ring forward and
                                                                       backward, dK,dV back around it)
* all-gather of K,V:       ``2 · (P - 1) · n · Hkv · 2d · b``         (all-gather forward, reduce-scatter back)
* causal linear attention: ``(P - 1) · H · (m·dv + m + 1) · 4 + all-reduce of the gathered grads``

Time of a layer on ``P`` ranks: the single-GPU window kernel on ``n`` tokens
(fwd+bwd, measured: ``t_win(n) = t_meas · n / N_meas``, the kernel is linear in
``n``) plus the exchange, not overlapped (our implementation exchanges, then
computes): ``t = t_win(n) + 2 (alpha + bytes_fwd / BW)``.  Weak-scaling
efficiency ``= t_win(n) / t``.  Ring attention (exact dense causal attention, what
PyTorch's ``context_parallel`` computes) is given its best case, comm perfectly
hidden behind compute: ``max(t_sdpa_causal(N) / P, ring bytes / BW)``, with
``t_sdpa_causal(N) = t_meas · (N / N_meas)^2``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List

# Link models.  NVLink: H200 (HGX, NVLink 4) has 18 links x 50 GB/s = 900 GB/s bidirectional per GPU,
# i.e. ~450 GB/s per direction (NVIDIA H200 product brief / datasheet: "NVLink: 900GB/s").
# InfiniBand NDR: 400 Gb/s = 50 GB/s per direction per NIC, one NIC per GPU in an HGX/DGX H200.
LINKS = {
    "nvlink_h200": {"bandwidth_Bps": 450e9, "latency_s": 10e-6, "source": "H200 datasheet, 900 GB/s bidirectional"},
    "infiniband_ndr": {"bandwidth_Bps": 50e9, "latency_s": 20e-6, "source": "NDR 400 Gb/s per GPU NIC"},
}
HEADS, HEAD_DIM, BYTES = 16, 128, 2  # the measured kernel configuration (H = Hkv = 16, d = 128, bf16)
RANKS = (2, 4, 8, 16, 32, 64)
WINDOWS = (512, 4096)
PER_RANK = (16384, 65536, 131072)
TOTALS = (65536, 131072, 262144, 524288, 1048576)


def load_kernel_times(path: str) -> Dict[str, float]:
    """fwd+bwd ms of the causal window kernel (W in WINDOWS) and causal SDPA at the largest measured N, d=128."""
    rows = json.load(open(path))["rows"]
    device = json.load(open(path))["meta"]["device"]
    out: Dict[str, float] = {"device": device}
    for row in rows:
        if row.get("D") != HEAD_DIM:
            continue
        if row["name"] == "sdpa" and row["N"] >= out.get("sdpa_N", 0):
            out["sdpa_N"], out["sdpa_ms"] = row["N"], row["causal_fwdbwd_ms"]
        for w in WINDOWS:
            if row["name"] == f"window W={w}" and row["N"] >= out.get(f"win{w}_N", 0):
                out[f"win{w}_N"] = row["N"]
                out[f"win{w}_ms"] = row.get("ours_graph_fwdbwd_ms") or row["ours_fwdbwd_ms"]
    return out


def kv_bytes(tokens: int) -> int:
    return tokens * HEADS * 2 * HEAD_DIM * BYTES


def halo_bytes(window: int) -> int:
    """Forward + backward bytes a rank sends for a causal window of ``window`` keys (itself included)."""
    return 2 * kv_bytes(window - 1)


def ring_bytes(n: int, ranks: int) -> int:
    return 3 * (ranks - 1) * kv_bytes(n)


def allgather_bytes(n: int, ranks: int) -> int:
    return 2 * (ranks - 1) * kv_bytes(n)


def linear_bytes(ranks: int, m: int = 256, dv: int = HEAD_DIM) -> int:
    state = HEADS * (m * dv + m + 1) * 4  # fp32 states
    return (ranks - 1) * state + 2 * (ranks - 1) * state  # all-gather forward, all-reduce of (P x state) grads


def link_for(ranks: int) -> str:
    return "nvlink_h200" if ranks <= 8 else "infiniband_ndr"  # 8 GPUs per node; beyond, the slowest hop is IB


def predict(k: Dict[str, float], window: int, n: int, ranks: int, link: str) -> Dict[str, float]:
    bw, alpha = LINKS[link]["bandwidth_Bps"], LINKS[link]["latency_s"]
    t_win = k[f"win{window}_ms"] * n / k[f"win{window}_N"] * 1e-3
    t_halo = 2 * (alpha + halo_bytes(window) / 2 / bw)
    total = n * ranks
    t_sdpa = k["sdpa_ms"] * (total / k["sdpa_N"]) ** 2 * 1e-3
    t_ring = max(t_sdpa / ranks, ring_bytes(n, ranks) / bw + 2 * (ranks - 1) * alpha)
    return {
        "window": window,
        "ranks": ranks,
        "tokens_per_rank": n,
        "tokens": total,
        "link": link,
        "halo_bytes": halo_bytes(window),
        "ring_bytes": ring_bytes(n, ranks),
        "allgather_bytes": allgather_bytes(n, ranks),
        "linear_attention_bytes": linear_bytes(ranks),
        "t_window_kernel_ms": t_win * 1e3,
        "t_halo_comm_ms": t_halo * 1e3,
        "t_step_ms": (t_win + t_halo) * 1e3,
        "weak_scaling_efficiency": t_win / (t_win + t_halo),
        "t_allgather_comm_ms": allgather_bytes(n, ranks) / bw * 1e3,
        "t_ring_attention_ms": t_ring * 1e3,
        "speedup_vs_ring": t_ring / (t_win + t_halo),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--out", default=os.path.join(here, "results"))
    parser.add_argument("--kernels", default=os.path.join(here, "results", "kernels_gpu_h100.json"))
    args = parser.parse_args()
    k = load_kernel_times(args.kernels)
    weak: List[dict] = [predict(k, w, n, p, link_for(p)) for w in WINDOWS for n in PER_RANK for p in RANKS]
    weak += [predict(k, w, n, p, "nvlink_h200") for w in WINDOWS for n in PER_RANK for p in (16, 32, 64)]
    strong = [
        predict(k, w, total // p, p, link_for(p)) for w in WINDOWS for total in TOTALS for p in RANKS if total // p >= w
    ]
    result = {
        "kernel_times": {
            **k,
            "source": os.path.relpath(args.kernels, os.path.dirname(here)),
            "note": "single-GPU fwd+bwd of the Triton causal window kernel and causal SDPA, "
            "B=1, H=16, d=128, bf16 (CUDA-graph times where recorded); H200 compute is "
            "taken equal to the measured H100",
        },
        "links": LINKS,
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "bytes_per_element": BYTES,
        "weak_scaling": weak,
        "fixed_total_tokens": strong,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "scaling_model.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(
        f"kernel times from {k['device']}: window W=512 {k['win512_ms']:.2f} ms and W=4096 {k['win4096_ms']:.2f} ms "
        f"at N={k['win4096_N']}, causal SDPA {k['sdpa_ms']:.1f} ms at N={k['sdpa_N']}"
    )
    print(
        f"{'W':>5} {'P':>3} {'n/rank':>7} {'link':>14} {'halo MB':>8} {'ring MB':>9} {'allg MB':>9} "
        f"{'t_kern ms':>9} {'t_halo ms':>9} {'eff':>6} {'ring ms':>9} {'x ring':>7}"
    )
    for r in weak:
        if r["tokens_per_rank"] in (65536, 131072) and r["link"] == link_for(r["ranks"]):
            print(
                f"{r['window']:>5} {r['ranks']:>3} {r['tokens_per_rank']:>7} {r['link']:>14} "
                f"{r['halo_bytes'] / 1e6:>8.1f} {r['ring_bytes'] / 1e6:>9.0f} {r['allgather_bytes'] / 1e6:>9.0f} "
                f"{r['t_window_kernel_ms']:>9.2f} {r['t_halo_comm_ms']:>9.3f} {r['weak_scaling_efficiency']:>6.3f} "
                f"{r['t_ring_attention_ms']:>9.1f} {r['speedup_vs_ring']:>7.1f}"
            )
    target = next(r for r in weak if r["window"] == 4096 and r["ranks"] == 8 and r["tokens_per_rank"] == 131072)
    print(
        f"target W=4096, 8 ranks, 128k/rank on NVLink: predicted weak-scaling efficiency "
        f"{target['weak_scaling_efficiency']:.3f} (>= 0.90 wanted); written {path}"
    )


if __name__ == "__main__":
    main()
