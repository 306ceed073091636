"""ParaGen plugin of efficient-attention: transformers with any registered attention.

    paragen-run --config train.yaml --lib efficient_transformers

registers ``EfficientTransformerEncoder`` and ``EfficientTransformerDecoder``
with ParaGen (see :mod:`efficient_transformers.paragen_plugin`).  The model
code itself -- :class:`EfficientEncoder`, :class:`EfficientDecoder`, their
layers and :class:`AttentionSpec` -- is plain PyTorch and works without
ParaGen; the registration layer is imported only where ParaGen is installed.
"""

import importlib.util

from .layers import EfficientDecoderLayer, EfficientEncoderLayer, FeedForward
from .spec import DEFAULT_ATTENTION, AttentionSpec
from .transformer import EfficientDecoder, EfficientEncoder

__all__ = [
    "AttentionSpec",
    "DEFAULT_ATTENTION",
    "EfficientDecoder",
    "EfficientDecoderLayer",
    "EfficientEncoder",
    "EfficientEncoderLayer",
    "FeedForward",
    "paragen_available",
]


def paragen_available() -> bool:
    """Whether ParaGen can be imported here."""
    return importlib.util.find_spec("paragen") is not None


if paragen_available():
    from .paragen_plugin import EfficientTransformerDecoder, EfficientTransformerEncoder  # noqa: F401  (registers)

    __all__ += ["EfficientTransformerDecoder", "EfficientTransformerEncoder"]
