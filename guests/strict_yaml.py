"""Reading YAML and JSON documents strictly: a duplicate key is an error, not "the last one wins".

PyYAML's ``safe_load`` and :func:`json.loads` both keep the last of two equal keys silently, so a
file that says ``memory_mib`` twice means something its author did not see. Every loader of the
project reads its files through :func:`load_yaml` / :func:`load_json`, which refuse that with
the file and line.

This module sits in ``guests`` (the lowest layer that reads files; ``hw`` reads none) so that
both the guest image and dump loaders and everything in ``vmhost`` (through
:mod:`vmhost.schema`) use the same reader without ``guests`` importing ``vmhost``. It raises
:class:`DocumentError`, a ``ValueError`` whose message is one line: ``FILE: line N: reason``.
"""

from __future__ import annotations

import json
from typing import Any

import yaml


class DocumentError(ValueError):
    """A document that is not valid YAML/JSON or repeats a key (one-line message)."""

    def __init__(self, path: str, line: int | None, reason: str, problem: str = ""):
        self.path, self.line, self.reason, self.problem = path, line, reason, problem or reason
        where = f"line {line}: " if line is not None else ""
        super().__init__(f"{path}: {where}{reason}".replace("\n", " "))


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
