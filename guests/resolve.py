"""Which guest image a mix entry's ``image:`` names: the one resolution density and fleet share.

``image:`` is one of

* a catalog name (``linux-server``: ``guests/catalog/*.yaml``);
* a path to an image YAML in the catalog's format (``*.yaml``/``*.yml``), for instance a
  profile fitted to real dumps by ``vmhost guests profile``;
* a path to an image file written by ``vmhost guests import`` (``*.vmimg`` by convention, or
  any existing file that is not YAML): the guest's memory is that dump's pages
  (:mod:`guests.dump_guest`).

A value without a ``/`` that does not end in ``.yaml``, ``.yml`` or ``.vmimg`` is a catalog
name if the catalog has it, else a file if there is one.

Relative paths are relative to the directory of the file that names them. Loaded dumps are
kept per process (by path, size and modification time), so a mix that boots a dump many
times reads it once. Errors are :class:`guests.images.ImageError`, one line naming the value
or file and the reason; the callers prefix their file and key (a loader's ``image:`` key is
read with :func:`expect_image`, which does).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from guests.images import CATALOG_DIR, Image, ImageError, catalog, load_image
from guests.schema import fail

YAML_SUFFIXES = (".yaml", ".yml")
DUMP_SUFFIX = ".vmimg"           # what `vmhost guests import` is told to write, by convention
DUMPS_KEPT = 16                  # dumps kept loaded per process (the oldest goes first)
_DUMPS: dict[tuple, Image] = {}


def resolve_image(value, base_dir: str | os.PathLike | None = None) -> Image:
    """The image ``value`` names (see the module doc); ImageError if there is none."""
    if not isinstance(value, str) or not value:
        raise ImageError("expected an image name from the catalog, a path to an image YAML "
                         "or a path to an imported dump (.vmimg)")
    p = Path(value)
    if not p.is_absolute() and base_dir is not None:
        p = Path(base_dir) / p
    is_file = value.endswith(YAML_SUFFIXES) or value.endswith(DUMP_SUFFIX) or "/" in value \
        or os.sep in value or (p.is_file() and value not in catalog())
    if not is_file:
        cat = catalog()
        if value not in cat:
            raise ImageError(f"unknown image {value!r} (catalog: {', '.join(sorted(cat))}; or a "
                             "path to an image YAML or an imported dump)")
        return cat[value]
    if not p.is_file():
        kind = "image file" if value.endswith(YAML_SUFFIXES) else "image or dump file"
        raise ImageError(f"no {kind} {value!r}" + (f" (looked at {p})" if str(p) != value else ""))
    if value.endswith(YAML_SUFFIXES):
        try:
            return load_image(p)
        except ImageError as exc:
            raise ImageError(f"bad image file: {exc}") from None
    return _dump_image(p)


def expect_image(value: Any, path: str, key: str) -> Image:
    """The image a loader's key ``key`` of file ``path`` names (an ``expect_*`` parser of
    :mod:`guests.schema`): a relative path is relative to the directory of ``path``; no such
    image is a SchemaError naming the file and the key."""
    try:
        return resolve_image(value, Path(path).resolve().parent)
    except ImageError as exc:
        raise fail(path, key, str(exc)) from None


def _dump_image(p: Path) -> Image:
    from guests.dump_guest import load_dump_image
    from guests.dumps import DumpError, is_image_file
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    img = _DUMPS.get(key)
    if img is None:
        if not is_image_file(p):
            raise ImageError(f"{p}: not an imported dump (a raw or ELF dump is imported first: "
                             "vmhost guests import DUMP -o IMAGE.vmimg)")
        try:
            img = load_dump_image(p)
        except DumpError as exc:
            raise ImageError(str(exc)) from None
        if len(_DUMPS) >= DUMPS_KEPT:
            _DUMPS.pop(next(iter(_DUMPS)))
        _DUMPS[key] = img
    return img


def image_ref(img: Image, value: str) -> str:
    """How a task names an image resolved from ``value``: a catalog name stays a name, a file
    becomes its absolute path (workers may run elsewhere, with another working directory)."""
    if img.path and Path(img.path).resolve().parent != CATALOG_DIR:
        return str(Path(img.path).resolve())
    return value
