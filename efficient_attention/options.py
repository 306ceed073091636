"""Typed mechanism options: each option's type, default, bounds and help, declared once.

A mechanism declares its options as a frozen dataclass deriving from :class:`AttentionOptions`
(the model is fairseq's dataclass configs), one field per option, written with the field helpers
below; the annotation is the type, the helper gives the default, the help text and the bounds::

    @dataclass(frozen=True)
    class PerformerOptions(AttentionOptions):
        approx_attn_dim: int = positive_int(16, "number of random features m")
        orthogonal_features: bool = option(True, "draw the random features in orthogonal blocks")
        feature_redraw_interval: int = nonnegative_int(1000, "redraw the features every this many forwards")

    @register_attention("performer")
    class Performer(EfficientAttention):
        Options = PerformerOptions

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)  # checks the options, sets self.approx_attn_dim, ...

Everything that configures mechanisms reads these declarations through :class:`Option`:
the constructor (:meth:`Option.validate`: ``ValueError`` naming the argument and the value,
``TypeError`` for a bool option given anything but a bool, ``TypeError`` with a did-you-mean
for an unknown option), ``python -m efficient_attention options``, the fairseq flags and hydra
fields, the ParaGen spec and the benchmark's ``--option`` (:meth:`Option.convert`: text from a
command line or a config file to the option's type).  Checks that involve several options or
the pattern (``look_forward`` must be 0 when causal, ...) stay in the mechanism's constructor.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

from .errors import did_you_mean

__all__ = [
    "Option",
    "AttentionOptions",
    "option",
    "positive_int",
    "nonnegative_int",
    "choice",
    "option_specs",
    "check_bool",
    "check_int",
    "did_you_mean",
]

_OPTION_KEY = "efficient_attention.option"
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def check_bool(value, name: str) -> bool:
    """``value`` as a bool: ``True`` / ``False`` (or the ints ``0`` / ``1``); anything else is a ``TypeError``.

    ``bool("false")`` is True: a string reaching a boolean option (from a config
    file or a command line) must be an error, never a silent True.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise TypeError(f"{name} must be a bool (True/False), got {value!r} ({type(value).__name__})")


def _int_words(minimum: Optional[int], odd: bool = False) -> str:
    kind = "odd integer" if odd else "integer"
    if minimum == 1:
        return f"a positive {kind}"
    if minimum == 0:
        return f"a non-negative {kind}"
    return f"an {kind}" if minimum is None else f"an {kind} >= {minimum}"


def check_int(value, name: str, minimum: Optional[int] = None) -> int:
    """``value`` if it is an int (not a bool) ``>= minimum``; otherwise ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        raise ValueError(f"{name} must be {_int_words(minimum)}, got {value!r}")
    return value


# ------------------------------------------------------------------ types
def _unwrap_optional(tp) -> Tuple[Any, bool]:
    """``(X, True)`` for ``Optional[X]``, else ``(tp, False)``."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _sequence_element(tp) -> Optional[type]:
    """``int`` for ``Tuple[int, ...]`` / ``List[int]`` / ``Sequence[int]`` (also float, str); else None."""
    origin = typing.get_origin(tp)
    if origin not in (tuple, list, collections.abc.Sequence):
        return None
    elems = [a for a in typing.get_args(tp) if a is not Ellipsis]
    if elems and all(e == elems[0] for e in elems) and elems[0] in (int, float, str):
        return elems[0]
    return None


def _convert_scalar(tp, value):
    """Text (or a YAML / argparse value) as ``tp``; ``ValueError`` when it is not one."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        low = str(value).strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"expected an integer, got {value!r}")
        return int(value.strip()) if isinstance(value, str) else int(value)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        return float(value)
    return str(value)


# ----------------------------------------------------------------- option
@dataclass(frozen=True)
class Option:
    """One mechanism option: name, default, type (an annotation), help, and the rule its values follow.

    ``minimum`` / ``maximum`` bound ints and floats (each element of a sequence option); ``odd``
    asks for odd ints; ``choices`` lists the allowed values; ``check(value, name) -> value``
    replaces the type-based check for a type the helpers do not cover (it must raise
    ``ValueError`` / ``TypeError`` naming ``name``) and ``words`` then says what it accepts.
    Options declared the old way (a keyword-only constructor argument and an ``option_help``
    entry) have no rule here: their constructor checks them.
    """

    name: str
    default: Any
    type: Any
    help: str
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    odd: bool = False
    choices: Optional[Tuple[Any, ...]] = None
    check: Optional[Callable[[Any, str], Any]] = None
    words: Optional[str] = None

    def __post_init__(self):
        literal = self.base_type
        if self.choices is None and typing.get_origin(literal) is typing.Literal:
            object.__setattr__(self, "choices", tuple(typing.get_args(literal)))

    @property
    def optional(self) -> bool:
        """None is allowed (``Optional[...]``)."""
        return _unwrap_optional(self.type)[1]

    @property
    def base_type(self):
        """The type without ``Optional``."""
        return _unwrap_optional(self.type)[0]

    @property
    def element_type(self) -> Optional[type]:
        """``int`` for a ``Tuple[int, ...]`` option (also float, str); ``None`` for a scalar option."""
        return _sequence_element(self.base_type)

    def describe(self) -> str:
        """The rule in words: ``"a positive integer"``, ``"one of 'relu', 'elu'"``, ``"a bool"`` ..."""
        tp, elem = self.base_type, self.element_type
        if self.words is not None:
            text = self.words
        elif self.choices is not None:
            text = "one of " + ", ".join(map(repr, self.choices))
        elif tp is bool:
            text = "a bool (True/False)"
        elif elem is not None:
            inner = self._scalar_words(elem).split(" ", 1)[1]
            text = f"a sequence of {inner}s (or a comma-separated string)"
        elif tp in (int, float, str):
            text = self._scalar_words(tp)
        else:
            text = f"a {getattr(tp, '__name__', None) or str(tp).replace('typing.', '')}"
        return text + (" or None" if self.optional else "")

    def _scalar_words(self, tp) -> str:
        if tp is int and self.maximum is None:
            return _int_words(None if self.minimum is None else int(self.minimum), self.odd)
        if tp in (int, float):
            noun = "integer" if tp is int else "number"
            lo = "" if self.minimum is None else f" >= {self.minimum}"
            hi = "" if self.maximum is None else f" <= {self.maximum}"
            return f"a {noun}{lo}{' and' if lo and hi else ''}{hi}"
        return "a string"

    # ---------------------------------------------------------- checking
    def _scalar_ok(self, tp, value) -> bool:
        if tp is int:
            ok = not isinstance(value, bool) and isinstance(value, int) and (not self.odd or value % 2 == 1)
        elif tp is float:
            ok = not isinstance(value, bool) and isinstance(value, (int, float))
        elif tp is str:
            ok = isinstance(value, str)
        else:
            return True
        if ok and tp in (int, float):
            ok = (self.minimum is None or value >= self.minimum) and (self.maximum is None or value <= self.maximum)
        return ok

    def validate(self, value, name: Optional[str] = None):
        """``value`` checked against the rule (and normalised: a sequence becomes a tuple, a float a float).

        ``ValueError`` naming the argument and the value when it breaks the rule; ``TypeError``
        for a bool option given anything but a bool (or ``0`` / ``1``).
        """
        name = name or self.name
        if self.check is not None:
            return self.check(value, name)
        tp, elem = self.base_type, self.element_type
        if value is None and self.optional:
            return None
        if tp is bool:
            return check_bool(value, name)
        bad = ValueError(f"{name} must be {self.describe()}, got {value!r}")
        if elem is not None:
            items = self._as_sequence(value, elem, bad)
            if not all(self._scalar_ok(elem, x) for x in items):
                raise bad
            return tuple(float(x) if elem is float else x for x in items)
        if self.choices is not None and value not in self.choices:
            raise bad
        if not self._scalar_ok(tp, value):
            raise bad
        return float(value) if tp is float else value

    @staticmethod
    def _as_sequence(value, elem, bad: ValueError) -> tuple:
        if isinstance(value, str):  # "8,16" or "(8, 16)", as the command lines write it
            try:
                return tuple(_convert_scalar(elem, x) for x in value.replace(" ", "").strip("()[]").split(",") if x)
            except ValueError:
                raise bad from None
        if isinstance(value, int) and not isinstance(value, bool) and elem is not str:
            return (value,)
        if isinstance(value, (str, bytes)) or not isinstance(value, collections.abc.Iterable):
            raise bad
        return tuple(value)

    def convert(self, value):
        """A value from a command line or a config file (text, or YAML's plain types) as the option's type.

        ``"none"`` / ``"null"`` is None for an optional option; bools are true/false, yes/no,
        on/off, 1/0; sequences are comma-separated.  ``ValueError`` when the text is not of the
        type; the value is not checked against the bounds (:meth:`validate` does that).
        """
        if value is None or (isinstance(value, str) and self.optional and value.strip().lower() in ("none", "null")):
            if self.optional:
                return None
            raise ValueError(f"expected {self.describe()}, got None")
        tp, elem = self.base_type, self.element_type
        if elem is not None:
            items = (
                value.replace(" ", "").strip("()[]").split(",")
                if isinstance(value, str)
                else (value if isinstance(value, collections.abc.Iterable) else [value])
            )
            return tuple(_convert_scalar(elem, x) for x in items if str(x).strip() != "")
        if not isinstance(value, (str, int, float)):
            return value  # not text (e.g. a layout tensor given in Python): the constructor checks it
        if self.choices is not None:
            for c in self.choices:
                if value == c or str(value) == str(c):
                    return c
            raise ValueError(f"expected one of {', '.join(map(repr, self.choices))}, got {value!r}")
        if tp in (bool, int, float, str):
            return _convert_scalar(tp, value)
        return value  # a type the command line cannot write (e.g. a tensor): the constructor checks it


class AttentionOptions:
    """Base of every mechanism's options dataclass (the base mechanism has none).

    Declare a subclass with ``@dataclass(frozen=True)`` and fields written with :func:`option`,
    :func:`positive_int`, :func:`nonnegative_int` or :func:`choice`.  Building one checks every
    field (``PerformerOptions(approx_attn_dim=0)`` raises), so a configuration can be checked
    without building the module.
    """

    def __post_init__(self):
        for name, spec in option_specs(type(self)).items():
            object.__setattr__(self, name, spec.validate(getattr(self, name)))


def option(
    default,
    help: str,
    *,
    minimum=None,
    maximum=None,
    odd: bool = False,
    choices: Optional[Iterable] = None,
    check: Optional[Callable[[Any, str], Any]] = None,
    words: Optional[str] = None,
):
    """A dataclass field declaring one option; its annotation gives the type (see :class:`Option`)."""
    if not isinstance(help, str) or not help.strip():
        raise TypeError("an option needs a help text")
    rule = dict(
        help=help,
        minimum=minimum,
        maximum=maximum,
        odd=odd,
        choices=None if choices is None else tuple(choices),
        check=check,
        words=words,
    )
    return dataclasses.field(default=default, metadata={_OPTION_KEY: rule})


def positive_int(default, help: str, **rule):
    """An int option ``>= 1`` (annotate ``int``, or ``Optional[int]`` to allow None)."""
    return option(default, help, minimum=1, **rule)


def nonnegative_int(default, help: str, **rule):
    """An int option ``>= 0``."""
    return option(default, help, minimum=0, **rule)


def choice(default, choices: Iterable, help: str):
    """An option whose value is one of ``choices``."""
    return option(default, help, choices=choices)


_SPECS: Dict[type, Dict[str, Option]] = {}


def option_specs(options_cls: type) -> Dict[str, Option]:
    """The :class:`Option` of each field of an options dataclass, in declaration order (checked once).

    ``TypeError`` when a field is not declared with :func:`option` (it would have no help) or
    has no default, or when a default breaks its own rule.
    """
    if options_cls in _SPECS:
        return _SPECS[options_cls]
    if options_cls is AttentionOptions:
        return {}
    if not (
        isinstance(options_cls, type)
        and issubclass(options_cls, AttentionOptions)
        and dataclasses.is_dataclass(options_cls)
    ):
        raise TypeError(
            f"{getattr(options_cls, '__name__', options_cls)} must be an AttentionOptions subclass "
            "declared with @dataclass(frozen=True), one field per option"
        )
    hints = typing.get_type_hints(options_cls)
    specs: Dict[str, Option] = {}
    for f in dataclasses.fields(options_cls):
        rule = f.metadata.get(_OPTION_KEY)
        if rule is None:
            raise TypeError(f"{options_cls.__name__}.{f.name} must be declared with option(default, help, ...)")
        if f.default is dataclasses.MISSING:
            raise TypeError(f"{options_cls.__name__}.{f.name} needs a default")
        spec = Option(f.name, f.default, hints[f.name], **rule)
        try:
            spec.validate(f.default)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{options_cls.__name__}.{f.name}: the default breaks the option's rule: {err}") from None
        specs[f.name] = spec
    _SPECS[options_cls] = specs
    return specs
