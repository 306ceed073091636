"""Quick start: every registered mechanism on data made here, through the Python API.

For each mechanism and each pattern it supports: a forward/backward pass on a
batch of random sequences, and for causal patterns a token-by-token decode
checked against the full forward.  Prints one line per (mechanism, pattern).

    python examples/quickstart.py [--length 512] [--embed-dim 128] [--heads 4] [--batch 2]

Every mechanism is built with its default options (cosFormer also gets ``max_len``, which its
causal decoding needs).  Takes about a minute on two CPU cores.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from efficient_attention import Pattern, available_attentions, build_attention

log = logging.getLogger("quickstart")


def run(length: int, embed_dim: int, heads: int, batch: int) -> None:
    torch.manual_seed(0)
    rows = []
    infos = available_attentions()
    for i, (name, info) in enumerate(infos.items(), 1):
        log.info("[%d/%d] %s", i, len(infos), name)
        for pattern in Pattern:
            if not info.capabilities.supports(pattern):
                continue
            # mechanisms whose position weighting needs the longest length to decode take it here (cosFormer)
            opts = {"max_len": length} if "max_len" in info.options else {}
            m = build_attention(
                name, embed_dim=embed_dim, num_heads=heads, cross=pattern.cross, causal=pattern.causal, **opts
            )
            x = torch.randn(length, batch, embed_dim, requires_grad=True)
            mem = torch.randn(length, batch, embed_dim) if pattern.cross else x
            start = time.perf_counter()
            out, _ = m(x, mem, mem, need_weights=False)
            out.float().pow(2).mean().backward()
            elapsed = time.perf_counter() - start
            check = ""
            if pattern.causal and info.capabilities.incremental:
                m.eval()
                with torch.no_grad():
                    full, _ = m(x[:32], mem[:32], mem[:32], need_weights=False)
                    state, steps = {}, []
                    for t in range(32):
                        step, _ = m(
                            x[t : t + 1], mem[t : t + 1], mem[t : t + 1], incremental_state=state, need_weights=False
                        )
                        steps.append(step)
                err = (torch.cat(steps) - full).abs().max().item()
                check = f"decode==full (max err {err:.1e})"
            rows.append((name, str(pattern), f"{elapsed * 1000:8.1f} ms", check))
    width = max(len(r[0]) for r in rows)
    print(f"{'mechanism':<{width}}  {'pattern':<16} {'fwd+bwd':>11}  incremental decoding")
    for name, pattern, t, check in rows:
        print(f"{name:<{width}}  {pattern:<16} {t:>11}  {check}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--embed-dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run(args.length, args.embed_dim, args.heads, args.batch)


if __name__ == "__main__":
    main()
