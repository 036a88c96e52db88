"""The page-table work of merging and unmerging, one page at a time.

- ``write_protect`` makes a page's PTE read-only and clean, refusing when the
  page has references beyond its mappings (a GUP pin, O_DIRECT): KSM must not
  merge a page someone could still write through a pin.
- ``replace`` points a PTE at the KSM page (or at the zero page) and drops
  the old page.
- ``break_ksm`` is the unshare fault: a PTE that maps a KSM page or a KSM
  zero page gets a private copy, as MADV_UNMERGEABLE and run=2 need.

Addresses are (vma, offset) pairs found by ``find_mergeable_vma``, which,
like the kernel's, only accepts a VM_MERGEABLE VMA that has an anon_vma.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numba import njit

from vmhost.mm.fault import alloc_for, put_mappings
from vmhost.mm.frames import PG_ANON, PG_DIRTY, PG_KSM, PG_MLOCKED, PG_SWAPCACHE
from vmhost.mm.vma import (PTE_DIRTY, PTE_KSM_ZERO, PTE_PRESENT, PTE_WRITE, PTE_YOUNG, PTE_ZERO,
                           VmFlags, Vma)

if TYPE_CHECKING:
    from vmhost.host import Host
    from vmhost.mm.mm import MM

ZERO_PAGE = -2          # stands for the kernel's shared zero page as a merge target
EFAULT = -14

_CLEAN_RO = np.uint8(~(PTE_WRITE | PTE_DIRTY) & 0xFF)


def find_mergeable_vma(mm: "MM", vpn: int) -> Vma | None:
    if mm.exiting:
        return None
    vma = mm.find_vma(vpn)
    if vma is None or not vma.flags & VmFlags.MERGEABLE or vma.anon_vma is None:
        return None
    return vma


def anon_page_at(host: "Host", vma: Vma, off: int) -> int:
    """The pfn of the anonymous page mapped at ``off``, or -1 (zero page, swap, none, shmem)."""
    if vma.ptef[off] & (PTE_PRESENT | PTE_ZERO) != PTE_PRESENT:
        return -1
    pfn = int(vma.pte[off])
    return pfn if host.frames.flags[pfn] & (PG_ANON | PG_KSM) else -1


def write_protect(host: "Host", vma: Vma, off: int, pfn: int) -> int:
    if anon_page_at(host, vma, off) != pfn:
        return EFAULT
    flags = vma.ptef[off]
    if flags & (PTE_WRITE | PTE_DIRTY):
        frames = host.frames
        swapped = 1 if frames.flags[pfn] & PG_SWAPCACHE else 0
        if frames.mapcount[pfn] + swapped != frames.refcount[pfn]:    # pinned: a GUP reference
            return EFAULT
        if flags & PTE_DIRTY:
            frames.flags[pfn] |= PG_DIRTY
        vma.ptef[off] = flags & _CLEAN_RO
    return 0


def replace(host: "Host", vma: Vma, off: int, pfn: int, kpfn: int) -> int:
    """Map ``kpfn`` (or the zero page) where ``pfn`` was mapped; returns 0 or EFAULT."""
    if anon_page_at(host, vma, off) != pfn or vma.ptef[off] & PTE_WRITE:
        return EFAULT
    frames = host.frames
    if kpfn == ZERO_PAGE:
        vma.pte[off] = -1
        vma.ptef[off] = PTE_PRESENT | PTE_ZERO | PTE_KSM_ZERO | PTE_DIRTY
        vma.mm.rss_anon -= 1
    else:
        frames.mapcount[kpfn] += 1
        frames.refcount[kpfn] += 1
        vma.map_readonly(off, kpfn, frames)
    put_mappings(host, np.array([pfn], dtype=np.int64))
    return 0


def break_ksm(host: "Host", vma: Vma, off: int) -> bool:
    """Unshare the page at ``off`` if it is a KSM page or a KSM zero page.

    Returns True when something was broken. Raises OutOfMemory like the fault would.
    """
    flags = vma.ptef[off]
    if flags & PTE_KSM_ZERO:
        host.ksm.zero_pages_unmapped(vma.mm, 1)
        new = alloc_for(host, vma, np.array([off]))
        av = host.anon_vmas.prepare(vma)
        host.frames.init_anon(new, 0, av.id, vma.linear_index([off]))
    elif flags & (PTE_PRESENT | PTE_ZERO) == PTE_PRESENT and host.frames.flags[vma.pte[off]] & PG_KSM:
        old = int(vma.pte[off])
        new = alloc_for(host, vma, np.array([off]))
        av = host.anon_vmas.prepare(vma)
        host.frames.init_anon(new, host.frames.content[old], av.id, vma.linear_index([off]))
        host.vmstat["cow_ksm"] += 1
        put_mappings(host, np.array([old], dtype=np.int64))
        vma.mm.rss_anon -= 1
    else:
        return False
    if vma.flags & VmFlags.LOCKED:
        host.frames.flags[new] |= PG_MLOCKED
    vma.pte[off] = new[0]
    writable = PTE_WRITE if vma.flags & VmFlags.WRITE else 0
    vma.ptef[off] = PTE_PRESENT | writable | PTE_DIRTY | PTE_YOUNG
    vma.mm.rss_anon += 1
    vma.mm.touch_ptes()
    return True


@njit(cache=True, nogil=True)
def _anon_offsets(pte, ptef, frame_flags):
    """The offsets whose PTE maps an anonymous or KSM page, as int32, with no temporary array
    as large as the VMA (a 16 GiB VMA's int64 index was 128 MiB): the present PTEs counted
    first (their flags alone, read in order), then each one's frame read once (at random:
    merged pages are anywhere), and the result cut to size only if some frame was not
    anonymous (a shared-memory page)."""
    bound = 0
    for off in range(ptef.shape[0]):
        if (ptef[off] & (PTE_PRESENT | PTE_ZERO)) == PTE_PRESENT:
            bound += 1
    out = np.empty(bound, dtype=np.int32)
    n = 0
    for off in range(ptef.shape[0]):
        if (ptef[off] & (PTE_PRESENT | PTE_ZERO)) == PTE_PRESENT \
                and frame_flags[pte[off]] & (PG_ANON | PG_KSM):
            out[n] = off
            n += 1
    return out if n == bound else out[:n].copy()


def candidate_offsets(host: "Host", vma: Vma) -> np.ndarray:
    """Offsets of the VMA that hold an anonymous page ksmd would visit (int32: a VMA has
    fewer than 2**31 pages)."""
    return _anon_offsets(vma.pte, vma.ptef, host.frames.flags)
