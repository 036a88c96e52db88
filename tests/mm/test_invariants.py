"""The invariant checker accepts consistent state and catches each kind of corruption."""

import numpy as np
import pytest

from tests.conftest import ids
from vmhost.mm import invariants
from vmhost.mm.frames import PG_ANON
from vmhost.mm.vma import PTE_WRITE


@pytest.fixture
def forked(host):
    p = host.spawn("p")
    vma = p.mm.mmap(4)
    p.mm.write(vma.start, ids(1, 2, 3, 4))
    c = host.fork(p)
    c.mm.write(vma.start, ids(9))
    invariants.check(host)
    return host, p, c, vma


def violation(h, before=None) -> str:
    with pytest.raises(invariants.InvariantViolation) as exc:
        invariants.check(h, before)
    return str(exc.value)


@pytest.mark.parametrize("field, page", [("mapcount", 1), ("refcount", 2), ("index", 3)])
def test_wrong_frame_field(forked, field, page):
    h, p, c, vma = forked
    getattr(h.frames, field)[vma.pte[page]] += 1
    assert field in violation(h)


def test_writable_cow_shared_page(forked):
    h, p, c, vma = forked
    vma.ptef[1] |= PTE_WRITE                     # page 1 is shared with the child
    assert "writable" in violation(h)


def test_page_rmap_cannot_reach(forked):
    h, p, c, vma = forked
    cvma = c.mm.find_vma(vma.start)
    h.frames.owner[cvma.pte[0]] = 9999           # an anon_vma the VMA is not chained to
    assert "not chained" in violation(h)


def test_mapped_free_frame_and_free_list(forked):
    h, p, c, vma = forked
    pfn = int(vma.pte[3])
    h.frames.clear(np.array([pfn]))
    h.allocator.free(np.array([pfn]))
    text = violation(h)
    assert "free frame" in text and "mapcount" in text


def test_lost_frame_not_on_free_lists(forked):
    h, p, c, vma = forked
    h.allocator.alloc(1, 0)                      # taken and never used
    assert "free lists" in violation(h)


def test_content_changed_behind_the_process(forked):
    h, p, c, vma = forked
    before = invariants.views(h)
    h.frames.content[vma.pte[2]] = 12345         # a kernel bug that corrupts a page
    assert "content changed" in violation(h, before)


def test_pte_to_foreign_page(forked):
    h, p, c, vma = forked
    vma.pte[0] = vma.pte[1]                      # both parent PTEs now map one frame
    text = violation(h)
    assert "mapcount" in text


def test_flags_lost(forked):
    h, p, c, vma = forked
    h.frames.flags[vma.pte[0]] &= np.uint16(~PG_ANON & 0xFFFF)
    h.frames.owner[vma.pte[0]] = -1
    h.frames.refcount[vma.pte[3]] = 0
    assert "maps a free frame" in violation(h)


@pytest.fixture
def merged(host):
    from vmhost.ksm.engine import Ksm
    from vmhost.ksm.ksmd import Ksmd
    ksm = Ksm(host)
    ksmd = Ksmd(ksm, host.clock)
    ksm.write_knob("pages_to_scan", "10000")
    p = host.spawn("p")
    vma = p.mm.mmap(6)
    p.mm.write(vma.start, ids(1, 1, 1, 2, 2, 3))
    p.mm.madvise(vma.start, 6, "mergeable")
    ksm.write_knob("run", "1")
    ksmd.run_full_scans(2)
    invariants.check(host)
    return host, ksm


def test_ksm_counter_out_of_step(merged):
    h, ksm = merged
    ksm.c.pages_sharing += 1
    assert "sharing" in violation(h)


def test_ksm_item_off_its_list(merged):
    h, ksm = merged
    item = int(ksm.nodes.hhead[ksm.nodes.live()[0]])
    ksm.items.head[item] = -1
    assert "does not belong" in violation(h)


def test_ksm_lost_zero_page_count(merged):
    h, ksm = merged
    ksm.c.ksm_zero_pages += 2
    assert "ksm_zero_pages" in violation(h)
