"""Validating user documents: one strict reader and one set of typed checks for every loader.

Every file the user hands us (a host config, a density or fleet study, a hot-remove scenario,
a KSM trace, a guest image, a dump's header) is read with :func:`read_yaml` /
:func:`load_yaml` / :func:`load_json` and walked with the ``expect_*`` helpers below.

The readers refuse a duplicate key with the file and line: PyYAML's ``safe_load`` and
:func:`json.loads` both keep the last of two equal keys silently, so a file that says
``memory_mib`` twice would mean something its author did not see.

A helper returns the value in its checked type or raises :class:`SchemaError`, an
:class:`~guests.errors.InputError` whose message is one line: ``FILE: KEY.PATH: reason``.
``expect_mapping`` takes the keys a section allows, so an unknown (and therefore ignored) key
is an error, never silently dropped. A loader declares a section once, as a :class:`Section` of
:func:`rule` rows (the key, its ``expect_*`` parser with its arguments, its default, the attribute
that keeps it); the allowed, required and alternative (``one_of``) keys and the parse are
derived from that one table. A document that is not YAML/JSON, or repeats a key, is a
:class:`DocumentError` (a SchemaError naming the line).

Units: sizes are integers (bytes) or strings with a binary unit (B, KiB, MiB, GiB, TiB; K, M,
G, T mean the same); durations are numbers of seconds or strings with s, ms, us, ns;
fractions may be written as percentages ("25%").

This module sits in ``guests``, the lowest layer that reads files (``hw`` reads none), so that
the guest image and dump loaders and every loader of ``vmhost`` use it alike.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from guests.errors import InputError

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
# reading: strict YAML and JSON

class DocumentError(SchemaError):
    """A document that is not valid YAML/JSON or repeats a key: ``FILE: line N: reason``."""

    def __init__(self, path: str, line: int | None, reason: str, problem: str = ""):
        self.path, self.line, self.reason, self.problem = path, line, reason, problem or reason
        where = f"line {line}: " if line is not None else ""
        super().__init__(f"{path}: {where}{reason}")


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys in any mapping."""


def _construct_mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            dup = key in seen
            seen.add(key)
        except TypeError:           # an unhashable key: SafeLoader reports it below
            continue
        if dup:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(text: str, path: str) -> Any:
    """The document in ``text`` (read from ``path``, named in errors)."""
    try:
        return yaml.load(text, Loader=StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise DocumentError(path, mark.line + 1 if mark is not None else None,
                            f"not valid YAML ({problem})", problem) from None
    except RecursionError:
        raise DocumentError(path, None, "not valid YAML (nested too deeply)") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


class _Duplicate(Exception):
    def __init__(self, key: str):
        self.key = key


def load_json(text: str | bytes, path: str) -> Any:
    """The JSON document in ``text``; a repeated key in any object is an error."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise DocumentError(path, exc.lineno, f"not valid JSON ({exc.msg})", exc.msg) from None
    except _Duplicate as exc:
        raise DocumentError(path, None, f"not valid JSON (duplicate key {exc.key!r})",
                            f"duplicate key {exc.key!r}") from None
    except (UnicodeDecodeError, RecursionError) as exc:
        raise DocumentError(path, None, f"not valid JSON ({type(exc).__name__})") from None


def read_text(path: str | Path) -> str:
    """The text of file ``path``; a file that cannot be read is a SchemaError."""
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise fail(str(path), "", f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise fail(str(path), "", f"cannot read: not UTF-8 text ({exc.reason})") from None


def read_yaml(path: str | Path) -> Any:
    """The YAML document in file ``path``; a duplicate key or bad syntax is a DocumentError."""
    return load_yaml(read_text(path), str(path))


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
    """A finite real number in [lo, hi] (or (lo, hi] with ``lo_open``), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise fail(path, key, f"expected a number, got {value!r}")
    if value in (math.inf, -math.inf) or isinstance(value, int) and value.bit_length() > 1000:
        raise fail(path, key, "not a finite number" if isinstance(value, float) else "too large a number")
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
    ``expect_*`` helper), or set by ``apply`` for a key with logic; with neither, the value is
    kept as written."""
    def read(value: Any, path: str, key_path: str) -> Any:
        return value if parser is None else parser(value, path, key_path, *args, **kwargs)
    return Key(name, read, default, attr, required, apply)


class Section:
    """A mapping's keys, in order: an unknown key, a missing required key or a bad value is one
    SchemaError naming the file and the key path. ``one_of``: keys of which the mapping gives
    exactly one (alternatives such as a size or a number of pages)."""

    def __init__(self, *keys: Key, one_of: tuple[str, ...] = ()):
        self.keys = keys
        self.names = tuple(k.name for k in keys)
        self.required = tuple(k.name for k in keys if k.required)
        self.one_of = one_of

    def check(self, value: Any, path: str, where: str) -> dict:
        """The mapping, its keys checked."""
        section = expect_mapping(value, path, where, self.names, self.required)
        if self.one_of and sum(k in section for k in self.one_of) != 1:
            raise fail(path, where, f"give one of {', '.join(self.one_of)}")
        return section

    def read(self, section: dict, path: str, where: str, obj: Any) -> Any:
        """Set ``obj``'s attribute of each key present in the (checked) mapping or defaulted, in
        the declaration order; ``obj``."""
        for k in self.keys:
            k.fill(section, path, where, obj)
        return obj

    def fill(self, value: Any, path: str, where: str, obj: Any) -> Any:
        """Check the mapping and read it into ``obj``; ``obj``."""
        return self.read(self.check(value, path, where), path, where, obj)


def nested(section: Section, *, null: str = "empty") -> Callable[[Any, str, str, Any], None]:
    """The ``apply`` of a key whose value is a sub-section filling the same object: a missing or
    null value reads as an empty mapping (``null="empty"``), or is skipped (``null="skip"``);
    any other value that is not a mapping is refused by the section."""
    def apply(value: Any, path: str, key_path: str, obj: Any) -> None:
        if null == "skip":
            if value is ABSENT or value is None:
                return
        elif value is ABSENT or value is None:
            value = {}
        section.fill(value, path, key_path, obj)
    return apply


def expect_section(value: Any, path: str, key: str, section: Section, make: Callable[[], Any]) -> Any:
    """A sub-section read by ``section`` into a new object ``make()`` (the parser of a key
    whose value is a section of its own); a null value reads as an empty mapping, any other
    value that is not a mapping is refused by the section. (A key that is absent is not read
    at all: its rule's default applies.)"""
    return section.fill({} if value is None else value, path, key, make())
