"""What a mechanism can do, declared as data.

Every attention class carries a :class:`Capabilities` record.  The base class
checks it when a module is built (pattern) and on every forward (masks,
weights, incremental decoding), so an input that a mechanism cannot honour is
rejected with a message that says why -- never silently ignored.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import FrozenSet, Tuple

from .errors import UnsupportedInputError, UnsupportedPatternError  # noqa: F401  (re-exported)


class Pattern(enum.Enum):
    """The four attention patterns of the CAB benchmark."""

    NONCAUSAL_SELF = "noncausal self"
    CAUSAL_SELF = "causal self"
    NONCAUSAL_CROSS = "noncausal cross"
    CAUSAL_CROSS = "causal cross"

    @staticmethod
    def of(*, cross: bool, causal: bool) -> "Pattern":
        if cross:
            return Pattern.CAUSAL_CROSS if causal else Pattern.NONCAUSAL_CROSS
        return Pattern.CAUSAL_SELF if causal else Pattern.NONCAUSAL_SELF

    @property
    def causal(self) -> bool:
        return self in (Pattern.CAUSAL_SELF, Pattern.CAUSAL_CROSS)

    @property
    def cross(self) -> bool:
        return self in (Pattern.NONCAUSAL_CROSS, Pattern.CAUSAL_CROSS)

    def __str__(self) -> str:
        return self.value


ALL_PATTERNS: FrozenSet[Pattern] = frozenset(Pattern)
SELF_PATTERNS: FrozenSet[Pattern] = frozenset({Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF})


@dataclass(frozen=True)
class Capabilities:
    """What a mechanism supports.

    Attributes:
        patterns: the patterns it can be built for.
        incremental: token-by-token decoding (fairseq ``incremental_state``)
            for its causal patterns, and ``static_kv`` caching for cross ones.
        constant_state: decoding state does not grow with the decoded length.
        attn_mask: honours an arbitrary ``attn_mask`` (a mask that only repeats
            the causal mask is accepted by every causal mechanism).
        key_padding_mask: honours ``key_padding_mask``.
        additive_masks: honours float masks with finite values (otherwise
            float masks must hold only ``0`` / ``-inf``).
        need_weights: can return attention weights.
        before_softmax: can return raw scores (``before_softmax=True``).
        bias_kv: supports ``add_bias_kv`` / ``add_zero_attn``.
        grouped_kv: supports ``num_kv_heads`` < ``num_heads``.
        independent_queries: with ``causal=False`` each output row depends only on
            its own query and the keys (exact softmax, linear attention ...), and
            any number of keys is accepted.  Noncausal decoding then attends the
            new queries to the cached keys instead of recomputing the prefix, and a
            module built with neither ``self_attention`` nor
            ``encoder_decoder_attention`` (fairseq's general attention) takes keys
            of another length.
        backends: the compute paths it has, fastest first (for the table).
    """

    patterns: FrozenSet[Pattern] = ALL_PATTERNS
    incremental: bool = False
    constant_state: bool = False
    attn_mask: bool = False
    key_padding_mask: bool = True
    additive_masks: bool = False
    need_weights: bool = False
    before_softmax: bool = False
    bias_kv: bool = False
    grouped_kv: bool = False
    independent_queries: bool = False
    backends: Tuple[str, ...] = field(default=("torch",))

    def supports(self, pattern: Pattern) -> bool:
        return pattern in self.patterns

    def pattern_names(self) -> Tuple[str, ...]:
        return tuple(p.value for p in Pattern if p in self.patterns)
