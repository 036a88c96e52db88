"""Each kind of page fault, and what it does to frames and page tables."""

import numpy as np
import pytest

from tests.conftest import ids
from vmhost.mm.frames import PG_ANON
from vmhost.mm.mm import PROT_READ, SegmentationFault
from vmhost.mm.vma import PTE_PRESENT, PTE_WRITE, PTE_ZERO


def test_read_of_untouched_page_maps_the_zero_page(host, checked):
    p = host.spawn("a")
    vma = p.mm.mmap(4)
    used = host.used_pages()
    assert p.mm.read(vma.start, 4).tolist() == [0, 0, 0, 0]
    assert host.used_pages() == used                       # no frame allocated
    assert (vma.ptef & PTE_ZERO).all() and not (vma.ptef & PTE_WRITE).any()
    checked(host)


def test_write_allocates_a_private_page(host, checked):
    p = host.spawn("a")
    vma = p.mm.mmap(4)
    p.mm.write(vma.start + 1, ids(7, 8))
    assert p.mm.view(vma.start, 4).tolist() == [0, 7, 8, 0]
    pfns = vma.pte[1:3]
    assert (host.frames.flags[pfns] & PG_ANON).all()
    assert host.frames.owner[pfns].tolist() == [vma.anon_vma.id] * 2
    assert vma.offsets_of(host.frames.index[pfns]).tolist() == [1, 2]
    assert p.mm.rss_anon == 2
    checked(host)


def test_write_after_read_replaces_the_zero_page(host, checked):
    p = host.spawn("a")
    vma = p.mm.mmap(2)
    p.mm.read(vma.start, 2)
    p.mm.write(vma.start, ids(5))
    assert vma.ptef[0] & (PTE_PRESENT | PTE_WRITE | PTE_ZERO) == PTE_PRESENT | PTE_WRITE
    assert vma.ptef[1] & PTE_ZERO
    assert p.mm.view(vma.start, 2).tolist() == [5, 0]
    checked(host)


def test_cow_after_fork_copies_for_the_writer_only(host, checked):
    parent = host.spawn("p")
    vma = parent.mm.mmap(3)
    parent.mm.write(vma.start, ids(1, 2, 3))
    child = host.fork(parent)
    shared = vma.pte.copy()
    assert host.frames.mapcount[shared].tolist() == [2, 2, 2]
    assert not (vma.ptef & PTE_WRITE).any()
    child.mm.write(vma.start, ids(10))
    cvma = child.mm.find_vma(vma.start)
    assert cvma.pte[0] != shared[0] and host.frames.mapcount[shared[0]] == 1
    assert parent.mm.view(vma.start, 3).tolist() == [1, 2, 3]
    assert child.mm.view(vma.start, 3).tolist() == [10, 2, 3]
    # the parent's page is now exclusive again: its write reuses it in place
    parent.mm.write(vma.start, ids(11))
    assert vma.pte[0] == shared[0]
    checked(host)


def test_cow_copy_is_stamped_with_the_childs_own_anon_vma(host, checked):
    parent = host.spawn("p")
    vma = parent.mm.mmap(2)
    parent.mm.write(vma.start, ids(1, 2))
    child = host.fork(parent)
    child.mm.write(vma.start, ids(9))
    cvma = child.mm.find_vma(vma.start)
    assert cvma.anon_vma is not vma.anon_vma
    assert cvma.anon_vma.root is vma.anon_vma
    assert host.frames.owner[cvma.pte[0]] == cvma.anon_vma.id
    assert host.frames.owner[cvma.pte[1]] == vma.anon_vma.id   # inherited, still the parent's
    checked(host)


def test_write_to_read_only_mapping_is_a_segfault(host):
    p = host.spawn("a")
    vma = p.mm.mmap(2, prot=PROT_READ)
    with pytest.raises(SegmentationFault):
        p.mm.write(vma.start, ids(1))
    p.mm.write(vma.start, ids(1), force=True)                 # like /proc/PID/mem
    assert p.mm.view(vma.start, 1).tolist() == [1]


def test_access_outside_any_vma_is_a_segfault(host):
    p = host.spawn("a")
    vma = p.mm.mmap(2)
    with pytest.raises(SegmentationFault):
        p.mm.write(vma.end, ids(1))
    with pytest.raises(SegmentationFault):
        p.mm.read(vma.start, 3)


def test_dontneed_drops_pages_and_frees_frames(host, checked):
    p = host.spawn("a")
    vma = p.mm.mmap(4)
    p.mm.write(vma.start, ids(1, 2, 3, 4))
    used = host.used_pages()
    assert p.mm.madvise(vma.start, 2, "dontneed") == 0
    assert host.used_pages() == used - 2
    assert p.mm.view(vma.start, 4).tolist() == [0, 0, 3, 4]
    checked(host)


def test_shared_anonymous_memory_is_shared_after_fork(host, checked):
    parent = host.spawn("p")
    vma = parent.mm.mmap(2, shared=True)
    parent.mm.write(vma.start, ids(1))
    child = host.fork(parent)
    child.mm.write(vma.start, ids(5))                 # no COW: the parent sees it
    child.mm.write(vma.start + 1, ids(6))             # faulted in after fork: still shared
    assert parent.mm.view(vma.start, 2).tolist() == [5, 6]
    checked(host)
    host.exit(child)
    host.exit(parent)
    assert host.used_pages() == 0
    checked(host)


def test_numa_policies_place_pages(checked):
    from hw.topology import Topology
    from vmhost.host import Host
    from vmhost.mm.mempolicy import MemPolicy
    h = Host(Topology.uniform(2, 16 << 20), block_pages=1024)
    p = h.spawn("a", home_node=1)
    local = p.mm.mmap(8)
    inter = p.mm.mmap(8, policy=MemPolicy("interleave", (0, 1)))
    bind = p.mm.mmap(8, policy=MemPolicy("bind", (0,)))
    for vma in (local, inter, bind):
        p.mm.write(vma.start, np.arange(1, 9, dtype=np.uint64))
    node = h.phys.node_of
    assert set(node(local.pte).tolist()) == {1}
    assert sorted(node(inter.pte).tolist()) == [0] * 4 + [1] * 4
    assert set(node(bind.pte).tolist()) == {0}
    checked(h)


def test_bind_policy_fails_rather_than_leave_its_nodes():
    from hw.topology import Topology
    from vmhost.host import Host
    from vmhost.mm.mempolicy import MemPolicy
    from vmhost.mm.page_alloc import OutOfMemory
    h = Host(Topology.uniform(2, 4 << 20), block_pages=256)
    p = h.spawn("a")
    vma = p.mm.mmap(2048, policy=MemPolicy("bind", (1,)))
    with pytest.raises(OutOfMemory):
        p.mm.write(vma.start, np.arange(1, 2049, dtype=np.uint64))
