"""Swap: entries, swap cache, swap-out of anonymous and KSM pages, swap-in's copy rule, errors."""

import numpy as np
import pytest

from hw.swap import SwapDevice
from hw.topology import Topology
from helpers import process_with, start_ksm
from vmhost.host import Host
from vmhost.mm import invariants
from vmhost.mm.swap import SWP_SHIFT, SWP_SLOT_MASK, SwapReadError
from vmhost.mm.vma import PTE_SWAP

MIB = 1 << 20


def ksm_host(profile="linux-6.18", swap=None):
    h = Host(Topology.uniform(1, 64 * MIB), block_pages=1024, profile=profile,
             swap=swap if swap is not None else [SwapDevice("sda", 4096, priority=5)])
    ksm, ksmd = start_ksm(h)
    return h, ksm, ksmd


def three_sharers(h, pages=4, value=7):
    out = []
    for name in "abc":
        p = h.spawn(name)
        v = p.mm.mmap(pages, thp=False)
        p.mm.write(v.start, np.full(pages, value, np.uint64))
        assert p.mm.madvise(v.start, pages, "mergeable") == 0
        out.append((p, v))
    return out


def shared(ksm):
    s = ksm.stats()
    return s["pages_shared"], s["pages_sharing"]


def test_ksm_page_swapped_out_and_back_first_faulter_keeps_it_others_copy():
    h, ksm, ksmd = ksm_host()
    procs = three_sharers(h)
    ksmd.run_full_scans(2)
    assert shared(ksm) == (1, 11)
    before = invariants.views(h)
    kpfn = int(procs[0][1].pte[0])
    assert h.swap.reclaim_page(kpfn) == "freed"
    # every mapping became the same swap entry; its count is the number of mappings
    entries = np.concatenate([v.pte for _, v in procs])
    assert len(set(entries.tolist())) == 1
    assert all((v.ptef & PTE_SWAP).all() for _, v in procs)
    area = h.swap.areas[0]
    assert area.count[int(entries[0]) & SWP_SLOT_MASK] == 12
    assert h.frames.refcount[kpfn] == 0
    assert [p.mm.swap_ents for p, _ in procs] == [4, 4, 4]
    invariants.check(h, before)
    # counters lag: still counted until ksmd passes the swapped addresses
    assert shared(ksm) == (1, 11)
    ksmd.run_full_scans(1)
    assert shared(ksm) == (0, 0)
    # swap-in: a fresh read, mapped by the first faulter; everyone else copies
    for p, v in procs:
        assert p.mm.read(v.start, 4).tolist() == [7] * 4
    assert h.vmstat["pswpin"] == 1
    assert h.vmstat["ksm_swpin_copy"] == 11
    invariants.check(h, before)
    # ... and ksmd merges them again two passes later
    ksmd.run_full_scans(1)
    assert shared(ksm) == (0, 0)
    ksmd.run_full_scans(1)
    assert shared(ksm) == (1, 11)
    invariants.check(h, before)


def test_ksm_page_still_in_swap_cache_is_mapped_again_without_copies():
    h, ksm, ksmd = ksm_host()
    procs = three_sharers(h)
    ksmd.run_full_scans(2)
    before = invariants.views(h)
    kpfn = int(procs[0][1].pte[0])
    assert h.swap.reclaim_page(kpfn, keep_cached=True) == "cached"
    assert h.frames.mapcount[kpfn] == 0 and ksm.get_page(int(h.frames.owner[kpfn])) == kpfn
    for p, v in procs:
        p.mm.read(v.start, 4)
    assert h.vmstat["ksm_swpin_copy"] == 0
    assert all((v.pte == kpfn).all() for _, v in procs)
    ksmd.run_full_scans(2)
    assert shared(ksm) == (1, 11)
    invariants.check(h, before)


def test_2_6_33_rule_maps_a_cached_ksm_page_even_after_its_node_is_gone():
    """6.18 copies from a KSM page whose stable node is gone (run=2); 2.6.33 has no such test."""
    results = {}
    for profile in ("linux-6.18", "linux-2.6.33"):
        h, ksm, ksmd = ksm_host(profile)
        procs = three_sharers(h)
        ksmd.run_full_scans(2)
        before = invariants.views(h)
        kpfn = int(procs[0][1].pte[0])
        h.swap.reclaim_page(kpfn, keep_cached=True)
        assert ksm.write_knob("run", "2") == 0        # removes the unmapped page's stable node
        for p, v in procs:
            p.mm.read(v.start, 4)
        results[profile] = h.vmstat["ksm_swpin_copy"]
        invariants.check(h, before)
    assert results == {"linux-6.18": 12, "linux-2.6.33": 0}


def test_forked_child_swaps_in_parents_page_without_copy():
    h, ksm, ksmd = ksm_host()
    p, v = process_with(h, range(1, 9))
    c = h.fork(p)
    cv = c.mm.vmas[0]
    before = invariants.views(h)
    for pfn in v.pte.tolist():
        assert h.swap.reclaim_page(pfn) == "freed"
    assert p.mm.swap_ents == 8 and c.mm.swap_ents == 8
    invariants.check(h, before)
    assert c.mm.read(cv.start, 8).tolist() == list(range(1, 9))     # child faults first
    assert p.mm.read(v.start, 8).tolist() == list(range(1, 9))
    assert h.vmstat["ksm_swpin_copy"] == 0                            # same root, same index
    assert (v.pte == cv.pte).all()
    p.mm.write(v.start, np.arange(11, 19, dtype=np.uint64))         # COW: parent's own copy
    assert c.mm.read(cv.start, 8).tolist() == list(range(1, 9))
    invariants.check(h)
    h.exit(c)
    h.exit(p)
    assert h.swap.areas[0].dev.free_pages == 4096
    invariants.check(h)


def test_swap_read_error_is_contained_to_one_process():
    h, ksm, ksmd = ksm_host()
    a, b = h.spawn("a"), h.spawn("b")
    va, vb = a.mm.mmap(4, thp=False), b.mm.mmap(4, thp=False)
    a.mm.write(va.start, np.arange(1, 5, dtype=np.uint64))
    b.mm.write(vb.start, np.arange(11, 15, dtype=np.uint64))
    before = invariants.views(h)
    for pfn in np.concatenate([va.pte, vb.pte]).tolist():
        assert h.swap.reclaim_page(pfn) == "freed"
    bad = int(va.pte[2]) & SWP_SLOT_MASK
    h.swap.areas[0].dev.inject_errors([bad])
    with pytest.raises(SwapReadError):
        a.mm.read(va.start, 4)
    assert a.signals == ["SIGBUS"] and b.signals == []
    assert a.alive
    assert b.mm.read(vb.start, 4).tolist() == [11, 12, 13, 14]
    assert a.mm.read(va.start, 2).tolist() == [1, 2]                 # other pages of a are fine
    assert va.ptef[2] & PTE_SWAP                                     # the failing one stays swapped
    invariants.check(h, before)
    h.swap.areas[0].dev.clear_errors()
    assert a.mm.read(va.start, 4).tolist() == [1, 2, 3, 4]
    invariants.check(h, before)


def test_swap_write_error_keeps_the_page_in_swap_cache():
    h, ksm, ksmd = ksm_host()
    p, v = process_with(h, [5, 6])
    before = invariants.views(h)
    h.swap.areas[0].dev.inject_errors(all_slots=True)
    pfn = int(v.pte[0])
    assert h.swap.reclaim_page(pfn) == "write error"
    assert h.frames.refcount[pfn] == 1 and pfn in h.swap.cache_entry
    invariants.check(h, before)
    assert p.mm.read(v.start, 2).tolist() == [5, 6]                  # found in the swap cache
    invariants.check(h, before)


def test_device_priorities_highest_first_equal_ones_round_robin():
    devs = [SwapDevice("slow", 64, priority=1), SwapDevice("fast", 2, priority=10),
            SwapDevice("r1", 64, priority=5), SwapDevice("r2", 64, priority=5)]
    h, ksm, ksmd = ksm_host(swap=devs)
    p, v = process_with(h, range(1, 9))
    before = invariants.views(h)
    for pfn in v.pte.tolist():
        h.swap.reclaim_page(pfn)
    names = [h.swap.areas[int(e) >> SWP_SHIFT].dev.name for e in v.pte]
    assert names == ["fast", "fast", "r1", "r2", "r1", "r2", "r1", "r2"]
    invariants.check(h, before)


def test_swap_full_leaves_pages_resident():
    h, ksm, ksmd = ksm_host(swap=[SwapDevice("tiny", 1)])
    p, v = process_with(h, [1, 2])
    assert h.swap.reclaim_page(int(v.pte[0])) == "freed"
    assert h.swap.reclaim_page(int(v.pte[1])) == "swap full"
    invariants.check(h)


def test_ksmd_skips_swap_ptes_and_counts_fall_one_pass_later_with_many_mappings():
    h, ksm, ksmd = ksm_host()
    procs = three_sharers(h, pages=200, value=3)
    ksmd.run_full_scans(2)
    assert shared(ksm) == (3, 597)                 # max_page_sharing 256: three KSM pages
    for kpfn in np.unique(np.concatenate([v.pte for _, v in procs])).tolist():
        assert h.swap.reclaim_page(kpfn) == "freed"
    assert shared(ksm) == (3, 597)
    ksmd.run_full_scans(1)
    assert shared(ksm) == (0, 0) and ksm.stats()["pages_volatile"] == 0
    invariants.check(h)
