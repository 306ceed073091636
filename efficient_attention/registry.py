"""The registry of attention mechanisms.

``@register_attention("name")`` adds a class; ``build_attention(name, **kw)``
builds one; ``available_attentions()`` lists them with their capabilities and
options.  The fairseq and ParaGen plugins, the benchmark and the generic tests
all read this registry, so a new mechanism is picked up everywhere by
registering it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple, Type

from .base import EfficientAttention, OptionSpec
from .capabilities import Capabilities, Pattern
from .errors import UnknownAttentionError, did_you_mean  # noqa: F401  (re-exported)

__all__ = [
    "register_attention",
    "get_attention_class",
    "build_attention",
    "available_attentions",
    "AttentionInfo",
    "capability_table",
    "UnknownAttentionError",
    "did_you_mean",
]

_REGISTRY: Dict[str, Type[EfficientAttention]] = {}
_ALIASES: Dict[str, str] = {}


@dataclass(frozen=True)
class AttentionInfo:
    name: str
    cls: Type[EfficientAttention]
    capabilities: Capabilities
    options: Dict[str, OptionSpec]
    aliases: Tuple[str, ...]


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def register_attention(name: str, *aliases: str) -> Callable[[Type[EfficientAttention]], Type[EfficientAttention]]:
    """Class decorator registering an :class:`EfficientAttention` subclass under ``name``."""

    def deco(cls: Type[EfficientAttention]) -> Type[EfficientAttention]:
        if not (isinstance(cls, type) and issubclass(cls, EfficientAttention)):
            raise TypeError(f"@register_attention needs an EfficientAttention subclass, got {cls!r}")
        key = _key(name)
        for k in (key, *map(_key, aliases)):
            owner = _REGISTRY.get(k) or _REGISTRY.get(_ALIASES.get(k, ""))
            if owner is not None and owner is not cls:
                raise ValueError(f"attention name {k!r} is already registered by {owner.__name__}")
        cls.options()  # fails early if an option has no help text or a default breaks its rule
        cls.attention_name = key
        _REGISTRY[key] = cls
        for alias in aliases:
            _ALIASES[_key(alias)] = key
        return cls

    return deco


def unknown_attention_message(name: str) -> str:
    """``unknown attention 'nme' (did you mean 'name'?); registered: ...``."""
    hint = did_you_mean(_key(str(name)), [*_REGISTRY, *_ALIASES])
    return f"unknown attention {name!r}{hint}; registered: {', '.join(sorted(_REGISTRY))}"


def get_attention_class(name: str) -> Type[EfficientAttention]:
    """The class registered as ``name``; :class:`UnknownAttentionError` (a ``KeyError``) otherwise."""
    key = _key(name)
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise UnknownAttentionError(unknown_attention_message(name))
    return _REGISTRY[key]


def build_attention(name: str, **kwargs) -> EfficientAttention:
    """Build the mechanism registered as ``name`` (aliases and any case accepted)."""
    return get_attention_class(name)(**kwargs)


def available_attentions() -> Dict[str, AttentionInfo]:
    """Every registered mechanism, by name, with its capabilities and options."""
    return {
        name: AttentionInfo(
            name, cls, cls.capabilities, cls.options(), tuple(a for a, k in _ALIASES.items() if k == name)
        )
        for name, cls in sorted(_REGISTRY.items())
    }


def capability_table() -> str:
    """Markdown table: mechanisms x patterns x incremental decoding x backends."""
    cols = [p.value for p in Pattern]
    head = "| name | class | " + " | ".join(cols) + " | incremental decoding | backends |"
    rows = [head, "|" + "---|" * (len(cols) + 4)]
    for name, info in available_attentions().items():
        caps = info.capabilities
        marks = ["yes" if caps.supports(p) else "-" for p in Pattern]
        inc = ("yes, constant state" if caps.constant_state else "yes") if caps.incremental else "-"
        rows.append(
            f"| `{name}` | `{info.cls.__name__}` | " + " | ".join(marks) + f" | {inc} | {', '.join(caps.backends)} |"
        )
    return "\n".join(rows)
