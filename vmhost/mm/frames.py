"""Page frames: the host's struct page array, as a struct of numpy arrays.

One entry per physical 4 KiB frame. A frame is free when its refcount is 0.
Fields, by their kernel counterparts:

- ``content``: 64-bit content id of the page's bytes (0 = all zeroes). Two
  frames hold the same bytes exactly when their ids are equal, so KSM compares
  ids instead of 4 KiB buffers.
- ``mapcount``: number of page-table entries that map the frame (_mapcount+1).
- ``refcount``: mappings plus other references (the swap cache, pins, and for
  each page of a transparent huge page one held by the folio as a whole).
- ``flags``: PG_* bits below.
- ``owner``: what ``page->mapping`` points to: an anon_vma id for an anonymous
  page, a stable_node id for a KSM page (the "keyhole" KSM checks to decide a
  stable node is stale), or a shmem object id.
- ``index``: the linear page index (``page->index``) an anonymous page was
  created at, its low 32 bits (``INDEX_MASK``); rmap turns it back into a virtual
  address in each VMA (``Vma.offsets_of``: a VMA spans fewer than 2**32 pages, so
  within one VMA the low bits name one page).
"""

from __future__ import annotations

import numpy as np

# page flags (a subset of the kernel's, with the same meaning)
PG_ANON = 1 << 0         # anonymous page; owner is an anon_vma
PG_KSM = 1 << 1          # KSM page; owner is a stable_node (PAGE_MAPPING_KSM)
PG_SWAPCACHE = 1 << 2    # in the swap cache (holds one reference)
PG_DIRTY = 1 << 3
PG_MLOCKED = 1 << 4      # mapped by a VM_LOCKED VMA: unevictable
PG_PINNED = 1 << 5       # long-term pinned (GUP): cannot be migrated or merged
PG_REFERENCED = 1 << 6
PG_ISOLATED = 1 << 7     # taken off the LRU / isolated for offlining
PG_SHMEM = 1 << 8        # backs a MAP_SHARED anonymous mapping; owner is a shmem id
PG_KERNEL = 1 << 9       # kernel allocation: unmovable, never mapped to user space
PG_HEAD = 1 << 10        # first page of a transparent huge page (a 2 MiB folio)
PG_TAIL = 1 << 11        # one of its other 511 pages; the head is pfn & ~511
PG_COMPOUND = PG_HEAD | PG_TAIL

NO_OWNER = -1
INDEX_MASK = 0xFFFF_FFFF     # what a frame keeps of page->index (``index``, uint32)
MAX_FRAMES = 1 << 31         # 8 TiB: a PTE (vmhost.mm.vma.PTE_DTYPE, 32 bits) names the pfn


def _check_size(nr_frames: int) -> None:
    if nr_frames > MAX_FRAMES:
        raise ValueError(f"{nr_frames} frames: at most {MAX_FRAMES} (8 TiB) can be emulated")


class FrameTable:
    """Per-frame state for every frame of every memory block, online or not."""

    def __init__(self, nr_frames: int = 0):
        _check_size(nr_frames)
        self.content = np.zeros(nr_frames, dtype=np.uint64)
        self.mapcount = np.zeros(nr_frames, dtype=np.int32)
        self.refcount = np.zeros(nr_frames, dtype=np.int32)
        self.flags = np.zeros(nr_frames, dtype=np.uint16)
        self.owner = np.full(nr_frames, NO_OWNER, dtype=np.int32)
        self.index = np.zeros(nr_frames, dtype=np.uint32)
        self.on_ksm_freed = None    # KSM's callback (pfns, their stable nodes) when KSM pages go

    _FIELDS = ("content", "mapcount", "refcount", "flags", "owner", "index")

    def __len__(self) -> int:
        return len(self.content)

    def grow(self, nr_frames: int) -> None:
        """Extend the table to ``nr_frames`` entries (memory hot-add)."""
        _check_size(nr_frames)
        extra = nr_frames - len(self)
        if extra <= 0:
            return
        for name in self._FIELDS:
            old = getattr(self, name)
            fill = NO_OWNER if name == "owner" else 0
            setattr(self, name, np.concatenate([old, np.full(extra, fill, dtype=old.dtype)]))

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, n).nbytes for n in self._FIELDS)

    def init_anon(self, pfns: np.ndarray, contents, anon_vma_id: int, indices) -> None:
        """Make freshly allocated frames anonymous pages mapped once."""
        self.content[pfns] = contents
        self.mapcount[pfns] = 1
        self.refcount[pfns] = 1
        self.flags[pfns] = PG_ANON | PG_DIRTY
        self.owner[pfns] = anon_vma_id
        self.index[pfns] = np.asarray(indices, dtype=np.int64) & INDEX_MASK

    def clear(self, pfns: np.ndarray) -> None:
        """Reset frames that have just been freed (every freed frame passes here)."""
        if self.on_ksm_freed is not None:
            ksm = pfns[(self.flags[pfns] & PG_KSM) != 0]
            if len(ksm):
                self.on_ksm_freed(ksm, self.owner[ksm])
        self.content[pfns] = 0
        self.mapcount[pfns] = 0
        self.refcount[pfns] = 0
        self.flags[pfns] = 0
        self.owner[pfns] = NO_OWNER
        self.index[pfns] = 0

    def has(self, pfns, flag: int) -> np.ndarray:
        return (self.flags[pfns] & flag) != 0
