"""khugepaged: the kernel thread that collapses PTE-mapped 2 MiB ranges back into huge pages
(mm/khugepaged.c, anonymous memory).

It matters here because KSM splits every huge page it merges into (``thp.split_huge_page``):
a range left with some private, writable pages beside KSM pages and zero-page PTEs is collapsed
again (its KSM and zero pages copied into a fresh huge page, the zero pages becoming real
zero-filled memory), and KSM splits it again when its scan next merges there.

As the kernel does it:

* **Which mms.** An mm is entered (``khugepaged_enter_vma``) when it gets a VMA THP is allowed
  in (MADV_HUGEPAGE under ``madvise``, any anonymous private VMA under ``always``), at the tail
  of the list; an empty list waits, its first entry wakes the thread at once.
* **How much.** Each wake-up scans ``pages_to_scan`` (4096) units of progress: one per mm
  visited and per VMA passed over, 512 per 2 MiB range looked at; then it sleeps
  ``scan_sleep_millisecs`` (10 s). One cursor (mm, address) goes round the list; passing its
  end counts ``full_scans``. A collapse attempt ends the visit of that mm (the mmap lock was
  dropped), the next visit resumes at the following range.
* **Which ranges** (``hpage_collapse_scan_pmd``): a range with a page table (not PMD-mapped,
  not empty) whose PTEs hold at most ``max_ptes_none`` (511) none or zero-page entries, at most
  ``max_ptes_swap`` (64) swap entries, at most ``max_ptes_shared`` (256) pages mapped more than
  once (a KSM page shared by two guests counts), at least one writable and one young PTE, and no
  page with extra references (pinned, in the swap cache). KSM pages are not refused as such:
  they are copied like any page.
* **The collapse**: a huge page is allocated (``thp_collapse_alloc``; failing that,
  ``thp_collapse_alloc_failed`` and a sleep of ``alloc_sleep_millisecs``), every subpage is a
  copy of the page mapped there or zero-filled, the old pages lose this mapping (a KSM page's
  rmap_item stays in the stable tree until ksmd next visits the address, as after a COW
  break), a KSM zero-page PTE is reported to KSM (``ksm_might_unmap_zero_page``), and the range
  is PMD-mapped (``pages_collapsed``).

Not modelled: swap-in of up to ``max_ptes_swap`` entries during a collapse (a range with a swap
PTE is left alone), collapsing a PTE-mapped huge page in place, file and shmem ranges,
khugepaged's own CPU time, and the phase of its sleep on a real machine (where other processes
keep its list non-empty, so it does not wake at once for a new guest).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from hw.units import HPAGE_PAGES
from vmhost.clock import NS_PER_MS
from vmhost.mm import thp
from vmhost.mm.frames import PG_COMPOUND, PG_PINNED, PG_SWAPCACHE
from vmhost.mm.vma import NO_PFN, PTE_KSM_ZERO, PTE_PRESENT, PTE_SWAP, PTE_WRITE, PTE_YOUNG, PTE_ZERO

if TYPE_CHECKING:
    from vmhost.host import Host
    from vmhost.mm.mm import MM
    from vmhost.mm.vma import Vma

#: /sys/kernel/mm/transparent_hugepage/khugepaged defaults (khugepaged_init, 6.18)
DEFAULTS = {
    "pages_to_scan": HPAGE_PAGES * 8,
    "scan_sleep_millisecs": 10_000,
    "alloc_sleep_millisecs": 60_000,
    "max_ptes_none": HPAGE_PAGES - 1,
    "max_ptes_swap": HPAGE_PAGES // 8,
    "max_ptes_shared": HPAGE_PAGES // 2,
}

# scan results (enum scan_result, the ones this model tells apart)
SUCCEED, PMD_NONE_OR_MAPPED, EXCEED_NONE, EXCEED_SWAP, EXCEED_SHARED, PAGE_RO, LACK_REFERENCED, \
    PAGE_COUNT, PAGE_COMPOUND = range(9)


def scan_range(host: "Host", vma: "Vma", start: int, knobs: dict) -> int:
    """``hpage_collapse_scan_pmd`` on the 2 MiB range at VMA offset ``start``: SUCCEED if
    khugepaged would collapse it, else why not."""
    if not vma.pgtable[vma.pmd_index(start)]:
        return PMD_NONE_OR_MAPPED
    span = slice(start, start + HPAGE_PAGES)
    f = vma.ptef[span]
    swap = (f & PTE_SWAP) != 0
    if swap.any():
        # the kernel swaps up to max_ptes_swap entries in when half the range is young;
        # not modelled: such a range stays as it is
        return EXCEED_SWAP
    present = (f & PTE_PRESENT) != 0
    zero = (f & PTE_ZERO) != 0
    if np.count_nonzero(~present | zero) > knobs["max_ptes_none"]:
        return EXCEED_NONE
    pages = present & ~zero
    pfns = vma.pte[span][pages]
    frames = host.frames
    if (frames.flags[pfns] & PG_COMPOUND).any():
        return PAGE_COMPOUND
    if np.count_nonzero(frames.mapcount[pfns] > 1) > knobs["max_ptes_shared"]:
        return EXCEED_SHARED
    if ((frames.refcount[pfns] != frames.mapcount[pfns])
            | ((frames.flags[pfns] & (PG_PINNED | PG_SWAPCACHE)) != 0)).any():
        return PAGE_COUNT
    if not (f[pages] & PTE_WRITE).any():
        return PAGE_RO
    if not (f[pages] & PTE_YOUNG).any():
        return LACK_REFERENCED
    return SUCCEED


def collapse_range(host: "Host", vma: "Vma", start: int) -> bool:
    """``collapse_huge_page``: copy the range at VMA offset ``start`` into a new huge page and
    map it with a PMD. False (nothing changed) if no huge page could be allocated."""
    policy = vma.policy or vma.mm.policy
    node = int(policy.preferred_nodes(vma.mm.home_node, vma.linear_index(np.array([start])))[0])
    head = host.allocator.alloc_huge(node, policy.allowed)
    if head is None:
        host.vmstat["thp_collapse_alloc_failed"] += 1
        return False
    host.vmstat["thp_collapse_alloc"] += 1
    from vmhost.mm.fault import put_mappings
    span = slice(start, start + HPAGE_PAGES)
    f = vma.ptef[span].copy()
    pages = ((f & PTE_PRESENT) != 0) & ((f & PTE_ZERO) == 0)
    old = vma.pte[span][pages].copy()
    contents = np.zeros(HPAGE_PAGES, dtype=np.uint64)
    contents[pages] = host.frames.content[old]
    ksm_zero = int(np.count_nonzero(f & PTE_KSM_ZERO))
    if ksm_zero:
        host.ksm.zero_pages_unmapped(vma.mm, ksm_zero)
    vma.pte[span] = NO_PFN
    vma.ptef[span] = 0
    vma.mm.rss_anon -= len(old)                 # map_huge counts all 512 again
    put_mappings(host, old)
    thp.map_huge(host, vma, start, head, host.anon_vmas.prepare(vma).id, event=None)
    host.frames.content[head: head + HPAGE_PAGES] = contents
    vma.pgtable[vma.pmd_index(start)] = False   # PMD-mapped again
    vma.mm.touch_ptes()
    return True


class Khugepaged:
    """The khugepaged thread of one host, on its virtual clock."""

    def __init__(self, host: "Host"):
        self.host = host
        self.knobs = dict(DEFAULTS)
        self.full_scans = 0
        self.pages_collapsed = 0
        self.slots: list["MM"] = []       # the mm_slot list, in order of entry
        self._cursor: "MM | None" = None  # khugepaged_scan.mm_slot
        self._address = 0                 # khugepaged_scan.address (a vpn)
        self._event = None
        self._alloc_failed = False

    # -- entering mms ---------------------------------------------------------------------------
    def enter(self, mm: "MM") -> None:
        """``__khugepaged_enter``: add ``mm`` (once) at the tail; an empty list wakes the thread."""
        if self.host.thp_mode == "never" or any(m is mm for m in self.slots):
            return
        wake = not self.slots
        self.slots.append(mm)
        if wake and self._event is None:
            self._event = self.host.clock.at(self.host.clock.now, self._tick, daemon=True)

    def enter_vma(self, vma: "Vma") -> None:
        """``khugepaged_enter_vma``: enter the VMA's mm if THP is allowed in it."""
        if thp.thp_allowed(self.host, vma):
            self.enter(vma.mm)

    def _alive(self, mm: "MM") -> bool:
        proc = self.host.processes.get(mm.id)
        return proc is not None and proc.mm is mm

    # -- the thread loop ------------------------------------------------------------------------
    def _tick(self) -> None:
        self._event = None
        self.do_scan()
        self.slots = [m for m in self.slots if self._alive(m) or m is self._cursor]
        if not self.slots:
            return                                  # wait for an mm to enter
        sleep = self.knobs["alloc_sleep_millisecs" if self._alloc_failed else "scan_sleep_millisecs"]
        self._alloc_failed = False
        self._event = self.host.clock.at(self.host.clock.now + sleep * NS_PER_MS, self._tick,
                                         daemon=True)

    def do_scan(self) -> None:
        """``khugepaged_do_scan``: scan until ``pages_to_scan`` units of progress are used, or
        the list's head was passed twice."""
        pages = self.knobs["pages_to_scan"]
        progress, through_head = 0, 0
        while progress < pages:
            if self._cursor is None:
                through_head += 1
            if not self.slots or through_head >= 2:
                break
            p, alloc_failed = self._scan_mm_slot(pages - progress)
            progress += p
            if alloc_failed:
                self._alloc_failed = True
                break

    def _scan_mm_slot(self, pages: int) -> tuple[int, bool]:
        """``khugepaged_scan_mm_slot``: progress made, and whether a huge page allocation
        failed."""
        if self._cursor is None:
            self._cursor, self._address = self.slots[0], 0
        mm = self._cursor
        progress = 1
        if self._alive(mm):
            for vma in [v for v in mm.vmas if v.end > self._address]:
                if not thp.thp_allowed(self.host, vma):
                    progress += 1
                    continue
                hstart = -(-vma.start // HPAGE_PAGES) * HPAGE_PAGES
                hend = vma.end // HPAGE_PAGES * HPAGE_PAGES
                if self._address > hend:
                    progress += 1
                    continue
                self._address = max(self._address, hstart)
                while self._address < hend:
                    start = self._address - vma.start
                    result = scan_range(self.host, vma, start, self.knobs)
                    collapsed = result == SUCCEED and collapse_range(self.host, vma, start)
                    if collapsed:
                        self.pages_collapsed += 1
                    self._address += HPAGE_PAGES
                    progress += HPAGE_PAGES
                    if result == SUCCEED:           # the mmap lock was dropped: visit ends
                        return progress, not collapsed
                    if progress >= pages:
                        return progress, False
        i = next(i for i, m in enumerate(self.slots) if m is mm)   # every VMA done: next mm
        if i + 1 < len(self.slots):
            self._cursor, self._address = self.slots[i + 1], 0
        else:
            self._cursor = None
            self.full_scans += 1
        if not self._alive(mm):
            self.slots.pop(i)
        return progress, False

    def stats(self) -> dict:
        """/sys/kernel/mm/transparent_hugepage/khugepaged's counters and knobs."""
        return {"full_scans": self.full_scans, "pages_collapsed": self.pages_collapsed, **self.knobs}
