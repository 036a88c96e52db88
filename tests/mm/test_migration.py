"""Page migration across NUMA nodes: ordinary, KSM (kpfn follows), merge_across_nodes=0."""

import numpy as np

from helpers import process_with, start_ksm
from hw.topology import Topology
from vmhost.host import Host
from vmhost.ksm.stable import MIGRATE
from vmhost.mm import invariants
from vmhost.mm.frames import PG_KSM
from vmhost.mm.mempolicy import MemPolicy
from vmhost.mm.migrate import migrate_pages

MIB = 1 << 20


def setup(mam="1"):
    h = Host(Topology.uniform(2, 16 * MIB), block_pages=1024)
    ksm, ksmd = start_ksm(h, merge_across_nodes=mam)
    return h, ksm, ksmd


def guest(h, name, node, pages, value):
    p = h.spawn(name, node)
    v = p.mm.mmap(pages, thp=False, policy=MemPolicy("bind", (node,)))
    p.mm.write(v.start, np.full(pages, value, np.uint64))
    p.mm.madvise(v.start, pages, "mergeable")
    return p, v


def test_migrate_ordinary_page_moves_every_mapping():
    h, ksm, ksmd = setup()
    p, v = process_with(h, range(1, 5))
    c = h.fork(p)
    before = invariants.views(h)
    old = int(v.pte[1])
    r = migrate_pages(h, [old], nodes=[1])
    assert r.migrated == 1 and r.mappings == 2 and not r.failed
    new = int(v.pte[1])
    assert new != old and int(c.mm.vmas[0].pte[1]) == new and int(h.phys.node_of(new)) == 1
    assert h.frames.refcount[old] == 0
    invariants.check(h, before)


def test_migrate_ksm_page_updates_stable_node_and_keeps_counters():
    h, ksm, ksmd = setup()
    guest(h, "a", 0, 8, 5)
    guest(h, "b", 0, 8, 5)
    ksmd.run_full_scans(2)
    stats = ksm.stats()
    kpfn = int(np.flatnonzero(h.frames.flags & PG_KSM)[0])
    node = int(h.frames.owner[kpfn])
    before = invariants.views(h)
    r = migrate_pages(h, [kpfn], nodes=[1])
    assert r.migrated_ksm == 1 and r.mappings == 16
    new = int(ksm.nodes.kpfn[node])
    assert new != kpfn and int(h.frames.owner[new]) == node and h.frames.flags[new] & PG_KSM
    assert ksm.get_page(node) == new
    assert ksm.stats() == stats
    invariants.check(h, before)
    ksmd.run_full_scans(2)
    assert ksm.stats()["pages_shared"] == 1 and ksm.stats()["pages_sharing"] == 15
    invariants.check(h, before)


def test_merge_across_nodes_0_keeps_one_copy_per_node_and_rehomes_migrated_pages():
    h, ksm, ksmd = setup(mam="0")
    guest(h, "a", 0, 8, 5)
    guest(h, "b", 1, 8, 5)
    ksmd.run_full_scans(2)
    s = ksm.stats()
    assert (s["pages_shared"], s["pages_sharing"]) == (2, 14)          # one KSM page per node
    kpfns = np.flatnonzero(h.frames.flags & PG_KSM)
    assert sorted(h.phys.node_of(kpfns).tolist()) == [0, 1]
    before = invariants.views(h)
    on1 = int(kpfns[h.phys.node_of(kpfns) == 1][0])
    node = int(h.frames.owner[on1])
    r = migrate_pages(h, [on1], nodes=[0])
    assert r.migrated_ksm == 1
    assert ksm.stats()["pages_shared"] == 2                             # counters unchanged
    invariants.check(h, before)
    ksmd.run_full_scans(1)        # ksmd meets it: misplaced, re-homed into node 0's tree
    assert ksm.nodes.kind[node] != MIGRATE
    assert int(ksm.nodes.nid[node]) == 0 or ksm.nodes.kind[node] == 0
    ksmd.run_full_scans(2)
    kpfns = np.flatnonzero((h.frames.flags & PG_KSM) != 0)
    assert set(h.phys.node_of(kpfns).tolist()) == {0}
    assert ksm.stats()["pages_shared"] + ksm.stats()["pages_sharing"] == 16
    invariants.check(h, before)


def test_pinned_page_does_not_migrate():
    h, ksm, ksmd = setup()
    p, v = process_with(h, [1, 2])
    pfns = h.hotplug.pin_user_pages(p.mm, v.start, 1)
    r = migrate_pages(h, pfns, nodes=[1])
    assert r.failed == {int(pfns[0]): "pinned"} and r.migrated == 0
    invariants.check(h)
