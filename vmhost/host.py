"""The host: its hardware, its kernel's memory state, its processes and clock.

``Host`` holds the state that the mm code (``vmhost.mm``), KSM
(``vmhost.ksm``) and the use cases work on; the operations live in those
modules. A host is built from a NUMA topology, a memory block size and a
kernel profile, and starts with all boot memory online.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Iterable

import numpy as np

from hw.memory import DEFAULT_BLOCK_PAGES, PhysicalMemory
from hw.swap import SwapDevice
from hw.topology import Topology
from vmhost.clock import Clock
from vmhost.mm.anon_vma import AnonVmaRegistry
from vmhost.mm.fork import exit_mm, fork_mm
from vmhost.mm.frames import FrameTable
from vmhost.mm.hooks import KsmHooks
from vmhost.mm.hotplug import MemoryHotplug
from vmhost.mm.khugepaged import Khugepaged
from vmhost.mm.mm import MM
from vmhost.mm.oom import OomKiller
from vmhost.mm.reclaim import Reclaim
from vmhost.mm.swap import Swap
from vmhost.mm.page_alloc import PageAllocator
from vmhost.mm.shmem import Shmem
from vmhost.mm.vma import Vma
from vmhost.profile import DEFAULT_PROFILE, Profile, get_profile
from vmhost.process import Process

GIB = 1 << 30


class Host:
    def __init__(self, topology: Topology | None = None, *, block_pages: int = DEFAULT_BLOCK_PAGES,
                 profile: str | Profile = DEFAULT_PROFILE, swap: Iterable[SwapDevice] = (),
                 movable_nodes: tuple[int, ...] = (), thp: str = "madvise"):
        self.profile = get_profile(profile) if isinstance(profile, str) else profile
        if thp not in ("always", "madvise", "never"):
            raise ValueError(f"THP mode must be always, madvise or never, not {thp!r}")
        self.thp_mode = thp
        self.topology = topology or Topology.uniform(1, 4 * GIB)
        self.phys = PhysicalMemory(self.topology, block_pages, movable_nodes)
        self.frames = FrameTable(self.phys.total_pages)
        self.allocator = PageAllocator(self.phys)
        for blk in reversed(self.phys.blocks):     # so that low frames are handed out first
            self.allocator.online_block(blk)
        self.anon_vmas = AnonVmaRegistry(chains=self.profile.anon_vma_chains)
        self.swap_devices = sorted(swap, key=lambda d: -d.priority)
        self.clock = Clock()
        self.vmstat: Counter[str] = Counter()
        self.ksm: KsmHooks = KsmHooks()
        self.processes: dict[int, Process] = {}
        self.pt_epoch = np.zeros(64, dtype=np.int64)   # per-mm page-table generation (by mm id)
        self.changes = np.zeros(1, dtype=np.int64)      # total changes, all mms
        self.mm_ksm = np.zeros((64, 3), dtype=np.int64)  # per-mm KSM counters (by mm id)
        self._pids = itertools.count(1)
        self._shmem_ids = itertools.count(1)
        # memory pressure and hotplug: swap areas and swap cache, kswapd / direct reclaim
        # (allocator.on_low), the OOM killer (oom_handler, run by faults that cannot allocate),
        # the memory notifier chain with online/offline of blocks
        self.swap = Swap(self)
        self.reclaim = Reclaim(self)
        self.oom = OomKiller(self)
        self.hotplug = MemoryHotplug(self)
        self.khugepaged = Khugepaged(self)         # re-collapses PTE-mapped 2 MiB ranges

    # -- processes ------------------------------------------------------------------------
    def _new_pid(self) -> int:
        pid = next(self._pids)
        if pid >= len(self.pt_epoch):
            self.pt_epoch = np.concatenate([self.pt_epoch, np.zeros(len(self.pt_epoch), np.int64)])
            self.mm_ksm = np.concatenate([self.mm_ksm, np.zeros_like(self.mm_ksm)])
        return pid

    def spawn(self, name: str, home_node: int = 0) -> Process:
        """A new process with an empty address space, running on ``home_node``."""
        if not 0 <= home_node < self.topology.node_count:
            raise ValueError(f"no NUMA node {home_node}")
        pid = self._new_pid()
        proc = Process(pid, name, MM(self, pid, home_node))
        self.processes[pid] = proc
        return proc

    def fork(self, parent: Process, name: str | None = None) -> Process:
        pid = self._new_pid()
        child = Process(pid, name or parent.name, fork_mm(self, parent.mm, pid), parent=parent,
                        oom_score_adj=parent.oom_score_adj)
        self.processes[pid] = child
        if any(m is parent.mm for m in self.khugepaged.slots):
            self.khugepaged.enter(child.mm)        # khugepaged_fork
        return child

    def exit(self, proc: Process) -> None:
        if not proc.alive:
            return
        proc.alive = False
        exit_mm(self, proc.mm)
        del self.processes[proc.pid]

    def live_mms(self) -> list[MM]:
        return [p.mm for p in self.processes.values()]

    # -- shmem --------------------------------------------------------------------------------
    def new_shmem(self, pages: int) -> Shmem:
        shmem = Shmem(next(self._shmem_ids), pages)
        shmem.users = 1
        return shmem

    def shmem_vmas(self, shmem_id: int) -> list[Vma]:
        return [v for mm in self.live_mms() for v in mm.vmas
                if v.shmem is not None and v.shmem.id == shmem_id]

    # -- accounting -----------------------------------------------------------------------------
    def used_pages(self) -> int:
        return int((self.frames.refcount > 0).sum())
