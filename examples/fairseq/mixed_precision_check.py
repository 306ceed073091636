#!/usr/bin/env python
"""fp16 / bf16 training steps of every registered mechanism, as fairseq runs them (no fairseq needed).

fairseq's ``--fp16`` / ``--bf16`` cast the whole model to half precision
(``FP16Optimizer`` keeps fp32 master weights) and ``--amp`` runs fp32 weights
under ``torch.autocast``.  For every mechanism and every pattern it supports
this script trains a small pre-norm transformer block whose attention is that
mechanism, in the three modes:

* ``fp16``: module in float16, loss scaling (static 128), fp32 master copy;
* ``bf16``: module in bfloat16, fp32 master copy;
* ``amp-fp16`` / ``amp-bf16``: fp32 module under ``torch.autocast``;

and checks that losses and gradients stay finite over a few steps, and (for
incremental mechanisms) that one cached decoding step in half precision is
finite.  It prints one line per case and exits non-zero if any case fails.

    python examples/fairseq/mixed_precision_check.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from efficient_attention import Pattern, available_attentions, build_attention  # noqa: E402

EMBED, HEADS, FFN = 64, 4, 128


class Block(nn.Module):
    """Pre-norm attention + FFN block, time-first like fairseq."""

    def __init__(self, name: str, pattern: Pattern, options):
        super().__init__()
        self.pattern = pattern
        self.ln1, self.ln2 = nn.LayerNorm(EMBED), nn.LayerNorm(EMBED)
        self.attn = build_attention(
            name,
            embed_dim=EMBED,
            num_heads=HEADS,
            self_attention=not pattern.cross,
            cross=pattern.cross,
            causal=pattern.causal,
            **options,
        )
        self.ffn = nn.Sequential(nn.Linear(EMBED, FFN), nn.ReLU(), nn.Linear(FFN, EMBED))

    def forward(self, x, memory=None, key_padding_mask=None, incremental_state=None):
        h = self.ln1(x)
        if self.pattern.cross:
            a, _ = self.attn(
                h,
                memory,
                memory,
                key_padding_mask=key_padding_mask,
                need_weights=False,
                incremental_state=incremental_state,
                static_kv=incremental_state is not None,
            )
        else:
            a, _ = self.attn(
                h, h, h, key_padding_mask=key_padding_mask, need_weights=False, incremental_state=incremental_state
            )
        x = x + a
        return x + self.ffn(self.ln2(x))


def finite(t) -> bool:
    return t is None or bool(torch.isfinite(t).all())


def train_case(name, pattern, mode, device, steps, seq, options) -> str:
    torch.manual_seed(0)
    model = Block(name, pattern, options).to(device)
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mode)
    amp = {"amp-fp16": torch.float16, "amp-bf16": torch.bfloat16}.get(mode)
    master = [p.detach().clone().float() for p in model.parameters()]
    if half is not None:
        model = model.to(half)
    opt_params = master if half is not None else list(model.parameters())
    opt = torch.optim.Adam(opt_params, lr=1e-3)
    scale = 128.0 if mode in ("fp16",) else 1.0
    scaler = torch.amp.GradScaler(device.type, enabled=(mode == "amp-fp16"))
    dtype = half or torch.float32
    bsz = 2
    for step in range(steps):
        g = torch.Generator(device="cpu").manual_seed(step)
        x = torch.randn(seq, bsz, EMBED, generator=g).to(device=device, dtype=dtype)
        # cross memories as long as the queries: some cross patterns align positions (local)
        mem = torch.randn(seq, bsz, EMBED, generator=g).to(device=device, dtype=dtype) if pattern.cross else None
        kpm = torch.zeros(bsz, seq, dtype=torch.bool, device=device)
        kpm[1, -3:] = True
        if pattern.cross or not pattern.causal:
            kpm = kpm if available_attentions()[name].capabilities.key_padding_mask else None
        else:
            kpm = None  # causal LMs: fairseq pads at the end and masks the loss instead
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            y = model(x, mem, key_padding_mask=kpm)
            loss = y.float().pow(2).mean()
        if not finite(loss):
            return f"non-finite loss at step {step}: {loss.item()}"
        if half is not None:
            model.zero_grad(set_to_none=True)
            (loss * scale).backward()
            for m, p in zip(master, model.parameters()):
                if p.grad is not None and not finite(p.grad):
                    return f"non-finite gradient at step {step}"
                m.grad = None if p.grad is None else p.grad.float() / scale
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for m, p in zip(master, model.parameters()):
                    p.copy_(m.to(p.dtype))
        else:
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            if not all(finite(p.grad) for p in model.parameters()):
                return f"non-finite gradient at step {step}"
            scaler.step(opt)
            scaler.update()
    caps = available_attentions()[name].capabilities
    if half is not None and caps.incremental and (pattern.causal or pattern.cross):
        model.eval()
        state = {}
        with torch.no_grad():
            x = torch.randn(3, bsz, EMBED, device=device, dtype=dtype)
            mem = torch.randn(seq, bsz, EMBED, device=device, dtype=dtype) if pattern.cross else None
            for t in range(3):
                y = model(x[t : t + 1], mem, incremental_state=state)
                if not finite(y):
                    return f"non-finite incremental decoding output at step {t}"
    return "ok"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--modes", default="fp16,bf16,amp-fp16,amp-bf16")
    p.add_argument("--mechanisms", help="comma-separated names (default: every registered mechanism)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available; pass --device cpu to check the CPU path")
    infos = available_attentions()
    names = args.mechanisms.split(",") if args.mechanisms else list(infos)
    print(
        f"torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        flush=True,
    )
    failures = 0
    for name in names:
        # each mechanism's defaults, as a fairseq run without --attn-* flags uses; a mechanism
        # with a maximum length (causal cosFormer decodes only with a fixed M) gets the sequence's
        opts = {"max_len": 2 * args.seq} if "max_len" in infos[name].options else {}
        for pattern in Pattern:
            if not infos[name].capabilities.supports(pattern):
                continue
            for mode in args.modes.split(","):
                t0 = time.time()
                try:
                    result = train_case(name, pattern, mode, device, args.steps, args.seq, opts)
                except Exception as err:  # report every case, do not stop at the first
                    result = f"error: {type(err).__name__}: {err}"
                failures += result != "ok"
                print(f"{name:16s} {str(pattern):16s} {mode:9s} {result} ({time.time() - t0:.1f}s)", flush=True)
    print(f"{failures} failing case(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
