"""What KSM's object caches share (mm/ksm.c's rmap_item_cache and stable_node_cache, which
the kernel allocates from with kmem_cache_zalloc): here each cache is a struct of numpy arrays
with its free objects on a stack (stable nodes) or a list threaded through a field
(rmap_items), so that the compiled scan allocates and frees too.

``FieldPool`` is such a cache's fields: one array per row of ``_FIELDS`` (name, dtype, fill),
and red-black tree links (``links``: only its roots are its own) whose left/right/parent are
three of those arrays (``_UNION``), as the kernel's structs keep a tree node in a union with
fields the object does not use while it is in the tree; ``_ALIASES`` names other such unions
(one array under two names). ``zalloc(pool)`` pops a free index
from the stack (growing the pool when it is empty) and resets every field to its fill value;
``ArrayCell`` is a counter kept in a cell of a numpy array (the compiled code updates it in
place), read and written as a Python int.
"""

from __future__ import annotations

import numpy as np

from vmhost.ksm.rbtree import NodeLinks


class ArrayCell:
    """An int attribute stored in ``getattr(obj, array)[index]``."""

    def __init__(self, array: str, index: int = 0):
        self.array, self.index = array, index

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        return int(getattr(obj, self.array)[self.index])

    def __set__(self, obj, value: int) -> None:
        getattr(obj, self.array)[self.index] = value


def zalloc(pool) -> int:
    """A free index of ``pool`` (its ``grow()`` called when none is left) with every field of
    ``pool._FIELDS`` (name, dtype, fill) reset to its fill."""
    if pool.free_top[0] == 0:
        pool.grow()
    pool.free_top[0] -= 1
    i = int(pool.free_stack[pool.free_top[0]])
    pool._reset(i)
    return i


class FieldPool:
    """The arrays of a KSM object cache: ``_FIELDS`` rows, and tree links over ``_UNION``'s three."""

    _FIELDS: tuple = ()
    _UNION: tuple[str, str, str] = ("", "", "")
    #: (name, field): ``name`` is another name for the field's array (a union of two fields)
    _ALIASES: tuple = ()

    def _init_fields(self, capacity: int, trees: int) -> None:
        for name, dtype, fill in self._FIELDS:
            setattr(self, name, np.full(capacity, fill, dtype=dtype))
        self.links = NodeLinks(0, trees)
        self.links.color = np.zeros(capacity, dtype=np.uint8)
        self._share_links()

    def _reset(self, i: int) -> None:
        """Every field of object ``i`` at its fill value, as kmem_cache_zalloc hands it out."""
        for name, _, fill in self._FIELDS:
            getattr(self, name)[i] = fill

    def _share_links(self) -> None:
        self.links.left, self.links.right, self.links.parent = (getattr(self, n) for n in self._UNION)
        for name, field in self._ALIASES:
            setattr(self, name, getattr(self, field))

    def _grow_fields(self, new: int) -> None:
        """Every field (and the tree colours) to ``new`` entries, the added ones at their fill."""
        old = len(self.links.color)
        for name, dtype, fill in self._FIELDS:
            setattr(self, name, np.concatenate([getattr(self, name), np.full(new - old, fill, dtype=dtype)]))
        self.links.color = np.concatenate([self.links.color, np.zeros(new - old, dtype=np.uint8)])
        self._share_links()

    @property
    def capacity(self) -> int:
        return len(self.links.color)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, n).nbytes for n, _, _ in self._FIELDS) + self.links.color.nbytes
