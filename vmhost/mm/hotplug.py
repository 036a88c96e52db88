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
   ``vmhost.mm.migrate``), pass after pass. A page that cannot move now -- a
   pin or an extra reference (migration fails with -EAGAIN), no free target
   frame (direct reclaim is tried) -- is retried, and the kernel retries
   forever: only a signal to the writer of ``state`` ends it. That is the
   caller's ``signal_after_ns`` (default ``SIGNAL_AFTER_NS``): the loop sees it
   at its next pass and the write fails   -> EINTR  "signal backoff".
   While it retries, ksmd stays parked (``run`` reads 4 + its old value) and a
   writer of ``run`` waits (``run_write_after_ns``: such a writer arrives
   then; it completes when the offline ends). A page that can never move
   (a kernel page found only now)         -> EBUSY  "unmovable page".
8. commit: the blocks go offline, their frames leave the allocator
   (managed pages and watermarks drop), MEM_OFFLINE is sent.
9. any failure after step 4: isolation undone, MEM_CANCEL_OFFLINE sent (only
   when GOING_OFFLINE was). Pages already migrated stay where they went.

Time (virtual, on the host clock, which runs while the offline does): ``BLOCK_NS``
per block (isolation, memmap and zone bookkeeping, notifiers, the final
check), ``SCAN_NS`` per page frame scanned per pass, the migration cost
(``vmhost.mm.migrate``), ``RETRY_NS`` per pass that moved nothing, and
``SIGNAL_BACKOFF_NS`` from the signal to the failed write's return. The
constants are fitted to the real kernel's offline of a 128 MiB block on this
machine class (``vmhost hotremove SCENARIO --oracle``; configs/hotremove-oracle-*.yaml).

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
BLOCK_NS = 12_000_000                # fitted: an empty 128 MiB block offlines in 6-35 ms here (median 13)
SCAN_NS = 1
RETRY_NS = 1_000_000                 # a pass that moved nothing, before the next one
SIGNAL_AFTER_NS = 10_000_000_000     # when the caller gives up on a retrying offline
SIGNAL_BACKOFF_NS = 1_000_000        # fitted: EINTR comes within ~1 ms of the signal here
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
    run_during: int | None = None          # what /sys/kernel/mm/ksm/run read while it ran
    run_write_wait_ns: int | None = None   # how long a writer of run arriving mid-offline waited

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
                "time_ms": round(self.time_ns / 1e6, 3), "events": self.events,
                "run_during": self.run_during,
                "run_write_wait_ms": (None if self.run_write_wait_ns is None
                                      else round(self.run_write_wait_ns / 1e6, 3))}


class MemoryHotplug:
    def __init__(self, host: "Host"):
        self.host = host
        self.signal_after_ns = SIGNAL_AFTER_NS
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
    def offline_block(self, index: int, **opts) -> OfflineResult:
        blk = self.host.phys.blocks[index]
        return self.offline_pages(blk.first_pfn, blk.pages, **opts)

    def _ksm_run(self) -> int | None:
        return self.host.ksm.run_state()

    def offline_pages(self, start_pfn: int, nr_pages: int, *, signal_after_ns: int | None = None,
                      run_write_after_ns: int | None = None) -> OfflineResult:
        """Write "offline" for [start_pfn, start_pfn + nr_pages); the writer gets a signal
        ``signal_after_ns`` after it started (default ``self.signal_after_ns``), and another
        process writes KSM's ``run`` (its current value) ``run_write_after_ns`` after it."""
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
        signal_at = t0 + (self.signal_after_ns if signal_after_ns is None else signal_after_ns)
        writer = None
        if run_write_after_ns is not None and self._ksm_run() is not None:
            writer = host.clock.at(t0 + run_write_after_ns, lambda: self._write_run(res))
        # isolate: the blocks' free pages leave the free lists; frames freed from now on
        # stay off them (the allocator does not hand out frames of a going-offline block)
        for b in blocks:
            host.allocator.isolate_block(b)
            b.state = BlockState.GOING_OFFLINE
        node = blocks[0].node
        if not any(b.state is BlockState.ONLINE for b in host.phys.blocks if b.node == node):
            res.events.append(f"node {node}: removing its last memory")
        rc = self.notify(GOING_OFFLINE, start_pfn, nr_pages)
        res.events.append(GOING_OFFLINE)
        res.run_during = self._ksm_run()
        host.clock.run_until(t0 + len(blocks) * BLOCK_NS)
        if rc:
            return self._cancel(res, blocks, start_pfn, nr_pages, -rc, "notifier failure", t0, writer)
        # do_migrate_range: targets on other nodes (nearest first), this node only when no
        # other node has memory
        with_memory = {b.node for b in host.phys.blocks if b.state is BlockState.ONLINE}
        others = [n for n in host.topology.fallback_order(node) if n != node and n in with_memory] or [node]
        while True:
            used = self._in_use(blocks)
            if len(used) == 0:
                break
            if host.clock.now >= signal_at:
                host.clock.run_until(max(host.clock.now, signal_at + SIGNAL_BACKOFF_NS))
                return self._cancel(res, blocks, start_pfn, nr_pages, errno.EINTR, "signal backoff",
                                    t0, writer)
            res.passes += 1
            mig = migrate_pages(host, used, nodes=others, reason="hotremove")
            res.migration.add(mig)
            step = nr_pages * SCAN_NS + mig.cost_ns
            reasons = set(mig.failed.values())
            if reasons - set(TRANSIENT):
                host.clock.run_until(host.clock.now + step)
                return self._cancel(res, blocks, start_pfn, nr_pages, errno.EBUSY, "unmovable page",
                                    t0, writer)
            if "nomem" in reasons:
                host.reclaim.direct_reclaim(others, sum(1 for r in mig.failed.values() if r == "nomem"))
            if mig.migrated == 0:
                # nothing moved: the kernel spins on the same pages until something changes
                # (an event on the clock) or the signal arrives
                nxt = host.clock.next_time()
                step = max(step, RETRY_NS, min(signal_at, nxt if nxt is not None else signal_at)
                           - host.clock.now)
            host.clock.run_until(host.clock.now + step)
        # commit
        for b in blocks:
            b.state = BlockState.OFFLINE
            host.allocator.offline_block(b)
        self.notify(OFFLINE, start_pfn, nr_pages)
        res.events.append(OFFLINE)
        self._writer_done(res, writer)
        if self.ksm_notifier is not None:
            res.stable_nodes_pruned = self.ksm_notifier.last_pruned
        res.ok = True
        res.ksm_after = self._ksm_stats()
        res.time_ns = host.clock.now - t0
        host.vmstat["blocks_offlined"] += len(blocks)
        return res

    def _write_run(self, res: OfflineResult) -> None:
        """Another process writes KSM's run (its current value) while the offline runs."""
        res.run_write_wait_ns = -self.host.clock.now        # completed in _writer_done
        self.host.ksm.write_knob("run", str(self._ksm_run() & 3))

    def _writer_done(self, res: OfflineResult, writer) -> None:
        """The offline ended: a writer of run that was waiting completes now."""
        if writer is None:
            return
        if res.run_write_wait_ns is not None and res.run_write_wait_ns <= 0:
            res.run_write_wait_ns += self.host.clock.now
        else:
            writer.cancel()                   # the offline ended before that writer came

    def _cancel(self, res: OfflineResult, blocks: list[MemoryBlock], start_pfn: int, nr_pages: int,
                err: int, why: str, t0: int, writer=None) -> OfflineResult:
        host = self.host
        frames = host.frames
        for b in blocks:
            b.state = BlockState.ONLINE
            span = np.arange(b.first_pfn, b.first_pfn + b.pages - b.hole_pages, dtype=np.int64)
            host.allocator.unisolate_block(b, span[frames.refcount[span] == 0])
        self.notify(CANCEL_OFFLINE, start_pfn, nr_pages)
        res.events.append(CANCEL_OFFLINE)
        self._writer_done(res, writer)
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
        return self._added(self.host.phys.hot_add_dimm(name, node, size_bytes, zone), online)

    def add_virtio_mem(self, name: str, node: int, blocks: int, zone: Zone = Zone.MOVABLE,
                       online: bool = True) -> list[MemoryBlock]:
        return self._added(self.host.phys.hot_add_virtio_mem(name, node, blocks, zone), online)

    def _added(self, blocks: list[MemoryBlock], online: bool) -> list[MemoryBlock]:
        """Frames for a device's new blocks, and the blocks onlined (as udev's auto-online does)."""
        self.host.frames.grow(self.host.phys.total_pages)
        if online:
            for b in blocks:
                self.online_block(b.index)
        return blocks

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
