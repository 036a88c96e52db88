"""Reverse mapping: from a page frame to every PTE that maps it.

An anonymous page is found through its anon_vma: each VMA chained to it whose
page-offset range covers the page's index is visited, and the page's address
there is ``vma.start + index - vma.pgoff``. Since 3.7 the chained VMAs are in
an interval tree, so a walk visits only VMAs whose range covers the index; the
2.6.33 profile walks its anon_vma's whole list, as that kernel did. A VMA can
be visited and not map the page (the process wrote its own copy).

KSM pages have no anon_vma of their own; KSM provides their walk
(``KsmHooks.rmap_walk``). shmem pages are found through the VMAs that map
their object.

``walk_many`` performs the same walks for many pages at once, grouped by
anon_vma, so that a walk of every page of a large system stays affordable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from vmhost.mm.frames import PG_ANON, PG_KSM, PG_SHMEM
from vmhost.mm.vma import PTE_PRESENT, PTE_YOUNG, PTE_ZERO, Vma

if TYPE_CHECKING:
    from vmhost.host import Host
    from vmhost.mm.anon_vma import AnonVma

Visit = Callable[[Vma, int], "bool | None"]   # return False to stop the walk


def _maps(vma: Vma, off: int, pfn: int) -> bool:
    return (0 <= off < vma.pages and int(vma.pte[off]) == pfn
            and vma.ptef[off] & (PTE_PRESENT | PTE_ZERO) == PTE_PRESENT)


def _candidate_vmas(host: "Host", av: "AnonVma", index: int) -> Iterator[Vma]:
    if host.profile.anon_vma_chains:
        return av.vmas_covering(index)
    return iter(list(av.vmas))


def rmap_walk(host: "Host", pfn: int, visit: Visit) -> int:
    """Call ``visit(vma, offset)`` for each mapping of ``pfn``; returns VMAs visited."""
    flags = int(host.frames.flags[pfn])
    if flags & PG_KSM:
        return host.ksm.rmap_walk(pfn, visit)
    index = int(host.frames.index[pfn])
    if flags & PG_ANON:
        vmas = _candidate_vmas(host, host.anon_vmas[int(host.frames.owner[pfn])], index)
    elif flags & PG_SHMEM:
        vmas = iter(host.shmem_vmas(int(host.frames.owner[pfn])))
    else:
        return 0
    visited = 0
    for vma in vmas:
        visited += 1
        off = int(vma.offsets_of(index))
        if _maps(vma, off, pfn) and visit(vma, off) is False:
            break
    return visited


def mappings(host: "Host", pfn: int) -> list[tuple[Vma, int]]:
    """Every (vma, offset) mapping ``pfn``, once each.

    A walk may reach one mapping twice: a KSM page's walk visits a forked child's VMA through
    the parent's rmap_item (the child is chained to the parent's anon_vma) and again through the
    child's own rmap_item once ksmd has met it. The kernel's callbacks see the second visit's
    PTE already changed by the first (page_vma_mapped_walk fails); a list collected before
    acting must drop the repeat itself."""
    found: list[tuple[Vma, int]] = []
    seen: set[tuple[int, int]] = set()

    def add(vma: Vma, off: int) -> None:
        if (id(vma), off) not in seen:
            seen.add((id(vma), off))
            found.append((vma, off))

    rmap_walk(host, pfn, add)
    return found


def page_referenced(host: "Host", pfn: int) -> int:
    """How many mappings have the accessed bit set; clears them (folio_referenced)."""
    young = 0

    def check(vma: Vma, off: int) -> None:
        nonlocal young
        if vma.ptef[off] & PTE_YOUNG:
            young += 1
            vma.ptef[off] &= np.uint8(~PTE_YOUNG & 0xFF)

    rmap_walk(host, pfn, check)
    return young


@dataclass
class WalkTotals:
    visited: np.ndarray    # VMAs visited by each page's walk
    found: np.ndarray      # mappings found by each page's walk


def walk_many(host: "Host", pfns: np.ndarray) -> WalkTotals:
    """The walks of many anonymous pages, one anon_vma at a time.

    Gives the same visited and found counts as calling :func:`rmap_walk` for
    each page; pages that are not plain anonymous pages count zero.
    """
    pfns = np.asarray(pfns, dtype=np.int64)
    frames = host.frames
    visited = np.zeros(len(pfns), dtype=np.int64)
    found = np.zeros(len(pfns), dtype=np.int64)
    anon = (frames.flags[pfns] & (PG_ANON | PG_KSM)) == PG_ANON
    owners = frames.owner[pfns]
    order = np.flatnonzero(anon)
    order = order[np.argsort(owners[order], kind="stable")]
    bounds = np.flatnonzero(np.diff(owners[order])) + 1
    for group in np.split(order, bounds):
        if len(group) == 0:
            continue
        av = host.anon_vmas[int(owners[group[0]])]
        idx = frames.index[pfns[group]]
        for vma in av.vmas:
            off = vma.offsets_of(idx)
            covers = off < vma.pages
            if host.profile.anon_vma_chains:
                visited[group] += covers
            else:
                visited[group] += 1
            hit = covers.copy()
            o = off[covers]
            hit[covers] = ((vma.pte[o] == pfns[group][covers])
                           & ((vma.ptef[o] & (PTE_PRESENT | PTE_ZERO)) == PTE_PRESENT))
            found[group] += hit
    return WalkTotals(visited, found)
