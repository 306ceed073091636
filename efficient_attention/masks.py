"""Mask conventions and the one place masks are built and converted.

Conventions used everywhere in the library:

* **bool masks: True = masked** (cannot be attended), as in fairseq and
  ``torch.nn.MultiheadAttention``.  ``uint8`` masks mean the same (non-zero =
  masked).
* **float masks are additive**: added to the scores before the softmax
  (``0`` keeps, ``-inf`` masks, finite values bias).
* **causal alignment**: with ``T`` queries and ``S`` keys, query ``i`` sees key
  ``j`` iff ``j <= i + (S - T)`` -- the queries are the *last* ``T`` positions
  of the key sequence.  This is what incremental decoding needs (one new
  query against a cache of ``S`` keys) and it is the usual rule for ``T == S``.
  Causal cross attention decoded over static keys (fairseq's ``static_kv``)
  keeps the position ``p`` of the next query: query ``p`` sees keys ``0..p``,
  which is the full pass's rule when ``T == S``.
"""

from __future__ import annotations

from typing import Optional, overload

import torch
from torch import Tensor

from .capabilities import UnsupportedInputError

__all__ = [
    "causal_mask",
    "is_causal_mask",
    "as_bool_mask",
    "to_additive",
    "check_key_padding_mask",
    "check_attn_mask",
    "expand_attn_mask",
    "merge_masks",
]


def causal_mask(tgt_len: int, src_len: int, device=None) -> Tensor:
    """Bool ``(T, S)``: True where query ``i`` may not see key ``j`` (``j > i + S - T``)."""
    i = torch.arange(tgt_len, device=device).unsqueeze(1)
    j = torch.arange(src_len, device=device).unsqueeze(0)
    return j > i + (src_len - tgt_len)


def is_causal_mask(mask: Tensor, tgt_len: int, src_len: int) -> bool:
    """Whether a 2-D ``attn_mask`` masks exactly the future (fairseq's ``buffered_future_mask``)."""
    if mask.dim() != 2 or mask.shape != (tgt_len, src_len):
        return False
    blocked = mask.bool() if mask.dtype in (torch.bool, torch.uint8) else torch.isneginf(mask)
    if mask.is_floating_point() and not torch.all(blocked | (mask == 0)):
        return False
    return bool(torch.equal(blocked, causal_mask(tgt_len, src_len, mask.device)))


def as_bool_mask(mask: Tensor, name: str) -> Tensor:
    """Bool view of a mask (True = masked).

    Float masks are accepted when they only hold ``0`` and ``-inf``; finite
    non-zero biases cannot be expressed as a bool mask and raise
    :class:`UnsupportedInputError` naming the argument.
    """
    if mask.dtype == torch.bool:
        return mask
    if mask.dtype == torch.uint8:
        return mask.bool()
    if mask.is_floating_point():
        blocked = torch.isneginf(mask)
        if not torch.all(blocked | (mask == 0)):
            raise UnsupportedInputError(
                f"{name} holds finite non-zero additive values; this mechanism only takes "
                f"masks that keep (0 / False) or remove (-inf / True) a position"
            )
        return blocked
    raise TypeError(f"{name} must be bool, uint8 or floating point, got {mask.dtype}")


def to_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive float version of a bool/uint8/float mask."""
    if mask.is_floating_point():
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask.bool(), float("-inf"))


def _check_mask_dtype(mask: Tensor, name: str) -> None:
    if not (mask.dtype in (torch.bool, torch.uint8) or mask.is_floating_point()):
        raise TypeError(f"{name} must be bool, uint8 or floating point, got {mask.dtype}")


@overload
def check_key_padding_mask(mask: None, bsz: int, src_len: int, device) -> None: ...
@overload
def check_key_padding_mask(mask: Tensor, bsz: int, src_len: int, device) -> Tensor: ...
@overload
def check_key_padding_mask(mask: Optional[Tensor], bsz: int, src_len: int, device) -> Optional[Tensor]: ...
def check_key_padding_mask(mask: Optional[Tensor], bsz: int, src_len: int, device) -> Optional[Tensor]:
    """Validate a ``(B, S)`` key padding mask; uint8 becomes bool."""
    if mask is None:
        return None
    _check_mask_dtype(mask, "key_padding_mask")
    if mask.dim() != 2 or mask.shape != (bsz, src_len):
        raise ValueError(
            f"key_padding_mask must have shape (batch, src_len) = ({bsz}, {src_len}), got {tuple(mask.shape)}"
        )
    if mask.device != device:
        raise ValueError(f"key_padding_mask is on {mask.device}, the inputs on {device}")
    return mask.bool() if mask.dtype == torch.uint8 else mask


def check_attn_mask(
    mask: Optional[Tensor], bsz: int, num_heads: int, tgt_len: int, src_len: int, device
) -> Optional[Tensor]:
    """Validate an ``attn_mask`` of shape ``(T, S)`` or ``(B*H, T, S)``; uint8 becomes bool."""
    if mask is None:
        return None
    _check_mask_dtype(mask, "attn_mask")
    ok = (mask.dim() == 2 and mask.shape == (tgt_len, src_len)) or (
        mask.dim() == 3 and mask.shape == (bsz * num_heads, tgt_len, src_len)
    )
    if not ok:
        raise ValueError(
            f"attn_mask must have shape (tgt_len, src_len) = ({tgt_len}, {src_len}) or "
            f"(batch*heads, tgt_len, src_len) = ({bsz * num_heads}, {tgt_len}, {src_len}), "
            f"got {tuple(mask.shape)}"
        )
    if mask.device != device:
        raise ValueError(f"attn_mask is on {mask.device}, the inputs on {device}")
    return mask.bool() if mask.dtype == torch.uint8 else mask


def expand_attn_mask(mask: Tensor, bsz: int, num_heads: int) -> Tensor:
    """``(T, S)`` -> ``(1, 1, T, S)``; ``(B*H, T, S)`` (batch-major) -> ``(B, H, T, S)``."""
    if mask.dim() == 2:
        return mask[None, None]
    return mask.view(bsz, num_heads, mask.shape[-2], mask.shape[-1])


def merge_masks(
    tgt_len: int,
    src_len: int,
    *,
    key_padding_mask: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    causal: bool = False,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> Optional[Tensor]:
    """One mask broadcastable to ``(B, H, T, S)`` combining all three kinds.

    ``key_padding_mask`` is ``(B, S)`` and ``attn_mask`` is already expanded
    (``(1|B, 1|H, T, S)``).  The result is bool (True = masked) when every
    input is bool, and additive in ``dtype`` otherwise; ``None`` when there is
    nothing to mask.
    """
    parts = []
    if key_padding_mask is not None:
        parts.append(key_padding_mask[:, None, None, :])
    if attn_mask is not None:
        parts.append(attn_mask)
    if causal:
        parts.append(causal_mask(tgt_len, src_len, device)[None, None])
    if not parts:
        return None
    if all(p.dtype == torch.bool for p in parts):
        out = parts[0]
        for p in parts[1:]:
            out = out | p
        return out
    out = to_additive(parts[0], dtype)
    for p in parts[1:]:
        out = out + to_additive(p, dtype)
    return out
