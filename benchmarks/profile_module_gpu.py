"""Profile one mechanism's forward + backward on CUDA (CAB's setting) and print the top kernels and ops.

python benchmarks/profile_module_gpu.py probsparse --causal --length 8192
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from efficient_attention import build_attention  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mechanism")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args()
    m = build_attention(args.mechanism, embed_dim=512, num_heads=8, causal=args.causal, self_attention=True).cuda()
    x = torch.randn(args.length, 4, 512, device="cuda", requires_grad=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, _ = m(x, x, x, need_weights=False)
        out.float().sum().backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        step()
        torch.cuda.synchronize()
    print(f"{args.mechanism} causal={args.causal} L={args.length}")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
