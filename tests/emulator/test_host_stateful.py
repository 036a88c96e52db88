"""The host under random sequences of everything that can happen to it.

A hypothesis state machine boots processes and QEMU guests, writes, forks, exits, madvises
(mergeable, unmergeable, dontneed), lets ksmd scan, unmerges, reclaims to swap, migrates
pages between nodes, offlines and onlines memory blocks and inflates and deflates a guest's
balloon, in any order. After every step the invariant checker recomputes the kernel's state
from scratch and compares what every process reads with a model of what it wrote: merging,
COW, swap, migration and hotremove never change a page's content; a write, a discard or a
balloon inflation changes exactly the pages it names.

The runs are bounded (a few dozen short sequences per profile) so that the file runs in well
under a minute; HOST_STATEFUL_EXAMPLES raises the count for a longer campaign.
"""

from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from guests.spec import GuestSpec
from hw.memory import BlockState
from hw.swap import SwapDevice
from hw.topology import Topology
from helpers import start_ksm
from vmhost.host import Host
from vmhost.mm import invariants
from vmhost.mm.mempolicy import MemPolicy
from vmhost.mm.migrate import migrate_pages
from vmhost.mm.page_alloc import OutOfMemory
from vmhost.mm.vma import PTE_PRESENT
from vmhost.qemu import QemuProcess

MIB = 1 << 20
BLOCK_PAGES = 1024                  # 4 MiB blocks
MAX_PROCS = 6
EXAMPLES = int(os.environ.get("HOST_STATEFUL_EXAMPLES", 25))
CONTENTS = st.integers(0, 4)        # few distinct contents: pages merge, zero pages too


class HostMachine(RuleBasedStateMachine):
    """One host (2 nodes of 32 MiB, node 1 movable, 16 MiB of swap) with KSM and ksmd."""

    PROFILE = "linux-6.18"

    def __init__(self):
        super().__init__()
        self.h = Host(Topology.uniform(2, 32 * MIB), block_pages=BLOCK_PAGES, profile=self.PROFILE,
                      movable_nodes=(1,), swap=[SwapDevice("sda", 4096, priority=5)])
        self.ksm, self.ksmd = start_ksm(self.h)
        self.procs: list = []                     # plain processes: (Process, Vma)
        self.guest: QemuProcess | None = None
        self.expected = invariants.views(self.h)  # what every process must read

    # -- helpers --------------------------------------------------------------------------------
    def _alive(self):
        self.procs = [(p, v) for p, v in self.procs if p.alive]
        return self.procs

    def _range(self, data, vma):
        start = data.draw(st.integers(0, vma.pages - 1))
        count = data.draw(st.integers(1, min(16, vma.pages - start)))
        return vma.start + start, count

    def _gpfns(self, data, most: int) -> np.ndarray:
        """Some of the guest's boot RAM frames."""
        frames = st.lists(st.integers(0, self.guest.boot_pages - 1), min_size=1, max_size=most)
        return np.unique(np.array(data.draw(frames), np.int64))

    def _set(self, pid: int, start: int, contents) -> None:
        vpns, old = self.expected[pid]
        at = np.searchsorted(vpns, start)
        old[at: at + len(contents)] = contents

    def _adopt(self, pid: int) -> None:
        """A new address space: every page reads zero."""
        vpns, contents = invariants.views(self.h)[pid]
        assert not contents.any()
        self.expected[pid] = (vpns, contents.copy())

    # -- processes --------------------------------------------------------------------------------
    @initialize(data=st.data())
    def two_sharers_and_a_guest(self, data):
        """Start from something to merge: two mergeable processes (one per node) with the same
        few contents, and a guest that wrote some of its RAM."""
        contents = np.array(data.draw(st.lists(CONTENTS, min_size=64, max_size=64)), np.uint64)
        for node in (0, 1):
            self.spawn(64, node, False, True)
            p, v = self.procs[-1]
            p.mm.write(v.start, contents)
            self._set(p.pid, v.start, contents)
        self.boot_guest()
        self.guest_writes(data)

    @precondition(lambda self: len(self._alive()) < MAX_PROCS)
    @rule(pages=st.integers(1, 96), node=st.integers(0, 1), thp=st.booleans(),
          mergeable=st.booleans())
    def spawn(self, pages, node, thp, mergeable):
        p = self.h.spawn(f"p{len(self.procs)}", node)
        v = p.mm.mmap(pages, thp=thp, policy=MemPolicy("bind", (node,)) if node else None)
        if mergeable:
            assert p.mm.madvise(v.start, pages, "mergeable") == 0
        self.procs.append((p, v))
        self._adopt(p.pid)

    @precondition(lambda self: self.guest is None or not self.guest.proc.alive)
    @rule()
    def boot_guest(self):
        self.guest = QemuProcess(self.h, GuestSpec("vm", memory_mib=4))
        self._adopt(self.guest.proc.pid)

    @precondition(lambda self: bool(self._alive()))
    @rule(data=st.data())
    def write(self, data):
        p, v = data.draw(st.sampled_from(self._alive()))
        start, count = self._range(data, v)
        contents = np.array(data.draw(st.lists(CONTENTS, min_size=count, max_size=count)), np.uint64)
        p.mm.write(start, contents)
        self._set(p.pid, start, contents)

    @precondition(lambda self: self.guest is not None and self.guest.proc.alive)
    @rule(data=st.data())
    def guest_writes(self, data):
        g = self.guest
        gpfns = self._gpfns(data, 32)
        contents = np.array(data.draw(st.lists(CONTENTS, min_size=len(gpfns), max_size=len(gpfns))),
                            np.uint64)
        g.write(gpfns, contents)
        for vpn, c in zip(g.vpns(gpfns), contents):
            self._set(g.proc.pid, int(vpn), [c])
        g.ballooned = g.ballooned[~np.isin(g.ballooned, gpfns)]   # the guest took them back

    @precondition(lambda self: bool(self._alive()) and len(self._alive()) < MAX_PROCS)
    @rule(data=st.data())
    def fork(self, data):
        p, v = data.draw(st.sampled_from(self._alive()))
        c = self.h.fork(p)
        self.procs.append((c, c.mm.find_vma(v.start)))
        vpns, contents = self.expected[p.pid]
        self.expected[c.pid] = (vpns.copy(), contents.copy())

    @precondition(lambda self: bool(self._alive()))
    @rule(data=st.data())
    def exit(self, data):
        p, _ = data.draw(st.sampled_from(self._alive()))
        self.h.exit(p)
        del self.expected[p.pid]

    @precondition(lambda self: self.guest is not None and self.guest.proc.alive)
    @rule()
    def guest_quits(self):
        pid = self.guest.proc.pid
        self.guest.quit()
        del self.expected[pid]

    @precondition(lambda self: bool(self._alive()))
    @rule(data=st.data(), advice=st.sampled_from(["mergeable", "unmergeable", "dontneed"]))
    def madvise(self, data, advice):
        p, v = data.draw(st.sampled_from(self._alive()))
        start, count = self._range(data, v)
        rc = p.mm.madvise(start, count, advice)
        assert rc == 0, (advice, rc)
        if advice == "dontneed":
            self._set(p.pid, start, np.zeros(count, np.uint64))

    # -- the kernel on its own: nothing any process reads changes ----------------------------------
    @rule(scans=st.integers(1, 3))
    def ksmd_scans(self, scans):
        self.ksmd.run_full_scans(scans)

    @rule()
    def unmerge_all(self):
        assert self.ksm.write_knob("run", "2") in (0, -12)          # ENOMEM is a clean failure
        assert self.ksm.write_knob("run", "1") == 0

    @rule(node=st.integers(0, 1), pages=st.integers(1, 512))
    def reclaim(self, node, pages):
        self.h.reclaim.direct_reclaim([node], pages)

    @precondition(lambda self: bool(self._alive()))
    @rule(data=st.data())
    def migrate(self, data):
        p, v = data.draw(st.sampled_from(self._alive()))
        present = v.pte[(v.ptef & PTE_PRESENT) != 0]
        present = present[present >= 0]
        if len(present) == 0:
            return
        pick = np.unique(np.array(data.draw(st.lists(st.sampled_from(present.tolist()), min_size=1,
                                                     max_size=16)), np.int64))
        try:
            migrate_pages(self.h, pick, nodes=[data.draw(st.integers(0, 1))])
        except OutOfMemory:
            pass

    @rule(data=st.data())
    def offline_block(self, data):
        online = [b.index for b in self.h.phys.online_blocks()]     # movable or not: may fail
        if online:
            self.h.hotplug.offline_block(data.draw(st.sampled_from(online)))

    @rule(data=st.data())
    def online_block(self, data):
        offline = [b.index for b in self.h.phys.blocks if b.state is BlockState.OFFLINE]
        if offline:
            self.h.hotplug.online_block(data.draw(st.sampled_from(offline)))

    # -- the balloon ----------------------------------------------------------------------------------
    @precondition(lambda self: self.guest is not None and self.guest.proc.alive)
    @rule(data=st.data())
    def balloon_inflate(self, data):
        g = self.guest
        gpfns = self._gpfns(data, 64)
        g.balloon_inflate(gpfns)
        for vpn in g.vpns(gpfns):
            self._set(g.proc.pid, int(vpn), [0])

    @precondition(lambda self: self.guest is not None and self.guest.proc.alive)
    @rule()
    def balloon_deflate(self):
        self.guest.balloon_deflate()              # pages come back when the guest touches them

    # -- after every step ------------------------------------------------------------------------------
    @invariant()
    def consistent_and_nothing_lost(self):
        invariants.check(self.h, self.expected)
        assert set(invariants.views(self.h)) == set(self.expected)


class OldHostMachine(HostMachine):
    PROFILE = "linux-2.6.33"


_SETTINGS = settings(max_examples=EXAMPLES, stateful_step_count=30, deadline=None,
                     derandomize=not os.environ.get("HOST_STATEFUL_RANDOM"),
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TestHost = HostMachine.TestCase
TestHost.settings = _SETTINGS
TestOldHost = OldHostMachine.TestCase
TestOldHost.settings = settings(_SETTINGS, max_examples=max(1, EXAMPLES // 2))


def test_swap_out_of_a_ksm_page_shared_with_a_forked_child():
    """Found by the machine above: the KSM page's rmap walk reaches the forked child's mapping
    through the parent's rmap_item and through the child's own; it is unmapped once."""
    h = Host(Topology.uniform(1, 32 * MIB), block_pages=BLOCK_PAGES,
             swap=[SwapDevice("sda", 4096, priority=5)])
    ksm, ksmd = start_ksm(h)
    p = h.spawn("p")
    v = p.mm.mmap(8, thp=False)
    p.mm.write(v.start, np.full(8, 5, np.uint64))
    assert p.mm.madvise(v.start, 8, "mergeable") == 0
    h.fork(p)
    ksmd.run_full_scans(2)
    kpfn = int(v.pte[0])
    assert ksm.stats()["pages_sharing"] == 15 and h.frames.mapcount[kpfn] == 16
    before = invariants.views(h)
    assert h.swap.reclaim_page(kpfn) == "freed"
    invariants.check(h, before)
