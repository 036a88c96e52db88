"""The red-black tree and the key index under random insertions and removals."""

import random

import numpy as np
import pytest

from guests.errors import InputError
from vmhost.ksm.keyindex import EMPTY, KeyIndex, ki_find
from vmhost.ksm.rbtree import BLACK, NIL, RED, NodeLinks, RbTree


def check_rb(tree: RbTree, keys: dict) -> None:
    n = tree.n

    def black_height(x):
        if x == NIL:
            return 1
        left, right = int(n.left[x]), int(n.right[x])
        if n.color[x] == RED:
            assert all(c == NIL or n.color[c] == BLACK for c in (left, right)), "red node with red child"
        for c in (left, right):
            assert c == NIL or n.parent[c] == x, "broken parent link"
        hl, hr = black_height(left), black_height(right)
        assert hl == hr, "unequal black heights"
        return hl + (n.color[x] == BLACK)

    assert tree.root == NIL or n.color[tree.root] == BLACK
    black_height(tree.root)
    in_order = [keys[x] for x in tree]
    assert in_order == sorted(in_order)


def test_rbtree_stays_balanced_and_ordered():
    rng = random.Random(5)
    links = NodeLinks(4000, trees=2)
    trees = [RbTree(links, 0), RbTree(links, 1)]
    keys, live = {}, [[], []]
    for node in range(3000):
        t = node % 2
        if live[t] and rng.random() < 0.4:
            victim = live[t].pop(rng.randrange(len(live[t])))
            trees[t].erase(victim)
            continue
        keys[node] = rng.random()
        at, cur, go_left = NIL, trees[t].root, False
        while cur != NIL:
            at, go_left = cur, keys[node] < keys[cur]
            cur = int(links.left[cur] if go_left else links.right[cur])
        trees[t].link(node, at, go_left)
        live[t].append(node)
        if node % 97 == 0:
            check_rb(trees[t], keys)
    for t in (0, 1):
        check_rb(trees[t], keys)
        assert sorted(trees[t]) == sorted(live[t])


def test_replace_keeps_shape():
    links = NodeLinks(16)
    tree = RbTree(links)
    keys = {i: i for i in range(8)}
    for i in range(8):
        at, cur, go_left = NIL, tree.root, False
        while cur != NIL:
            at, go_left = cur, i < keys[cur]
            cur = int(links.left[cur] if go_left else links.right[cur])
        tree.link(i, at, go_left)
    before = [(int(links.left[x]), int(links.right[x])) for x in range(8)]
    keys[12] = keys[3]
    tree.replace(3, 12)
    assert [keys[x] for x in tree] == list(range(8))
    assert (int(links.left[12]), int(links.right[12])) == before[3]


class Owner:
    def __init__(self, n):
        self.key = np.zeros(n, dtype=np.uint64)
        self.nid = np.zeros(n, dtype=np.int16)


def test_key_index_insert_delete_replace_and_growth():
    rng = np.random.default_rng(3)
    owner = Owner(5000)
    owner.key[:] = rng.integers(0, 1 << 62, 5000, dtype=np.uint64)
    owner.nid[:] = rng.integers(0, 2, 5000)
    index = KeyIndex(owner, capacity=16)
    present = set()
    for node in range(4000):
        index.insert(node)
        present.add(node)
        if node % 3 == 0:
            gone = node // 2
            if gone in present:
                index.delete(gone)
                present.discard(gone)
    for node in range(4000):
        found = ki_find(index.slots, owner.key, owner.nid, owner.key[node], owner.nid[node])
        assert (found == node) == (node in present) and (found in (node, EMPTY))
    old = max(present)
    owner.key[4500], owner.nid[4500] = owner.key[old], owner.nid[old]
    index.replace(old, 4500)
    assert ki_find(index.slots, owner.key, owner.nid, owner.key[old], owner.nid[old]) == 4500
    assert index.count == len(present)


def test_replaying_the_unstable_tree_keeps_the_stable_fields_it_shares():
    """An rmap_item's unstable links and nid are its stable fields (unions): an item the
    hashed tree's log inserts and erases, and that has joined a stable node's list since,
    keeps its head, list links and anon_vma through the replay (which takes its nid from the
    log); the items still in the tree get links."""
    from vmhost.ksm import fastscan
    from vmhost.ksm.items import STABLE_FLAG, UNSTABLE_FLAG, RmapItems
    items = RmapItems(capacity=16)
    ln = items.links
    assert ln.left is items.head and ln.right is items.hnext and ln.parent is items.hprev
    for i, key in enumerate((50, 20, 80, 10)):
        items.tree_key[i] = key
        items.set_flags(i, UNSTABLE_FLAG)
    items.nid[:4] = 0
    log = np.array([0, 1, 2, 3, -1 - 2, -0 - 2], dtype=np.int32)    # item 1 erased last
    items.set_flags(1, STABLE_FLAG)                                # ... and now on a stable node
    items.head[1], items.hnext[1], items.hprev[1] = 7, 9, 11
    items.anon_vma[1] = 42                                      # nid's field (a union)
    assert items.nid is items.anon_vma
    fastscan.replay_unstable(log, len(log), items.tree_key, items.nid, items.mm_address,
                             ln.left, ln.right, ln.parent, ln.color, ln.roots)
    assert (items.head[1], items.hnext[1], items.hprev[1]) == (7, 9, 11)
    assert items.anon_vma[1] == 42
    root = int(ln.roots[0])
    assert root == 0 and {int(ln.left[0]), int(ln.right[0])} == {3, 2}
    assert int(ln.parent[3]) == 0 and int(ln.parent[2]) == 0


def test_replay_gives_an_item_erased_twice_what_it_held_before_the_first_erasure():
    """An item the log inserts and erases twice (freed and allocated again in one pass), now
    on a stable node: the replay erases each time from the tree the log names, and the item
    ends with the anon_vma it holds now, not the nid its first erasure logged."""
    from vmhost.ksm import fastscan
    from vmhost.ksm.items import STABLE_FLAG, UNSTABLE_FLAG, RmapItems
    items = RmapItems(capacity=16, trees=2)
    ln = items.links
    for i, key in enumerate((50, 20, 80)):
        items.tree_key[i] = key
        items.set_flags(i, UNSTABLE_FLAG)
    items.nid[:3] = 0
    log = np.array([0, 1, 2, -1 - 2, -0 - 2, 1, -1 - 2, -1 - 2], dtype=np.int32)  # tree 0, then 1
    items.set_flags(1, STABLE_FLAG)
    items.head[1], items.hnext[1], items.hprev[1] = 7, 9, 11
    items.anon_vma[1] = 42
    fastscan.replay_unstable(log, len(log), items.tree_key, items.nid, items.mm_address,
                             ln.left, ln.right, ln.parent, ln.color, ln.roots)
    assert items.anon_vma[1] == 42
    assert (items.head[1], items.hnext[1], items.hprev[1]) == (7, 9, 11)
    assert int(ln.roots[1]) == NIL and int(ln.roots[0]) == 0 and int(ln.right[0]) == 2


def test_stable_node_pool_grows_by_half_and_hands_out_the_lowest_new_node_first():
    """The pool holds at most 1.5 slots per node it has handed out (plus its first 256); a
    chain's dup list head and a node's rmap_item list head are one array, through growth."""
    from vmhost.ksm.stable import NODE, StableNodes
    nodes = StableNodes(capacity=256)
    got = [nodes.alloc(NODE) for _ in range(10_000)]
    assert sorted(got) == got == list(range(10_000))
    assert 10_000 <= nodes.capacity <= 1.5 * 10_000
    assert nodes.dhead is nodes.hhead and len(nodes.free_stack) == nodes.capacity
    nodes.free(got[5])
    assert nodes.alloc(NODE) == got[5]                # the last freed is the next handed out


def test_a_vmas_candidates_need_no_vma_sized_temporary():
    """Listing a VMA's anonymous pages for the scan allocates the int32 result only (a 16 GiB
    VMA's int64 index and masked copies were 64 MiB above the state at a 64 GiB host's peak)."""
    import tracemalloc
    from vmhost.ksm import pages
    from vmhost.ksm.warmup import ksm_host, mergeable_process
    h, ksm, _ = ksm_host(64, 4096)
    proc, start = mergeable_process(h, "p", np.arange(1, 8001), thp=False)
    vma = proc.mm.find_vma(start)
    pages.candidate_offsets(h, vma)                   # compiled before it is measured
    tracemalloc.start()
    cand = pages.candidate_offsets(h, vma)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert cand.dtype == np.int32 and len(cand) == 8000
    assert peak < cand.nbytes + 4096


def test_the_page_allocators_free_stacks_hold_32_bit_pfns():
    from vmhost.ksm.warmup import ksm_host, mergeable_process
    h, _, _ = ksm_host(64, 4096)
    proc, start = mergeable_process(h, "p", np.arange(1, 2001), thp=False)
    proc.mm.munmap(start, 2000)
    stacks = [s for a in h.allocator._areas.values() for s in (a.small, a.chunks)]
    assert all(s.pfns.dtype == np.int32 for s in stacks) and sum(s.top for s in stacks) > 0
    got = h.allocator._areas[next(iter(h.allocator._areas))].small.pop(1)
    assert got.dtype == np.int64


def test_an_rmap_items_word_holds_its_mm_address_and_flags_at_their_limits():
    """mm, virtual page and flags share one word (``mm_address``): each reads back as written at
    the ends of its range, a freed item reads mm -1 with its address and flags kept, and an mm
    or a page the word cannot hold is refused before an item is made for it."""
    from vmhost.ksm.items import (FLAG_BITS, MAX_MM, SEQNR_MASK, STABLE_FLAG, UNSTABLE_FLAG,
                                  VPN_MASK, RmapItems, check_item_range)
    items = RmapItems(capacity=4)
    assert items.live().size == 0 and items.mm_address.dtype == np.int64
    for mm_id, vpn in ((0, 0), (MAX_MM - 1, VPN_MASK), (7, 0x7F000000 + 5)):
        it = items.alloc(mm_id, vpn)
        assert (items.mm_of(it), items.vpn_of(it), items.flags_of(it)) == (mm_id, vpn, 0)
        items.set_flags(it, UNSTABLE_FLAG | SEQNR_MASK)
        assert (items.mm_of(it), items.vpn_of(it)) == (mm_id, vpn)
        assert items.flags_of(it) == FLAG_BITS & ~STABLE_FLAG
        items.mm_address[it] |= STABLE_FLAG
        assert items.flags_of(it) == FLAG_BITS and items.vpn_of(it) == vpn
        items.set_flags(it, 0)
        assert (items.mm_of(it), items.vpn_of(it), items.flags_of(it)) == (mm_id, vpn, 0)
        items.set_flags(it, STABLE_FLAG)
        items.free(it)
        assert (items.mm_of(it), items.vpn_of(it), items.flags_of(it)) == (-1, vpn, STABLE_FLAG)
        assert it not in items.live()
    check_item_range(MAX_MM - 1, VPN_MASK + 1)
    with pytest.raises(InputError, match="mms"):
        check_item_range(MAX_MM, 1)
    with pytest.raises(InputError, match="47-bit"):
        check_item_range(1, VPN_MASK + 2)


def test_smart_scan_on_one_byte_skips_as_the_kernels_u8_age_and_remaining_skips():
    """An rmap_item's ``smart`` byte (age saturating at 15, remaining_skips) makes the same
    skip decisions, visit after visit, as the kernel's separate u8 fields (age up to 255),
    and its skips read back as the kernel's."""
    from vmhost.ksm.fastscan import smart_skip, smart_step
    from vmhost.ksm.items import SMART_SKIPS_SHIFT
    age, skips, smart = 0, 0, 0
    decisions = []
    for _ in range(400):
        age, skips, skip = smart_skip.py_func(age, skips)
        smart, skip_byte = smart_step.py_func(smart)
        assert skip_byte == skip and smart >> SMART_SKIPS_SHIFT == skips and 0 <= smart < 256
        decisions.append(skip)
    assert age == 255 and decisions[-9:].count(True) == 8     # 8 skips for each visit
