"""Transparent huge pages: whole-folio faults, splitting, zero-page remapping, freeing."""

import numpy as np

from hw.topology import Topology
from tests.conftest import ids
from hw.units import HPAGE_PAGES
from vmhost.host import Host
from vmhost.mm import invariants
from vmhost.mm.frames import PG_HEAD, PG_TAIL
from vmhost.mm.thp import split_huge_page
from vmhost.mm.vma import PTE_ZERO


def thp_host(mode="madvise"):
    return Host(Topology.uniform(1, 64 << 20), block_pages=1024, thp=mode)


def test_write_in_hugepage_vma_maps_a_whole_folio():
    h = thp_host()
    p = h.spawn("a")
    vma = p.mm.mmap(2 * HPAGE_PAGES, thp=True, at=0x10000)
    p.mm.write(vma.start + 3, ids(42))
    pfns = vma.pte[:HPAGE_PAGES]
    assert (np.diff(pfns) == 1).all() and pfns[0] % HPAGE_PAGES == 0
    assert h.frames.flags[pfns[0]] & PG_HEAD and (h.frames.flags[pfns[1:]] & PG_TAIL).all()
    assert p.mm.view(vma.start, 5).tolist() == [0, 0, 0, 42, 0]
    assert (vma.ptef[HPAGE_PAGES:] == 0).all() and h.vmstat["thp_fault_alloc"] == 1
    invariants.check(h)


def test_thp_needs_madvise_in_madvise_mode_and_never_means_never():
    for mode, thp, huge in (("madvise", None, False), ("always", None, True), ("never", True, False)):
        h = thp_host(mode)
        p = h.spawn("a")
        vma = p.mm.mmap(HPAGE_PAGES, thp=thp, at=0x10000)
        p.mm.write(vma.start, ids(1))
        assert bool(h.frames.flags[vma.pte[0]] & PG_HEAD) == huge, mode


def test_split_frees_unmapped_and_zero_maps_zero_filled_pages():
    h = thp_host()
    p = h.spawn("a")
    vma = p.mm.mmap(HPAGE_PAGES, thp=True, at=0x10000)
    p.mm.write(vma.start, ids(5, 0, 6))          # page 1 written with zeroes: zero-filled too
    p.mm.madvise(vma.start + 10, 10, "dontneed")  # unmapped part of the folio
    before = invariants.views(h)
    used = h.used_pages()
    assert used == HPAGE_PAGES                          # the folio lives on while any page is mapped
    split_huge_page(h, int(vma.pte[0]))
    assert h.used_pages() == 2                    # only the non-zero pages keep frames
    assert vma.ptef[1] & PTE_ZERO and vma.ptef[100] & PTE_ZERO
    assert p.mm.rss_anon == 2
    invariants.check(h, before)


def test_folio_is_freed_when_its_last_page_is_unmapped():
    h = thp_host()
    p = h.spawn("a")
    vma = p.mm.mmap(HPAGE_PAGES, thp=True, at=0x10000)
    p.mm.write(vma.start, ids(1))
    c = h.fork(p)
    p.mm.munmap(vma.start, HPAGE_PAGES)
    assert h.used_pages() == HPAGE_PAGES                # the child still maps it
    h.exit(c)
    assert h.used_pages() == 0
    invariants.check(h)


def test_no_free_chunk_falls_back_to_small_pages():
    h = thp_host()
    p = h.spawn("a")
    n = h.allocator.free_pages() - h.allocator.watermarks[0].min - 1
    small = p.mm.mmap(n, thp=False)
    p.mm.write(small.start, np.arange(1, n + 1, dtype=np.uint64))   # breaks every 2 MiB chunk
    for off in range(0, n, 2):                                      # free pages never coalesce
        p.mm.madvise(small.start + off, 1, "dontneed")
    assert h.allocator.free_pages() > 4 * HPAGE_PAGES
    vma = p.mm.mmap(HPAGE_PAGES, thp=True, at=0x10000)
    p.mm.write(vma.start, ids(1))
    assert not h.frames.flags[vma.pte[0]] & PG_HEAD
    assert h.vmstat["thp_fault_fallback"] >= 1
    invariants.check(h)


def test_ksm_on_thp_backed_zero_pages_merges_nothing():
    """Splitting for KSM sends zero-filled pages to the zero page: they never reach pages_sharing."""
    from vmhost.ksm.warmup import ksm_host
    h, ksm, ksmd = ksm_host(64, 1024, pages_to_scan=100000)
    for i in range(2):
        vma = h.spawn(f"g{i}").mm.mmap(2 * HPAGE_PAGES, thp=True, at=0x10000)
        vma.mm.write(vma.start, np.full(8, 77, dtype=np.uint64))    # 8 shared pages, rest zero
        vma.mm.madvise(vma.start, vma.pages, "mergeable")
    before = invariants.views(h)
    ksm.write_knob("run", "1")
    ksmd.run_full_scans(4)
    s = ksm.stats()
    assert s["pages_shared"] + s["pages_sharing"] == 16 and s["ksm_zero_pages"] == 0
    assert h.used_pages() == 1                     # one KSM page left; every zero page freed
    invariants.check(h, before)


def test_split_range_keeps_a_page_table_until_dontneed_frees_it():
    h = thp_host()
    p = h.spawn("a")
    vma = p.mm.mmap(2 * HPAGE_PAGES, thp=True, at=0x10000)
    p.mm.write(vma.start, ids(5))
    split_huge_page(h, int(vma.pte[0]))
    assert vma.pgtable.tolist() == [True, False]
    p.mm.write(vma.start + 7, ids(9))             # PTE level: one 4 KiB page, no new folio
    assert h.vmstat["thp_fault_alloc"] == 1 and h.used_pages() == 2
    p.mm.madvise(vma.start + 1, 10, "dontneed")   # part of the range: the page table stays
    p.mm.write(vma.start + 3, ids(4))
    assert h.vmstat["thp_fault_alloc"] == 1
    p.mm.madvise(vma.start, HPAGE_PAGES, "dontneed")   # all of it: the emptied table is freed
    assert vma.pgtable.tolist() == [False, False]
    p.mm.write(vma.start + 3, ids(4))
    assert h.vmstat["thp_fault_alloc"] == 2
    invariants.check(h)


def test_page_table_state_follows_vma_split_and_merge():
    h = thp_host()
    p = h.spawn("a")
    vma = p.mm.mmap(3 * HPAGE_PAGES, thp=True, at=0x10000)
    p.mm.write(vma.start + HPAGE_PAGES + 5, ids(1))
    split_huge_page(h, int(vma.pte[HPAGE_PAGES + 5]))
    tail = vma.take_tail(vma.start + HPAGE_PAGES + 100)    # cut inside the split range
    assert vma.pgtable.tolist() == [False, True] and tail.pgtable.tolist() == [True, False]
    vma.absorb(tail)
    assert vma.pgtable.tolist() == [False, True, False]
    child = h.fork(p, "b")
    assert child.mm.vmas[0].pgtable.tolist() == [False, True, False]


def test_zero_remap_in_one_go_equals_page_by_page():
    """The split's zero-page remapping of the common case (every zero-filled page mapped once,
    in one VMA) done at once leaves what the page-by-page walk leaves: PTEs, counts, page-table
    generations, the free list's order (which frames the next allocations get); a forked
    folio (pages mapped twice) goes page by page."""
    import pytest
    from vmhost.mm import thp
    orig = thp._zero_remap_at_once

    def run(at_once: bool, fork: bool):
        taken = []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(thp, "_zero_remap_at_once", lambda host, zeroed: taken.append(
                orig(host, zeroed) if at_once else False) or taken[-1])
            h = thp_host()
            p = h.spawn("a")
            vma = p.mm.mmap(2 * HPAGE_PAGES, thp=True, at=0x10000)
            p.mm.write(vma.start, ids(*([5, 0, 6, 0, 0, 7] * 40)))
            p.mm.write(vma.start + HPAGE_PAGES, ids(8))
            if fork:
                h.fork(p, "child")
            before = invariants.views(h)
            split_huge_page(h, int(vma.pte[0]))
            invariants.check(h, before)
        new = p.mm.mmap(HPAGE_PAGES, thp=False, at=0x90000)
        p.mm.write(new.start, ids(*range(1, 301)))          # takes frames off the free list
        return taken, (vma.pte.tolist(), vma.ptef.tolist(), new.pte.tolist(),
                       int(h.pt_epoch[p.mm.id]), int(h.changes[0]), p.mm.rss_anon,
                       h.frames.refcount.tolist(), h.used_pages())

    taken, at_once = run(True, False)
    assert taken == [True] and at_once == run(False, False)[1]
    taken, forked = run(True, True)
    assert taken == [False] and forked == run(False, True)[1]
