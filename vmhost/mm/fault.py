"""Page faults and page-table teardown, vectorised over many pages of one VMA.

Write faults (``write_fault``), by the state of the PTE:

- none, or the shared zero page: a new page is allocated under the VMA's
  NUMA policy and stamped with the VMA's anon_vma (created on first use);
- present and writable: the write lands in place;
- present and write-protected (after fork, or a KSM page): copy-on-write.
  A KSM page is always copied, even by its last user (``cow_ksm``). An
  ordinary page that only this mapping holds is reused and moved to the
  VMA's own anon_vma; any other page is copied into the VMA's anon_vma.

A read of an untouched private page maps the shared zero page, which has no
frame. ``zap`` removes mappings (munmap, MADV_DONTNEED, exit) and frees frames
whose last reference went; a freed KSM page leaves its stable node stale, to
be pruned when KSM next touches it.

A swapped PTE is first swapped in (``vmhost.mm.swap``: do_swap_page with the
KSM copy rule); ``zap`` releases swap entries (free_swap_and_cache). When an
allocation fails, the whole fault is retried after ``host.oom_handler``
reclaimed memory or OOM-killed a process (``vmhost.mm.oom``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from hw.units import HPAGE_PAGES
from vmhost.mm import thp
from vmhost.mm.frames import INDEX_MASK, PG_DIRTY, PG_KSM, PG_MLOCKED, PG_SHMEM, PG_SWAPCACHE
from vmhost.mm.vma import (NO_PFN, PTE_DIRTY, PTE_KSM_ZERO, PTE_PRESENT, PTE_SWAP, PTE_WRITE,
                           PTE_YOUNG, PTE_ZERO, VmFlags, Vma)

if TYPE_CHECKING:
    from vmhost.host import Host

_MAPPED_RW = np.uint8(PTE_PRESENT | PTE_WRITE | PTE_DIRTY | PTE_YOUNG)


def alloc_for(host: "Host", vma: Vma, offsets: np.ndarray) -> np.ndarray:
    """Allocate one frame for each offset, following the VMA's (or mm's) NUMA policy."""
    policy = vma.policy or vma.mm.policy
    nodes = policy.preferred_nodes(vma.mm.home_node, vma.linear_index(offsets))
    return host.allocator.alloc_per_node(nodes, policy.allowed)


MAX_FAULT_RETRIES = 16     # like MAX_RECLAIM_RETRIES: give up (and let OOM be final) after this


def retry_fault(host: "Host", vma: Vma, op) -> None:
    """Run a whole (vectorised) fault; when an allocation fails, let ``host.oom_handler``
    reclaim or OOM-kill (vmhost.mm.oom) and run the fault again.

    A fault that fails half way leaves every PTE it already handled in a consistent
    state, so running it again only does what is left; no page is held across the
    retry, so reclaim in between cannot pull a page out from under the fault.
    """
    from vmhost.mm.page_alloc import OutOfMemory
    attempt = 0
    while True:
        try:
            return op()
        except OutOfMemory as exc:
            handler = getattr(host, "oom_handler", None)
            attempt += 1
            if handler is None or attempt > MAX_FAULT_RETRIES or not handler(exc, vma.mm, attempt):
                raise
            current = getattr(host, "current_task", None)
            if current is not None and not current.alive:
                raise              # the task doing the work was killed: it stops (signal pending)


def write_fault(host: "Host", vma: Vma, offsets: np.ndarray, contents: np.ndarray) -> None:
    """The process writes content ids ``contents`` at page offsets ``offsets`` of ``vma``."""
    retry_fault(host, vma, lambda: _write_fault(host, vma, offsets, contents))


def _write_fault(host: "Host", vma: Vma, offsets: np.ndarray, contents: np.ndarray) -> None:
    if vma.shmem is not None:
        _shmem_fault(host, vma, offsets, write=True)
    else:
        flags = vma.ptef[offsets]
        if (flags & PTE_SWAP).any():                 # do_swap_page first, then the write
            host.swap.swap_in(vma, offsets[(flags & PTE_SWAP) != 0], write=True)
            flags = vma.ptef[offsets]
        fresh = (flags & PTE_PRESENT == 0) | (flags & PTE_ZERO != 0)
        if fresh.any():
            _fault_huge(host, vma, offsets[fresh])
            still = offsets[fresh]
            still = still[(vma.ptef[still] & PTE_PRESENT == 0) | (vma.ptef[still] & PTE_ZERO != 0)]
            if len(still):
                _replace_zero_or_none(host, vma, still)
        cow = (flags & (PTE_PRESENT | PTE_WRITE | PTE_ZERO)) == PTE_PRESENT
        if cow.any():
            _copy_on_write(host, vma, offsets[cow])
    pfns = vma.pte[offsets]
    host.frames.content[pfns] = contents
    host.frames.flags[pfns] |= PG_DIRTY
    vma.ptef[offsets] |= np.uint8(PTE_DIRTY | PTE_YOUNG)
    if not vma.flags & VmFlags.WRITE:          # a forced write (/proc/PID/mem) maps read-only
        vma.ptef[offsets] &= np.uint8(~PTE_WRITE & 0xFF)
    vma.mm.touch_data()


def read_fault(host: "Host", vma: Vma, offsets: np.ndarray) -> None:
    """The process reads pages: an untouched private page gets the zero page."""
    retry_fault(host, vma, lambda: _read_fault(host, vma, offsets))


def _read_fault(host: "Host", vma: Vma, offsets: np.ndarray) -> None:
    if vma.shmem is not None:
        _shmem_fault(host, vma, offsets, write=False)
        return
    swapped = (vma.ptef[offsets] & PTE_SWAP) != 0
    if swapped.any():
        host.swap.swap_in(vma, offsets[swapped], write=False)
    none = offsets[vma.ptef[offsets] & (PTE_PRESENT | PTE_SWAP) == 0]
    vma.ptef[none] = PTE_PRESENT | PTE_ZERO
    thp.mark_pgtable(vma, none[~thp.huge_zero_ranges(host, vma, none)])
    vma.ptef[offsets] |= np.uint8(PTE_YOUNG)


def peek(host: "Host", vma: Vma, lo: int, hi: int) -> np.ndarray:
    """Content ids seen at offsets [lo, hi) of ``vma``, touching nothing."""
    flags = vma.ptef[lo:hi]
    out = np.zeros(hi - lo, dtype=np.uint64)
    mapped = (flags & (PTE_PRESENT | PTE_ZERO)) == PTE_PRESENT
    out[mapped] = host.frames.content[vma.pte[lo:hi][mapped]]
    swapped = (flags & PTE_SWAP) != 0
    if swapped.any():
        out[swapped] = host.swap.contents(vma.pte[lo:hi][swapped])
    if vma.shmem is not None:
        cached = vma.shmem.cache[vma.pgoff + lo: vma.pgoff + hi]
        hit = ~mapped & (cached != NO_PFN)
        out[hit] = host.frames.content[cached[hit]]
    return out


def _fault_huge(host: "Host", vma: Vma, offs: np.ndarray) -> None:
    """Map whole transparent huge pages where the VMA and the 2 MiB range allow it."""
    starts = thp.huge_candidates(host, vma, offs)
    if len(starts) == 0:
        return
    policy = vma.policy or vma.mm.policy
    nodes = policy.preferred_nodes(vma.mm.home_node, vma.linear_index(starts))
    for start, node in zip(starts, nodes):
        head = host.allocator.alloc_huge(int(node), policy.allowed)
        if head is None:
            host.vmstat["thp_fault_fallback"] += 1
            continue
        span = slice(int(start), int(start) + HPAGE_PAGES)
        ksm_zero = int(np.count_nonzero(vma.ptef[span] & PTE_KSM_ZERO))
        if ksm_zero:
            host.ksm.zero_pages_unmapped(vma.mm, ksm_zero)
        thp.map_huge(host, vma, int(start), head, host.anon_vmas.prepare(vma).id)


def _replace_zero_or_none(host: "Host", vma: Vma, offs: np.ndarray) -> None:
    ksm_zero = np.count_nonzero(vma.ptef[offs] & PTE_KSM_ZERO)
    if ksm_zero:
        host.ksm.zero_pages_unmapped(vma.mm, ksm_zero)
    av = host.anon_vmas.prepare(vma)
    pfns = alloc_for(host, vma, offs)
    host.frames.init_anon(pfns, 0, av.id, vma.linear_index(offs))
    _map_new(host, vma, offs, pfns)
    thp.mark_pgtable(vma, offs)                 # do_anonymous_page installs 4 KiB PTEs


def _map_new(host: "Host", vma: Vma, offs: np.ndarray, pfns: np.ndarray) -> None:
    if vma.flags & VmFlags.LOCKED:
        host.frames.flags[pfns] |= PG_MLOCKED
    vma.pte[offs] = pfns
    vma.ptef[offs] = _MAPPED_RW
    vma.mm.rss_anon += len(offs)
    vma.mm.touch_ptes()


def _copy_on_write(host: "Host", vma: Vma, offs: np.ndarray) -> None:
    frames = host.frames
    old = vma.pte[offs]
    cached = old[frames.has(old, PG_SWAPCACHE) & (frames.mapcount[old] == 1)]
    for pfn in cached.tolist():              # wp_can_reuse_anon_folio: drop an unneeded swap slot
        if not frames.flags[pfn] & PG_KSM:
            host.swap.try_free_swap(pfn)
    thp.mark_pgtable(vma, offs)     # a shared huge PMD is split; the copy is one 4 KiB page
    is_ksm = frames.has(old, PG_KSM)
    exclusive = ~is_ksm & (frames.mapcount[old] == 1) & (frames.refcount[old] == 1)
    av = host.anon_vmas.prepare(vma)
    reuse = offs[exclusive]
    if len(reuse):
        frames.owner[old[exclusive]] = av.id      # folio_move_anon_rmap
        vma.ptef[reuse] |= _MAPPED_RW
    copy = offs[~exclusive]
    if len(copy) == 0:
        return
    vma.mm.touch_ptes()
    src = old[~exclusive]
    host.vmstat["cow_ksm"] += int(np.count_nonzero(is_ksm))
    pfns = alloc_for(host, vma, copy)
    frames.init_anon(pfns, frames.content[src], av.id, vma.linear_index(copy))
    vma.mm.rss_anon -= len(copy)        # _map_new counts them again
    _map_new(host, vma, copy, pfns)
    put_mappings(host, src)


def put_mappings(host: "Host", pfns: np.ndarray) -> None:
    """Drop one mapping (and its reference) per entry; free frames left unreferenced."""
    if len(pfns) == 1:
        _put_one_mapping(host, int(pfns[0]))
        return
    frames = host.frames
    np.subtract.at(frames.mapcount, pfns, 1)
    np.subtract.at(frames.refcount, pfns, 1)
    uniq = np.unique(pfns)
    unmapped = uniq[frames.mapcount[uniq] == 0]
    frames.flags[unmapped] &= np.uint16(~PG_MLOCKED & 0xFFFF)
    dead = uniq[frames.refcount[uniq] == 0]
    if len(dead):
        frames.clear(dead)
        host.allocator.free(dead)
    thp.free_unmapped_folios(host, unmapped)
    for pfn in unmapped[frames.has(unmapped, PG_SWAPCACHE)].tolist():
        host.swap.try_free_swap(pfn)        # free_swap_cache: unmapped, no swap PTE left


def _put_one_mapping(host: "Host", pfn: int) -> None:
    """put_mappings for a single frame (KSM merges one page at a time), in scalar code."""
    frames = host.frames
    frames.mapcount[pfn] -= 1
    frames.refcount[pfn] -= 1
    if frames.mapcount[pfn]:
        return
    flags = int(frames.flags[pfn])
    frames.flags[pfn] = flags & ~PG_MLOCKED
    if frames.refcount[pfn] == 0:
        frames.clear(np.array([pfn], dtype=np.int64))
        host.allocator.free_one(pfn)
    elif flags & thp.PG_COMPOUND:
        thp.free_unmapped_folios(host, np.array([pfn], dtype=np.int64))
    elif flags & PG_SWAPCACHE:
        host.swap.try_free_swap(pfn)


def zap(host: "Host", vma: Vma, lo: int, hi: int) -> None:
    """Remove the mappings at offsets [lo, hi) (zap_page_range)."""
    flags = vma.ptef[lo:hi]
    ksm_zero = int(np.count_nonzero(flags & PTE_KSM_ZERO))
    if ksm_zero:
        host.ksm.zero_pages_unmapped(vma.mm, ksm_zero)
    mapped = (flags & (PTE_PRESENT | PTE_ZERO)) == PTE_PRESENT
    pfns = vma.pte[lo:hi][mapped]
    if len(pfns):
        if vma.shmem is not None:
            vma.mm.rss_shmem -= len(pfns)
        else:
            vma.mm.rss_anon -= len(pfns)
        put_mappings(host, pfns)
    swapped = (flags & PTE_SWAP) != 0
    if swapped.any():                        # free_swap_and_cache for each swap PTE
        vma.mm.swap_ents -= int(swapped.sum())
        host.swap.free_entries(vma.pte[lo:hi][swapped])
    _zap_pgtables(vma, lo, hi)
    vma.pte[lo:hi] = NO_PFN
    vma.ptef[lo:hi] = 0
    vma.mm.touch_ptes()


def _zap_pgtables(vma: Vma, lo: int, hi: int) -> None:
    """Page-table state after zapping [lo, hi). A 2 MiB range zapped whole has no page table
    left (a huge PMD is cleared; an emptied page table is freed, as MADV_DONTNEED does with
    CONFIG_PT_RECLAIM). A range zapped in part keeps its page table, and a huge PMD there is
    split first, so it gets one; a range that mapped nothing gets none. Called before the
    PTEs are cleared."""
    a, b = vma.start + lo, vma.start + hi
    first, last = a // HPAGE_PAGES, (b - 1) // HPAGE_PAGES
    base = vma.start // HPAGE_PAGES
    whole_lo = -(-a // HPAGE_PAGES)                  # first range starting at or after a
    whole_hi = b // HPAGE_PAGES                      # ranges before this one end by b
    if whole_hi > whole_lo:
        vma.pgtable[whole_lo - base: whole_hi - base] = False
    for r in {first, last}:
        if whole_lo <= r < whole_hi:
            continue
        s = max(r * HPAGE_PAGES, vma.start) - vma.start
        e = min((r + 1) * HPAGE_PAGES, vma.end) - vma.start
        if vma.ptef[s:e].any():
            vma.pgtable[r - base] = True


def _shmem_fault(host: "Host", vma: Vma, offs: np.ndarray, write: bool) -> None:
    shmem = vma.shmem
    idx = vma.linear_index(offs)
    missing = shmem.cache[idx] == NO_PFN
    if missing.any():
        new = alloc_for(host, vma, offs[missing])
        frames = host.frames
        frames.content[new] = 0
        frames.refcount[new] = 1                 # the page cache's reference
        frames.mapcount[new] = 0
        frames.flags[new] = PG_SHMEM
        frames.owner[new] = shmem.id
        frames.index[new] = idx[missing] & INDEX_MASK
        shmem.cache[idx[missing]] = new
    unmapped = offs[vma.ptef[offs] & PTE_PRESENT == 0]
    if len(unmapped):
        pfns = shmem.cache[vma.linear_index(unmapped)]
        host.frames.mapcount[pfns] += 1
        host.frames.refcount[pfns] += 1
        vma.pte[unmapped] = pfns
        vma.ptef[unmapped] = PTE_PRESENT | PTE_YOUNG | (PTE_WRITE if vma.flags & VmFlags.WRITE else 0)
        vma.mm.rss_shmem += len(unmapped)


def release_shmem(host: "Host", shmem) -> None:
    """The last VMA of a shmem object went: its page cache is dropped."""
    cached = shmem.cache[shmem.cache != NO_PFN]
    shmem.cache[:] = NO_PFN
    if len(cached):
        frames = host.frames
        frames.refcount[cached] -= 1
        dead = cached[frames.refcount[cached] == 0]
        frames.clear(dead)
        host.allocator.free(dead)

