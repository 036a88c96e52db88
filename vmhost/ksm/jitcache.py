"""Where numba keeps the compiled scan, and when that copy is stale.

numba's own cache (``cache=True``) is keyed by the content of the one source file that
defines a function. The compiled scan also bakes in what it imports: dtypes, struct layouts
and constants of other modules (``PTE_DTYPE`` in ``vmhost/mm/vma.py``, the frame and rmap_item
groups). After an edit to one of those, numba would load machine code built for the old
layout, which reads memory wrongly. So every function cached from this package is stamped
with one hash of all the emulator's sources (``hw/``, ``vmhost/mm/``, ``vmhost/ksm/``): any
edit there recompiles everything, once. The files stay where numba puts them (``__pycache__``
beside the source, or ``NUMBA_CACHE_DIR``); the build hook (``setup.py``) fills them for a wheel.

Imported by ``vmhost/ksm/__init__.py``, before any module of the package defines a cached
function (numba picks a function's cache locator when it is decorated).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from numba.core import caching

ROOT = Path(__file__).resolve().parents[2]
#: the sources the compiled code depends on (what it imports, transitively)
SOURCES = ("hw", "vmhost/mm", "vmhost/ksm")


@lru_cache(maxsize=None)
def sources_stamp() -> str:
    """One hash of every .py file the compiled scan can depend on."""
    h = hashlib.sha256()
    for top in SOURCES:
        for path in sorted((ROOT / top).rglob("*.py")):
            h.update(str(path.relative_to(ROOT)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _ours(py_file: str) -> bool:
    return Path(py_file).resolve().is_relative_to(ROOT / "vmhost" / "ksm")


class _StampAll:
    """The source stamp of a cached function of ours: all the sources, not its file alone."""

    def get_source_stamp(self):
        return sources_stamp()

    @classmethod
    def from_function(cls, py_func, py_file):
        return super().from_function(py_func, py_file) if _ours(py_file) else None


class UserDirLocator(_StampAll, caching.UserProvidedCacheLocator):
    """``NUMBA_CACHE_DIR`` set: there."""


class InTreeLocator(_StampAll, caching.InTreeCacheLocator):
    """Otherwise ``__pycache__`` beside the source (the wheel carries these)."""


def install() -> None:
    """Put the two locators first in numba's list (once)."""
    classes = caching.CacheImpl._locator_classes
    for cls in (InTreeLocator, UserDirLocator):      # UserDirLocator ends up first, as numba's
        if cls not in classes:
            classes.insert(0, cls)


install()
