"""khugepaged: which PTE-mapped ranges it collapses, the collapse itself (nothing lost), its
pace on the clock, and the collapse/split cycle with KSM."""

import numpy as np

from hw.topology import Topology
from hw.units import HPAGE_PAGES
from tests.conftest import ids
from vmhost.clock import NS_PER_MS, Clock
from vmhost.host import Host
from vmhost.ksm.warmup import ksm_host
from vmhost.mm import invariants
from vmhost.mm import khugepaged as kh
from vmhost.mm.frames import PG_HEAD, PG_KSM
from vmhost.mm.thp import split_huge_page
from vmhost.mm.vma import PTE_WRITE

AT = 0x80000


def split_range(pages: int = 3):
    """A THP range with ``pages`` distinct non-zero pages, split: the rest maps the zero page."""
    h = Host(Topology.uniform(1, 64 << 20), block_pages=1024)
    p = h.spawn("a")
    vma = p.mm.mmap(2 * HPAGE_PAGES, thp=True, at=AT)
    p.mm.write(vma.start, ids(*range(1, pages + 1)))
    split_huge_page(h, int(vma.pte[0]))
    assert vma.pgtable[0] and h.used_pages() == pages
    return h, p, vma


def test_defaults_are_the_kernels():
    d = kh.DEFAULTS
    assert (d["pages_to_scan"], d["scan_sleep_millisecs"], d["max_ptes_none"], d["max_ptes_swap"],
            d["max_ptes_shared"]) == (4096, 10000, 511, 64, 256)


def test_split_range_is_collapsed_with_contents_kept():
    h, p, vma = split_range(3)
    before = invariants.views(h)
    assert kh.scan_range(h, vma, 0, kh.DEFAULTS) == kh.SUCCEED
    h.clock.run_until(0)                           # the first entry woke khugepaged at once
    assert h.khugepaged.pages_collapsed == 1 and h.vmstat["thp_collapse_alloc"] == 1
    assert h.vmstat["thp_fault_alloc"] == 1                # the first fault's, not the collapse
    assert not vma.pgtable[0] and h.frames.flags[vma.pte[0]] & PG_HEAD
    assert h.used_pages() == HPAGE_PAGES and p.mm.rss_anon == HPAGE_PAGES   # zero pages are real now
    assert p.mm.view(vma.start, 4).tolist() == [1, 2, 3, 0]
    invariants.check(h, before)
    assert kh.scan_range(h, vma, 0, kh.DEFAULTS) == kh.PMD_NONE_OR_MAPPED


def test_ranges_khugepaged_leaves_alone():
    h, p, vma = split_range(1)
    vma.ptef[0] &= ~np.uint8(PTE_WRITE)            # its only page read-only (as KSM leaves it)
    assert kh.scan_range(h, vma, 0, kh.DEFAULTS) == kh.PAGE_RO
    assert kh.scan_range(h, vma, HPAGE_PAGES, kh.DEFAULTS) == kh.PMD_NONE_OR_MAPPED   # empty
    h, p, vma = split_range(1)
    assert kh.scan_range(h, vma, 0, dict(kh.DEFAULTS, max_ptes_none=510)) == kh.EXCEED_NONE
    # pages mapped twice (after fork) beyond max_ptes_shared
    h, p, vma = split_range(300)
    h.fork(p, "child")
    assert kh.scan_range(h, vma, 0, kh.DEFAULTS) == kh.EXCEED_SHARED
    assert kh.scan_range(h, vma, 0, dict(kh.DEFAULTS, max_ptes_shared=300)) != kh.EXCEED_SHARED


def test_pace_on_the_clock_eight_ranges_every_ten_seconds():
    h = Host(Topology.uniform(1, 256 << 20), block_pages=1024)
    p = h.spawn("a")
    vma = p.mm.mmap(32 * HPAGE_PAGES, thp=True, at=AT)
    for r in range(32):
        p.mm.write(vma.start + r * HPAGE_PAGES, ids(r + 1))
        split_huge_page(h, int(vma.pte[r * HPAGE_PAGES]))
    h.clock.run_until(0)
    # a collapse ends the mm's visit (1 + 512 of progress), the wake-up goes on: 8 x 513 >= 4096
    assert h.khugepaged.pages_collapsed == 8
    h.clock.run_until(10_000 * NS_PER_MS - 1)
    assert h.khugepaged.pages_collapsed == 8
    h.clock.run_until(10_000 * NS_PER_MS)
    assert h.khugepaged.pages_collapsed == 16
    h.clock.run_until(30_000 * NS_PER_MS)
    assert h.khugepaged.pages_collapsed == 32 and h.khugepaged.full_scans == 0
    h.clock.run_until(40_000 * NS_PER_MS)            # the rest of the VMA: the end of the list
    assert h.khugepaged.pages_collapsed == 32 and h.khugepaged.full_scans == 1
    assert h.clock.next_time() is None             # its timer alone does not keep the loop going


def test_daemon_events_run_in_their_turn_but_do_not_keep_the_loop_alive():
    c = Clock()
    seen = []
    c.at(5, lambda: seen.append("d5"), daemon=True)
    c.at(3, lambda: seen.append("e3"))
    c.at(9, lambda: seen.append("d9"), daemon=True)
    assert c.run_while(lambda: True) is False and seen == ["e3"]
    c.at(6, lambda: seen.append("e6"))
    c.run_while(lambda: True)
    assert seen == ["e3", "d5", "e6"]
    c.run_until(20)
    assert seen == ["e3", "d5", "e6", "d9"] and c.now == 20


def test_ksm_splits_khugepaged_collapses_ksm_splits_again():
    """Two guests' identical THP ranges with one private page each: KSM merges and splits,
    khugepaged copies the range back into a huge page (unmerging it), KSM merges it again."""
    h, ksm, ksmd = ksm_host(128, 4096, pages_to_scan=100000)
    procs = []
    for i in range(2):     # a whole huge page each, 201 pages written: 200 alike, one private
        p = h.spawn(f"g{i}")
        vma = p.mm.mmap(HPAGE_PAGES, thp=True, at=AT)
        p.mm.write(vma.start, np.concatenate([np.arange(100, 300, dtype=np.uint64), ids(1000 + i)]))
        p.mm.madvise(vma.start, HPAGE_PAGES, "mergeable")
        procs.append((p, vma))
    before = invariants.views(h)
    h.clock.run_until(0)                          # khugepaged's first look: ranges PMD-mapped
    ksm.write_knob("run", "1")
    ksmd.run_full_scans(3)
    assert ksm.stats()["pages_sharing"] == 200
    vma = procs[0][1]
    assert vma.pgtable[0] and (h.frames.flags[vma.pte[:200]] & PG_KSM).all()
    collapsed = h.khugepaged.pages_collapsed
    ksm.write_knob("run", "0")                    # ksmd waits: khugepaged's work stays visible
    h.clock.run_until(h.clock.now + 10_000 * NS_PER_MS)
    assert h.khugepaged.pages_collapsed == collapsed + 2   # both ranges: 200 shared <= 256
    assert not vma.pgtable[0] and h.vmstat["thp_collapse_alloc"] == 2
    invariants.check(h, before)
    ksm.write_knob("run", "1")
    ksmd.run_full_scans(3)
    assert ksm.stats()["pages_sharing"] == 200 and vma.pgtable[0]
    invariants.check(h, before)
