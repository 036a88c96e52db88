"""Transparent huge pages: 2 MiB folios of 512 pages, and splitting them.

QEMU backs guest RAM with THPs (it madvises MADV_HUGEPAGE), so a guest's
first touch of a 2 MiB-aligned range allocates a whole zero-filled 2 MiB
folio. Each of its 512 frames is tracked on its own (content, mappings) but
the folio lives and dies as one: every frame carries one extra reference held
by the folio, and the folio is freed only when none of its pages is mapped.

KSM cannot merge part of a huge page, so it splits the folio first
(``split_huge_page``). Splitting turns the 512 frames into ordinary pages,
frees those nobody maps, and, since 6.12, maps every zero-filled page to the
shared zero page instead of keeping it: that is why zero pages of THP-backed
guest RAM never show up in pages_sharing.

THP mode follows /sys/kernel/mm/transparent_hugepage/enabled: ``always``,
``madvise`` (only MADV_HUGEPAGE VMAs; the default on this project's
machines) or ``never``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from hw.units import HPAGE_PAGES
from vmhost.mm.frames import (PG_ANON, PG_COMPOUND, PG_DIRTY, PG_HEAD, PG_MLOCKED, PG_REFERENCED,
                              PG_TAIL)
from vmhost.mm.vma import (PTE_DIRTY, PTE_KSM_ZERO, PTE_PRESENT, PTE_SWAP, PTE_WRITE, PTE_YOUNG, PTE_ZERO,
                           VmFlags, Vma)

if TYPE_CHECKING:
    from vmhost.host import Host

_COMPOUND_MASK = np.uint16(~PG_COMPOUND & 0xFFFF)
_NOT_PLAIN = np.uint16(~(PG_ANON | PG_DIRTY | PG_REFERENCED) & 0xFFFF)   # a flag that changes how a page is put


def thp_allowed(host: "Host", vma: Vma) -> bool:
    if host.thp_mode == "never" or not vma.is_anonymous_private:
        return False
    if vma.flags & (VmFlags.NOHUGEPAGE | VmFlags.HUGETLB | VmFlags.PFNMAP):
        return False
    return host.thp_mode == "always" or bool(vma.flags & VmFlags.HUGEPAGE)


def huge_candidates(host: "Host", vma: Vma, offs: np.ndarray) -> np.ndarray:
    """Offsets (first of each 2 MiB range) where a write fault can map a whole huge page."""
    if not thp_allowed(host, vma) or len(offs) == 0:
        return np.zeros(0, dtype=np.int64)
    first = ((vma.start + offs) // HPAGE_PAGES) * HPAGE_PAGES - vma.start
    starts = np.unique(first)
    starts = starts[(starts >= 0) & (starts + HPAGE_PAGES <= vma.pages)]
    # pmd_none, or the huge zero page: no page table there (a split or a 4 KiB fault made one)
    starts = starts[~vma.pgtable[vma.pmd_index(starts)]]
    ok = []
    for s in starts:
        f = vma.ptef[s: s + HPAGE_PAGES]
        empty = (f & (PTE_PRESENT | PTE_SWAP)) == 0
        plain_zero = (f & (PTE_ZERO | PTE_KSM_ZERO)) == PTE_ZERO
        if (empty | plain_zero).all():
            ok.append(s)
    return np.asarray(ok, dtype=np.int64)


def huge_zero_ranges(host: "Host", vma: Vma, offs: np.ndarray) -> np.ndarray:
    """Mask over ``offs``: a read fault there maps the huge zero page (a whole 2 MiB range of
    a THP VMA with no page table yet), not a 4 KiB zero-page PTE."""
    if not thp_allowed(host, vma) or len(offs) == 0:
        return np.zeros(len(offs), dtype=np.bool_)
    first = ((vma.start + offs) // HPAGE_PAGES) * HPAGE_PAGES - vma.start
    return (first >= 0) & (first + HPAGE_PAGES <= vma.pages) & ~vma.pgtable[vma.pmd_index(offs)]


def map_huge(host: "Host", vma: Vma, start: int, head: int, anon_vma_id: int,
             event: str | None = "thp_fault_alloc") -> None:
    """Map a freshly allocated, zero-filled folio at offsets [start, start+512), counting
    ``event`` in vmstat (a fault's; khugepaged counts its collapse itself)."""
    frames = host.frames
    pfns = np.arange(head, head + HPAGE_PAGES, dtype=np.int64)
    frames.init_anon(pfns, 0, anon_vma_id, vma.linear_index(np.arange(start, start + HPAGE_PAGES)))
    frames.refcount[pfns] += 1                      # the folio's own reference
    frames.flags[head] |= PG_HEAD
    frames.flags[head + 1: head + HPAGE_PAGES] |= PG_TAIL
    if vma.flags & VmFlags.LOCKED:
        frames.flags[pfns] |= PG_MLOCKED
    vma.pte[start: start + HPAGE_PAGES] = pfns
    vma.ptef[start: start + HPAGE_PAGES] = PTE_PRESENT | PTE_WRITE | PTE_DIRTY | PTE_YOUNG
    vma.mm.rss_anon += HPAGE_PAGES
    vma.mm.touch_ptes()
    if event:
        host.vmstat[event] += 1


def head_of(pfn: int) -> int:
    return pfn - pfn % HPAGE_PAGES


def same_folio(host: "Host", a: int, b: int) -> bool:
    flags = host.frames.flags
    return bool(flags[a] & PG_COMPOUND) and bool(flags[b] & PG_COMPOUND) and head_of(a) == head_of(b)


def free_unmapped_folios(host: "Host", pfns: np.ndarray) -> None:
    """Free the huge pages among ``pfns`` whose 512 pages are all unmapped now."""
    frames = host.frames
    compound = pfns[(frames.flags[pfns] & PG_COMPOUND) != 0]
    for head in np.unique(compound - compound % HPAGE_PAGES):
        span = slice(int(head), int(head) + HPAGE_PAGES)
        if frames.mapcount[span].any() or (frames.refcount[span] != 1).any():
            continue
        frames.clear(np.arange(head, head + HPAGE_PAGES))
        host.allocator.free_huge(int(head))


def mark_pgtable(vma: Vma, offs) -> None:
    """A PTE page table now exists for the 2 MiB ranges holding these offsets."""
    vma.pgtable[vma.pmd_index(offs)] = True


def _split_pmds(host: "Host", pfns: np.ndarray) -> None:
    """Every mapping of the folio ``pfns`` becomes PTE-mapped (unmap_folio splits each huge
    PMD): mark a page table in each VMA range that maps one of its pages."""
    frames = host.frames
    mapped = pfns[frames.mapcount[pfns] > 0]
    if len(mapped) == 0:
        return
    index = frames.index[mapped]
    for owner in np.unique(frames.owner[mapped]).tolist():
        mine = frames.owner[mapped] == owner
        for vma in list(host.anon_vmas[int(owner)].vmas):
            offs = vma.offsets_of(index[mine])
            inside = offs < vma.pages
            offs, want = offs[inside], mapped[mine][inside]
            hit = offs[(vma.pte[offs] == want)
                       & ((vma.ptef[offs] & (PTE_PRESENT | PTE_ZERO)) == PTE_PRESENT)]
            if len(hit):
                mark_pgtable(vma, hit)


def _zero_remap_at_once(host: "Host", zeroed: np.ndarray) -> bool:
    """The zero-page remapping of ``split_huge_page`` for the common case, in one go: every
    zero-filled page mapped once, by its own reference only, in one unlocked VMA of its
    anon_vma. The same PTEs, counts, page-table generations and free order as page by page
    (returns False, having changed nothing, for any other case)."""
    frames = host.frames
    if len(zeroed) == 0:
        return True
    owner = frames.owner[zeroed]
    if ((frames.mapcount[zeroed] != 1).any() or (frames.refcount[zeroed] != 1).any()
            or (owner != owner[0]).any()
            or (frames.flags[zeroed] & _NOT_PLAIN).any()
            or not (frames.flags[zeroed] & PG_ANON).all()):
        return False
    index = frames.index[zeroed]
    hit = None
    for vma in host.anon_vmas[int(owner[0])].vmas:
        offs = vma.offsets_of(index)
        inside = offs < vma.pages
        if not inside.any():
            continue
        if hit is not None or not inside.all():
            return False                       # more than one VMA to look at
        maps = ((vma.pte[offs] == zeroed)
                & ((vma.ptef[offs] & (PTE_PRESENT | PTE_ZERO)) == PTE_PRESENT))
        if not maps.all() or vma.flags & VmFlags.LOCKED:
            return False
        hit = (vma, offs)
    if hit is None:
        return False
    vma, offs = hit
    k = len(zeroed)
    vma.pte[offs] = -1
    vma.ptef[offs] = PTE_PRESENT | PTE_ZERO
    vma.mm.rss_anon -= k
    host.pt_epoch[vma.mm.id] += k              # touch_ptes once per page, as page by page
    host.changes[0] += k
    frames.mapcount[zeroed] = 0
    frames.refcount[zeroed] = 0
    frames.clear(zeroed)
    host.allocator.free_in_order(zeroed)
    return True


def split_huge_page(host: "Host", pfn: int) -> None:
    """Split the folio holding ``pfn`` into 512 ordinary pages (split_huge_page).

    Unmapped pages are freed; mapped zero-filled pages are replaced by the
    shared zero page in every mapping (remap_page with RMP_USE_SHARED_ZEROPAGE).
    """
    from vmhost.mm.fault import put_mappings
    from vmhost.mm.rmap import mappings
    frames = host.frames
    head = head_of(pfn)
    pfns = np.arange(head, head + HPAGE_PAGES, dtype=np.int64)
    _split_pmds(host, pfns)
    frames.flags[pfns] &= _COMPOUND_MASK
    frames.refcount[pfns] -= 1                          # the folio reference goes
    host.vmstat["thp_split_page"] += 1
    unmapped = pfns[frames.refcount[pfns] == 0]
    if len(unmapped):
        frames.clear(unmapped)
        host.allocator.free(unmapped)
    zeroed = pfns[(frames.content[pfns] == 0) & (frames.mapcount[pfns] > 0)
                  & ((frames.flags[pfns] & PG_MLOCKED) == 0)]
    if _zero_remap_at_once(host, zeroed):
        return
    for z in zeroed:
        for vma, off in mappings(host, int(z)):
            if vma.flags & VmFlags.LOCKED:
                continue
            vma.pte[off] = -1
            vma.ptef[off] = PTE_PRESENT | PTE_ZERO
            vma.mm.rss_anon -= 1
            vma.mm.touch_ptes()
            put_mappings(host, np.array([z], dtype=np.int64))
