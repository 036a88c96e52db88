"""An address space (mm_struct): its VMAs and the system calls that shape them.

Addresses are virtual page numbers. New mappings are placed top-down below
``MMAP_BASE`` as Linux does, and a new anonymous mapping that ends where a
compatible one begins is merged into it (vma_merge), so a sequence of equal
mmaps forms one VMA exactly as it would in the kernel.

Return values follow the system calls: 0 or a negative errno.
"""

from __future__ import annotations

import bisect
import errno
from typing import TYPE_CHECKING, Iterable

import numpy as np

from hw.units import HPAGE_PAGES
from vmhost.mm import fault
from vmhost.mm.mempolicy import LOCAL, MemPolicy
from vmhost.mm.vma import LAYOUT_GEN, PTE_WRITE, VmFlags, Vma

if TYPE_CHECKING:
    from vmhost.host import Host

MMAP_BASE = 0x7F00_0000_0000 >> 12      # top of the mmap area, in pages

MADV_DONTNEED = 4
MADV_MERGEABLE = 12
MADV_UNMERGEABLE = 13
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
ADVICE = {"dontneed": MADV_DONTNEED, "mergeable": MADV_MERGEABLE,
          "unmergeable": MADV_UNMERGEABLE, "hugepage": MADV_HUGEPAGE,
          "nohugepage": MADV_NOHUGEPAGE}

PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
_PROT_FLAGS = VmFlags.READ | VmFlags.WRITE


class SegmentationFault(Exception):
    """The process touched memory it may not (SIGSEGV)."""


class MM:
    def __init__(self, host: "Host", id: int, home_node: int = 0):
        self.host = host
        self.id = id
        self.home_node = home_node
        self.policy: MemPolicy = LOCAL
        self.vmas: list[Vma] = []
        self._starts: list[int] = []
        # KSM state kept in mm_struct (the counters live in host.mm_ksm, see below)
        self.ksm_mergeable = False      # MMF_VM_MERGEABLE: has an mm_slot
        self.ksm_merge_any = False      # MMF_VM_MERGE_ANY: prctl(PR_SET_MEMORY_MERGE)
        # RSS counters
        self.rss_anon = 0
        self.rss_shmem = 0
        self.swap_ents = 0
        self.exiting = False

    def __repr__(self) -> str:
        return f"MM({self.id}, {len(self.vmas)} vmas)"

    @property
    def pt_gen(self) -> int:
        """Page-table generation: changes whenever a PTE of this mm is changed by anyone but
        KSM's own merging. Scanners cache what they saw under a generation."""
        return int(self.host.pt_epoch[self.id])

    def touch_ptes(self) -> None:
        """Record that some PTE of this mm changed (fault, zap, COW, swap, migration, split)."""
        self.host.pt_epoch[self.id] += 1
        self.touch_data()

    def touch_data(self) -> None:
        """Record that a page this mm maps may hold other contents now."""
        self.host.changes[0] += 1

    # mm->ksm_rmap_items, ksm_merging_pages, ksm_zero_pages: a row of host.mm_ksm, so that
    # compiled code can update them by mm id
    def _ksm_get(i: int):
        return property(lambda self: int(self.host.mm_ksm[self.id, i]),
                        lambda self, v: self.host.mm_ksm.__setitem__((self.id, i), v))

    ksm_rmap_items = _ksm_get(0)
    ksm_merging_pages = _ksm_get(1)
    ksm_zero_pages = _ksm_get(2)
    del _ksm_get

    # -- lookup -------------------------------------------------------------------------
    def _reindex(self) -> None:
        LAYOUT_GEN[0] += 1
        self.vmas.sort(key=lambda v: v.start)
        self._starts = [v.start for v in self.vmas]

    def find_vma(self, vpn: int) -> Vma | None:
        """The VMA containing ``vpn``, if any."""
        i = bisect.bisect_right(self._starts, vpn) - 1
        if i >= 0 and self.vmas[i].end > vpn:
            return self.vmas[i]
        return None

    def vmas_overlapping(self, start: int, end: int) -> list[Vma]:
        i = max(bisect.bisect_right(self._starts, start) - 1, 0)
        out = []
        for vma in self.vmas[i:]:
            if vma.start >= end:
                break
            if vma.end > start:
                out.append(vma)
        return out

    def is_mapped(self, start: int, end: int) -> bool:
        covered = start
        for vma in self.vmas_overlapping(start, end):
            if vma.start > covered:
                return False
            covered = vma.end
        return covered >= end

    # -- mmap ---------------------------------------------------------------------------
    def get_unmapped_area(self, pages: int, align: int = 1) -> int:
        """Highest gap below MMAP_BASE that fits (top-down, like arch_get_unmapped_area_topdown)."""
        top = MMAP_BASE
        for vma in reversed(self.vmas):
            if vma.start >= top:
                continue
            start = (top - pages) // align * align
            if start >= vma.end:
                return start
            top = vma.start
        start = (top - pages) // align * align
        if start < 0:
            raise MemoryError("address space exhausted")
        return start

    def mmap(self, pages: int, *, prot: int = PROT_READ | PROT_WRITE, shared: bool = False,
             thp: bool | None = None, locked: bool = False, hugetlb: bool = False,
             pfnmap: bool = False, policy: MemPolicy | None = None, at: int | None = None) -> Vma:
        """Map ``pages`` anonymous pages; ``thp`` True/False sets MADV_HUGEPAGE/NOHUGEPAGE."""
        if pages <= 0:
            raise ValueError("mmap needs a positive number of pages")
        flags = _prot_flags(prot)
        if shared:
            flags |= VmFlags.SHARED | VmFlags.MAYSHARE
        if thp is True:
            flags |= VmFlags.HUGEPAGE
        elif thp is False:
            flags |= VmFlags.NOHUGEPAGE
        if locked:
            flags |= VmFlags.LOCKED
        if hugetlb:
            flags |= VmFlags.HUGETLB
        if pfnmap:
            flags |= VmFlags.PFNMAP | VmFlags.IO | VmFlags.DONTEXPAND
        if at is None:
            at = self.get_unmapped_area(pages, HPAGE_PAGES if thp else 1)
        elif self.vmas_overlapping(at, at + pages):
            self.munmap(at, pages)            # MAP_FIXED replaces what was there
        shmem = self.host.new_shmem(pages) if shared else None
        vma = Vma(self, at, at + pages, flags, pgoff=at if shmem is None else 0,
                  policy=policy, shmem=shmem)
        self.host.ksm.vma_created(vma)
        self.host.khugepaged.enter_vma(vma)
        self._insert(vma)
        return self._merge_neighbours(vma)

    def _insert(self, vma: Vma) -> None:
        LAYOUT_GEN[0] += 1
        i = bisect.bisect_left(self._starts, vma.start)
        self.vmas.insert(i, vma)
        self._starts.insert(i, vma.start)

    def _remove(self, vma: Vma) -> None:
        LAYOUT_GEN[0] += 1
        i = self.vmas.index(vma)
        del self.vmas[i]
        del self._starts[i]

    # -- splitting and merging ----------------------------------------------------------
    def split_vma(self, vma: Vma, at: int) -> Vma:
        """Split ``vma`` at page ``at``; returns the upper part (__split_vma)."""
        tail = vma.take_tail(at)
        self.host.anon_vmas.clone(tail, vma)
        if tail.shmem is not None:
            tail.shmem.users += 1
        self._insert(tail)
        return tail

    def isolate_range(self, start: int, end: int) -> list[Vma]:
        """Split VMAs so that the mapped part of [start, end) is made of whole VMAs."""
        vmas = self.vmas_overlapping(start, end)
        if vmas and vmas[0].start < start:
            vmas[0] = self.split_vma(vmas[0], start)
        if vmas and vmas[-1].end > end:
            self.split_vma(vmas[-1], end)
        return vmas

    def _can_merge(self, a: Vma, b: Vma) -> bool:
        if a.end != b.start or a.flags != b.flags or a.policy != b.policy:
            return False
        if a.shmem is not None or b.shmem is not None:
            return False
        if a.pgoff + a.pages != b.pgoff:
            return False
        # is_mergeable_anon_vma: same anon_vma, or one has none and the other a single chain link
        if a.anon_vma is b.anon_vma:
            return a.chain == b.chain
        if a.anon_vma is None:
            return len(b.chain) <= 1
        if b.anon_vma is None:
            return len(a.chain) <= 1
        return False

    def _merge_neighbours(self, vma: Vma) -> Vma:
        i = self.vmas.index(vma)
        if i + 1 < len(self.vmas) and self._can_merge(vma, self.vmas[i + 1]):
            self._absorb(vma, self.vmas[i + 1])
        if i > 0 and self._can_merge(self.vmas[i - 1], vma):
            prev = self.vmas[i - 1]
            self._absorb(prev, vma)
            vma = prev
        return vma

    def _absorb(self, keep: Vma, gone: Vma) -> None:
        """Merge ``gone`` into the adjacent ``keep`` (which ends where it begins)."""
        anon_vmas = self.host.anon_vmas
        if keep.anon_vma is None and gone.anon_vma is not None:
            anon_vmas.clone(keep, gone)
        anon_vmas.unlink(gone)
        keep.absorb(gone)
        self._remove(gone)

    # -- munmap / mprotect ----------------------------------------------------------------
    def munmap(self, start: int, pages: int) -> int:
        if pages <= 0:
            return -errno.EINVAL
        for vma in self.isolate_range(start, start + pages):
            self.unmap_vma(vma)
        return 0

    def unmap_vma(self, vma: Vma) -> None:
        """Tear one whole VMA down: its pages, its anon_vma links, its shmem reference."""
        fault.zap(self.host, vma, 0, vma.pages)
        self.host.anon_vmas.unlink(vma)
        if vma.shmem is not None:
            vma.shmem.users -= 1
            if vma.shmem.users == 0:
                fault.release_shmem(self.host, vma.shmem)
        self._remove(vma)

    def mprotect(self, start: int, pages: int, prot: int) -> int:
        if not self.is_mapped(start, start + pages):
            return -errno.ENOMEM
        for vma in self.isolate_range(start, start + pages):
            vma.flags = (vma.flags & ~_PROT_FLAGS) | _prot_flags(prot)
            if not vma.flags & VmFlags.WRITE:
                vma.ptef &= np.uint8(~PTE_WRITE & 0xFF)
        self._merge_range(start, start + pages)
        return 0

    def _merge_range(self, start: int, end: int) -> None:
        """vma_merge over every VMA of [start, end) after a change of their flags; a VMA
        absorbed by its neighbour on the way is not visited again."""
        seen: set[int] = set()
        while True:
            todo = [v for v in self.vmas_overlapping(start, end) if id(v) not in seen]
            if not todo:
                return
            seen.add(id(todo[0]))
            seen.add(id(self._merge_neighbours(todo[0])))

    # -- madvise --------------------------------------------------------------------------
    def madvise(self, start: int, pages: int, advice: int | str) -> int:
        """madvise(2): applies to every mapped part; a gap in the range gives -ENOMEM."""
        if isinstance(advice, str):
            advice = ADVICE[advice]
        if pages == 0:
            return 0
        if pages < 0:
            return -errno.EINVAL
        end = start + pages
        result = 0 if self.is_mapped(start, end) else -errno.ENOMEM
        for vma in self.isolate_range(start, end):
            rc = self._madvise_vma(vma, advice)
            if rc:
                return rc
        self._merge_range(start, end)
        return result

    def _madvise_vma(self, vma: Vma, advice: int) -> int:
        if advice == MADV_DONTNEED:
            if vma.flags & (VmFlags.LOCKED | VmFlags.PFNMAP | VmFlags.HUGETLB):
                return -errno.EINVAL
            fault.zap(self.host, vma, 0, vma.pages)
            return 0
        if advice in (MADV_MERGEABLE, MADV_UNMERGEABLE):
            rc = self.host.ksm.madvise(vma, advice == MADV_MERGEABLE)
            return -errno.EAGAIN if rc == -errno.ENOMEM else rc   # madvise reports EAGAIN
        if advice == MADV_HUGEPAGE:
            vma.flags = (vma.flags | VmFlags.HUGEPAGE) & ~VmFlags.NOHUGEPAGE
            self.host.khugepaged.enter_vma(vma)
            return 0
        if advice == MADV_NOHUGEPAGE:
            vma.flags = (vma.flags | VmFlags.NOHUGEPAGE) & ~VmFlags.HUGEPAGE
            return 0
        return -errno.EINVAL

    # -- the process's own memory accesses ---------------------------------------------------
    def _pieces(self, start: int, count: int, for_write: bool, force: bool):
        """Split [start, start+count) by VMA, checking it is all mapped and accessible."""
        pos, end = start, start + count
        for vma in self.vmas_overlapping(start, end):
            if vma.start > pos:
                break
            need = VmFlags.WRITE if for_write else VmFlags.READ
            if not force and not vma.flags & need:
                raise SegmentationFault(f"mm {self.id}: no {'write' if for_write else 'read'} "
                                        f"access at page {pos:#x}")
            lo, hi = pos - vma.start, min(end, vma.end) - vma.start
            yield vma, lo, hi, pos - start
            pos = vma.start + hi
        if pos < end:
            raise SegmentationFault(f"mm {self.id}: page {pos:#x} is not mapped")

    def write(self, start: int, contents: Iterable[int] | np.ndarray, force: bool = False) -> None:
        """The process writes whole pages: page ``start + i`` gets content id ``contents[i]``.

        ``force`` writes through missing permissions, like /proc/PID/mem does.
        """
        contents = np.asarray(contents, dtype=np.uint64)
        for vma, lo, hi, at in self._pieces(start, len(contents), True, force):
            fault.write_fault(self.host, vma, np.arange(lo, hi), contents[at: at + hi - lo])

    def read(self, start: int, count: int) -> np.ndarray:
        """The process reads pages (faulting untouched ones in); returns their content ids."""
        out = np.zeros(count, dtype=np.uint64)
        for vma, lo, hi, at in self._pieces(start, count, False, False):
            fault.read_fault(self.host, vma, np.arange(lo, hi))
            out[at: at + hi - lo] = fault.peek(self.host, vma, lo, hi)
        return out

    def view(self, start: int, count: int) -> np.ndarray:
        """What the process would read, without touching anything (for checks)."""
        out = np.zeros(count, dtype=np.uint64)
        for vma, lo, hi, at in self._pieces(start, count, False, True):
            out[at: at + hi - lo] = fault.peek(self.host, vma, lo, hi)
        return out

    # -- statistics -------------------------------------------------------------------------
    def resident_pages(self) -> int:
        return sum(int(np.count_nonzero(v.present_mask())) for v in self.vmas)


def _prot_flags(prot: int) -> VmFlags:
    flags = VmFlags(0)
    if prot & PROT_READ:
        flags |= VmFlags.READ
    if prot & PROT_WRITE:
        flags |= VmFlags.WRITE
    return flags
