"""What KSM's object caches share (mm/ksm.c's rmap_item_cache and stable_node_cache, which
the kernel allocates from with kmem_cache_zalloc): here each cache is a struct of numpy arrays
with a stack of free indices, so that the compiled scan allocates and frees too.

``zalloc(pool)`` pops a free index (growing the pool when the stack is empty) and resets every
field of ``pool._FIELDS`` to its fill value; ``ArrayCell`` is a counter kept in a cell of a
numpy array (the compiled code updates it in place), read and written as a Python int.
"""

from __future__ import annotations


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
    for name, _, fill in pool._FIELDS:
        getattr(pool, name)[i] = fill
    return i
