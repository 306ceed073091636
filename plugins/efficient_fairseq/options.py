"""Mechanism choice and mechanism options, derived from the registry.

Nothing here lists mechanisms or options by hand: the command-line flags and
dataclass fields come from ``efficient_attention.available_attentions()`` and
each class's option spec (``options()``, :mod:`efficient_attention.options`:
type, default, rule and help of every option) when the plugin is imported.

Namespacing
-----------
Options of different mechanisms may share a name (``wsize``, ``num_landmarks``
...) with different defaults, so an option is exposed once per name and per
*role*, never with a default of its own:

* ``--attn-<option>`` (field ``attn_<option>``) applies to every attention role
  of the model whose mechanism has that option;
* an option name that means different things for different mechanisms
  (``num_landmarks``, ``window_size``, ``block_size``, ``autopad``: declared
  with different help texts or types) also gets one flag per mechanism,
  ``--attn-<mechanism>-<option>`` (field ``attn_<mechanism>_<option>``), which
  overrides ``--attn-<option>`` for the roles built with that mechanism.  The
  plain ``--attn-<option>`` keeps working while it is unambiguous: it is an
  error when two roles of the model use mechanisms that give the name
  different meanings;
* the translation model also has ``--encoder-attn-<option>``,
  ``--decoder-attn-<option>`` and ``--cross-attn-<option>``, which override
  both for one role.

Every such flag defaults to ``None`` = "the mechanism's own default" (listed in
``--help`` per mechanism).  A flag set for a role whose mechanism does not have
that option is an error, never ignored.  Values are converted by the option's
spec (:meth:`efficient_attention.options.Option.convert`: ``int``, ``float``,
``bool`` as true/false, ``str``, choices, comma-separated lists for tuple
options): no ``eval`` of strings anywhere.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from efficient_attention import Pattern, UnsupportedPatternError, available_attentions, get_attention_class
from efficient_attention.options import Option, did_you_mean

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
    "ambiguous_options",
    "convert_value",
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
def _from_text(spec: Option) -> bool:
    """Whether a command line can write the option (scalars, choices, sequences of scalars)."""
    return spec.base_type in (bool, int, float, str) or spec.choices is not None or spec.element_type is not None


def convert_value(spec_type, value, flag: str, mechanism: str, spec: Optional[Option] = None):
    """``value`` (from argparse or YAML) as the mechanism option's type (``spec``, or an annotation)."""
    spec = Option(flag, None, spec_type, flag) if spec is None else spec
    if not _from_text(spec):
        raise ValueError(
            f"{flag}: option type {spec.type!r} of {mechanism} cannot be set from fairseq "
            "(supported: int, float, bool, str, choices, tuples/lists of int/float/str)"
        )
    try:
        return spec.convert(value)
    except (TypeError, ValueError) as err:
        raise user_error(ValueError(f"{flag}: invalid value for option of {mechanism}: {err}")) from None


# ---------------------------------------------------------- option fields
@dataclass(frozen=True)
class OptionField:
    """One flag: ``--<prefix>-<option>`` (the union of that option over all mechanisms) or, with ``mechanism``,
    ``--<prefix>-<mechanism>-<option>`` (that mechanism's option only)."""

    option: str
    prefix: str  # "attn", "encoder_attn", ...
    field_type: Any  # Optional[int] / Optional[float] / Optional[bool] / Optional[str]
    parse: Callable[[str], Any]
    choices: Optional[Tuple[str, ...]]
    help: str
    mechanism: Optional[str] = None

    @property
    def dest(self) -> str:
        return f"{self.prefix}_{self.mechanism}_{self.option}" if self.mechanism else f"{self.prefix}_{self.option}"

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


def meaning(spec: Option) -> Tuple[Any, ...]:
    """Options of two mechanisms with the same name mean the same thing when type, choices and help agree."""
    return spec.help, str(spec.type), spec.choices


def _owners(infos: Optional[Mapping] = None) -> Dict[str, List[Tuple[str, Option]]]:
    infos = available_attentions() if infos is None else infos
    owners: Dict[str, List[Tuple[str, Option]]] = {}
    for name, info in infos.items():
        for opt, spec in info.options.items():
            owners.setdefault(opt, []).append((name, spec))
    return owners


def ambiguous_options(infos: Optional[Mapping] = None) -> Dict[str, List[Tuple[str, Option]]]:
    """Option names that mechanisms declare with different meanings, with every ``(mechanism, spec)``."""
    return {opt: own for opt, own in _owners(infos).items() if len({meaning(spec) for _, spec in own}) > 1}


def _union_field(specs: List[Option]) -> Tuple[Any, Callable, Optional[Tuple[str, ...]]]:
    first = specs[0]
    if (
        all(
            (s.base_type, s.choices, s.element_type) == (first.base_type, first.choices, first.element_type)
            for s in specs
        )
        and first.element_type is None
    ):
        if first.choices is not None and all(isinstance(c, str) for c in first.choices):
            return Optional[str], str, first.choices
        if first.choices is None and first.base_type in (bool, int, float, str):
            return Optional[first.base_type], first.convert, None
    # differing types across mechanisms, sequences, ...: a string, converted per mechanism at build time
    return Optional[str], str, None


def _field(opt: str, prefix: str, specs: List[Option], text: str, mechanism: Optional[str] = None) -> OptionField:
    ftype, parse, choices = _union_field(specs)
    label = getattr(typing.get_args(ftype)[0], "__name__", "str")
    return OptionField(opt, prefix, ftype, _argparse_type(parse, label), choices, text, mechanism)


def option_fields(
    prefix: str = "attn", infos: Optional[Mapping] = None, scope: str = "", per_mechanism: bool = False
) -> List[OptionField]:
    """One :class:`OptionField` per option name over every registered mechanism.

    ``per_mechanism``: also one field per mechanism for each name that mechanisms give different
    meanings (:func:`ambiguous_options`), ``<prefix>_<mechanism>_<option>``.
    """
    owners = _owners(infos)
    ambiguous = ambiguous_options(infos)
    fields_: List[OptionField] = []
    for opt in sorted(owners):
        helps = sorted({spec.help for _, spec in owners[opt]})
        per_mech = ", ".join(f"{name}={spec.default!r}" for name, spec in owners[opt])
        note = ""
        if opt in ambiguous:
            flag = f"--{prefix}-<mechanism>-{opt}".replace("_", "-")
            note = f"; the mechanisms give it different meanings: {flag} sets one mechanism's"
        text = (
            f"{scope}{' / '.join(helps)} (option {opt!r} of: {per_mech}; "
            f"default None = each mechanism's own default{note})"
        )
        fields_.append(_field(opt, prefix, [spec for _, spec in owners[opt]], text))
    if per_mechanism:
        for opt in sorted(ambiguous):
            shared = f"--{prefix}-{opt}".replace("_", "-")
            for name, spec in ambiguous[opt]:
                text = (
                    f"{name} only: {spec.help} ({spec.describe()}; {name}'s default {spec.default!r}; "
                    f"overrides {shared})"
                )
                fields_.append(_field(opt, prefix, [spec], text, mechanism=name))
    dests: Dict[str, OptionField] = {}
    for f in fields_:
        if f.dest in dests:
            raise ValueError(
                f"option flag {f.flag} is both option {dests[f.dest].option!r} and {f.option!r} of "
                f"{f.mechanism}: rename one of them"
            )
        dests[f.dest] = f
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
            role.flag,
            type=parse_attention_name,
            metavar="NAME",
            default=argparse.SUPPRESS,
            help=f"attention mechanism of the {role.description} (default: vanilla; registered: {names}; "
            f"supporting {role.pattern}: {', '.join(mechanisms_supporting(role.pattern))})",
        )
    for i, (prefix, scope) in enumerate(option_prefixes):
        for f in option_fields(prefix, scope=scope, per_mechanism=i == 0):
            parser.add_argument(f.flag, type=f.parse, choices=f.choices, metavar=f.dest.upper(), help=f.help)


def dataclass_fields(roles: Iterable[str], option_prefixes: Iterable[Tuple[str, str]]) -> List[Tuple[str, Any, Any]]:
    """``(name, type, field)`` triples for :func:`dataclasses.make_dataclass` (fairseq-hydra-train)."""
    out = []
    for key in roles:
        role = ROLES[key]
        out.append(
            (
                f"{key}_attention",
                str,
                field(
                    default="vanilla",
                    metadata={"help": f"attention mechanism of the {role.description} (a registered name)"},
                ),
            )
        )
    for i, (prefix, scope) in enumerate(option_prefixes):
        for f in option_fields(prefix, scope=scope, per_mechanism=i == 0):
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
        raise user_error(
            UnsupportedPatternError(
                f"{role.flag} {name}: {cls.__name__} cannot be used for the {role.description}, which needs "
                f"{role.pattern} attention; {name} supports: {', '.join(cls.capabilities.pattern_names())}. "
                f"Mechanisms supporting {role.pattern}: {', '.join(mechanisms_supporting(role.pattern))}"
            )
        )
    specs = cls.options()
    options: Dict[str, Any] = {}
    own = {opt for opt, own in ambiguous_options().items() if any(n == name for n, _ in own)}
    for i, prefix in enumerate(option_prefixes):  # later prefixes override earlier ones
        for opt, spec in specs.items():
            dests = [f"{prefix}_{opt}"] + ([f"{prefix}_{name}_{opt}"] if i == 0 and opt in own else [])
            for dest in dests:  # the per-mechanism flag overrides the shared one
                value = _get(cfg, dest)
                if value is not None:
                    options[opt] = convert_value(spec.type, value, "--" + dest.replace("_", "-"), name, spec)
    return RoleChoice(role, name, options)


def _flag_hint(opt: str, options: Sequence[str], prefix: str) -> str:
    """`` (did you mean --attn-window?)`` for the closest option flag of the chosen mechanisms."""
    return did_you_mean(opt, options, prefix=f"--{prefix}_").replace("_", "-")


def check_option_flags(
    cfg, choices: Mapping[str, RoleChoice], shared_prefix: str, role_prefixes: Mapping[str, str]
) -> None:
    """Reject option flags that no chosen mechanism has (a set flag is never silently ignored)."""
    known = {f.option for f in option_fields(shared_prefix)}
    for opt in sorted(known):
        if _get(cfg, f"{shared_prefix}_{opt}") is None:
            continue
        if not any(opt in c.cls.options() for c in choices.values()):
            used = ", ".join(f"{c.role.description}={c.name}" for c in choices.values())
            theirs = sorted({o for c in choices.values() for o in c.cls.options()})
            raise user_error(
                ValueError(
                    f"--{shared_prefix.replace('_', '-')}-{opt.replace('_', '-')} is set but no attention of this "
                    f"model has option {opt!r} ({used})" + _flag_hint(opt, theirs, shared_prefix)
                )
            )
        having = {c.name: c.cls.options()[opt] for c in choices.values() if opt in c.cls.options()}
        if len({meaning(spec) for spec in having.values()}) > 1:
            uses = "; ".join(f"{name}: {spec.help!r}" for name, spec in having.items())
            instead = ", ".join(f"--{shared_prefix}-{name}-{opt}".replace("_", "-") for name in having)
            raise user_error(
                ValueError(
                    f"--{shared_prefix}-{opt}".replace("_", "-") + " is ambiguous in this model: its mechanisms give "
                    f"option {opt!r} different meanings ({uses}); set {instead}"
                    + (" or the per-role flags" if role_prefixes else "")
                    + " instead"
                )
            )
    chosen = {c.name for c in choices.values()}
    for opt, own in sorted(ambiguous_options().items()):
        for name, _ in own:
            dest = f"{shared_prefix}_{name}_{opt}"
            if _get(cfg, dest) is not None and name not in chosen:
                used = ", ".join(f"{c.role.description}={c.name}" for c in choices.values())
                raise user_error(
                    ValueError(
                        "--" + dest.replace("_", "-") + f" is set but no attention of this model is {name} ({used})"
                    )
                )
    for key, prefix in role_prefixes.items():
        choice = choices[key]
        for opt in sorted(known):
            if _get(cfg, f"{prefix}_{opt}") is not None and opt not in choice.cls.options():
                raise user_error(
                    ValueError(
                        f"--{prefix.replace('_', '-')}-{opt.replace('_', '-')} is set but {choice.name} "
                        f"({choice.role.description}) has no option {opt!r}"
                        + _flag_hint(opt, list(choice.cls.options()), prefix)
                        + f"; its options: {', '.join(choice.cls.options()) or 'none'}"
                    )
                )
