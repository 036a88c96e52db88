"""mmap placement and merging, munmap, mprotect and madvise with VMA splits."""

import errno

import numpy as np

from tests.conftest import ids
from vmhost.mm.mm import PROT_READ, PROT_WRITE
from vmhost.mm.vma import PTE_WRITE, VmFlags


def test_mmaps_go_top_down_and_equal_neighbours_merge(host):
    mm = host.spawn("a").mm
    first = mm.mmap(4).start
    mm.mmap(4)
    assert len(mm.vmas) == 1 and mm.vmas[0].pages == 8          # vma_merge
    assert mm.vmas[0].start == first - 4                        # the second went below the first
    shared = mm.mmap(4, shared=True)
    assert len(mm.vmas) == 2 and shared.end <= mm.vmas[-1].start


def test_mprotect_splits_and_merges_back(host, checked):
    mm = host.spawn("a").mm
    vma = mm.mmap(8)
    start = vma.start
    mm.write(start, np.arange(1, 9, dtype=np.uint64))
    assert mm.mprotect(start + 2, 3, PROT_READ) == 0
    assert [(v.start - start, v.end - start) for v in mm.vmas] == [(0, 2), (2, 5), (5, 8)]
    mid = mm.find_vma(start + 3)
    assert not mid.flags & VmFlags.WRITE and not (mid.ptef & PTE_WRITE).any()
    assert mid.pgoff == vma.pgoff + 2 and mid.anon_vma is vma.anon_vma
    assert mm.view(start, 8).tolist() == list(range(1, 9))
    checked(host)
    assert mm.mprotect(start + 2, 3, PROT_READ | PROT_WRITE) == 0
    assert len(mm.vmas) == 1
    checked(host)


def test_split_pages_stay_findable_by_rmap(host, checked):
    from vmhost.mm.rmap import mappings
    p = host.spawn("a")
    vma = p.mm.mmap(6)
    p.mm.write(vma.start, np.arange(1, 7, dtype=np.uint64))
    c = host.fork(p)
    p.mm.madvise(vma.start + 3, 1, "nohugepage")             # split the parent's VMA
    assert len(p.mm.vmas) == 3
    pfn = int(c.mm.find_vma(vma.start + 4).pte[4])
    assert sorted(v.mm.id for v, _ in mappings(host, pfn)) == sorted([p.pid, c.pid])
    checked(host)


def test_munmap_middle_leaves_two_vmas(host, checked):
    mm = host.spawn("a").mm
    vma = mm.mmap(6)
    start = vma.start
    mm.write(start, np.arange(1, 7, dtype=np.uint64))
    used = host.used_pages()
    assert mm.munmap(start + 2, 2) == 0
    assert [(v.start - start, v.end - start) for v in mm.vmas] == [(0, 2), (4, 6)]
    assert host.used_pages() == used - 2
    assert mm.view(start + 4, 2).tolist() == [5, 6]
    checked(host)


def test_madvise_errors(host):
    mm = host.spawn("a").mm
    vma = mm.mmap(4)
    assert mm.madvise(vma.start, 0, "dontneed") == 0
    assert mm.madvise(vma.end + 10, 1, "dontneed") == -errno.ENOMEM
    mm.munmap(vma.start + 1, 1)                        # a hole in the middle
    mm.write(vma.start, ids(1))
    mm.write(vma.start + 2, ids(2))
    assert mm.madvise(vma.start, 4, "dontneed") == -errno.ENOMEM
    assert mm.view(vma.start, 1).tolist() == [0]       # the mapped parts were still done
    assert mm.madvise(vma.start, 1, 99) == -errno.EINVAL
