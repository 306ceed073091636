"""Mechanism choice and mechanism options, derived from the registry.

Nothing here lists mechanisms or options by hand: the command-line flags and
dataclass fields come from ``efficient_attention.available_attentions()`` and
each class's ``options()`` when the plugin is imported.

Namespacing
-----------
Options of different mechanisms may share a name (``wsize``, ``num_landmarks``
...) with different defaults, so an option is exposed once per name and per
*role*, never with a default of its own:

* ``--attn-<option>`` (field ``attn_<option>``) applies to every attention role
  of the model whose mechanism has that option;
* the translation model also has ``--encoder-attn-<option>``,
  ``--decoder-attn-<option>`` and ``--cross-attn-<option>``, which override
  ``--attn-<option>`` for one role.

Every such flag defaults to ``None`` = "the mechanism's own default" (listed in
``--help`` per mechanism).  A flag set for a role whose mechanism does not have
that option is an error, never ignored.  Values are parsed with the option's
annotated type (``int``, ``float``, ``bool`` as true/false, ``str``, a
``Literal`` choice, comma-separated lists for tuple/list options): no
``eval`` of strings anywhere.
"""
from __future__ import annotations

import argparse
import collections.abc
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from efficient_attention import Pattern, UnsupportedPatternError, available_attentions, get_attention_class
from efficient_attention.registry import did_you_mean

__all__ = [
    "ROLES",
    "Role",
    "OptionField",
    "RoleChoice",
    "option_fields",
    "add_attention_args",
    "dataclass_fields",
    "resolve_role",
    "check_option_flags",
    "mechanisms_supporting",
    "parse_attention_name",
    "user_error",
    "install_user_error_hook",
]

_USER_ERROR = "_efficient_fairseq_user_error"


def user_error(exc: BaseException) -> BaseException:
    """Mark ``exc`` as a configuration mistake: fairseq's programs then print it as one line, no traceback."""
    setattr(exc, _USER_ERROR, True)
    return exc


def install_user_error_hook() -> None:
    """Print marked configuration errors as ``<program>: error: <message>`` (``EA_TRACEBACK=1``: full traceback)."""
    previous = sys.excepthook
    if getattr(previous, _USER_ERROR, False):
        return

    def hook(exc_type, exc, tb):
        if getattr(exc, _USER_ERROR, False) and os.environ.get("EA_TRACEBACK", "0") in ("", "0"):
            prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "fairseq"
            sys.stderr.write(f"{prog}: error: {exc}\n(EA_TRACEBACK=1 shows the traceback)\n")
            return
        previous(exc_type, exc, tb)

    setattr(hook, _USER_ERROR, True)
    sys.excepthook = hook


_BOOL_TRUE = {"true", "1", "yes", "on"}
_BOOL_FALSE = {"false", "0", "no", "off"}


@dataclass(frozen=True)
class Role:
    """One attention role of a model and the pattern its modules are built for."""

    key: str  # field prefix: "encoder", "decoder", "cross"
    flag: str  # the flag choosing the mechanism
    description: str
    pattern: Pattern


ROLES: Dict[str, Role] = {
    "encoder": Role("encoder", "--encoder-attention", "encoder self-attention", Pattern.NONCAUSAL_SELF),
    "decoder": Role("decoder", "--decoder-attention", "decoder self-attention", Pattern.CAUSAL_SELF),
    "cross": Role("cross", "--cross-attention", "encoder-decoder (cross) attention", Pattern.NONCAUSAL_CROSS),
}


# ----------------------------------------------------------------- types
def _unwrap_optional(tp):
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _kind(tp) -> Tuple[str, Any]:
    """Classify an option type: ("scalar", int|float|bool|str), ("choice", values), ("list", elem) or ("other", tp)."""
    tp = _unwrap_optional(tp)
    if tp in (int, float, bool, str):
        return "scalar", tp
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "choice", tuple(typing.get_args(tp))
    if origin in (tuple, list, collections.abc.Sequence) or tp in (tuple, list):
        elems = [a for a in typing.get_args(tp) if a is not Ellipsis]
        elem = elems[0] if elems and all(e == elems[0] for e in elems) and elems[0] in (int, float, str) else None
        if elem is not None:
            return "list", elem
    return "other", tp


def _parse_bool(text) -> bool:
    if isinstance(text, bool):
        return text
    low = str(text).strip().lower()
    if low in _BOOL_TRUE:
        return True
    if low in _BOOL_FALSE:
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def _parse_scalar(tp, value):
    if tp is bool:
        return _parse_bool(value)
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"expected an integer, got {value!r}")
        return int(value) if not isinstance(value, str) else int(value.strip())
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        return float(value)
    return str(value)


def convert_value(spec_type, value, flag: str, mechanism: str):
    """``value`` (from argparse or YAML) as the mechanism option's annotated type."""
    kind, arg = _kind(spec_type)
    try:
        if isinstance(value, str) and value.strip().lower() in ("none", "null") and _unwrap_optional(spec_type) is not spec_type:
            return None
        if kind == "scalar":
            return _parse_scalar(arg, value)
        if kind == "choice":
            for choice in arg:
                if value == choice or str(value) == str(choice):
                    return choice
            raise ValueError(f"expected one of {', '.join(map(repr, arg))}, got {value!r}")
        if kind == "list":
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(_parse_scalar(arg, x) for x in items if str(x).strip() != "")
    except (TypeError, ValueError) as err:
        raise user_error(ValueError(f"{flag}: invalid value for option of {mechanism}: {err}")) from None
    raise ValueError(
        f"{flag}: option type {spec_type!r} of {mechanism} cannot be set from fairseq "
        "(supported: int, float, bool, str, Literal, tuples/lists of int/float/str)"
    )


# ---------------------------------------------------------- option fields
@dataclass(frozen=True)
class OptionField:
    """One ``--<prefix>-<option>`` flag: the union of that option over all mechanisms."""

    option: str
    prefix: str  # "attn", "encoder_attn", ...
    field_type: Any  # Optional[int] / Optional[float] / Optional[bool] / Optional[str]
    parse: Callable[[str], Any]
    choices: Optional[Tuple[str, ...]]
    help: str

    @property
    def dest(self) -> str:
        return f"{self.prefix}_{self.option}"

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")


def _argparse_type(parse, label):
    def convert(text):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"invalid {label} value {text!r}: {err}") from None

    convert.__name__ = label
    return convert


def _union_field(option: str, owners: List[Tuple[str, Any]]) -> Tuple[Any, Callable, Optional[Tuple[str, ...]]]:
    kinds = [_kind(spec.type) for _, spec in owners]
    if all(k == kinds[0] for k in kinds):
        kind, arg = kinds[0]
        if kind == "scalar":
            return Optional[arg], (lambda v, tp=arg: _parse_scalar(tp, v)), None
        if kind == "choice" and all(isinstance(c, str) for c in arg):
            return Optional[str], str, tuple(arg)
    # differing types across mechanisms, lists, ...: a string, converted per mechanism at build time
    return Optional[str], str, None


def option_fields(prefix: str = "attn", infos: Optional[Mapping] = None, scope: str = "") -> List[OptionField]:
    """One :class:`OptionField` per option name over every registered mechanism."""
    infos = available_attentions() if infos is None else infos
    owners: Dict[str, List[Tuple[str, Any]]] = {}
    for name, info in infos.items():
        for opt, spec in info.options.items():
            owners.setdefault(opt, []).append((name, spec))
    fields_: List[OptionField] = []
    for opt in sorted(owners):
        ftype, parse, choices = _union_field(opt, owners[opt])
        helps = sorted({spec.help for _, spec in owners[opt]})
        per_mech = ", ".join(f"{name}={spec.default!r}" for name, spec in owners[opt])
        text = (
            f"{scope}{' / '.join(helps)} (option {opt!r} of: {per_mech}; "
            "default None = each mechanism's own default)"
        )
        label = getattr(_unwrap_optional(ftype), "__name__", "str")
        fields_.append(OptionField(opt, prefix, ftype, _argparse_type(parse, label), choices, text))
    return fields_


def parse_attention_name(text: str) -> str:
    """argparse type of ``--*-attention``: a registered name or alias (listing them otherwise)."""
    try:
        return get_attention_class(text).attention_name
    except KeyError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def mechanisms_supporting(pattern: Pattern) -> List[str]:
    return [n for n, info in available_attentions().items() if info.capabilities.supports(pattern)]


def add_attention_args(parser, roles: Iterable[str], option_prefixes: Iterable[Tuple[str, str]]) -> None:
    """Add ``--<role>-attention`` and the option flags to an argparse parser (no defaults: archs set them)."""
    names = ", ".join(sorted(available_attentions()))
    for key in roles:
        role = ROLES[key]
        parser.add_argument(  # no default at all: arch presets set it, then the config's "vanilla"
            role.flag, type=parse_attention_name, metavar="NAME", default=argparse.SUPPRESS,
            help=f"attention mechanism of the {role.description} (default: vanilla; registered: {names}; "
            f"supporting {role.pattern}: {', '.join(mechanisms_supporting(role.pattern))})",
        )
    for prefix, scope in option_prefixes:
        for f in option_fields(prefix, scope=scope):
            parser.add_argument(f.flag, type=f.parse, choices=f.choices, metavar=f.dest.upper(), help=f.help)


def dataclass_fields(roles: Iterable[str], option_prefixes: Iterable[Tuple[str, str]]) -> List[Tuple[str, Any, Any]]:
    """``(name, type, field)`` triples for :func:`dataclasses.make_dataclass` (fairseq-hydra-train)."""
    out = []
    for key in roles:
        role = ROLES[key]
        out.append((
            f"{key}_attention", str,
            field(default="vanilla", metadata={"help": f"attention mechanism of the {role.description} (a registered name)"}),
        ))
    for prefix, scope in option_prefixes:
        for f in option_fields(prefix, scope=scope):
            out.append((f.dest, f.field_type, field(default=None, metadata={"help": f.help})))
    return out


# -------------------------------------------------------------- resolving
@dataclass(frozen=True)
class RoleChoice:
    """What one role of a model is built with: mechanism, pattern and converted options."""

    role: Role
    name: str
    options: Dict[str, Any]

    @property
    def cls(self):
        return get_attention_class(self.name)

    @property
    def capabilities(self):
        return self.cls.capabilities

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in sorted(self.options.items()))
        return f"{self.role.description}: {self.name}" + (f" ({opts})" if opts else "")


def _get(cfg, key: str):
    try:
        return getattr(cfg, key, None)
    except Exception:  # omegaconf raises for missing keys in struct mode
        return None


def resolve_role(cfg, key: str, option_prefixes: Sequence[str]) -> RoleChoice:
    """The mechanism and options of role ``key`` from ``cfg`` (later prefixes override earlier ones).

    Raises ``ValueError`` (unknown name, bad option value) or
    :class:`UnsupportedPatternError` (the mechanism cannot do the role's pattern).
    """
    role = ROLES[key]
    raw = _get(cfg, f"{key}_attention") or "vanilla"
    try:
        cls = get_attention_class(str(raw))
    except KeyError as err:
        raise user_error(ValueError(f"{role.flag}: {err}")) from None
    name = cls.attention_name
    if not cls.capabilities.supports(role.pattern):
        raise user_error(UnsupportedPatternError(
            f"{role.flag} {name}: {cls.__name__} cannot be used for the {role.description}, which needs "
            f"{role.pattern} attention; {name} supports: {', '.join(cls.capabilities.pattern_names())}. "
            f"Mechanisms supporting {role.pattern}: {', '.join(mechanisms_supporting(role.pattern))}"
        ))
    specs = cls.options()
    options: Dict[str, Any] = {}
    for prefix in option_prefixes:
        for opt, spec in specs.items():
            value = _get(cfg, f"{prefix}_{opt}")
            if value is not None:
                flag = "--" + f"{prefix}_{opt}".replace("_", "-")
                options[opt] = convert_value(spec.type, value, flag, name)
    return RoleChoice(role, name, options)


def _flag_hint(opt: str, options: Sequence[str], prefix: str) -> str:
    """`` (did you mean --attn-window?)`` for the closest option flag of the chosen mechanisms."""
    return did_you_mean(opt, options, prefix=f"--{prefix}_").replace("_", "-")


def check_option_flags(cfg, choices: Mapping[str, RoleChoice], shared_prefix: str, role_prefixes: Mapping[str, str]) -> None:
    """Reject option flags that no chosen mechanism has (a set flag is never silently ignored)."""
    known = {f.option for f in option_fields(shared_prefix)}
    for opt in sorted(known):
        if _get(cfg, f"{shared_prefix}_{opt}") is None:
            continue
        if not any(opt in c.cls.options() for c in choices.values()):
            used = ", ".join(f"{c.role.description}={c.name}" for c in choices.values())
            theirs = sorted({o for c in choices.values() for o in c.cls.options()})
            raise user_error(ValueError(
                f"--{shared_prefix.replace('_', '-')}-{opt.replace('_', '-')} is set but no attention of this "
                f"model has option {opt!r} ({used})" + _flag_hint(opt, theirs, shared_prefix)
            ))
    for key, prefix in role_prefixes.items():
        choice = choices[key]
        for opt in sorted(known):
            if _get(cfg, f"{prefix}_{opt}") is not None and opt not in choice.cls.options():
                raise user_error(ValueError(
                    f"--{prefix.replace('_', '-')}-{opt.replace('_', '-')} is set but {choice.name} "
                    f"({choice.role.description}) has no option {opt!r}"
                    + _flag_hint(opt, list(choice.cls.options()), prefix)
                    + f"; its options: {', '.join(choice.cls.options()) or 'none'}"
                ))
