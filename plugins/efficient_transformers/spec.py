"""Attention configuration: a registered mechanism name plus its options.

In YAML an attention is either a name or a mapping with ``name`` and the
mechanism's own options::

    attention: local
    attention: {name: local, wsize: 32}

:meth:`AttentionSpec.parse` checks the name against the registry (an unknown
one lists the registered names) and every option against the mechanism's
option spec (``options()``, :mod:`efficient_attention.options`): an unknown
option is named, with the valid ones; a value of the wrong basic type is a
``TypeError``, one that breaks the option's rule (bounds, choices) a
``ValueError``, both naming the option and ``where``.  :meth:`AttentionSpec.build` checks the pattern
first, so a mechanism that cannot be built for a layer fails with the layer's
name and the pattern.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Union

from efficient_attention import (
    EfficientAttention,
    Pattern,
    UnsupportedPatternError,
    available_attentions,
    get_attention_class,
)
from efficient_attention.options import Option

__all__ = ["AttentionSpec", "DEFAULT_ATTENTION"]

# the library's baseline mechanism (exact softmax attention); used when a layer names none
DEFAULT_ATTENTION = "vanilla"

_SIMPLE_TYPES = (bool, int, float, str)


def _matches(value: Any, t: type) -> bool:
    if t is bool or isinstance(value, bool):
        return t is bool and isinstance(value, bool)
    if t is float:
        return isinstance(value, (int, float))
    return isinstance(value, t)


def _check_value(value: Any, spec: Option, where: str) -> None:
    """Reject a value of the wrong basic type (YAML gives plain types: ``TypeError``) or outside the option's rule.

    The rule is the spec's (:meth:`Option.validate`); options declared the old way (keyword-only arguments) have
    none, and their constructor checks them when the layer is built.
    """
    tp = spec.base_type
    simple = tp in _SIMPLE_TYPES and spec.element_type is None and spec.check is None
    if simple and not (value is None and spec.optional) and not _matches(value, tp):
        raise TypeError(f"{where}: option {spec.name!r} must be {tp.__name__}, got {value!r} ({type(value).__name__})")
    try:
        spec.validate(value)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{where}: attention option {err}") from None


@dataclass(frozen=True)
class AttentionSpec:
    """A mechanism name (canonical registry key) and its keyword options."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, value: Union[None, str, Mapping[str, Any], "AttentionSpec"], where: str) -> "AttentionSpec":
        """Parse a YAML value (``None`` = :data:`DEFAULT_ATTENTION`); ``where`` names it in errors."""
        if isinstance(value, AttentionSpec):
            return cls.parse({"name": value.name, **value.options}, where)
        if value is None:
            value = DEFAULT_ATTENTION
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, Mapping):
            raise TypeError(
                f"{where} must be a mechanism name or a mapping {{name: ..., <option>: ...}}, "
                f"got {type(value).__name__}: {value!r}"
            )
        options: Dict[str, Any] = dict(value)
        name = options.pop("name", None)
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where} needs a mechanism 'name'; registered: {', '.join(available_attentions())}")
        try:
            klass = get_attention_class(name)
        except KeyError as err:
            raise ValueError(f"{where}: {err}") from None
        specs = klass.options()
        for opt, val in options.items():
            if opt not in specs:
                valid = ", ".join(sorted(specs)) or "none"
                raise ValueError(
                    f"{where}: attention {klass.attention_name!r} has no option {opt!r} (its options: {valid}; "
                    f"embed_dim, num_heads, dropout, cross and causal are set by the layer)"
                )
            _check_value(val, specs[opt], where)
        return cls(klass.attention_name, options)

    @property
    def cls(self) -> type:
        return get_attention_class(self.name)

    def check_pattern(self, pattern: Pattern, where: str) -> None:
        """Raise :class:`UnsupportedPatternError` naming ``where`` if the mechanism lacks ``pattern``."""
        caps = self.cls.capabilities
        if not caps.supports(pattern):
            raise UnsupportedPatternError(
                f"{where}: attention {self.name!r} does not support {pattern} attention "
                f"(it supports: {', '.join(caps.pattern_names())})"
            )

    def build(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        dropout: float,
        cross: bool,
        causal: bool,
        where: str,
        kdim: Optional[int] = None,
        max_positions: Optional[int] = None,
    ) -> EfficientAttention:
        """Build the module for one layer: options by keyword, pattern from ``cross``/``causal``.

        ``max_positions`` (the model's longest sequence) becomes ``max_len`` of a mechanism that has that
        option (cosFormer's fixed ``M``, which decoding needs) unless the spec sets it.
        """
        self.check_pattern(Pattern.of(cross=cross, causal=causal), where)
        kwargs: Dict[str, Any] = dict(
            embed_dim=embed_dim, num_heads=num_heads, dropout=dropout, cross=cross, causal=causal
        )
        if max_positions is not None and "max_len" in self.cls.options() and "max_len" not in self.options:
            kwargs["max_len"] = max_positions
        if cross:
            kwargs.update(kdim=kdim, vdim=kdim, encoder_decoder_attention=True)
        else:
            kwargs.update(self_attention=True)
        try:
            return self.cls(**kwargs, **self.options)
        except (ValueError, TypeError) as err:
            raise type(err)(f"{where}: attention {self.name!r}: {err}") from err

    def to_config(self) -> Dict[str, Any]:
        return {"name": self.name, **self.options}
