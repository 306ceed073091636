"""Nyströmformer's Triton landmark core on CUDA: its error against the PyTorch ops in float64, and the module's
training step (CAB's setting: ``(L, 4, 512)``, 8 heads, bf16 autocast) with the core as two Triton launches and
as PyTorch ops.

    python benchmarks/nystrom_core_gpu.py [--lengths 1024 4096]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from profile_launches_gpu import median_ms, training_step  # noqa: E402 - benchmarks/ (this script's folder)

from efficient_attention import build_attention  # noqa: E402
from efficient_attention.attentions import nystrom  # noqa: E402
from efficient_attention.kernels._triton_nystrom import NystromCore  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def core_error(c: int, d: int) -> str:
    torch.manual_seed(0)
    ins = [torch.randn(32, c, d, device="cuda") * 0.5 for _ in range(3)]
    g = torch.randn(32, c, d, device="cuda")
    got_in = [t.clone().requires_grad_() for t in ins]
    got = NystromCore.apply(*got_in, 6)
    got.backward(g)
    ref_in = [t.double().requires_grad_() for t in ins]
    kernel2 = torch.softmax(ref_in[0] @ ref_in[1].transpose(1, 2), -1)
    ref = nystrom.iterative_pinv(kernel2, 6, stochastic=True) @ ref_in[2]
    ref.backward(g.double())
    grads = " ".join(f"{rel(a.grad, b.grad):.1e}" for a, b in zip(got_in, ref_in))
    return f"core C={c} d={d}: out {rel(got, ref):.1e}  grads {grads}"


def step_ms(length: int, landmarks: int) -> float:
    torch.manual_seed(0)
    m = build_attention("nystrom", embed_dim=512, num_heads=8, num_landmarks=landmarks, self_attention=True)
    x = torch.randn(length, 4, 512, device="cuda", requires_grad=True)
    return median_ms(training_step(m.cuda().train(), x), warmup=3, repeats=7)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096])
    args = p.parse_args()
    for c, d in ((16, 64), (64, 64), (40, 32)):
        print(core_error(c, d), flush=True)
    for landmarks in (16, 64):
        for length in args.lengths:
            fused = step_ms(length, landmarks)
            nystrom._TRITON_CORE["failed"] = "measuring the PyTorch ops"
            ops = step_ms(length, landmarks)
            nystrom._TRITON_CORE.clear()
            print(f"C={landmarks} L={length}: step {fused:.2f} ms with the Triton core, {ops:.2f} ms with ATen ops")


if __name__ == "__main__":
    main()
