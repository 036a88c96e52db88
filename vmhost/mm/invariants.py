"""The invariant checker: proof that the kernel state is consistent and nothing was lost.

``check(host)`` verifies, from scratch and independently of how the state was
reached:

- every frame's mapcount equals the number of PTEs mapping it, and its
  refcount equals its mappings plus its other references (swap cache, the
  shmem page cache, a pin);
- free frames are blank, and every free frame of an online block is on the
  free lists exactly once;
- no PTE is writable in a VMA without VM_WRITE, and a frame mapped more than
  once in private memory, or a KSM page, is write-protected everywhere
  (otherwise one process's write would show through another's mapping);
- rmap can find every mapping: an anonymous page's anon_vma is chained to each
  VMA mapping it and its index matches the address; KSM adds its own checks
  through ``host.ksm.check_invariants``.

``views(host)`` records what every process sees at every mapped page;
``check(host, before)`` then also proves that no kernel-internal operation
(KSM merging, swap, migration, hotremove) changed any of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vmhost.mm.frames import (INDEX_MASK, NO_OWNER, PG_ANON, PG_COMPOUND, PG_KERNEL, PG_KSM, PG_PINNED, PG_SHMEM,
                               PG_SWAPCACHE)
from vmhost.mm.fault import peek
from vmhost.mm.vma import NO_PFN, PTE_KSM_ZERO, PTE_PRESENT, PTE_WRITE, PTE_ZERO, VmFlags

if TYPE_CHECKING:
    from vmhost.host import Host

Views = dict[int, tuple[np.ndarray, np.ndarray]]   # pid -> (virtual pages, content ids)


class InvariantViolation(AssertionError):
    def __init__(self, problems: list[str]):
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{len(problems)} invariant violation(s):\n  {shown}{more}")
        self.problems = problems


def views(host: "Host") -> Views:
    """What each live process sees at each of its mapped pages."""
    out: Views = {}
    for pid, proc in host.processes.items():
        vpns, contents = [], []
        for vma in proc.mm.vmas:
            vpns.append(np.arange(vma.start, vma.end, dtype=np.int64))
            contents.append(peek(host, vma, 0, vma.pages))
        if vpns:
            out[pid] = (np.concatenate(vpns), np.concatenate(contents))
        else:
            out[pid] = (np.zeros(0, np.int64), np.zeros(0, np.uint64))
    return out


def check(host: "Host", before: Views | None = None) -> None:
    """Raise InvariantViolation listing every inconsistency found."""
    problems: list[str] = []
    frames = host.frames
    n = len(frames)
    mapped_count = np.zeros(n, dtype=np.int64)
    writable_count = np.zeros(n, dtype=np.int64)
    private_count = np.zeros(n, dtype=np.int64)

    for pid, proc in host.processes.items():
        for vma in proc.mm.vmas:
            where = f"pid {pid} {vma!r}"
            f = vma.ptef
            present = (f & (PTE_PRESENT | PTE_ZERO)) == PTE_PRESENT
            pfns = vma.pte[present]
            if len(pfns) and (pfns.min() < 0 or pfns.max() >= n):
                problems.append(f"{where}: PTE points outside physical memory")
                continue
            np.add.at(mapped_count, pfns, 1)
            w = (f & PTE_WRITE) != 0
            if w.any() and not vma.flags & VmFlags.WRITE:
                problems.append(f"{where}: writable PTE in a VMA without VM_WRITE")
            np.add.at(writable_count, vma.pte[present & w], 1)
            if vma.shmem is None:
                np.add.at(private_count, pfns, 1)
            if ((f & PTE_ZERO) != 0).any() and (vma.pte[(f & PTE_ZERO) != 0] != NO_PFN).any():
                problems.append(f"{where}: zero-page PTE carries a pfn")
            if (((f & PTE_KSM_ZERO) != 0) & ((f & PTE_ZERO) == 0)).any():
                problems.append(f"{where}: KSM zero mark on a PTE that is not the zero page")
            _check_rmap_links(host, vma, present, where, problems)

    bad = np.flatnonzero(mapped_count != frames.mapcount)
    for pfn in bad[:10]:
        problems.append(f"pfn {pfn}: mapcount {frames.mapcount[pfn]} but {mapped_count[pfn]} PTEs map it")

    extra = (((frames.flags & PG_SWAPCACHE) != 0).astype(np.int64)
             + ((frames.flags & PG_PINNED) != 0)
             + ((frames.flags & PG_COMPOUND) != 0)
             + (((frames.flags & PG_SHMEM) != 0) & _in_shmem_cache(host, n)))
    bad = np.flatnonzero(frames.refcount != frames.mapcount + extra)
    bad = bad[frames.flags[bad] & PG_KERNEL == 0]        # kernel allocations: references not modelled
    for pfn in bad[:10]:
        problems.append(f"pfn {pfn}: refcount {frames.refcount[pfn]} != mappings "
                        f"{frames.mapcount[pfn]} + other references {extra[pfn]}")

    shared_rw = np.flatnonzero((writable_count > 0) & ((private_count > 1) | ((frames.flags & PG_KSM) != 0)))
    for pfn in shared_rw[:10]:
        problems.append(f"pfn {pfn}: mapped {private_count[pfn]} times privately "
                        f"(KSM: {bool(frames.flags[pfn] & PG_KSM)}) but writable in {writable_count[pfn]}")

    _check_free_lists(host, problems)
    # swap: each slot's count equals the swap PTEs naming it, swap cache pages are linked
    # both ways, MM_SWAPENTS matches (swapped pages' content is part of views() via peek)
    from vmhost.mm import swap
    problems.extend(swap.check(host))
    problems.extend(host.ksm.check_invariants())

    if before is not None:
        _check_views(host, before, problems)
    if problems:
        raise InvariantViolation(problems)


def _in_shmem_cache(host: "Host", n: int) -> np.ndarray:
    cached = np.zeros(n, dtype=bool)
    seen = set()
    for mm in host.live_mms():
        for vma in mm.vmas:
            if vma.shmem is not None and vma.shmem.id not in seen:
                seen.add(vma.shmem.id)
                c = vma.shmem.cache
                cached[c[c != NO_PFN]] = True
    return cached


def _check_rmap_links(host: "Host", vma, present: np.ndarray, where: str, problems: list[str]) -> None:
    frames = host.frames
    offs = np.flatnonzero(present)
    pfns = vma.pte[offs]
    anon = (frames.flags[pfns] & (PG_ANON | PG_KSM)) == PG_ANON
    if not anon.any():
        return
    owners = frames.owner[pfns[anon]]
    linked = {av.id for av in vma.chain}
    missing = np.setdiff1d(np.unique(owners), np.fromiter(linked, dtype=np.int32, count=len(linked)))
    if len(missing):
        problems.append(f"{where}: maps pages of anon_vma {missing[:5].tolist()} it is not chained to "
                        "(rmap cannot find them)")
    wrong = frames.index[pfns[anon]] != vma.linear_index(offs[anon]) & INDEX_MASK
    if wrong.any():
        problems.append(f"{where}: {int(wrong.sum())} anonymous pages with an index that does not "
                        "match their address")
    if (frames.refcount[pfns] == 0).any():
        problems.append(f"{where}: maps a free frame")


def _check_free_lists(host: "Host", problems: list[str]) -> None:
    frames = host.frames
    on_lists = host.allocator.free_pfns()
    if len(np.unique(on_lists)) != len(on_lists):
        problems.append("a frame is on the free lists twice")
    if len(on_lists) and (frames.refcount[on_lists] != 0).any():
        problems.append("a frame in use is on the free lists")
    free = frames.refcount == 0
    blank = (frames.mapcount == 0) & (frames.flags == 0) & (frames.owner == NO_OWNER)
    if (free & ~blank).any():
        problems.append(f"{int((free & ~blank).sum())} free frames are not blank")
    online = np.zeros(len(frames), dtype=bool)
    for blk in host.phys.online_blocks():
        online[blk.first_pfn: blk.first_pfn + blk.pages - blk.hole_pages] = True
    expected = np.flatnonzero(free & online)
    if len(expected) != len(on_lists) or not np.array_equal(np.sort(on_lists), expected):
        problems.append(f"free lists hold {len(on_lists)} frames but {len(expected)} online frames are free")


def _check_views(host: "Host", before: Views, problems: list[str]) -> None:
    now = views(host)
    for pid, (vpns, contents) in before.items():
        if pid not in now:
            continue                  # the process exited; its memory went with it
        nv, nc = now[pid]
        if not np.array_equal(vpns, nv):
            problems.append(f"pid {pid}: the set of mapped pages changed")
            continue
        diff = np.flatnonzero(nc != contents)
        if len(diff):
            problems.append(f"pid {pid}: content changed at {len(diff)} pages, first at page "
                            f"{vpns[diff[0]]:#x} ({contents[diff[0]]:#x} -> {nc[diff[0]]:#x})")
