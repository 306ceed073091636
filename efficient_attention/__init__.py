"""efficient-attention: efficient attention mechanisms with fairseq's interface.

    from efficient_attention import MultiheadAttention, build_attention, available_attentions

Every mechanism subclasses :class:`EfficientAttention` (fairseq's
``MultiheadAttention`` constructor and forward, plus ``cross`` / ``causal``)
and is registered by name.  ``python -m efficient_attention`` prints the table
of mechanisms, patterns and backends.  Importing this package never imports
fairseq or ParaGen.
"""

from .attentions import *  # noqa: F401,F403  (registers every mechanism)
from .attentions import __all__ as _mechanisms
from .base import AttentionMasks, EfficientAttention, OptionSpec, check_bool
from .capabilities import Capabilities, Pattern
from .compat.fairseq import fsmha
from .errors import UnsupportedInputError, UnsupportedPatternError
from .registry import (
    available_attentions,
    build_attention,
    capability_table,
    get_attention_class,
    register_attention,
)
from .sparse import (  # the sparse functionals on (B, H, N, D) tensors
    UnknownSparsityModeError,
    _renamed,
    block_layout_attention,
    blockwise_attention,
    dilated_attention,
    dynamic_sparse_attention,
    hash_sparse_attention,
    landmark_token_attention,
    mask_attention,
    qk_sparse_attention,
)

__version__ = "0.1.0"

__all__ = [
    *_mechanisms,
    "AttentionMasks",
    "Capabilities",
    "EfficientAttention",
    "OptionSpec",
    "Pattern",
    "UnsupportedInputError",
    "UnsupportedPatternError",
    "available_attentions",
    "build_attention",
    "capability_table",
    "check_bool",
    "fsmha",
    "get_attention_class",
    "register_attention",
    # sparse functionals
    "UnknownSparsityModeError",
    "block_layout_attention",
    "blockwise_attention",
    "dilated_attention",
    "dynamic_sparse_attention",
    "hash_sparse_attention",
    "landmark_token_attention",
    "mask_attention",
    "qk_sparse_attention",
]


def __getattr__(name: str):
    """``block_sparse_attention`` / ``landmark_attention``: the functionals' old names (``DeprecationWarning``)."""
    return _renamed(__name__, name)
