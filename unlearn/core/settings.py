"""One check for every setting: unknown keys, types and ranges, each failure one line naming `section.key`.

Settings arrive from YAML files, `--set` and received run folders, so nothing about their shape can be
assumed. Every component (method, optimizer, benchmark, attack) declares its settings the same way: a dataclass
`Settings`, each field typed, with its default and its range (`setting(default, limit=Limit(...))`). They are
checked here, by `from_mapping`, before any model is loaded.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, TypeVar, Union

from unlearn.core.errors import UserError, shown


class SettingError(ValueError):
    """A setting with the wrong type or out of range (components raise it; the CLI shows it as one line)."""


class InvalidSettings(UserError, ValueError):
    """What `from_mapping` raises: one line for the CLI (exit 2), and a ValueError for the builders that report
    every bad option as one (build_method, build_optimizer)."""


@dataclass(frozen=True)
class Limit:
    """A range for a number (`ge`/`gt`/`le`/`lt`) or the allowed values (`choices`)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] | None = None

    def ok(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        if not isinstance(value, int | float) or isinstance(value, bool):
            return True  # a range only constrains numbers (None for an optional number passes)
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        parts = [f"{op} {_num(v)}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                 if v is not None]
        return " and ".join(parts)


def key_list(keys) -> str:
    """Keys from a config for a one-line message: plain names as they are, anything else (a key with a newline,
    a number, null) as its repr, so the message stays one line and never fails on a non-string key."""
    names = sorted(k if isinstance(k, str) and k.isidentifier() and len(k) <= 60 else shown(k) for k in keys)
    return ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")


def unknown_keys(data: Mapping[Any, Any], known) -> list[Any]:
    return [k for k in data if not isinstance(k, str) or k not in known]


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


POSITIVE = Limit(gt=0)
NON_NEGATIVE = Limit(ge=0)
# Seeds: the range every generator they reach takes (numpy's legacy seeding stops at 2**32 - 1).
SEED = Limit(ge=0, le=2**32 - 1)
AT_LEAST_ONE = Limit(ge=1)
UNIT_OPEN = Limit(ge=0, lt=1)


def check_int(name: str, value: Any, minimum: int = 1) -> None:
    """One-line SettingError (a ValueError) unless ``value`` is an integer (not a bool) >= ``minimum``: counts,
    ranks, periods, limits."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise SettingError(f"{name} must be an integer >= {minimum}, got {shown(value)}")


def setting(default: Any = MISSING, *, limit: Limit | None = None, default_factory: Any = MISSING) -> Any:
    """A dataclass field with a declared range: `max_steps: int = setting(60, limit=AT_LEAST_ONE)`."""
    metadata = {"limit": limit} if limit else {}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(tp))
    if tp is type(None) or tp is None:
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        if isinstance(value, int) and not isinstance(value, bool):
            return abs(value) < 2**1023  # math.isfinite would overflow on a 400-digit integer
        return isinstance(value, float) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args, strict=True))
    if origin in (list, Sequence) or tp in (list, Sequence):
        args = typing.get_args(tp)
        return isinstance(value, list | tuple) and all(_matches(v, args[0]) for v in value) if args else \
            isinstance(value, list | tuple)
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        return isinstance(value, dict)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # an annotation we cannot read: the component's own check decides


def describe_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        plain = [a for a in members if _is_plain(a)]  # a config value is never a Tensor: don't offer one
        names = [describe_type(a) for a in plain or members]
        optional = type(None) in typing.get_args(tp)
        return " or ".join(dict.fromkeys(names)) + (" (or null)" if optional else "")
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        return f"a list of {len(args)} {_plural(args[0])}"
    if origin in (list, Sequence):
        args = typing.get_args(tp)
        return f"a list of {_plural(args[0])}" if args else "a list"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(
        tp, "a mapping" if origin in (dict, Mapping) or tp is dict else getattr(tp, "__name__", str(tp)))


def _is_plain(tp: Any) -> bool:
    """A type a YAML value can have."""
    return tp in (bool, int, float, str, list, dict, tuple) or typing.get_origin(tp) in (list, tuple, dict,
                                                                                          Sequence, Mapping)


def _plural(tp: Any) -> str:
    if typing.get_origin(tp) in (Union, types.UnionType):
        members = typing.get_args(tp)
        return " or ".join(_plural(a) for a in [a for a in members if _is_plain(a)] or members)
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans", type(None): "nulls"}.get(
        tp, getattr(tp, "__name__", str(tp)) + "s")


def check_value(key: str, value: Any, annotation: Any, limit: Limit | None = None) -> Any:
    """`value` (an integral float given for an integer setting becomes an int: `1e3` steps); SettingError
    naming `key` if its type or range is wrong."""
    if (isinstance(value, float) and value.is_integer() and not _matches(value, annotation)
            and _matches(int(value), annotation)):
        value = int(value)
    if not _matches(value, annotation):
        wanted = describe_type(annotation)
        if limit and limit.choices is None and limit.describe():
            wanted += " " + limit.describe()
        raise SettingError(f"{key} must be {wanted}, got {shown(value)}")
    if limit is not None and not limit.ok(value):
        wanted = limit.describe() if limit.choices is not None else f"{describe_type(annotation)} {limit.describe()}"
        raise SettingError(f"{key} must be {wanted}, got {shown(value)}")
    return value


Settings = TypeVar("Settings")


def from_mapping(cls: type[Settings], data: Any, section: str, owner: str | None = None,
                 ignore: tuple[str, ...] = ()) -> Settings:
    """An instance of the dataclass `cls` from an untrusted mapping: every key known, typed and in range.

    The one settings check of the toolkit: every config section (train, eval, a benchmark's, an attack's) is a
    dataclass read through here. `owner` names the section in the unknown-key message ("benchmark 'wmdp'");
    `ignore` lists keys another part reads (a component section's `name`)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidSettings(f"config section '{section}' must be a mapping, got {shown(data)}")
    data = {k: v for k, v in data.items() if k not in ignore}
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = unknown_keys(data, known)
    if unknown:
        raise InvalidSettings(f"unknown key(s) in {owner or repr(section)}: {key_list(unknown)} "
                              f"(known: {', '.join(sorted([*known, *ignore])) or 'none'})")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        try:
            values[key] = check_value(f"{section}.{key}", value, hints[key], known[key].metadata.get("limit"))
        except SettingError as err:
            raise InvalidSettings(str(err)) from None
    return cls(**values)


@dataclass(frozen=True)
class NoSettings:
    """A component without settings."""


def declares_settings(kind: str) -> Callable[[str, Any], None]:
    """A registry's check: every member declares its settings as a dataclass named `Settings`."""

    def check(name: str, component: Any) -> None:
        declared = getattr(component, "Settings", None)
        if not isinstance(declared, type) or not hasattr(declared, "__dataclass_fields__"):
            raise TypeError(f"{kind} '{name}' must declare its settings as a dataclass `Settings`")

    return check


def setting_names(component: Any) -> set[str]:
    """The names of the settings a component declares."""
    return {f.name for f in fields(component.Settings)}
