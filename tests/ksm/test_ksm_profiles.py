"""The linux-2.6.33 profile: the same engine with that era's features only.

These traces run only in the emulator (the oracle is a 6.18 kernel), so each
expectation is argued from how 2.6.33 worked, in the test's docstring.
"""

import errno

import numpy as np
import pytest

from hw.topology import Topology
from vmhost.host import Host
from vmhost.ksm.engine import Ksm
from vmhost.ksm.ksmd import Ksmd
from vmhost.mm import invariants


def setup(profile, pages, contents):
    host = Host(Topology.uniform(1, 64 << 20), block_pages=1024, profile=profile)
    ksm = Ksm(host)
    ksmd = Ksmd(ksm, host.clock)
    ksm.write_knob("pages_to_scan", "100000")
    proc = host.spawn("a")
    vma = proc.mm.mmap(pages, thp=False)
    proc.mm.write(vma.start, contents)
    assert proc.mm.madvise(vma.start, pages, "mergeable") == 0
    ksm.write_knob("run", "1")
    return host, ksm, ksmd, proc, vma


@pytest.mark.parametrize("profile, shared, sharing", [("linux-6.18", 4, 996), ("linux-2.6.33", 1, 999)])
def test_identical_pages_without_max_page_sharing(profile, shared, sharing):
    """2.6.33 had no max_page_sharing: 1000 identical pages share one KSM page (6.18: 4 in a chain)."""
    host, ksm, ksmd, proc, vma = setup(profile, 1000, np.full(1000, 7, dtype=np.uint64))
    before = invariants.views(host)
    ksmd.run_full_scans(3)
    s = ksm.stats()
    assert (s["pages_shared"], s["pages_sharing"]) == (shared, sharing)
    assert s["stable_node_chains"] == (1 if profile == "linux-6.18" else 0)
    invariants.check(host, before)


def test_old_profile_has_no_smart_scan_or_zero_pages():
    """Unique pages are never skipped and zero pages merge among themselves in 2.6.33."""
    contents = np.concatenate([np.zeros(50, np.uint64), np.arange(1, 51, dtype=np.uint64)])
    host, ksm, ksmd, proc, vma = setup("linux-2.6.33", 100, contents)
    assert ksm.write_knob("use_zero_pages", "1") == -errno.ENOENT
    assert ksm.write_knob("smart_scan", "1") == -errno.ENOENT
    ksmd.run_full_scans(12)
    s = ksm.stats()
    assert s["pages_skipped"] == 0 and s["pages_scanned"] == 12 * 100   # merged pages are visited too
    assert (s["pages_shared"], s["pages_sharing"], s["pages_unshared"]) == (1, 49, 50)
    invariants.check(host)


def test_old_profile_keeps_one_anon_vma_and_ksm_rmap_finds_forks():
    """A fork family shares one anon_vma, and rmap of a KSM page reaches the child through it."""
    from vmhost.mm.rmap import mappings
    host, ksm, ksmd, proc, vma = setup("linux-2.6.33", 4, np.full(4, 9, dtype=np.uint64))
    ksmd.run_full_scans(2)
    child = host.fork(proc)
    kpfn = int(vma.pte[0])
    assert sorted({v.mm.id for v, _ in mappings(host, kpfn)}) == sorted([proc.pid, child.pid])
    assert len(host.anon_vmas) == 1
    invariants.check(host)
