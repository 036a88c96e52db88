"""Memory hot(un)plug: onlining and offlining memory blocks, adding and removing devices.

A memory block is the unit of online/offline (``hw.memory``); in this model a
block is also one SPARSEMEM section, so "section aligned" means "whole blocks".

``offline_pages`` follows mm/memory_hotplug.c step by step; each failure ends
with the kernel's errno and its reason string:

1. the range must be whole, online blocks          -> EINVAL "unaligned range" / "not online"
2. no firmware holes in it                         -> EINVAL "memory holes"
3. one zone of one node                            -> EINVAL "multizone range"
4. isolate the range (free pages leave the free lists, the blocks become
   going-offline); an unmovable kernel allocation  -> EBUSY  "failure to isolate range"
5. (the node loses its last memory: logged, NODE_REMOVING_LAST_MEMORY never vetoes here)
6. MEM_GOING_OFFLINE on the notifier chain; a veto -> that errno, "notifier failure"
7. migrate every movable page out (KSM pages and THPs included, see
   ``vmhost.mm.migrate``), pass after pass; a page that can never move
   (long-term pin)                                 -> EBUSY  "unmovable page".
   Transient failures (an extra reference, no free target frame; direct
   reclaim is tried for the latter) are retried; the kernel retries until a
   signal arrives, modelled as ``retry_budget`` passes -> EINTR "signal backoff"
8. commit: the blocks go offline, their frames leave the allocator
   (managed pages and watermarks drop), MEM_OFFLINE is sent.
9. any failure after step 4: isolation undone, MEM_CANCEL_OFFLINE sent (only
   when GOING_OFFLINE was).

Time (virtual, on the host clock): ``BLOCK_NS`` per block (isolation, memmap
and zone bookkeeping, notifiers), ``SCAN_NS`` per page frame scanned per
pass, plus the migration cost (``vmhost.mm.migrate``). While the offline
"runs", the clock advances with ksmd parked (KSM's notifier set RUN_OFFLINE).

Onlining: MEM_GOING_ONLINE (a veto cancels with MEM_CANCEL_ONLINE), the
block's frames join the free lists of its zone, MEM_ONLINE.

Devices: ``add_dimm`` / ``add_virtio_mem`` hot-add blocks (offline, then
onlined when ``online`` is True, like auto_online_blocks=online);
``remove_device`` needs every block of the device offline (EBUSY otherwise)
and retires them. ``unplug_dimm`` is the whole ACPI eject: offline every
block, roll back (re-online) on any failure, then remove.
"""

from __future__ import annotations

import errno
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from hw.memory import BlockState, MemoryBlock, Zone
from vmhost.mm.frames import PG_KERNEL, PG_PINNED
from vmhost.mm.migrate import TRANSIENT, MigrateResult, migrate_pages

if TYPE_CHECKING:
    from vmhost.host import Host
    from vmhost.mm.mm import MM

GOING_ONLINE, ONLINE, CANCEL_ONLINE = "GOING_ONLINE", "ONLINE", "CANCEL_ONLINE"
GOING_OFFLINE, OFFLINE, CANCEL_OFFLINE = "GOING_OFFLINE", "OFFLINE", "CANCEL_OFFLINE"
BLOCK_NS = 100_000
SCAN_NS = 1
REMOVED = "(removed)"

Notifier = Callable[[str, int, int], int]


@dataclass
class OfflineResult:
    blocks: list[int]
    ok: bool = False
    errno: int = 0
    reason: str = ""
    passes: int = 0
    migration: MigrateResult = field(default_factory=MigrateResult)
    stable_nodes_pruned: int = 0
    ksm_before: dict | None = None
    ksm_after: dict | None = None
    time_ns: int = 0
    events: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"blocks": self.blocks, "ok": self.ok,
                "errno": errno.errorcode.get(self.errno, "") if self.errno else None,
                "reason": self.reason or None, "passes": self.passes,
                "pages_migrated": self.migration.migrated,
                "ksm_pages_migrated": self.migration.migrated_ksm,
                "ordinary_pages_migrated": self.migration.migrated - self.migration.migrated_ksm,
                "thp_migrated_whole": self.migration.migrated_thp,
                "thp_split": self.migration.split_thp,
                "mappings_moved": self.migration.mappings,
                "stable_nodes_pruned": self.stable_nodes_pruned,
                "ksm_before": self.ksm_before, "ksm_after": self.ksm_after,
                "time_ms": round(self.time_ns / 1e6, 3), "events": self.events}


class MemoryHotplug:
    def __init__(self, host: "Host"):
        self.host = host
        self.retry_budget = 10
        self._chain: list[tuple[int, int, str, Notifier]] = []
        self._seq = itertools.count()
        self.events: list[tuple[str, int, int]] = []
        self.ksm_notifier = None
        self._ksm_engine = None         # the host.ksm whose notifier is registered

    # -- the notifier chain ------------------------------------------------------------------------
    def register_notifier(self, callback: Notifier, priority: int = 0, name: str | None = None) -> None:
        """register_memory_notifier: higher priority is called first."""
        self._chain.append((-priority, next(self._seq), name or getattr(callback, "name", "?"), callback))
        self._chain.sort(key=lambda t: (t[0], t[1]))

    def unregister_notifier(self, callback: Notifier) -> None:
        self._chain = [t for t in self._chain if t[3] is not callback]

    def _attach_ksm(self) -> None:
        """KSM registers its callback at init (ksm_init); done here the first time it matters."""
        ksm = self.host.ksm
        if self._ksm_engine is not ksm:
            notifier = ksm.memory_notifier()
            if notifier is not None:
                if self.ksm_notifier is not None:
                    self.unregister_notifier(self.ksm_notifier)
                self.ksm_notifier = notifier
                self._ksm_engine = ksm
                self.register_notifier(notifier, notifier.priority, "ksm")

    def notify(self, event: str, start_pfn: int, nr_pages: int) -> int:
        """memory_notify: 0, or the first callback's -errno (GOING_* events may be vetoed)."""
        self._attach_ksm()
        self.events.append((event, start_pfn, nr_pages))
        for _, _, _, cb in list(self._chain):
            rc = cb(event, start_pfn, nr_pages) or 0
            if rc and event in (GOING_OFFLINE, GOING_ONLINE):
                return rc
        return 0

    # -- helpers ------------------------------------------------------------------------------------
    def _blocks_of_range(self, start_pfn: int, nr_pages: int) -> list[MemoryBlock]:
        bp = self.host.phys.block_pages
        return self.host.phys.blocks[start_pfn // bp: (start_pfn + nr_pages) // bp]

    def _ksm_stats(self) -> dict | None:
        return self.host.ksm.stats()

    def _in_use(self, blocks: list[MemoryBlock]) -> np.ndarray:
        frames = self.host.frames
        parts = [np.flatnonzero(frames.refcount[b.first_pfn: b.first_pfn + b.pages] > 0) + b.first_pfn
                 for b in blocks]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    # -- offline ------------------------------------------------------------------------------------
    def offline_block(self, index: int) -> OfflineResult:
        blk = self.host.phys.blocks[index]
        return self.offline_pages(blk.first_pfn, blk.pages)

    def offline_pages(self, start_pfn: int, nr_pages: int) -> OfflineResult:
        host = self.host
        bp = host.phys.block_pages
        res = OfflineResult(blocks=[], ksm_before=self._ksm_stats())
        t0 = host.clock.now

        def fail(err: int, why: str) -> OfflineResult:
            res.errno, res.reason = err, why
            res.ksm_after = self._ksm_stats()
            res.time_ns = host.clock.now - t0
            return res

        if nr_pages <= 0 or start_pfn % bp or nr_pages % bp or start_pfn + nr_pages > host.phys.total_pages:
            return fail(errno.EINVAL, "unaligned range")
        blocks = self._blocks_of_range(start_pfn, nr_pages)
        res.blocks = [b.index for b in blocks]
        if any(b.state is not BlockState.ONLINE for b in blocks):
            return fail(errno.EINVAL, "not online")
        if any(b.hole_pages for b in blocks):
            return fail(errno.EINVAL, "memory holes")
        if len({(b.node, b.zone) for b in blocks}) != 1:
            return fail(errno.EINVAL, "multizone range")
        frames = host.frames
        used = self._in_use(blocks)
        if (frames.flags[used] & PG_KERNEL).any():
            return fail(errno.EBUSY, "failure to isolate range")
        # isolate: the blocks' free pages leave the free lists; frames freed from now on
        # stay off them (the allocator does not hand out frames of a going-offline block)
        for b in blocks:
            host.allocator.isolate_block(b)
            b.state = BlockState.GOING_OFFLINE
        node = blocks[0].node
        if not any(b.state is BlockState.ONLINE for b in host.phys.blocks if b.node == node):
            res.events.append(f"node {node}: removing its last memory")
        cost = len(blocks) * BLOCK_NS
        rc = self.notify(GOING_OFFLINE, start_pfn, nr_pages)
        res.events.append(GOING_OFFLINE)
        if rc:
            return self._cancel(res, blocks, start_pfn, nr_pages, -rc, "notifier failure", cost, t0)
        # do_migrate_range: targets on other nodes (nearest first), this node only when no
        # other node has memory
        with_memory = {b.node for b in host.phys.blocks if b.state is BlockState.ONLINE}
        others = [n for n in host.topology.fallback_order(node) if n != node and n in with_memory] or [node]
        while True:
            used = self._in_use(blocks)
            if len(used) == 0:
                break
            if res.passes >= self.retry_budget:
                return self._cancel(res, blocks, start_pfn, nr_pages, errno.EINTR, "signal backoff",
                                    cost, t0)
            res.passes += 1
            cost += nr_pages * SCAN_NS
            mig = migrate_pages(host, used, nodes=others, reason="hotremove")
            res.migration.add(mig)
            cost += mig.cost_ns
            reasons = set(mig.failed.values())
            if reasons - set(TRANSIENT):
                res.migration.failed = {p: r for p, r in res.migration.failed.items()}
                return self._cancel(res, blocks, start_pfn, nr_pages, errno.EBUSY, "unmovable page",
                                    cost, t0)
            if "nomem" in reasons:
                host.reclaim.direct_reclaim(others, sum(1 for r in mig.failed.values() if r == "nomem"))
        # commit
        host.clock.run_until(t0 + cost)
        for b in blocks:
            b.state = BlockState.OFFLINE
            host.allocator.offline_block(b)
        self.notify(OFFLINE, start_pfn, nr_pages)
        res.events.append(OFFLINE)
        if self.ksm_notifier is not None:
            res.stable_nodes_pruned = self.ksm_notifier.last_pruned
        res.ok = True
        res.ksm_after = self._ksm_stats()
        res.time_ns = host.clock.now - t0
        host.vmstat["blocks_offlined"] += len(blocks)
        return res

    def _cancel(self, res: OfflineResult, blocks: list[MemoryBlock], start_pfn: int, nr_pages: int,
                err: int, why: str, cost: int, t0: int) -> OfflineResult:
        host = self.host
        host.clock.run_until(t0 + cost)
        frames = host.frames
        for b in blocks:
            b.state = BlockState.ONLINE
            span = np.arange(b.first_pfn, b.first_pfn + b.pages - b.hole_pages, dtype=np.int64)
            host.allocator.unisolate_block(b, span[frames.refcount[span] == 0])
        self.notify(CANCEL_OFFLINE, start_pfn, nr_pages)
        res.events.append(CANCEL_OFFLINE)
        res.errno, res.reason = err, why
        res.ksm_after = self._ksm_stats()
        res.time_ns = host.clock.now - t0
        return res

    # -- online -------------------------------------------------------------------------------------
    def online_block(self, index: int, zone: Zone | None = None) -> int:
        """Online one offline block (state "online", "online_movable", "online_kernel")."""
        host = self.host
        blk = host.phys.blocks[index]
        if blk.device.endswith(REMOVED):
            return -errno.ENODEV
        if blk.state is not BlockState.OFFLINE:
            return -errno.EINVAL
        if zone is not None:
            blk.zone = zone
        rc = self.notify(GOING_ONLINE, blk.first_pfn, blk.pages)
        if rc:
            self.notify(CANCEL_ONLINE, blk.first_pfn, blk.pages)
            return rc
        host.frames.grow(host.phys.total_pages)
        blk.state = BlockState.ONLINE
        host.allocator.online_block(blk)
        self.notify(ONLINE, blk.first_pfn, blk.pages)
        host.vmstat["blocks_onlined"] += 1
        return 0

    # -- devices -------------------------------------------------------------------------------------
    def add_dimm(self, name: str, node: int, size_bytes: int, zone: Zone = Zone.MOVABLE,
                 online: bool = True) -> list[MemoryBlock]:
        blocks = self.host.phys.hot_add_dimm(name, node, size_bytes, zone)
        self.host.frames.grow(self.host.phys.total_pages)
        if online:
            for b in blocks:
                self.online_block(b.index)
        return blocks

    def add_virtio_mem(self, name: str, node: int, blocks: int, zone: Zone = Zone.MOVABLE,
                       online: bool = True) -> list[MemoryBlock]:
        added = self.host.phys.hot_add_virtio_mem(name, node, blocks, zone)
        self.host.frames.grow(self.host.phys.total_pages)
        if online:
            for b in added:
                self.online_block(b.index)
        return added

    def remove_device(self, name: str, blocks: list[int] | None = None) -> int:
        """Remove a device's blocks (all of a DIMM; some or all of a virtio-mem device)."""
        phys = self.host.phys
        if name not in phys.devices or name == "boot":
            return -errno.ENODEV
        mine = [b for b in phys.blocks_of_device(name) if blocks is None or b.index in blocks]
        if any(b.state is not BlockState.OFFLINE for b in mine):
            return -errno.EBUSY
        for b in mine:
            b.device = f"{name} {REMOVED}"
            b.hole_pages = b.pages            # the frames no longer exist
        if not phys.blocks_of_device(name):
            del phys.devices[name]
        self.host.vmstat["blocks_removed"] += len(mine)
        return 0

    def unplug(self, name: str, blocks: list[int] | None = None) -> tuple[int, list[OfflineResult]]:
        """Hot-remove a device: offline its online blocks, re-online them all if one fails."""
        phys = self.host.phys
        if name not in phys.devices or name == "boot":
            return -errno.ENODEV, []
        mine = [b for b in phys.blocks_of_device(name) if blocks is None or b.index in blocks]
        results, done = [], []
        for b in mine:
            if b.state is BlockState.OFFLINE:
                continue
            r = self.offline_block(b.index)
            results.append(r)
            if not r.ok:
                for idx in done:
                    self.online_block(idx)
                return -r.errno, results
            done.append(b.index)
        return self.remove_device(name, [b.index for b in mine]), results

    # -- sources of unmovable pages --------------------------------------------------------------------
    def alloc_kernel_pages(self, node: int, count: int) -> np.ndarray:
        """Unmovable kernel allocations (slab, page tables...) from ZONE_NORMAL of ``node``."""
        host = self.host
        pfns = host.allocator.alloc(count, node, [node], kernel=True)
        host.frames.refcount[pfns] = 1
        host.frames.flags[pfns] = PG_KERNEL
        return pfns

    def pin_user_pages(self, mm: "MM", start: int, count: int) -> np.ndarray:
        """pin_user_pages(FOLL_LONGTERM | FOLL_WRITE): fault the pages in writable, move any
        in ZONE_MOVABLE to ZONE_NORMAL first (check_and_migrate_movable_pages), then pin."""
        host = self.host
        frames = host.frames
        current = mm.read(start, count)
        mm.write(start, current)                      # a write fault: private, exclusive pages
        pfns = self._pfns_of(mm, start, count)
        movable = np.array([host.phys.blocks[int(b)].zone is Zone.MOVABLE
                            for b in host.phys.block_of(pfns)], dtype=bool)
        if movable.any():
            res = migrate_pages(host, pfns[movable], kernel_zone=True, reason="longterm_pin")
            if res.failed:
                raise RuntimeError(f"cannot migrate pages out of ZONE_MOVABLE to pin them: {res.to_dict()}")
            pfns = self._pfns_of(mm, start, count)
        fresh = pfns[(frames.flags[pfns] & PG_PINNED) == 0]
        frames.flags[fresh] |= PG_PINNED
        frames.refcount[fresh] += 1
        return pfns

    def unpin_user_pages(self, pfns: np.ndarray) -> None:
        frames = self.host.frames
        pinned = pfns[(frames.flags[pfns] & PG_PINNED) != 0]
        frames.flags[pinned] &= np.uint16(~PG_PINNED & 0xFFFF)
        frames.refcount[pinned] -= 1

    @staticmethod
    def _pfns_of(mm: "MM", start: int, count: int) -> np.ndarray:
        out = np.zeros(count, dtype=np.int64)
        for vma in mm.vmas_overlapping(start, start + count):
            lo, hi = max(start, vma.start), min(start + count, vma.end)
            out[lo - start: hi - start] = vma.pte[lo - vma.start: hi - vma.start]
        return out
