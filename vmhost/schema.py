"""Validating user documents: one strict reader and one set of typed checks for every loader.

Every file the user hands us (a host config, a density or fleet study, a hot-remove scenario,
a KSM trace, a guest image) is read with :func:`read_yaml` (duplicate keys refused, with the
file and line: :mod:`guests.strict_yaml`) and walked with the ``expect_*`` helpers below. A
helper returns the value in its checked type or raises :class:`SchemaError`, an
:class:`~vmhost.errors.InputError` whose message is one line: ``FILE: KEY.PATH: reason``.

``expect_mapping`` takes the keys a section allows, so an unknown (and therefore ignored) key
is an error, never silently dropped. A loader declares a section once, as a :class:`Section` of
:func:`rule` rows (the key, its ``expect_*`` parser with its arguments, its default, the attribute
that keeps it); the allowed and required keys and the parse are derived from that one table.

Units: sizes are integers (bytes) or strings with a binary unit (B, KiB, MiB, GiB, TiB; K, M,
G, T mean the same); durations are numbers of seconds or strings with s, ms, us, ns;
fractions may be written as percentages ("25%").
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from guests.strict_yaml import DocumentError, load_yaml
from vmhost.errors import InputError

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|ms|us|ns|)\s*$")
_DURATION_UNITS = {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1, "": 10**9}


class SchemaError(InputError):
    """A document that breaks its schema; the message names the file and the key."""


def fail(path: str, key: str, reason: str) -> SchemaError:
    """The error for ``key`` (a dotted key path, "" for the whole document) of file ``path``."""
    return SchemaError(f"{path}: {key}: {reason}" if key else f"{path}: {reason}")


def sub(key: str, child: str | int) -> str:
    """The key path of ``child`` inside ``key``: ``a.b``, ``a[3]``."""
    if isinstance(child, int):
        return f"{key}[{child}]"
    return f"{key}.{child}" if key else str(child)


# ------------------------------------------------------------------------------------------
# reading

def read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: cannot read: not UTF-8 text ({exc.reason})") from None


def parse_yaml(text: str, path: str) -> Any:
    try:
        return load_yaml(text, path)
    except DocumentError as exc:
        raise InputError(str(exc)) from None


def read_yaml(path: str | Path) -> Any:
    """The YAML document in file ``path``; a duplicate key or bad syntax is an InputError."""
    return parse_yaml(read_text(path), str(path))


# ------------------------------------------------------------------------------------------
# structure

def expect_mapping(value: Any, path: str, key: str, allowed: Iterable[str],
                   required: Iterable[str] = ()) -> dict:
    """A mapping whose keys are all in ``allowed`` and include ``required``."""
    allowed, where = tuple(allowed), key or "document"
    if not isinstance(value, dict):
        raise fail(path, key, f"expected a mapping, got {type(value).__name__}")
    for k in value:
        if k not in allowed:
            raise fail(path, sub(key, str(k)), f"unknown key (allowed in {where}: {', '.join(allowed)})")
    for k in required:
        if k not in value:
            raise fail(path, sub(key, k), "missing")
    return value


def expect_list(value: Any, path: str, key: str, what: str = "values", *,
                nonempty: bool = False) -> list:
    if not isinstance(value, list) or (nonempty and not value):
        raise fail(path, key, f"expected a {'non-empty ' if nonempty else ''}list of {what}")
    return value


def expect_one_step(value: Any, path: str, key: str, kinds: tuple[str, ...], example: str) -> tuple[str, Any]:
    """A one-key mapping ``{kind: body}`` whose kind is one of ``kinds`` (a timeline step)."""
    if not isinstance(value, dict) or len(value) != 1:
        raise fail(path, key, f"expected one step such as {example} (kinds: {', '.join(kinds)})")
    (kind, body), = value.items()
    if kind not in kinds:
        raise fail(path, sub(key, str(kind)), f"unknown step (kinds: {', '.join(kinds)})")
    return kind, body


# ------------------------------------------------------------------------------------------
# scalars

def expect_bool(value: Any, path: str, key: str) -> bool:
    if not isinstance(value, bool):
        raise fail(path, key, f"expected true or false, got {value!r}")
    return value


def expect_int(value: Any, path: str, key: str, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(path, key, f"expected a whole number, got {value!r}")
    if lo is not None and value < lo or hi is not None and value > hi:
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise fail(path, key, f"{value} is out of range ({rng})")
    return value


def expect_number(value: Any, path: str, key: str, lo: float, hi: float | None = None,
                  lo_open: bool = False) -> float:
    """A real number in [lo, hi] (or (lo, hi] with ``lo_open``), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise fail(path, key, f"expected a number, got {value!r}")
    if value < lo or (lo_open and value == lo) or (hi is not None and value > hi):
        rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]"
        raise fail(path, key, f"{value} is out of range {rng}")
    return float(value)


def expect_str(value: Any, path: str, key: str, what: str = "a non-empty name") -> str:
    if not isinstance(value, str) or not value:
        raise fail(path, key, f"expected {what}")
    return value


def expect_new_name(value: Any, path: str, key: str, taken: set, what: str) -> str:
    """A name no earlier entry of the list has (``taken``: theirs, this one added); ``what``
    names the entries in the message ("swap devices")."""
    name = expect_str(value, path, key)
    if name in taken:
        raise fail(path, key, f"two {what} are named {name!r}")
    taken.add(name)
    return name


def expect_enum(value: Any, path: str, key: str, choices: Iterable[str], what: str = "") -> str:
    """One of ``choices``; ``what`` names the kind of thing in the message ("profile")."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        if what:
            raise fail(path, key, f"unknown {what} {value!r} (known: {', '.join(choices)})")
        raise fail(path, key, f"{value!r} is not one of {', '.join(choices)}")
    return value


def expect_domain(value: Any, path: str, key: str) -> str:
    """A sharing domain name (a string or a number used as a name)."""
    if not isinstance(value, (str, int)) or isinstance(value, bool) or str(value) == "":
        raise fail(path, key, "expected a sharing domain name")
    return str(value)


# ------------------------------------------------------------------------------------------
# quantities

def parse_size(value: Any, path: str, key: str, *, minimum: int = 1) -> int:
    """Bytes from an integer or a string like "4GiB", "128 MiB", "512K"."""
    if isinstance(value, bool):
        raise fail(path, key, f"expected a size such as 4GiB, got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        unit = m.group(2).lower() if m else None
        if not m or unit not in _UNITS:
            raise fail(path, key, f"{value!r} is not a size (use a number with B, KiB, MiB, GiB or TiB)")
        size = float(m.group(1)) * _UNITS[unit]
        if not math.isfinite(size) or size != int(size):
            raise fail(path, key, f"{value!r} is not a whole number of bytes")
        size = int(size)
    else:
        raise fail(path, key, f"expected a size such as 4GiB, got {type(value).__name__}")
    if size < minimum:
        raise fail(path, key, f"{value!r} is too small (at least {minimum} bytes)")
    return size


def expect_mib(value: Any, path: str, key: str) -> int:
    """A positive size that is a whole number of MiB, in MiB (a guest's memory)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
        raise fail(path, key, f"{value!r} is not a positive size")
    if isinstance(value, str) and value.strip().startswith("-"):
        raise fail(path, key, f"{value!r} is negative")
    size = parse_size(value, path, key, minimum=1 << 20)
    if size % (1 << 20):
        raise fail(path, key, f"{value!r} is not a whole number of MiB")
    return size >> 20


def parse_duration_ns(value: Any, path: str, key: str) -> int:
    """Nanoseconds from a number of seconds or a string like "1.5s", "200ms", "50us"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise fail(path, key, f"{value!r} is not a duration (e.g. 2s, 500ms)")
        ns = value * 10**9
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        ns = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        if not math.isfinite(ns):
            raise fail(path, key, f"{value!r} is not a duration (e.g. 2s, 500ms)")
    else:
        raise fail(path, key, f"{value!r} is not a duration (e.g. 2s, 500ms)")
    if ns <= 0:
        raise fail(path, key, "a duration must be positive")
    return int(ns)


def is_percentage(value: Any) -> bool:
    return isinstance(value, str) and value.strip().endswith("%")


def parse_percentage(value: str, path: str, key: str, lo: float = 0.0, hi: float = 100.0,
                     hi_open: bool = False) -> float:
    """The number of a string like "25%" (25.0), in [lo, hi] (or [lo, hi) with ``hi_open``)."""
    try:
        pct = float(value.strip()[:-1])
    except ValueError:
        raise fail(path, key, f"{value!r} is not a percentage") from None
    if math.isnan(pct) or pct < lo or pct > hi or (hi_open and pct == hi):
        raise fail(path, key, f"{value} is out of range [{lo:g}%, {hi:g}%{')' if hi_open else ']'}")
    return pct


def expect_fraction(value: Any, path: str, key: str) -> float:
    """A fraction in (0, 1], written as a number or a percentage ("25%")."""
    if is_percentage(value):
        try:
            v = float(value.strip()[:-1]) / 100
        except ValueError:
            raise fail(path, key, f"{value!r} is not a percentage") from None
        return expect_number(v, path, key, 0.0, 1.0, lo_open=True)
    return expect_number(value, path, key, 0.0, 1.0, lo_open=True)


# ------------------------------------------------------------------------------------------
# references

def expect_image(value: Any, path: str, key: str):
    """A guest image (``guests.images.Image``) as ``guests.resolve`` finds it: a catalog name,
    an image YAML or an imported dump, a relative path being relative to the directory of
    ``path``."""
    from guests.images import ImageError
    from guests.resolve import resolve_image
    try:
        return resolve_image(value, Path(path).resolve().parent)
    except ImageError as exc:
        raise fail(path, key, str(exc)) from None


# ------------------------------------------------------------------------------------------
# sections: one declaration per key

ABSENT = object()        # a key without a default: when it is missing, its attribute is left as is


@dataclass(frozen=True)
class Key:
    """One key of a section. ``read(value, path, key_path)`` checks and converts its value (the
    ``default`` when the key is missing, unless the default is ABSENT); the result goes to
    attribute ``attr`` (default: the key's name) of the loader's object. A key with logic gives
    ``apply(value, path, key_path, obj)`` instead (value: ABSENT when missing without a
    default), which sets what it needs on ``obj``."""
    name: str
    read: Callable[[Any, str, str], Any] | None = None
    default: Any = ABSENT
    attr: str = ""
    required: bool = False
    apply: Callable[[Any, str, str, Any], None] | None = None

    def fill(self, section: dict, path: str, where: str, obj: Any) -> None:
        key_path, value = sub(where, self.name), section.get(self.name, self.default)
        if self.apply is not None:
            self.apply(value, path, key_path, obj)
        elif value is not ABSENT:
            setattr(obj, self.attr or self.name, self.read(value, path, key_path))


def rule(name: str, parser: Callable[..., Any] | None = None, *args: Any, default: Any = ABSENT,
         attr: str = "", required: bool = False, apply: Callable | None = None, **kwargs: Any) -> Key:
    """A section's key read with ``parser(value, path, key_path, *args, **kwargs)`` (an
    ``expect_*`` helper), or set by ``apply`` for a key with logic."""
    def read(value: Any, path: str, key_path: str) -> Any:
        return parser(value, path, key_path, *args, **kwargs)
    return Key(name, read if parser is not None else None, default, attr, required, apply)


class Section:
    """A mapping's keys, in order: an unknown key, a missing required key or a bad value is one
    SchemaError naming the file and the key path."""

    def __init__(self, *keys: Key):
        self.keys = keys
        self.names = tuple(k.name for k in keys)
        self.required = tuple(k.name for k in keys if k.required)

    def check(self, value: Any, path: str, where: str) -> dict:
        """The mapping, its keys checked."""
        return expect_mapping(value, path, where, self.names, self.required)

    def fill(self, value: Any, path: str, where: str, obj: Any) -> Any:
        """Check the mapping and set ``obj``'s attribute of each key present or defaulted, in
        the declaration order; ``obj``."""
        section = self.check(value, path, where)
        for k in self.keys:
            k.fill(section, path, where, obj)
        return obj


def nested(section: Section, *, null: str = "empty") -> Callable[[Any, str, str, Any], None]:
    """The ``apply`` of a key whose value is a sub-section filling the same object: a missing or
    empty value (null, ``{}``, ...) reads as an empty mapping (``null="empty"``), or a missing
    or null one is skipped (``null="skip"``)."""
    def apply(value: Any, path: str, key_path: str, obj: Any) -> None:
        if null == "skip":
            if value is ABSENT or value is None:
                return
        elif value is ABSENT or not value:
            value = {}
        section.fill(value, path, key_path, obj)
    return apply
