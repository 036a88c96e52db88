"""Page migration: move pages to other frames, keeping every mapping and what it reads.

``migrate_pages`` moves a batch of pages the way migrate_pages() does for
each folio: allocate a target frame (preferring the page's own node, or the
nodes given), copy the content and the struct page state, point every PTE
that mapped the old frame at the new one, move the swap-cache and shmem
page-cache references, and free the old frame. For a KSM page the stable
node is told its page moved (``folio_migrate_ksm``: kpfn := new pfn, the new
frame's owner is the node, PG_KSM stays); sharing and the KSM counters are
unchanged. With merge_across_nodes=0 a KSM page that lands on another node
is re-homed lazily by the engine (migrate_nodes) when ksmd next meets it.

What cannot move, and why (the ``failed`` reasons):

- ``unmovable``: a kernel allocation (PG_KERNEL);
- ``pinned``: a GUP pin or reference (PG_PINNED): the page's refcount is
  above what its mappings explain, so folio_migrate_mapping fails with
  -EAGAIN; transient, retried by the caller (memory offline retries until
  its writer gets a signal);
- ``ksm``: a KSM page on the 2.6.33 profile, for any reason but hot-remove
  (``Profile.ksm_migrate_any`` is False: until 3.9 only memory offlining
  could migrate KSM pages);
- ``busy``: a reference beyond its mappings, swap cache, page cache and folio
  (an in-flight access): transient, retried by the caller;
- ``nomem``: no free frame for the copy: transient.

Transparent huge pages migrate whole when a free aligned 2 MiB chunk exists
on an allowed node; otherwise the THP is split first (the kernel's fallback
when no huge target can be allocated) and its pages migrate one by one.

Finding the mappings: the result is the same as an rmap walk of every page
of the batch (anon_vma interval tree, or the stable node's rmap_items for a
KSM page), but computed as one sweep of the page tables of every live mm,
which is what lets a 16 GiB offline run in seconds. Each page's mapping
count found by the sweep must equal its mapcount; a mismatch fails the page
(``busy``) rather than leaving a PTE at a freed frame.

Cost model (virtual time, returned as ``cost_ns``): ``PAGE_NS`` per page
(isolate from the LRU, allocate the target, copy 4 KiB, unmap/remap
bookkeeping) plus ``MAPPING_NS`` per PTE rewritten (rmap visit, set_pte and
its share of the TLB shootdown). A 2 MiB THP moved whole costs 512 x
``THP_PAGE_NS`` (a large copy without per-page allocation) plus its
mappings. PAGE_NS and MAPPING_NS are fitted to the real kernel's memory
offline on this machine class (a VM: 5-10 us per migrated page; bare metal
is faster), measured by ``vmhost hotremove configs/hotremove-oracle-*.yaml
--oracle``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np

from hw.units import HPAGE_PAGES
from vmhost.mm.frames import (PG_COMPOUND, PG_HEAD, PG_ISOLATED, PG_KERNEL, PG_KSM, PG_PINNED, PG_SHMEM,
                               PG_SWAPCACHE)
from vmhost.mm.page_alloc import OutOfMemory
from vmhost.mm.vma import NO_PFN, PTE_PRESENT, PTE_ZERO

if TYPE_CHECKING:
    from vmhost.host import Host

PAGE_NS = 5000
MAPPING_NS = 500
THP_PAGE_NS = 300

TRANSIENT = ("busy", "nomem", "pinned")


@dataclass
class MigrateResult:
    migrated: int = 0               # pages moved
    migrated_ksm: int = 0           # of which KSM pages
    migrated_thp: int = 0           # whole THPs moved (each counts 512 in migrated)
    split_thp: int = 0              # THPs split because no huge target was free
    mappings: int = 0               # PTEs rewritten
    cost_ns: int = 0
    failed: dict[int, str] = field(default_factory=dict)   # pfn -> reason

    def add(self, other: "MigrateResult") -> None:
        for name in ("migrated", "migrated_ksm", "migrated_thp", "split_thp", "mappings", "cost_ns"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.failed.update(other.failed)

    def to_dict(self) -> dict:
        reasons: dict[str, int] = {}
        for r in self.failed.values():
            reasons[r] = reasons.get(r, 0) + 1
        return {"migrated": self.migrated, "migrated_ksm": self.migrated_ksm,
                "migrated_thp": self.migrated_thp, "split_thp": self.split_thp,
                "mappings": self.mappings, "cost_ns": self.cost_ns, "failed": reasons}


def expected_refs(host: "Host", pfns: np.ndarray) -> np.ndarray:
    """References a movable page may hold: mappings, swap cache, page cache, folio."""
    f = host.frames.flags[pfns]
    return (host.frames.mapcount[pfns] + ((f & PG_SWAPCACHE) != 0) + ((f & PG_COMPOUND) != 0)
            + ((f & PG_SHMEM) != 0))


def migrate_pages(host: "Host", pfns, *, nodes: Sequence[int] | None = None, reason: str = "compaction",
                  kernel_zone: bool = False) -> MigrateResult:
    """Migrate the in-use pages among ``pfns``; ``nodes`` limits the targets (default: any,
    nearest to each page's node first). ``kernel_zone`` asks for ZONE_NORMAL targets (what a
    long-term pin needs)."""
    frames = host.frames
    res = MigrateResult()
    pfns = np.unique(np.asarray(pfns, dtype=np.int64))
    pfns = pfns[frames.refcount[pfns] > 0]
    if len(pfns) == 0:
        return res
    flags = frames.flags[pfns]
    bad = [((flags & PG_KERNEL) != 0, "unmovable"), ((flags & PG_PINNED) != 0, "pinned")]
    if reason != "hotremove" and not host.profile.ksm_migrate_any:
        bad.append(((flags & PG_KSM) != 0, "ksm"))
    busy = frames.refcount[pfns] != expected_refs(host, pfns)
    bad.append((busy, "busy"))
    keep = np.ones(len(pfns), dtype=bool)
    for mask, why in bad:
        for p in pfns[mask & keep].tolist():
            res.failed[p] = why
        keep &= ~mask
    pfns = pfns[keep]

    # transparent huge pages: whole, or split and then moved as base pages
    compound = pfns[(frames.flags[pfns] & PG_COMPOUND) != 0]
    base = pfns[(frames.flags[pfns] & PG_COMPOUND) == 0]
    heads = np.unique(compound - compound % HPAGE_PAGES)
    moved_heads, split_pages = [], []
    for head in heads.tolist():
        node = int(host.phys.node_of(head))
        new_head = host.allocator.alloc_huge(node, nodes)
        if new_head is not None and _thp_movable(host, head):
            moved_heads.append((head, new_head))
            continue
        if new_head is not None:
            host.allocator.free_huge(new_head)
        from vmhost.mm import thp
        thp.split_huge_page(host, head)
        res.split_thp += 1
        span = np.arange(head, head + HPAGE_PAGES, dtype=np.int64)
        split_pages.append(span[frames.refcount[span] > 0])
    if split_pages:
        base = np.unique(np.concatenate([base] + split_pages))
        base = base[frames.refcount[base] > 0]

    old_parts, new_parts = [], []
    for head, new_head in moved_heads:
        old_parts.append(np.arange(head, head + HPAGE_PAGES, dtype=np.int64))
        new_parts.append(np.arange(new_head, new_head + HPAGE_PAGES, dtype=np.int64))
        res.migrated_thp += 1
    if len(base):
        src_nodes = host.phys.node_of(base)
        for node in np.unique(src_nodes).tolist():
            group = base[src_nodes == node]
            try:
                new = host.allocator.alloc(len(group), int(node), nodes, kernel=kernel_zone)
            except OutOfMemory:
                for p in group.tolist():
                    res.failed[p] = "nomem"
                continue
            old_parts.append(group)
            new_parts.append(np.asarray(new, dtype=np.int64))
    if not old_parts:
        return res
    old = np.concatenate(old_parts)
    new = np.concatenate(new_parts)
    found = _move(host, old, new, res)
    ok = found == frames.mapcount[old]
    if not ok.all():
        # a mapping the sweep could not account for: put those pages back untouched
        _move(host, new[~ok], old[~ok], MigrateResult())
        for p in old[~ok].tolist():
            res.failed[p] = "busy"
        _free(host, new[~ok])
        old, new = old[ok], new[ok]
    _finish(host, old, new, res)
    whole = sum(HPAGE_PAGES for _ in moved_heads)
    res.migrated += len(old)
    res.cost_ns += (len(old) - whole) * PAGE_NS + whole * THP_PAGE_NS + res.mappings * MAPPING_NS
    host.vmstat["pgmigrate_success"] += len(old)
    host.vmstat["pgmigrate_fail"] += len(res.failed)
    return res


def _thp_movable(host: "Host", head: int) -> bool:
    span = slice(head, head + HPAGE_PAGES)
    f = host.frames.flags[span]
    return not ((f & (PG_PINNED | PG_KERNEL)) != 0).any()


def _move(host: "Host", old: np.ndarray, new: np.ndarray, res: MigrateResult) -> np.ndarray:
    """Point every PTE at ``old[i]`` to ``new[i]``; returns the mappings found per page."""
    order = np.argsort(old)
    sold, snew = old[order], new[order]
    found = np.zeros(len(old), dtype=np.int64)
    lo, hi = int(sold[0]), int(sold[-1]) + 1
    for proc in list(host.processes.values()):
        touched = False
        for vma in proc.mm.vmas:
            pte = vma.pte
            cand = np.flatnonzero((pte >= lo) & (pte < hi))
            if len(cand) == 0:
                continue
            cand = cand[(vma.ptef[cand] & (PTE_PRESENT | PTE_ZERO)) == PTE_PRESENT]
            idx = np.searchsorted(sold, pte[cand])
            idx[idx >= len(sold)] = 0
            hit = sold[idx] == pte[cand]
            if not hit.any():
                continue
            cand, idx = cand[hit], idx[hit]
            pte[cand] = snew[idx]
            np.add.at(found, order[idx], 1)
            res.mappings += len(cand)
            touched = True
        if touched:
            proc.mm.touch_ptes()
    return found


def _finish(host: "Host", old: np.ndarray, new: np.ndarray, res: MigrateResult) -> None:
    """Copy the struct page state, move cache references and KSM's kpfn, free the old frames."""
    frames = host.frames
    for name in ("content", "mapcount", "refcount", "owner", "index"):
        arr = getattr(frames, name)
        arr[new] = arr[old]
    frames.flags[new] = frames.flags[old] & np.uint16(~PG_ISOLATED & 0xFFFF)
    is_cached = (frames.flags[old] & PG_SWAPCACHE) != 0
    if is_cached.any():
        host.swap.moved(old[is_cached], new[is_cached])
    shm = (frames.flags[old] & PG_SHMEM) != 0
    if shm.any():
        _move_shmem(host, old[shm], new[shm])
    ksm = (frames.flags[old] & PG_KSM) != 0
    if ksm.any():
        res.migrated_ksm += int(ksm.sum())
        host.ksm.migrate_pages(old[ksm], new[ksm])
    _free(host, old)


def _free(host: "Host", pfns: np.ndarray) -> None:
    """Free frames (whole 2 MiB chunks go back as chunks)."""
    if len(pfns) == 0:
        return
    frames = host.frames
    heads = pfns[(frames.flags[pfns] & PG_HEAD) != 0]
    frames.clear(pfns)
    in_chunk = np.isin(pfns - pfns % HPAGE_PAGES, heads)
    for head in heads.tolist():
        host.allocator.free_huge(int(head))
    host.allocator.free(pfns[~in_chunk])


def _move_shmem(host: "Host", old: np.ndarray, new: np.ndarray) -> None:
    order = np.argsort(old)
    sold, snew = old[order], new[order]
    seen = set()
    for mm in host.live_mms():
        for vma in mm.vmas:
            if vma.shmem is None or vma.shmem.id in seen:
                continue
            seen.add(vma.shmem.id)
            cache = vma.shmem.cache
            cand = np.flatnonzero(cache != NO_PFN)
            idx = np.searchsorted(sold, cache[cand])
            idx[idx >= len(sold)] = 0
            hit = sold[idx] == cache[cand]
            cache[cand[hit]] = snew[idx[hit]]
