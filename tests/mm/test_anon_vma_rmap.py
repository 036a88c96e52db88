"""fork, exit and COW with anon_vma chains; rmap walks in both profiles."""

import numpy as np
import pytest

from tests.conftest import ids
from vmhost.mm.rmap import mappings, page_referenced, rmap_walk, walk_many


def family(h):
    """parent P with 4 pages; child C forked, COWs page 1; grandchild G forked from C, COWs page 2."""
    p = h.spawn("P")
    vma = p.mm.mmap(4)
    p.mm.write(vma.start, ids(1, 2, 3, 4))
    c = h.fork(p, "C")
    c.mm.write(vma.start + 1, ids(20))
    g = h.fork(c, "G")
    g.mm.write(vma.start + 2, ids(300))
    return p, c, g, vma.start


def owners_of(h, found):
    return sorted(vma.mm.id for vma, _ in found)


def test_walk_of_a_parent_only_page_finds_every_process(host, checked):
    p, c, g, start = family(host)
    pfn = int(p.mm.find_vma(start).pte[0])          # never COWed by anyone
    assert owners_of(host, mappings(host, pfn)) == sorted([p.pid, c.pid, g.pid])
    checked(host)


def test_walk_of_a_child_cow_page_stays_in_the_childs_subtree(host, checked):
    p, c, g, start = family(host)
    pfn = int(c.mm.find_vma(start).pte[1])          # C's copy, inherited by G
    found = []
    visited = rmap_walk(host, pfn, lambda vma, off: found.append((vma, off)))
    assert owners_of(host, found) == sorted([c.pid, g.pid])
    assert visited == 2                             # C's VMA and G's, not P's
    checked(host)


def test_walk_of_a_grandchild_page_visits_one_vma(host, checked):
    p, c, g, start = family(host)
    gvma = g.mm.find_vma(start)
    pfn = int(gvma.pte[2])
    found = []
    assert rmap_walk(host, pfn, lambda vma, off: found.append((vma, off))) == 1
    assert found == [(gvma, 2)]
    checked(host)


def test_chain_shapes(host):
    p, c, g, start = family(host)
    pv, cv, gv = (x.mm.find_vma(start) for x in (p, c, g))
    assert [a.id for a in pv.chain] == [pv.anon_vma.id]
    assert len(cv.chain) == 2 and cv.chain[-1] is pv.anon_vma      # root last
    assert len(gv.chain) == 3 and gv.anon_vma.parent is cv.anon_vma
    assert gv.anon_vma.root is pv.anon_vma


def test_old_profile_uses_one_anon_vma_per_family(old_host, checked):
    p, c, g, start = family(old_host)
    pv, cv, gv = (x.mm.find_vma(start) for x in (p, c, g))
    assert pv.anon_vma is cv.anon_vma is gv.anon_vma
    assert len(old_host.anon_vmas) == 1
    pfn = int(gv.pte[2])                                # the grandchild's private copy
    found = []
    assert rmap_walk(old_host, pfn, lambda vma, off: found.append((vma, off))) == 3
    assert found == [(gv, 2)]
    checked(old_host)


def test_exit_unlinks_and_frees_anon_vmas(host, checked):
    p, c, g, start = family(host)
    assert len(host.anon_vmas) == 3
    host.exit(g)
    assert len(host.anon_vmas) == 2
    host.exit(c)
    assert len(host.anon_vmas) == 1
    pfn = int(p.mm.find_vma(start).pte[0])
    assert host.frames.mapcount[pfn] == 1
    checked(host)
    host.exit(p)
    assert len(host.anon_vmas) == 0 and host.used_pages() == 0
    checked(host)


def test_parent_exit_leaves_children_pages_findable(host, checked):
    p, c, g, start = family(host)
    host.exit(p)
    pfn = int(c.mm.find_vma(start).pte[0])              # P's page, still mapped by C and G
    assert owners_of(host, mappings(host, pfn)) == sorted([c.pid, g.pid])
    checked(host)


def test_forking_again_reuses_an_idle_anon_vma(host, checked):
    """3.19's heuristic: a child adopts an ancestor anon_vma no VMA uses any more."""
    p = host.spawn("P")
    vma = p.mm.mmap(1)
    p.mm.write(vma.start, ids(1))
    c = host.fork(p)
    mid = c.mm.find_vma(vma.start).anon_vma
    g = host.fork(c)
    host.exit(c)                                         # mid: no active VMA, one child
    assert mid.num_active_vmas == 0 and mid.num_children == 1
    gg = host.fork(g)
    assert gg.mm.find_vma(vma.start).anon_vma is mid
    checked(host)


def test_page_referenced_counts_young_mappings(host):
    p = host.spawn("P")
    vma = p.mm.mmap(1)
    p.mm.write(vma.start, ids(1))
    c = host.fork(p)                                     # the child's PTE starts old
    pfn = int(vma.pte[0])
    assert page_referenced(host, pfn) == 1
    assert page_referenced(host, pfn) == 0               # bits were cleared
    c.mm.read(vma.start, 1)
    assert page_referenced(host, pfn) == 1


@pytest.mark.parametrize("profile", ["linux-6.18", "linux-2.6.33"])
def test_walk_many_equals_single_walks(profile):
    from hw.topology import Topology
    from vmhost.host import Host
    h = Host(Topology.uniform(1, 64 << 20), block_pages=1024, profile=profile)
    p = h.spawn("P")
    vma = p.mm.mmap(16)
    p.mm.write(vma.start, np.arange(1, 17, dtype=np.uint64))
    kids = [h.fork(p) for _ in range(5)]
    for i, k in enumerate(kids):
        k.mm.write(vma.start + i, ids(100 + i))
    h.fork(kids[0]).mm.write(vma.start + 7, ids(7000))
    pfns = np.flatnonzero(h.frames.refcount > 0)
    totals = walk_many(h, pfns)
    for i, pfn in enumerate(pfns):
        found = []
        assert rmap_walk(h, int(pfn), lambda v, o: found.append(v)) == totals.visited[i]
        assert len(found) == totals.found[i] == h.frames.mapcount[pfn]


def test_rmap_bench_reproduces_the_anon_vma_chain_result():
    from vmhost.benchmarks.rmap import run
    new, old = run(50, 40, "linux-6.18"), run(50, 40, "linux-2.6.33")
    assert new["walks"] == old["walks"] == 40 * 51
    assert old["avg_vmas_per_walk"] == 51                # every walk visits the whole family
    assert new["avg_vmas_per_walk"] <= 2.0
    assert new["max_vmas_per_walk"] == 51                # the parent's own pages
