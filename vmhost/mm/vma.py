"""Virtual memory areas and their page tables.

A VMA covers virtual pages ``[start, end)`` (addresses here are in pages, not
bytes) with one set of flags. Its page table entries are two numpy arrays
indexed by the page's offset in the VMA:

- ``pte``: the pfn of a present page, or the swap entry of a swapped one
  (``PTE_DTYPE``, 32 bits: a pfn below 2**31, 8 TiB of frames; a swap entry as
  vmhost/mm/swap.py encodes it);
- ``ptef``: PTE_* bits: present, writable, the shared zero page (and whether
  KSM put it there, which the kernel marks with the dirty bit), swap entry,
  young (accessed) and dirty.

A third array, ``pgtable``, has one flag per 2 MiB range: whether a PTE page
table exists there (the PMD level). A huge page is mapped by the PMD itself, so
a range with a page table is handled 4 KiB at a time by every later fault.

Keeping the table per VMA makes splitting, merging and scanning plain array
slices; the kernel keeps one radix tree per mm, which is the same mapping.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import numpy as np

from hw.units import HPAGE_PAGES
from vmhost.mm.frames import INDEX_MASK, PG_MLOCKED
from vmhost.mm.mempolicy import MemPolicy

if TYPE_CHECKING:
    from vmhost.mm.anon_vma import AnonVma
    from vmhost.mm.mm import MM


class VmFlags(enum.IntFlag):
    READ = 0x1
    WRITE = 0x2
    EXEC = 0x4
    SHARED = 0x8
    MAYSHARE = 0x80
    PFNMAP = 0x400
    LOCKED = 0x2000
    IO = 0x4000
    DONTEXPAND = 0x40000
    HUGETLB = 0x400000
    HUGEPAGE = 0x20000000       # MADV_HUGEPAGE
    NOHUGEPAGE = 0x40000000     # MADV_NOHUGEPAGE
    MIXEDMAP = 0x10000000
    MERGEABLE = 0x80000000      # MADV_MERGEABLE: KSM may scan it


# flags that make a VMA unsuitable for KSM (vma_ksm_compatible)
KSM_INCOMPATIBLE = (VmFlags.SHARED | VmFlags.MAYSHARE | VmFlags.PFNMAP | VmFlags.IO
                    | VmFlags.DONTEXPAND | VmFlags.HUGETLB | VmFlags.MIXEDMAP)

PTE_PRESENT = 1 << 0
PTE_WRITE = 1 << 1
PTE_ZERO = 1 << 2        # maps the shared zero page (no frame of its own)
PTE_KSM_ZERO = 1 << 3    # zero page placed there by KSM (use_zero_pages)
PTE_SWAP = 1 << 4        # not present; pte holds a swap entry
PTE_YOUNG = 1 << 5
PTE_DIRTY = 1 << 6

NO_PFN = -1
PTE_DTYPE = np.int32

#: bumped whenever any VMA's extent, flags, anon_vma or page-table arrays are replaced, or a
#: VMA joins or leaves an mm: compiled code that keeps page-table arrays by address (KSM's
#: registry of mergeable VMAs) rebuilds its copy when this moves
LAYOUT_GEN = np.zeros(1, dtype=np.int64)
_LAYOUT_ATTRS = frozenset(("start", "end", "flags", "anon_vma", "pte", "ptef"))


class Vma:
    def __init__(self, mm: "MM", start: int, end: int, flags: VmFlags, pgoff: int,
                 policy: MemPolicy | None = None, shmem=None):
        if not 0 < end - start <= INDEX_MASK:
            raise ValueError("a VMA covers at least one page and fewer than 2**32")
        self.mm = mm
        self.start = start
        self.end = end
        self.flags = flags
        self.pgoff = pgoff
        self.policy = policy
        self.shmem = shmem                       # backing object of a MAP_SHARED anonymous VMA
        self.anon_vma: "AnonVma | None" = None
        self.chain: list["AnonVma"] = []         # anon_vma_chain (same_vma list)
        self.pte = np.full(end - start, NO_PFN, dtype=PTE_DTYPE)
        self.ptef = np.zeros(end - start, dtype=np.uint8)
        # one entry per 2 MiB range the VMA touches (first one holds ``start``): True once a
        # page table exists there (the PMD was split, or a 4 KiB PTE was installed); False is
        # pmd_none, a huge PMD, or the huge zero page: only there may a fault map a huge page
        self.pgtable = np.zeros(self._pmd_count(start, end), dtype=np.bool_)

    def __setattr__(self, name, value) -> None:
        if name in _LAYOUT_ATTRS:
            LAYOUT_GEN[0] += 1
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return f"Vma({self.start:#x}-{self.end:#x} {self.flags!s} mm={self.mm.id})"

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other) -> bool:
        return self is other

    @property
    def pages(self) -> int:
        return self.end - self.start

    @property
    def is_anonymous_private(self) -> bool:
        return self.shmem is None and not self.flags & (VmFlags.SHARED | VmFlags.MAYSHARE)

    @property
    def ksm_compatible(self) -> bool:
        return not self.flags & KSM_INCOMPATIBLE

    def map_readonly(self, off: int, pfn: int, frames) -> None:
        """Point the PTE at ``off`` to ``pfn``, present, young and write-protected (a write
        faults), the page mlocked in a locked VMA; the caller counted the mapping."""
        if self.flags & VmFlags.LOCKED:
            frames.flags[pfn] |= PG_MLOCKED
        self.pte[off] = pfn
        self.ptef[off] = PTE_PRESENT | PTE_YOUNG

    def linear_index(self, offsets) -> np.ndarray:
        """page->index of a page at these offsets (linear_page_index)."""
        return self.pgoff + np.asarray(offsets, dtype=np.int64)

    def offsets_of(self, index) -> np.ndarray:
        """The offsets here of pages whose frames keep ``index`` (``FrameTable.index``, the
        low 32 bits of page->index); an offset >= ``pages`` is outside this VMA."""
        return (np.asarray(index, dtype=np.int64) - self.pgoff) & INDEX_MASK

    def present_mask(self) -> np.ndarray:
        """Offsets whose PTE maps a frame of its own (not the zero page)."""
        return (self.ptef & (PTE_PRESENT | PTE_ZERO)) == PTE_PRESENT

    @staticmethod
    def _pmd_count(start: int, end: int) -> int:
        return (end - 1) // HPAGE_PAGES - start // HPAGE_PAGES + 1

    def pmd_index(self, offsets) -> np.ndarray:
        """Index into ``pgtable`` of the 2 MiB range holding each page offset."""
        return (self.start + np.asarray(offsets, dtype=np.int64)) // HPAGE_PAGES - self.start // HPAGE_PAGES

    def take_tail(self, at: int) -> "Vma":
        """Split at virtual page ``at``: this VMA keeps [start, at), returns [at, end).

        The anon_vma chain of the new part is the caller's to clone.
        """
        assert self.start < at < self.end
        cut = at - self.start
        tail = Vma(self.mm, at, self.end, self.flags, self.pgoff + cut, self.policy, self.shmem)
        tail.pte = self.pte[cut:].copy()
        tail.ptef = self.ptef[cut:].copy()
        self.pte = self.pte[:cut].copy()
        self.ptef = self.ptef[:cut].copy()
        first = at // HPAGE_PAGES - self.start // HPAGE_PAGES
        tail.pgtable = self.pgtable[first:].copy()
        self.pgtable = self.pgtable[:self._pmd_count(self.start, at)].copy()
        self.end = at
        return tail

    def absorb(self, nxt: "Vma") -> None:
        """Append the adjacent VMA ``nxt`` (same flags, compatible anon_vma) to this one."""
        assert nxt.start == self.end and nxt.pgoff == self.pgoff + self.pages
        self.pte = np.concatenate([self.pte, nxt.pte])
        self.ptef = np.concatenate([self.ptef, nxt.ptef])
        if nxt.start % HPAGE_PAGES:              # the 2 MiB range at the seam is one range
            self.pgtable[-1] |= nxt.pgtable[0]
            self.pgtable = np.concatenate([self.pgtable, nxt.pgtable[1:]])
        else:
            self.pgtable = np.concatenate([self.pgtable, nxt.pgtable])
        self.end = nxt.end
