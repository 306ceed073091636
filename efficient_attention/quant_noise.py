"""Quantization noise (Fan et al., 2020) for the projections, as fairseq's ``q_noise``.

During training, blocks of ``block_size`` input features of each output row of
a weight are dropped with probability ``p`` and the rest rescaled by
``1 / (1 - p)``.  It is applied functionally when the projection runs, so the
parameters (and checkpoints) are those of a plain ``nn.Linear``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_quant_noise", "quant_noise_weight"]


def check_quant_noise(p: float, block_size: int, in_features: int, name: str) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"q_noise must be in [0, 1), got {p}")
    if p > 0 and (block_size <= 0 or in_features % block_size != 0):
        raise ValueError(
            f"qn_block_size={block_size} must be positive and divide the input features of {name} ({in_features})"
        )


def quant_noise_weight(weight: Tensor, p: float, block_size: int, training: bool) -> Tensor:
    if not training or p <= 0:
        return weight
    out_features, in_features = weight.shape
    keep = torch.rand(out_features, in_features // block_size, device=weight.device) >= p
    keep = keep.repeat_interleave(block_size, dim=1).to(weight.dtype)
    return weight * keep / (1.0 - p)
