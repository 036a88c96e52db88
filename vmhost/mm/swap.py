"""Swap: swap entries, the swap cache, swap-out of one page, swap-in at a fault.

The pieces, by their kernel counterparts:

- a *swap entry* names one slot of one swap device (swp_entry_t). A swapped
  PTE holds it (``PTE_SWAP`` set, ``vma.pte`` = the entry, encoded as
  ``device << SWP_SHIFT | slot`` to fit a 32-bit PTE: at most ``MAX_SWAPFILES`` devices
  of at most ``SWP_MAX_PAGES`` slots each, 256 GiB; the kernel's x86-64 entry has 5 bits
  of device too, and 50 of slot);
- each device has a *swap map*: for every slot, how many swap PTEs refer to
  it (``SwapArea.count``). A slot is in use while that count is non-zero or a
  page sits in the swap cache for it;
- the *swap cache* maps an entry to the page holding its data while both
  exist (``SwapArea.cache``). A page in it has PG_SWAPCACHE and one extra
  reference. A KSM page keeps its stable node valid while it is in the swap
  cache (the engine's keyhole test accepts a PG_SWAPCACHE page);
- devices are used highest priority first; devices of equal priority take
  turns page by page (the kernel's plist rotation in get_swap_pages).

Swap-out (``reclaim_page``, shrink_folio_list for one anonymous folio):
add_to_swap, then try_to_unmap through rmap -- for a KSM page that walks its
stable node's rmap_items (own mm first, then forked mms), so every mapping
becomes the same entry and the slot's count is the number of mappings --
then pageout() if the page is dirty, then the page leaves the swap cache and
is freed. A write error leaves the page in the swap cache, dirty, unmapped:
nothing is lost, a later fault maps it back.

Swap-in (``swap_in``, do_swap_page): the page is taken from the swap cache
or read from the device into a fresh page (swapin_readahead without the
readahead); then ``ksm_might_need_to_copy`` decides whether this PTE may map
that page or needs a private copy (see ``_needs_copy``). A read error makes
the access fail with SIGBUS (:class:`SwapReadError`), recorded in the
process's signals; the entry, and every other page, stays as it was.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hw.swap import SwapDevice, SwapIOError
from vmhost.mm.frames import (INDEX_MASK, NO_OWNER, PG_ANON, PG_COMPOUND, PG_DIRTY, PG_KERNEL, PG_KSM,
                               PG_MLOCKED, PG_PINNED, PG_SHMEM, PG_SWAPCACHE)
from vmhost.mm.vma import PTE_DIRTY, PTE_PRESENT, PTE_SWAP, PTE_WRITE, PTE_ZERO, VmFlags, Vma

if TYPE_CHECKING:
    from vmhost.host import Host

SWP_SHIFT = 26
SWP_SLOT_MASK = (1 << SWP_SHIFT) - 1
SWP_MAX_PAGES = 1 << SWP_SHIFT                     # slots a swap device can have here
MAX_SWAPFILES = 1 << (31 - SWP_SHIFT)              # an entry stays a non-negative int32


def swp_entry(area: int, slot: int) -> int:
    return (int(area) << SWP_SHIFT) | int(slot)


class SwapReadError(Exception):
    """A swap-in read failed: the faulting access gets SIGBUS (VM_FAULT_SIGBUS)."""

    def __init__(self, pid: int, vpn: int, entry: int, cause: str):
        super().__init__(f"SIGBUS: pid {pid} page {vpn:#x}: {cause}")
        self.pid, self.vpn, self.entry = pid, vpn, entry


@dataclass
class SwapArea:
    """swap_info_struct: one swapon'ed device and its swap map."""
    index: int
    dev: SwapDevice

    def __post_init__(self) -> None:
        self.count = np.zeros(self.dev.capacity_pages, dtype=np.int32)      # swap PTEs per slot
        self.cache = np.full(self.dev.capacity_pages, -1, dtype=np.int64)   # swap cache: slot -> pfn

    @property
    def priority(self) -> int:
        return self.dev.priority


class Swap:
    """Swap areas, the swap cache and the two directions of swapping."""

    def __init__(self, host: "Host"):
        self.host = host
        self.areas: list[SwapArea] = []
        self.cache_entry: dict[int, int] = {}       # pfn in the swap cache -> its entry
        self._turn: dict[int, int] = {}             # priority -> next area index to try (round robin)
        self.io_seconds = 0.0
        for dev in host.swap_devices:
            self.swapon(dev)

    # -- devices --------------------------------------------------------------------------------
    def swapon(self, dev: SwapDevice) -> SwapArea:
        if len(self.areas) >= MAX_SWAPFILES or dev.capacity_pages > SWP_MAX_PAGES:
            raise ValueError(f"swap device {dev.name}: at most {MAX_SWAPFILES} devices of at "
                             f"most {SWP_MAX_PAGES} pages each")
        area = SwapArea(len(self.areas), dev)
        self.areas.append(area)
        if not any(d is dev for d in self.host.swap_devices):
            self.host.swap_devices.append(dev)
            self.host.swap_devices.sort(key=lambda d: -d.priority)
        return area

    @property
    def total_pages(self) -> int:
        return sum(a.dev.capacity_pages for a in self.areas)

    @property
    def free_pages(self) -> int:
        return sum(a.dev.free_pages for a in self.areas)

    def swap_full(self) -> bool:
        """vm_swap_full: more than half of all swap space in use."""
        total = self.total_pages
        return total > 0 and self.free_pages * 2 < total

    def _alloc_entry(self) -> int | None:
        """get_swap_pages: a free slot on the highest-priority device with room (round robin
        among devices of that priority); None when every device is full."""
        for prio in sorted({a.priority for a in self.areas}, reverse=True):
            group = [a for a in self.areas if a.priority == prio]
            start = self._turn.get(prio, 0)
            for k in range(len(group)):
                area = group[(start + k) % len(group)]
                got = area.dev.allocate_slots(1)
                if len(got):
                    self._turn[prio] = (start + k + 1) % len(group)
                    return swp_entry(area.index, int(got[0]))
        return None

    def _area(self, entry: int) -> tuple[SwapArea, int]:
        return self.areas[entry >> SWP_SHIFT], entry & SWP_SLOT_MASK

    def _maybe_free_slot(self, area: SwapArea, slot: int) -> None:
        if area.count[slot] == 0 and area.cache[slot] < 0:
            area.dev.free_slots([slot])

    # -- the swap cache ---------------------------------------------------------------------------
    def add_to_swap_cache(self, pfn: int, entry: int) -> None:
        area, slot = self._area(entry)
        self.host.frames.flags[pfn] |= PG_SWAPCACHE
        self.host.frames.refcount[pfn] += 1
        area.cache[slot] = pfn
        self.cache_entry[pfn] = entry

    def delete_from_swap_cache(self, pfn: int) -> None:
        """The page leaves the swap cache (its reference goes; freed if that was the last)."""
        entry = self.cache_entry.pop(pfn)
        area, slot = self._area(entry)
        frames = self.host.frames
        area.cache[slot] = -1
        frames.flags[pfn] &= np.uint16(~PG_SWAPCACHE & 0xFFFF)
        frames.refcount[pfn] -= 1
        self._maybe_free_slot(area, slot)
        if frames.refcount[pfn] == 0:
            dead = np.array([pfn], dtype=np.int64)
            frames.clear(dead)
            self.host.allocator.free(dead)

    def try_free_swap(self, pfn: int) -> bool:
        """folio_free_swap: drop a swap-cache page's slot once no swap PTE refers to it."""
        entry = self.cache_entry.get(pfn)
        if entry is None:
            return False
        area, slot = self._area(entry)
        if area.count[slot] != 0:
            return False
        self.delete_from_swap_cache(pfn)
        return True

    def moved(self, old: np.ndarray, new: np.ndarray) -> None:
        """Migration moved swap-cache pages ``old`` to frames ``new`` (folio_migrate_mapping)."""
        for o, n in zip(old.tolist(), new.tolist()):
            entry = self.cache_entry.pop(o, None)
            if entry is None:
                continue
            area, slot = self._area(entry)
            area.cache[slot] = n
            self.cache_entry[n] = entry

    # -- swap PTEs: fork, zap, peek -----------------------------------------------------------------
    def dup_entries(self, entries: np.ndarray) -> None:
        """swap_duplicate for each entry copied at fork."""
        for e in entries.tolist():
            area, slot = self._area(e)
            area.count[slot] += 1

    def free_entries(self, entries: np.ndarray) -> None:
        """free_swap_and_cache for each zapped swap PTE."""
        for e in entries.tolist():
            area, slot = self._area(e)
            area.count[slot] -= 1
            if area.count[slot] == 0:
                pfn = int(area.cache[slot])
                if pfn >= 0 and self.host.frames.mapcount[pfn] == 0:
                    self.delete_from_swap_cache(pfn)       # __try_to_reclaim_swap
                self._maybe_free_slot(area, slot)

    def contents(self, entries: np.ndarray) -> np.ndarray:
        """What the pages behind these entries hold (swap cache first, else the device)."""
        out = np.zeros(len(entries), dtype=np.uint64)
        for i, e in enumerate(np.asarray(entries).tolist()):
            area, slot = self._area(e)
            pfn = int(area.cache[slot])
            out[i] = self.host.frames.content[pfn] if pfn >= 0 else area.dev.data[slot]
        return out

    # -- swap-out ------------------------------------------------------------------------------------
    def reclaimable(self, pfn: int) -> bool:
        f = int(self.host.frames.flags[pfn])
        if not f & (PG_ANON | PG_KSM) or f & (PG_MLOCKED | PG_PINNED | PG_KERNEL | PG_SHMEM):
            return False
        return self.host.frames.refcount[pfn] > 0

    def reclaim_page(self, pfn: int, keep_cached: bool = False) -> str:
        """Swap one anonymous or KSM page out and free it.

        Returns "freed", or why not: "unevictable", "swap full", "busy" (a mapping
        rmap cannot reach, or an extra reference), "write error". With ``keep_cached``
        the page is unmapped and written but left in the swap cache ("cached"), as it
        is between writeback and the next reclaim pass.
        """
        host, frames = self.host, self.host.frames
        if not self.reclaimable(pfn):
            return "unevictable"
        if frames.flags[pfn] & PG_COMPOUND:
            from vmhost.mm import thp
            thp.split_huge_page(host, pfn)          # swap out as base pages (THP_SWAP fallback)
            if frames.refcount[pfn] == 0 or not self.reclaimable(pfn):
                return "freed"
        entry = self.cache_entry.get(pfn)
        if entry is None:
            entry = self._alloc_entry()
            if entry is None:
                return "swap full"
            self.add_to_swap_cache(pfn, entry)
            frames.flags[pfn] |= PG_DIRTY          # the slot holds nothing yet
        self._unmap(pfn, entry)
        if frames.mapcount[pfn] > 0:
            return "busy"                          # try_to_unmap could not reach every mapping
        area, slot = self._area(entry)
        if frames.flags[pfn] & PG_DIRTY:
            try:
                area.dev.write_slot(slot, int(frames.content[pfn]))
            except SwapIOError:
                host.vmstat["swap_write_errors"] += 1
                return "write error"               # stays in the swap cache, dirty
            frames.flags[pfn] &= np.uint16(~PG_DIRTY & 0xFFFF)
            host.vmstat["pswpout"] += 1
            self.io_seconds += area.dev.write_seconds(1)
        if keep_cached:
            return "cached"
        if frames.refcount[pfn] != 1:
            return "busy"                          # a pin or in-flight reference: keep it cached
        self.delete_from_swap_cache(pfn)
        return "freed"

    def _unmap(self, pfn: int, entry: int) -> None:
        """try_to_unmap: every mapping rmap finds becomes the swap entry."""
        from vmhost.mm.rmap import mappings
        host, frames = self.host, self.host.frames
        area, slot = self._area(entry)
        for vma, off in mappings(host, pfn):
            vma.pte[off] = entry
            vma.ptef[off] = PTE_SWAP
            frames.mapcount[pfn] -= 1
            frames.refcount[pfn] -= 1
            area.count[slot] += 1
            vma.mm.rss_anon -= 1
            vma.mm.swap_ents += 1
            vma.mm.touch_ptes()
        if frames.mapcount[pfn] == 0:
            frames.flags[pfn] &= np.uint16(~PG_MLOCKED & 0xFFFF)

    # -- swap-in ---------------------------------------------------------------------------------
    def swap_in(self, vma: Vma, offsets: np.ndarray, write: bool) -> None:
        """do_swap_page for each swapped PTE among ``offsets``."""
        for off in offsets.tolist():
            if vma.ptef[off] & PTE_SWAP:
                self._swap_in_one(vma, off, write)

    def _swap_in_one(self, vma: Vma, off: int, write: bool) -> None:
        from vmhost.mm.fault import alloc_for
        host, frames = self.host, self.host.frames
        entry = int(vma.pte[off])
        area, slot = self._area(entry)
        pfn = int(area.cache[slot])
        if pfn < 0:                                       # not cached: read it from the device
            try:
                area.dev.check_io(slot)
            except SwapIOError as exc:
                self._sigbus(vma, off, entry, str(exc))
            new = int(alloc_for(host, vma, np.array([off]))[0])
            content = area.dev.read_slot(slot)
            self.io_seconds += area.dev.read_seconds(1)
            host.vmstat["pswpin"] += 1
            frames.content[new] = content
            frames.flags[new] = 0
            frames.owner[new] = NO_OWNER
            frames.index[new] = 0
            frames.mapcount[new] = 0
            frames.refcount[new] = 0
            self.add_to_swap_cache(new, entry)
            pfn = new
        av = host.anon_vmas.prepare(vma)
        page = pfn
        if self._needs_copy(pfn, vma, off):
            page = int(alloc_for(host, vma, np.array([off]))[0])
            frames.init_anon(np.array([page]), frames.content[pfn], av.id, vma.linear_index([off]))
            frames.flags[page] &= np.uint16(~PG_DIRTY & 0xFFFF)
            frames.flags[page] |= frames.flags[pfn] & PG_DIRTY
            host.vmstat["ksm_swpin_copy"] += 1
        else:
            if not frames.flags[pfn] & (PG_ANON | PG_KSM):
                # a fresh read from swap: becomes an ordinary anonymous page of this VMA
                frames.flags[pfn] |= PG_ANON
                frames.owner[pfn] = av.id
                frames.index[pfn] = int(vma.linear_index([off])[0]) & INDEX_MASK
            frames.mapcount[pfn] += 1
            frames.refcount[pfn] += 1
        vma.map_readonly(off, page, frames)
        vma.mm.rss_anon += 1
        vma.mm.swap_ents -= 1
        area.count[slot] -= 1
        # should_try_to_free_swap: the cached copy's slot goes when no PTE needs it any more
        # and swap is over half full, the page is mlocked, or a write wants it exclusive
        cached = int(area.cache[slot])
        if cached >= 0 and area.count[slot] == 0:
            is_ksm = bool(frames.flags[cached] & PG_KSM)
            if (frames.mapcount[cached] == 0 or self.swap_full() or vma.flags & VmFlags.LOCKED
                    or frames.flags[cached] & PG_MLOCKED
                    or (write and not is_ksm and page == cached and frames.refcount[cached] == 2)):
                self.delete_from_swap_cache(cached)
        self._maybe_free_slot(area, slot)
        exclusive = (not frames.flags[page] & (PG_KSM | PG_SWAPCACHE) and frames.mapcount[page] == 1
                     and frames.refcount[page] == 1)
        if write and exclusive and vma.flags & VmFlags.WRITE:
            vma.ptef[off] |= np.uint8(PTE_WRITE | PTE_DIRTY)
            frames.flags[page] |= PG_DIRTY
        vma.mm.touch_ptes()

    def _needs_copy(self, pfn: int, vma: Vma, off: int) -> bool:
        """ksm_might_need_to_copy: may this PTE map the swap-cache page, or must it copy?"""
        host, frames = self.host, self.host.frames
        flags = int(frames.flags[pfn])
        owner = int(frames.owner[pfn])
        index = int(vma.linear_index([off])[0]) & INDEX_MASK       # as a frame keeps it
        if flags & PG_COMPOUND:
            return False                                    # large folios are never copied
        if not host.profile.ksm_swapin_root_rule:
            # 2.6.33: page_anon_vma() is NULL for a KSM page and for a fresh read, so both are
            # mapped; an anon page is mapped only by the VMA (and index) it belongs to
            if not flags & PG_ANON or flags & PG_KSM:
                return False
            return not (vma.anon_vma is not None and owner == vma.anon_vma.id
                        and int(frames.index[pfn]) == index)
        if flags & PG_KSM:
            if host.ksm.stable_node_live(pfn) and not host.ksm.unmerging():
                return False
        elif not flags & PG_ANON:
            return False                                    # no anon_vma yet: fresh from swap
        else:
            av = host.anon_vmas.by_id.get(owner)
            if (av is not None and vma.anon_vma is not None and int(frames.index[pfn]) == index
                    and av.root is vma.anon_vma.root):
                return False
        return True

    def _sigbus(self, vma: Vma, off: int, entry: int, cause: str) -> None:
        proc = self.host.processes.get(vma.mm.id)
        if proc is not None:
            proc.signals.append("SIGBUS")
        self.host.vmstat["swap_read_errors"] += 1
        raise SwapReadError(vma.mm.id, vma.start + off, entry, cause)

    # -- statistics ----------------------------------------------------------------------------------
    def stats(self) -> dict:
        return {
            "devices": [{"name": a.dev.name, "priority": a.priority, "pages": a.dev.capacity_pages,
                         "used": a.dev.capacity_pages - a.dev.free_pages,
                         "read": a.dev.pages_read, "written": a.dev.pages_written} for a in self.areas],
            "swap_cache_pages": len(self.cache_entry),
            "io_seconds": round(self.io_seconds, 6),
        }


def check(host: "Host") -> list[str]:
    """Invariants of swap: swap map counts, swap cache links, per-mm swap entry counts."""
    problems: list[str] = []
    swap: Swap | None = getattr(host, "swap", None)
    if swap is None:
        return problems
    counts = [np.zeros(a.dev.capacity_pages, dtype=np.int64) for a in swap.areas]
    for pid, proc in host.processes.items():
        mm_ents = 0
        for vma in proc.mm.vmas:
            sw = (vma.ptef & PTE_SWAP) != 0
            if not sw.any():
                continue
            if ((vma.ptef[sw] & (PTE_PRESENT | PTE_ZERO)) != 0).any():
                problems.append(f"pid {pid} {vma!r}: a swap PTE is also marked present")
            ents = vma.pte[sw]
            mm_ents += len(ents)
            areas = ents >> SWP_SHIFT
            if (areas < 0).any() or (areas >= len(swap.areas)).any():
                problems.append(f"pid {pid} {vma!r}: swap entry of no swap device")
                continue
            for a in np.unique(areas):
                np.add.at(counts[int(a)], ents[areas == a] & SWP_SLOT_MASK, 1)
        if mm_ents != proc.mm.swap_ents:
            problems.append(f"pid {pid}: MM_SWAPENTS {proc.mm.swap_ents} but {mm_ents} swap PTEs")
    frames = host.frames
    for area, want in zip(swap.areas, counts):
        bad = np.flatnonzero(area.count != want)
        for slot in bad[:5]:
            problems.append(f"swap {area.dev.name} slot {slot}: count {area.count[slot]} "
                            f"but {want[slot]} swap PTEs")
        in_use = (area.count > 0) | (area.cache >= 0)
        if not np.array_equal(in_use, area.dev.used):
            problems.append(f"swap {area.dev.name}: {int((in_use != area.dev.used).sum())} slots "
                            "marked used/free wrongly")
        for slot in np.flatnonzero(area.cache >= 0).tolist():
            pfn = int(area.cache[slot])
            if not frames.flags[pfn] & PG_SWAPCACHE or swap.cache_entry.get(pfn) != swp_entry(area.index, slot):
                problems.append(f"swap {area.dev.name} slot {slot}: swap cache page {pfn} not linked back")
    flagged = np.flatnonzero((frames.flags & PG_SWAPCACHE) != 0)
    if len(flagged) != len(swap.cache_entry) or set(flagged.tolist()) != set(swap.cache_entry):
        problems.append(f"{len(flagged)} frames have PG_SWAPCACHE but the swap cache holds "
                        f"{len(swap.cache_entry)}")
    return problems


ENOSPC = errno.ENOSPC
