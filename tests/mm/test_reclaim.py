"""Reclaim: kswapd at the low watermark, the CLOCK policy with rmap-walked referenced bits."""

import numpy as np

from helpers import start_ksm
from hw.swap import SwapDevice
from hw.topology import Topology
from vmhost.host import Host
from vmhost.mm import invariants
from vmhost.mm.vma import PTE_PRESENT, PTE_SWAP

MIB = 1 << 20


def host(swap_pages=8192):
    return Host(Topology.uniform(1, 16 * MIB), block_pages=1024,
                swap=[SwapDevice("sda", swap_pages, priority=1)])


def test_kswapd_wakes_below_low_and_reclaims_to_high():
    h = host()
    p = h.spawn("p")
    total = h.allocator.free_pages(0)
    wm = h.allocator.watermarks[0]
    pages = total - (wm.low + wm.min) // 2               # ends between min and low
    v = p.mm.mmap(pages, thp=False)
    p.mm.write(v.start, np.arange(1, pages + 1, dtype=np.uint64))
    before = invariants.views(h)
    assert h.allocator.free_pages(0) < wm.low
    h.clock.run_until(h.clock.now + 1)                    # kswapd runs on the clock
    assert h.allocator.free_pages(0) >= wm.high
    assert h.reclaim.stats["kswapd_runs"] == 1 and h.vmstat["pswpout"] > 0
    invariants.check(h, before)
    assert (p.mm.read(v.start, pages) == np.arange(1, pages + 1)).all()
    invariants.check(h, before)


def test_referenced_pages_get_a_second_chance():
    h = host()
    p = h.spawn("p")
    v = p.mm.mmap(64, thp=False)
    p.mm.write(v.start, np.arange(1, 65, dtype=np.uint64))
    from vmhost.mm.rmap import page_referenced
    for pfn in v.pte.tolist():
        page_referenced(h, pfn)                           # clear all young bits (an aging pass)
    p.mm.read(v.start, 32)                                # touch the first half again
    before = invariants.views(h)
    h.reclaim.hand[0] = 0
    freed = h.reclaim.shrink_node(0, 32)
    assert freed == 32
    assert (v.ptef[:32] & PTE_PRESENT).all() and (v.ptef[32:] & PTE_SWAP).all()
    invariants.check(h, before)


def test_ksm_page_referenced_through_any_mapping_stays():
    h = host()
    ksm, ksmd = start_ksm(h)
    procs = []
    for name in "ab":
        p = h.spawn(name)
        v = p.mm.mmap(2, thp=False)
        p.mm.write(v.start, np.array([7, 8], dtype=np.uint64))
        p.mm.madvise(v.start, 2, "mergeable")
        procs.append((p, v))
    ksmd.run_full_scans(2)
    from vmhost.mm.rmap import page_referenced
    k7, k8 = int(procs[0][1].pte[0]), int(procs[0][1].pte[1])
    page_referenced(h, k7), page_referenced(h, k8)
    procs[1][0].mm.read(procs[1][1].start, 1)             # b touches content 7 only
    before = invariants.views(h)
    for pfn in (k7, k8):
        if page_referenced(h, pfn) == 0:
            assert h.swap.reclaim_page(pfn) == "freed"
    assert h.frames.refcount[k7] > 0 and h.frames.refcount[k8] == 0
    assert all(v.ptef[1] & PTE_SWAP for _, v in procs)
    invariants.check(h, before)


def test_no_swap_means_no_anonymous_reclaim():
    h = Host(Topology.uniform(1, 16 * MIB), block_pages=1024)
    p = h.spawn("p")
    v = p.mm.mmap(16, thp=False)
    p.mm.write(v.start, np.arange(1, 17, dtype=np.uint64))
    assert h.reclaim.shrink_node(0, 16) == 0
    invariants.check(h)
