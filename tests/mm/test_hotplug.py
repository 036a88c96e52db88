"""Memory hotplug: the offline sequence, its failures, KSM's notifier, devices."""

import errno

import numpy as np

from hw.memory import BlockState, Zone
from hw.topology import Topology
from helpers import start_ksm
from vmhost.host import Host
from vmhost.ksm.knobs import RUN_OFFLINE
from vmhost.mm import hotplug, invariants
from vmhost.mm.frames import PG_KSM
from vmhost.mm.mempolicy import MemPolicy

MIB = 1 << 20


def setup(profile="linux-6.18", nodes=2, movable=(1,)):
    h = Host(Topology.uniform(nodes, 16 * MIB), block_pages=1024, profile=profile, movable_nodes=movable)
    ksm, ksmd = start_ksm(h)
    return h, ksm, ksmd


def merged_guests(h, pages=1024, node=1):
    procs = []
    for name, home in (("a", 0), ("b", node)):
        p = h.spawn(name, home)
        v = p.mm.mmap(pages, thp=False, policy=MemPolicy("bind", (home,)))
        p.mm.write(v.start, np.arange(1, pages + 1, dtype=np.uint64))
        p.mm.madvise(v.start, pages, "mergeable")
        procs.append((p, v))
    return procs


def blocks_with_ksm(h):
    ksm_pfns = np.flatnonzero(h.frames.flags & PG_KSM)
    return sorted(set((ksm_pfns // h.phys.block_pages).tolist()))


def test_ksm_pages_survive_offline_with_counters_unchanged():
    h, ksm, ksmd = setup()
    merged_guests(h)
    ksmd.run_full_scans(2)
    stats = ksm.stats()
    assert stats["pages_shared"] == 1024
    before = invariants.views(h)
    target = [b for b in blocks_with_ksm(h) if h.phys.blocks[b].node == 1]
    assert target
    for b in target:
        r = h.hotplug.offline_block(b)
        assert r.ok, r.to_dict()
        assert r.migration.migrated_ksm > 0
        assert r.events == ["GOING_OFFLINE", "OFFLINE"]
        assert h.phys.blocks[b].state is BlockState.OFFLINE
    assert ksm.stats() == stats
    assert not ksm.knobs.run & RUN_OFFLINE
    # every stable node points at its (migrated) page
    nodes = ksm.nodes.live()
    kpfn = ksm.nodes.kpfn[nodes[ksm.nodes.kind[nodes] != 3]]
    assert (h.frames.flags[kpfn] & PG_KSM).all()
    invariants.check(h, before)
    ksmd.run_full_scans(2)
    assert ksm.stats()["pages_shared"] == 1024
    invariants.check(h, before)


def test_offline_failing_on_a_pinned_page_cancels_and_leaves_state_as_before():
    h, ksm, ksmd = setup(nodes=1, movable=())
    p = h.spawn("p")
    v = p.mm.mmap(64, thp=False)
    p.mm.write(v.start, np.arange(1, 65, dtype=np.uint64))
    pinned = h.hotplug.pin_user_pages(p.mm, v.start, 1)
    blk = int(pinned[0]) // h.phys.block_pages
    merged_guests(h, pages=256, node=0)
    ksmd.run_full_scans(2)
    before = invariants.views(h)
    stats = ksm.stats()
    free_before = h.allocator.free_pages()
    seen = []
    h.hotplug.register_notifier(lambda ev, s, n: seen.append(ev) or 0, priority=0, name="spy")
    t0 = h.clock.now
    r = h.hotplug.offline_block(blk, signal_after_ns=2_000_000_000, run_write_after_ns=300_000_000)
    # the kernel retries the pinned page until the writer's signal: EINTR, not EBUSY at once
    assert not r.ok and r.errno == errno.EINTR and r.reason == "signal backoff"
    assert r.events == ["GOING_OFFLINE", "CANCEL_OFFLINE"] and seen == r.events
    assert r.time_ns == h.clock.now - t0 == 2_000_000_000 + hotplug.SIGNAL_BACKOFF_NS
    assert r.run_during == 1 | RUN_OFFLINE                  # run reads 5 (it was 1) meanwhile
    assert r.run_write_wait_ns == r.time_ns - 300_000_000   # that writer waited to the end
    assert ksm.waited_writes == [("run", "1", 0)]
    assert r.migration.migrated > 0                         # the rest moved and stays moved
    assert set(r.migration.failed.values()) == {"pinned"}
    assert h.phys.blocks[blk].state is BlockState.ONLINE
    assert not ksm.knobs.run & RUN_OFFLINE and ksm.should_run()
    assert ksm.stats() == stats
    assert h.allocator.free_pages() == free_before
    assert int(v.pte[0]) == int(pinned[0])
    invariants.check(h, before)
    h.hotplug.unpin_user_pages(pinned)
    assert h.hotplug.offline_block(blk).ok
    invariants.check(h, before)


def test_kernel_page_fails_isolation_before_any_notifier():
    h, ksm, ksmd = setup(nodes=1, movable=())
    pfns = h.hotplug.alloc_kernel_pages(0, 2)
    seen = []
    h.hotplug.register_notifier(lambda ev, s, n: seen.append(ev) or 0)
    r = h.hotplug.offline_block(int(pfns[0]) // h.phys.block_pages)
    assert (r.errno, r.reason) == (errno.EBUSY, "failure to isolate range") and seen == []
    invariants.check(h)


def test_notifier_veto_and_bad_ranges():
    h, ksm, ksmd = setup()
    h.hotplug.register_notifier(lambda ev, s, n: -errno.EPERM if ev == "GOING_OFFLINE" else 0,
                                priority=200, name="veto")
    r = h.hotplug.offline_block(5)
    assert (r.errno, r.reason, r.events) == (errno.EPERM, "notifier failure", ["GOING_OFFLINE", "CANCEL_OFFLINE"])
    assert not ksm.knobs.run & RUN_OFFLINE      # KSM (priority 100) never saw GOING_OFFLINE
    assert h.hotplug.offline_pages(1, 1024).reason == "unaligned range"
    assert h.hotplug.offline_pages(0, 8 * 1024).reason == "multizone range"   # node 0 and node 1
    h.phys.blocks[2].hole_pages = 10
    assert h.hotplug.offline_block(2).reason == "memory holes"
    h.phys.blocks[2].hole_pages = 0
    invariants.check(h)


def test_ksmd_is_parked_while_going_offline():
    h, ksm, ksmd = setup()
    merged_guests(h)
    states = []

    def spy(ev, s, n):
        states.append((ev, ksm.should_run(), ksm.write_knob("run", "1")))
        return 0
    h.hotplug.register_notifier(spy, priority=50)
    assert h.hotplug.offline_block(blocks_with_ksm(h)[-1] if blocks_with_ksm(h) else 4).ok
    # a write of run while going offline waits; it completes (in order) when the offline ends
    assert states == [("GOING_OFFLINE", False, 0), ("OFFLINE", True, 0)]
    assert ksm.waited_writes == [("run", "1", 0)] and ksm.knobs.run == 1


def test_stale_stable_nodes_in_range_are_pruned_at_offline():
    h, ksm, ksmd = setup()
    procs = merged_guests(h)
    ksmd.run_full_scans(2)
    before = ksm.stats()["pages_shared"]
    # both guests exit: the KSM pages are freed, their stable nodes become stale
    for p, _ in procs:
        h.exit(p)
    stale = [n for n in ksm.nodes.live().tolist() if ksm.nodes.kind[n] in (1, 2)]
    blocks = sorted({int(ksm.nodes.kpfn[n]) // h.phys.block_pages for n in stale})
    pruned = 0
    for b in blocks:
        r = h.hotplug.offline_block(b)
        assert r.ok
        pruned += r.stable_nodes_pruned
    assert pruned == len(stale) == before
    assert ksm.stats()["pages_shared"] == 0
    invariants.check(h)


def test_2_6_33_profile_offline_migrates_ksm_pages():
    h, ksm, ksmd = setup(profile="linux-2.6.33")
    merged_guests(h)
    ksmd.run_full_scans(2)
    stats = ksm.stats()
    before = invariants.views(h)
    from vmhost.mm.migrate import migrate_pages
    ksm_pfn = int(np.flatnonzero(h.frames.flags & PG_KSM)[0])
    assert migrate_pages(h, [ksm_pfn], reason="numa_balancing").failed == {ksm_pfn: "ksm"}
    for b in blocks_with_ksm(h):
        if h.phys.blocks[b].node == 1:
            assert h.hotplug.offline_block(b).ok
    assert ksm.stats() == stats
    invariants.check(h, before)


def test_dimm_hot_add_online_use_unplug():
    h, ksm, ksmd = setup(nodes=1, movable=())
    blocks = h.hotplug.add_dimm("dimm0", 0, 8 * MIB, Zone.MOVABLE, online=True)
    assert [b.state for b in blocks] == [BlockState.ONLINE, BlockState.ONLINE]
    assert len(h.frames) == h.phys.total_pages
    p = h.spawn("p")
    v = p.mm.mmap(512, thp=False)
    p.mm.write(v.start, np.full(512, 9, np.uint64))
    p.mm.madvise(v.start, 512, "mergeable")
    assert (h.phys.block_of(v.pte) >= blocks[0].index).all()        # movable zone first
    ksmd.run_full_scans(2)
    stats = ksm.stats()
    before = invariants.views(h)
    assert h.hotplug.remove_device("dimm0") == -errno.EBUSY
    rc, results = h.hotplug.unplug("dimm0")
    assert rc == 0 and all(r.ok for r in results)
    assert "dimm0" not in h.phys.devices
    assert ksm.stats() == stats
    invariants.check(h, before)
    vm = h.hotplug.add_virtio_mem("vmem0", 0, 2, online=False)
    assert h.hotplug.online_block(vm[0].index) == 0
    assert h.hotplug.online_block(vm[0].index) == -errno.EINVAL
    invariants.check(h, before)


def test_thp_migrates_whole_or_split():
    h = Host(Topology.uniform(2, 16 * MIB), block_pages=1024, thp="always", movable_nodes=(1,))
    p = h.spawn("p", 1)
    v = p.mm.mmap(1024, policy=MemPolicy("bind", (1,)))
    p.mm.write(v.start, np.arange(1, 1025, dtype=np.uint64))
    assert h.vmstat["thp_fault_alloc"] == 2
    before = invariants.views(h)
    blk = int(v.pte[0]) // 1024
    r = h.hotplug.offline_block(blk)
    assert r.ok and r.migration.migrated_thp == 2 and r.migration.split_thp == 0
    invariants.check(h, before)
