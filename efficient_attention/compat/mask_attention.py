"""``mask_attention_transformer``'s ``mask_attn`` on top of :func:`mask_attention`.

    from efficient_attention.compat import mask_attention as att
    w = att.mask_attn(tensor1=q, tensor2=k, mask_to_attend_to=m == 0, fill=-1e6)

Returns the raw dot products ``q · k`` where ``mask_to_attend_to`` is True and
``fill`` elsewhere, computing only the allowed entries.
"""

from __future__ import annotations

from torch import Tensor

from ..sparse.masked import mask_attention

__all__ = ["mask_attn"]


def mask_attn(tensor1: Tensor, tensor2: Tensor, mask_to_attend_to: Tensor, fill: float = -1e6) -> Tensor:
    """Masked scores ``tensor1 @ tensor2ᵀ`` (unscaled) where allowed, ``fill`` elsewhere."""
    return mask_attention(tensor1, tensor2, mask=mask_to_attend_to, fill=fill, scale=1.0)
