"""Long-Short on CUDA: the fused block-mask path against the window + memories path, and SDPA.

CAB's setting (self-attention on ``(L, B=4, 512)``, 8 heads of 64, bf16 autocast, forward + backward):
checks that both paths agree (fp32, L = 1000, with padding), then times both and causal / noncausal SDPA
(our ``vanilla``) at L in 1k, 4k, 8k, 32k, with peak memory.

    python benchmarks/longshort_gpu.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from efficient_attention import build_attention  # noqa: E402
from efficient_attention.benchmark.timing import peak_bytes, run_timed, train_case  # noqa: E402


def check(name: str, causal: bool) -> float:
    torch.manual_seed(0)
    m = build_attention(name, embed_dim=512, num_heads=8, causal=causal, self_attention=True).cuda()
    x = torch.randn(1000, 2, 512, device="cuda", requires_grad=True)
    kpm = torch.zeros(2, 1000, dtype=torch.bool, device="cuda")
    kpm[1, -300:] = True
    res = []
    for fused in (True, False):
        m._fused = fused
        x.grad = None
        out, _ = m(x, x, x, key_padding_mask=kpm, need_weights=False)
        out[:700].sum().backward()
        res.append((out[:700].detach(), x.grad.clone()))
    return max((a - b).abs().max().item() for a, b in zip(*res))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096, 8192, 32768])
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    rows = []
    for name, causal in (("attention_ls", False), ("causal_ls", True)):
        print(f"{name}: fused vs window+memories max abs diff (fp32, padded) {check(name, causal):.2e}", flush=True)
        for length in args.lengths:
            row = {"mechanism": name, "length": length}
            for label in ("fused", "old", "sdpa"):
                torch.manual_seed(0)
                m = build_attention(
                    "vanilla" if label == "sdpa" else name,
                    embed_dim=512,
                    num_heads=8,
                    causal=causal,
                    self_attention=True,
                ).to(device)
                if label != "sdpa":
                    m._fused = label == "fused"
                call, reset = train_case(m, length, 4, 512, device, torch.bfloat16)
                row[label + "_ms"] = run_timed(call, reset, device, 2, 7)["time_s"] * 1e3
                row[label + "_gib"] = peak_bytes(call, reset, device)["mem_max_allocated_bytes"] / 2**30
            rows.append(row)
            print(
                f"{name:13s} L={length:6d} fused {row['fused_ms']:7.2f} ms {row['fused_gib']:.2f} GiB | "
                f"old {row['old_ms']:7.2f} ms {row['old_gib']:.2f} GiB | SDPA {row['sdpa_ms']:7.2f} ms "
                f"{row['sdpa_gib']:.2f} GiB",
                flush=True,
            )
    (args.out / "longshort_gpu.json").write_text(
        json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1)
    )


if __name__ == "__main__":
    main()
