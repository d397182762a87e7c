"""Options declared once: each stage and each method states its options as a frozen dataclass.

A field declared with `option(...)` carries its default, its help text, its range or
choices and, where the command line spells a value differently (`--select off`), a parser.
From that one declaration come the CLI flags and their `--help` (`rankone.cli.flags`), the
keys of a pipeline YAML file (`rankone.pipeline`) and the Python API: constructing the
dataclass checks every value, so `TiesOptions(top=1.5)`, `--top 1.5` and `top: 1.5` in a
YAML file all fail with the same one-line message, before anything is read or written.

Fields declared without `option(...)` are run-time context (a device, a progress flag):
they are neither flags nor YAML keys.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from rankone.errors import RankoneError

_METADATA_KEY = "rankone.option"


@dataclass(frozen=True)
class Declared:
    """What an option states besides its name, type and default."""

    help: str
    key: str | None = None  # YAML key; default: the field name
    flag: str | None = None  # CLI flag; default: the key, dashed (`batch_size` → `--batch-size`)
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    # Text as typed on the command line → value; None: the flag takes the field's own type.
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None
    # A note appended to range errors ("(or off)").
    note: str = ""
    # A folder the user must already have (a pipeline file is checked for it before anything runs).
    existing_folder: bool = False
    # A list of names that may also be given comma-separated (`--tasks a,b`).
    comma_separated: bool = False
    # Also takes `auto` (AUTO), resolved by the stage that runs (`--lambda auto`).
    auto: bool = False
    # What --help shows as the default when the default depends on another option (None: the default itself).
    shown_default: str | None = None


def option(default: Any = MISSING, help: str = "", *, default_factory: Callable[[], Any] | None = None, **declared: Any) -> Any:
    """A dataclass field that is an option: its default, help text, range, choices or parser."""
    metadata = {_METADATA_KEY: Declared(help=help, **declared)}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


class OptionValue:
    """A value type an option may have besides the plain ones: it parses itself from what a flag
    (repeatable, so a list of strings) or a YAML file (a string, a list or a mapping) gives, and
    says itself back as JSON-ready data, which `plain` also serves for the manifest and the CLI."""

    metavar: str | None = None  # how `--help` shows the value

    @classmethod
    def from_option(cls, value: Any, flag: str) -> "OptionValue":
        raise NotImplementedError

    def plain(self) -> Any:
        raise NotImplementedError

    def folders(self) -> list[Path]:
        """The folders the value names (what `existing_folder` checks)."""
        return []


@dataclass(frozen=True)
class OptionInfo:
    """One declared option of an options class, as the CLI and the YAML reader see it."""

    name: str  # the dataclass field
    key: str  # YAML key
    flag: str  # CLI flag
    type: Any  # the field's resolved type hint
    default: Any  # MISSING when required
    declared: Declared

    @property
    def required(self) -> bool:
        return self.default is MISSING

    def describe_range(self) -> str:
        """`in (0, 1]`, `at least 1`, `greater than 0`, or '' for an unbounded option."""
        d = self.declared
        if d.low is not None and d.high is not None:
            return f"in {'(' if d.low_open else '['}{_number(d.low)}, {_number(d.high)}{')' if d.high_open else ']'}"
        if d.low is not None:
            return f"greater than {_number(d.low)}" if d.low_open else f"at least {_number(d.low)}"
        if d.high is not None:
            return f"less than {_number(d.high)}" if d.high_open else f"at most {_number(d.high)}"
        return ""


def _number(value: float) -> str:
    return f"{value:g}"


def base_type(hint: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = [member for member in typing.get_args(hint) if member is not type(None)]
        return (members[0] if len(members) == 1 else typing.Union[tuple(members)]), len(members) < len(typing.get_args(hint))
    return hint, False


def declared_options(options_class: type) -> list[OptionInfo]:
    """The `option(...)` fields of an options dataclass, in declaration order."""
    hints = typing.get_type_hints(options_class)
    found = []
    for item in fields(options_class):
        declared = item.metadata.get(_METADATA_KEY)
        if declared is None:
            continue
        key = declared.key or item.name
        if item.default is not MISSING:
            default = item.default
        elif item.default_factory is not MISSING:
            default = item.default_factory()
        else:
            default = MISSING
        flag = declared.flag or "--" + key.replace("_", "-")
        found.append(OptionInfo(item.name, key, flag, hints[item.name], default, declared))
    return found


def check_value(info: OptionInfo, value: Any) -> Any:
    """`value` checked against the option's type, range and choices, and coerced (int → float, str → Path).

    The error names the option by its flag, as every entry point (CLI, YAML, Python) reports it.
    """
    base, optional = base_type(info.type)
    if value is None:
        if optional:
            return None
        raise RankoneError(f"{info.flag}: a value is required")
    if info.declared.auto and value == AUTO:
        return AUTO
    if isinstance(value, str) and info.declared.parse is not None and base is not str:
        value = info.declared.parse(value)
        if value is None and optional:
            return None
    value = _coerce(info, base, value)
    if isinstance(value, float) and not math.isfinite(value):
        raise RankoneError(f"{info.flag} {value}: must be a finite number")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and info.describe_range():
        d = info.declared
        below = d.low is not None and (value <= d.low if d.low_open else value < d.low)
        above = d.high is not None and (value >= d.high if d.high_open else value > d.high)
        if below or above:
            raise RankoneError(f"{info.flag} {value}: must be {info.describe_range()}{d.note}")
    if info.declared.choices is not None and value not in info.declared.choices:
        raise RankoneError(f"{info.flag} {value!r}: expected one of {', '.join(info.declared.choices)}")
    return value


def _coerce(info: OptionInfo, base: Any, value: Any) -> Any:
    origin = typing.get_origin(base)
    if base is bool:
        if isinstance(value, bool):
            return value
        raise RankoneError(f"{info.flag} {value!r}: expected true or false")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RankoneError(f"{info.flag} {value!r}: expected a whole number")
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise RankoneError(f"{info.flag} {value!r}: expected a number")
    if base is str:
        if isinstance(value, str):
            return value
        raise RankoneError(f"{info.flag} {value!r}: expected text")
    if isinstance(base, type) and issubclass(base, OptionValue):
        return value if isinstance(value, base) else base.from_option(value, info.flag)
    if base is Path:
        if isinstance(value, (str, Path)) and str(value):
            return Path(value)
        raise RankoneError(f"{info.flag} {value!r}: expected a path")
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
            if info.declared.comma_separated:
                return [name for item in value for name in item.split(",") if name]
            return list(value)
        raise RankoneError(f"{info.flag} {value!r}: expected a list of names")
    if origin is dict:
        if isinstance(value, (list, tuple)):
            value = parse_pairs([str(item) for item in value], info.flag)
        if isinstance(value, Mapping) and all(isinstance(k, str) and isinstance(v, (str, Path)) for k, v in value.items()):
            return {k: str(v) for k, v in value.items()}
        raise RankoneError(f"{info.flag} {value!r}: expected TASK=VALUE pairs")
    return value


def parse_pairs(values: list[str], option: str) -> dict[str, str]:
    """`TASK=VALUE` pairs from a repeated option, in the order given."""
    pairs: dict[str, str] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            raise RankoneError(f"{option} {value!r}: expected TASK=VALUE")
        if name in pairs:
            raise RankoneError(f"{option}: task {name!r} given twice")
        pairs[name] = rest
    return pairs


@dataclass(frozen=True)
class Options:
    """Base of every options dataclass: construction checks (and coerces) every declared option."""

    def __post_init__(self) -> None:
        for info in declared_options(type(self)):
            object.__setattr__(self, info.name, check_value(info, getattr(self, info.name)))

    @classmethod
    def options(cls) -> list[OptionInfo]:
        return declared_options(cls)

    @classmethod
    def from_values(cls, values: Mapping[str, Any], **context: Any):
        """Build from {field name: value}, leaving out None (a flag not given) so the default applies."""
        given = {name: value for name, value in values.items() if value is not None}
        return cls(**given, **context)

    def record(self) -> dict[str, Any]:
        """{YAML key: value} of every declared option, JSON-ready (paths as strings)."""
        return {info.key: _plain(getattr(self, info.name)) for info in declared_options(type(self))}


def _plain(value: Any) -> Any:
    if isinstance(value, OptionValue):
        return value.plain()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


@dataclass(frozen=True)
class NoOptions(Options):
    """For methods and stages that take no options."""


# ---- option fields several classes declare the same way ---------------------------------

DEFAULT_LAMBDA = 0.3
# The workspace every command reads and writes when -w is not given.
DEFAULT_WORKSPACE = Path("rankone-work")
ADAPTATION_LR = 1e-4


AUTO = "auto"


def parse_lambda(text: str) -> float | str:
    """`--lambda` as typed: a number, or `auto`."""
    if text == AUTO:
        return AUTO
    try:
        return float(text)
    except ValueError:
        raise RankoneError(f"--lambda {text!r}: expected a number or {AUTO}") from None


def lambda_option(help: str = "Scale λ of the merged task vector: θ0 + λ·merged.", auto: bool = False,
                  default: float = DEFAULT_LAMBDA) -> Any:
    """λ, 0.3 unless the method's paper says otherwise, for every method that scales a merged task vector; with
    `auto`, it also takes `auto` (the label-free rule of `rankone.label_free`, run by `merge` and `build-pool` on their --data)."""
    # Any finite λ: a negative one subtracts task vectors (forgetting a task), as before.
    if not auto:
        return option(default, help, key="lambda")
    return option(default, help + " `auto`: the λ of a grid whose task-arithmetic merge has the lowest mean "
                  "prediction entropy on --data's unlabeled images.", key="lambda", auto=True, parse=parse_lambda, metavar="λ|auto")


def learning_rate_option(default: float = ADAPTATION_LR) -> Any:
    """Adam's learning rate for an adaptive method (1e-4 unless the method's paper says otherwise)."""
    return option(default, "Adam learning rate.", low=0.0, low_open=True)


def seed_option(help: str) -> Any:
    return option(0, help, low=0)
