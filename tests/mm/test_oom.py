"""The OOM killer: victim choice (badness, oom_score_adj, -1000, OOM origin) and the fault path."""

import errno

import numpy as np
import pytest

from hw.topology import Topology
from vmhost.host import Host
from vmhost.ksm.engine import Ksm
from vmhost.mm import invariants
from vmhost.mm.oom import OomKilled
from vmhost.mm.page_alloc import OutOfMemory

MIB = 1 << 20


def small_host():
    return Host(Topology.uniform(1, 8 * MIB), block_pages=256)       # 2048 pages, no swap


def hog(h, name, pages, value, adj=0):
    p = h.spawn(name)
    p.oom_score_adj = adj
    v = p.mm.mmap(pages, thp=False)
    p.mm.write(v.start, np.arange(value, value + pages, dtype=np.uint64))
    return p, v


def test_oom_kills_the_biggest_process_and_the_fault_succeeds():
    h = small_host()
    small, _ = hog(h, "small", 200, 1)
    big, _ = hog(h, "big", 1000, 10_000)
    views = invariants.views(h)
    newcomer = h.spawn("newcomer")
    v = newcomer.mm.mmap(900, thp=False)
    newcomer.mm.write(v.start, np.arange(1, 901, dtype=np.uint64))
    assert not big.alive and big.signals == ["SIGKILL"]
    assert small.alive and small.signals == []
    assert [k.name for k in h.oom.kills] == ["big"]
    assert newcomer.mm.read(v.start, 3).tolist() == [1, 2, 3]
    invariants.check(h, views)          # the survivors' pages are untouched


def test_oom_score_adj_minus_1000_is_never_chosen_and_adj_scales_by_totalpages():
    h = small_host()
    big, _ = hog(h, "big", 1000, 1, adj=-1000)
    medium, _ = hog(h, "medium", 300, 5000, adj=500)
    total = h.oom.totalpages()
    assert h.oom.badness(big) is None
    assert h.oom.badness(medium) == medium.mm.rss_anon + 500 * (total // 1000) + 4   # 4 page-table pages
    victim, _ = h.oom.select_victim()
    assert victim is medium


def test_faulting_process_itself_may_be_the_victim():
    h = small_host()
    p = h.spawn("greedy")
    v = p.mm.mmap(4000, thp=False)
    with pytest.raises(OomKilled):
        p.mm.write(v.start, np.arange(1, 4001, dtype=np.uint64))
    assert not p.alive and p.signals == ["SIGKILL"]
    invariants.check(h)


def test_no_killable_process_lets_the_allocation_fail():
    h = small_host()
    p = h.spawn("immortal")
    p.oom_score_adj = -1000
    v = p.mm.mmap(4000, thp=False)
    with pytest.raises(OutOfMemory):
        p.mm.write(v.start, np.arange(1, 4001, dtype=np.uint64))
    assert p.alive
    invariants.check(h)


def test_run_2_unmerge_out_of_memory_kills_the_writer_first():
    h = Host(Topology.uniform(1, 12 * MIB), block_pages=256)
    ksm = Ksm(h)
    guest = h.spawn("guest")
    v = guest.mm.mmap(1500, thp=False)
    guest.mm.write(v.start, np.full(1500, 3, np.uint64))
    guest.mm.madvise(v.start, 1500, "mergeable")
    ksm.write_knob("pages_to_scan", "100000")
    ksm.write_knob("max_page_sharing", "10000")
    ksm.write_knob("run", "1")
    for _ in range(2):
        ksm.do_scan(100000)
    assert ksm.stats()["pages_sharing"] == 1499
    other, _ = hog(h, "other", 1550, 9000)          # fills memory; bigger badness than the shell
    shell = h.spawn("sh")                            # the writer of run=2: tiny
    before = invariants.views(h)
    rc = h.oom.write_ksm_run("2", writer=shell)
    assert rc == -errno.ENOMEM
    assert not shell.alive and shell.signals == ["SIGKILL"]           # the OOM origin
    assert other.alive and guest.alive
    assert ksm.knobs.run == 0
    invariants.check(h, before)


@pytest.mark.parametrize("hog_adj, expect", [(-1000, -errno.EAGAIN), (0, 0)])
def test_madvise_unmergeable_out_of_memory_reclaims_kills_or_reports_eagain(hog_adj, expect):
    h = Host(Topology.uniform(1, 12 * MIB), block_pages=256)
    ksm = Ksm(h)
    guest = h.spawn("guest")
    guest.oom_score_adj = -1000
    v = guest.mm.mmap(1500, thp=False)
    guest.mm.write(v.start, np.full(1500, 3, np.uint64))
    guest.mm.madvise(v.start, 1500, "mergeable")
    for k, val in (("pages_to_scan", "100000"), ("max_page_sharing", "10000"), ("run", "1")):
        ksm.write_knob(k, val)
    for _ in range(2):
        ksm.do_scan(100000)
    other, _ = hog(h, "other", 1550, 9000, adj=hog_adj)
    before = invariants.views(h)
    # the unshare faults reclaim and call the OOM killer like any fault; what cannot be met
    # is reported as EAGAIN, as madvise does
    assert guest.mm.madvise(v.start, 1500, "unmergeable") == expect
    assert other.alive == (hog_adj == -1000) and guest.alive
    invariants.check(h, before)
