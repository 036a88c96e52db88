"""Backing objects of MAP_SHARED anonymous mappings (shmem).

A shared anonymous mapping is not anonymous memory to the kernel: its pages
live in a shmem object's page cache, every VMA mapping the object (the parent
and its forked children) sees the same frames, writes never copy, and KSM
never merges them. Each page the cache holds keeps one frame reference.
"""

from __future__ import annotations

import numpy as np

from vmhost.mm.vma import NO_PFN


class Shmem:
    def __init__(self, id: int, pages: int):
        self.id = id
        self.cache = np.full(pages, NO_PFN, dtype=np.int64)   # page index -> pfn
        self.users = 0                                       # VMAs mapping the object
