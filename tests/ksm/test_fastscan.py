"""The compiled scan loop gives exactly what the pure-Python scan gives.

The corpus traces cover the kernel's behaviours; here the two scan paths are
held against each other on every trace, and on a time-driven workload where
processes write between ksmd batches (so that the compiled loop's caches,
the hashed unstable tree and the stable-tree key index go stale mid-pass and
must be noticed). Not only the counters: the whole state (every mm_slot's
rmap_items in list order, the stable trees' shape with chains, dups and their
lists, the unstable trees' shape, every page table and every frame) must be
the same.
"""

import json

import numpy as np
import pytest

from vmhost.ksm import fastscan
from vmhost.ksm.items import STABLE_FLAG, UNSTABLE_FLAG
from vmhost.ksm.replay import Replay
from vmhost.ksm.trace import load_trace
from vmhost.ksm.warmup import ksm_host, mergeable_process
from vmhost.mm import invariants

from helpers import CORPUS


def _tree(links, root, describe):
    """A tree's shape: (node, colour, left subtree, right subtree), nested."""
    if root == -1:
        return None
    return (describe(root), int(links.color[root]), _tree(links, int(links.left[root]), describe),
            _tree(links, int(links.right[root]), describe))


def record(history: list, ksm, full: bool) -> None:
    """A churn step's record: the counters, and the full state when ``full``."""
    history.append(ksm.stats())
    if full:
        history.append(full_state(ksm))


def ended(history: list, host, ksm) -> list:
    """A churn run's end: the invariant checker passes, and the final full state is recorded."""
    invariants.check(host)
    history.append(full_state(ksm))
    return history


def full_state(ksm) -> dict:
    """Everything KSM and the page tables hold, item and node ids included."""
    ksm.build_unstable_trees()           # the hashed form of the unstable tree, as a tree
    items, nodes, host = ksm.items, ksm.nodes, ksm.host

    def item(i):
        i = int(i)
        return (i, items.mm_of(i), items.vpn_of(i), items.flags_of(i),
                int(items.oldchecksum[i]), int(items.smart[i]),
                int(items.head[i]) if items.flags_of(i) & STABLE_FLAG else -1, int(items.anon_vma[i]),
                int(items.nid[i]) if items.flags_of(i) & (STABLE_FLAG | UNSTABLE_FLAG) else 0)

    def hlist(node):
        out, it = [], int(nodes.hhead[node])
        while it != -1:
            out.append(item(it))
            it = int(items.hnext[it])
        return out

    def node(n):
        n = int(n)
        return (n, int(nodes.kind[n]), int(nodes.kpfn[n]), int(nodes.key[n]), int(nodes.nid[n]),
                int(nodes.hlist_len[n]), hlist(n), int(nodes.prune_time[n]),
                [node(d) for d in nodes.dups(n)] if nodes.kind[n] == 3 else [])

    slots = []
    for slot in ksm.slots:
        lst, it = [], slot.rmap_list
        while it != -1:
            lst.append(item(it))
            it = int(items.rnext[it])
        slots.append((slot.mm.id, lst))
    ptes = []
    for pid in sorted(host.processes):
        for v in host.processes[pid].mm.vmas:
            ptes.append((pid, v.start, v.end, int(v.flags), v.pte.tobytes(), v.ptef.tobytes()))
    f = host.frames
    return {"stats": ksm.stats(), "seqnr": ksm.seqnr, "slots": slots,
            "cursor": (None if ksm.cursor is None else ksm.cursor.mm.id, ksm.address, ksm.prev_item),
            "stable": [_tree(nodes.links, int(r), node) for r in nodes.links.roots],
            "migrate": [node(n) for n in nodes.migrate_nodes],
            "unstable": [_tree(items.links, int(r), item) for r in items.links.roots],
            "ptes": ptes, "frames": [getattr(f, n).tobytes() for n in f._FIELDS],
            "mm_ksm": host.mm_ksm.tobytes()}
TRACES = sorted(CORPUS.glob("*.yaml"))


@pytest.mark.parametrize("path", TRACES, ids=[p.stem for p in TRACES])
def test_pure_python_scan_gives_the_same_result(path):
    pure, fast = Replay(load_trace(path)), Replay(load_trace(path))
    pure.ksm.fast = False
    assert pure.run() == json.loads(json.dumps(fast.run()))
    assert full_state(pure.ksm) == full_state(fast.ksm)


def churn(fast: bool, seed: int = 7, prune_ms: int = 2000, mps: int = 8, contents: int = 40):
    """Four processes, small batches, random writes and forks between batches."""
    rng = np.random.default_rng(seed)
    h, ksm, ksmd = ksm_host(256, 4096, fast, pages_to_scan=300, max_page_sharing=mps,
                            stable_node_chains_prune_millisecs=prune_ms)
    procs = [mergeable_process(h, f"p{i}", rng.integers(0, contents, 2048), thp=(i % 2 == 0),
                               at=0x40000 + 4096 * i) for i in range(4)]
    ksm.write_knob("run", "1")
    history = []
    for step in range(150):
        ksmd._tick()
        p, start = procs[rng.integers(len(procs))]
        offs = rng.integers(0, 2048, 20)
        for off in offs:
            p.mm.write(start + int(off), [int(rng.integers(0, contents))])
        if step == 25:
            child = h.fork(procs[0][0], "child")
            procs.append((child, procs[0][1]))
        if step == 40:
            h.exit(procs[1][0])
            procs.pop(1)
        record(history, ksm, full=step % 10 == 0)
    return ended(history, h, ksm)


@pytest.mark.parametrize("prune_ms", [0, 2000])
def test_compiled_scan_follows_changes_between_batches(prune_ms):
    fast, pure = churn(fast=True, prune_ms=prune_ms), churn(fast=False, prune_ms=prune_ms)
    assert fast == pure
    assert max(s["stable_node_chains"] for s in pure if "stable_node_chains" in s) > 0   # chains met


def test_chains_collapse_in_a_tree_with_neighbours():
    """Chains of two or three dups among a few thousand stable nodes, decaying as pages are
    written: a chain left with one dup collapses into it where the chain sits in the tree (the
    dup's list links and the tree links are one union: the order of the steps matters)."""
    fast = churn(fast=True, prune_ms=0, mps=2, contents=2000)
    pure = churn(fast=False, prune_ms=0, mps=2, contents=2000)
    assert fast == pure
    chains = [s["stable_node_chains"] for s in pure if "stable_node_chains" in s]
    assert max(chains) > 0 and any(b < a for a, b in zip(chains, chains[1:]))


def thp_pairs(fast: bool):
    """Huge-page-backed memory whose merges split THPs mid-pass (which invalidates the
    hashed unstable tree after merged items already left it)."""
    h, ksm, ksmd = ksm_host(128, 4096, fast, pages_to_scan=100000, max_page_sharing=4)
    rng = np.random.default_rng(11)
    for i in range(3):
        mergeable_process(h, f"g{i}", rng.integers(1, 300, 4 * 512), thp=True, at=0x80000)
    before = invariants.views(h)
    ksm.write_knob("run", "1")
    history = []
    for _ in range(4):
        ksmd.run_full_scans(1)
        history.append(ksm.stats())
    invariants.check(h, before)
    history.append(full_state(ksm))
    return history


def test_compiled_scan_does_the_merges_itself():
    """Merges into new KSM pages, with chains and dups in the tree, are compiled: Python
    finishes only the few visits that need it (pruning, collapsing, new chains)."""
    rng = np.random.default_rng(3)
    h, ksm, ksmd = ksm_host(256, 4096, pages_to_scan=100000, max_page_sharing=4)
    for i in range(4):
        mergeable_process(h, f"p{i}", rng.integers(1, 3000, 4096))
    ksm.write_knob("run", "1")
    ksmd.run_full_scans(3)
    merges = int(ksm.work[fastscan.W_MERGES])
    assert ksm.c.stable_node_chains > 100 and merges > 10000
    assert int(ksm.bails.sum()) < merges // 20
    # writes break KSM pages (COW), leave stale nodes and dups, change page tables mid-pass
    before = ksm.stats()
    for step in range(20):
        for p in list(h.processes.values()):
            offs = rng.integers(0, 4096, 100)
            for off in offs:
                p.mm.write(p.mm.vmas[0].start + int(off), [int(rng.integers(1, 3000))])
        ksmd.run_full_scans(1)
    merges = int(ksm.work[fastscan.W_MERGES])
    assert ksm.stats()["stable_node_dups"] != before["stable_node_dups"]
    assert int(ksm.bails.sum()) < merges // 20
    invariants.check(h)


def test_compiled_scan_with_thp_splits_mid_pass():
    assert thp_pairs(fast=True) == thp_pairs(fast=False)


def merged_then_materialized(fast: bool):
    """A merge takes an item out of the hashed unstable tree; a write elsewhere later in the
    same pass forces the real tree to be built from the log, which must not disturb the
    merged item's place on its stable node."""
    h, ksm, ksmd = ksm_host(64, 1024, fast, pages_to_scan=3)
    starts = [mergeable_process(h, name, contents, thp=False)
              for name, contents in (("a", [5, 6, 7]), ("b", [5, 8, 9]), ("c", [10, 11, 12]))]
    ksm.write_knob("run", "1")
    history = []
    for batch in range(12):
        ksmd._tick()
        if batch % 4 == 1:                       # a write in c while a pass is under way
            c, start = starts[2]
            c.mm.write(start + 2, [100 + batch])
        history.append(ksm.stats())
    invariants.check(h)
    history.append(full_state(ksm))
    ksm.write_knob("run", "2")                   # walks every stable list
    history.append(ksm.stats())
    return history


def test_merged_item_survives_building_the_tree_from_the_log():
    assert merged_then_materialized(fast=True) == merged_then_materialized(fast=False)


def quiet_merges(fast: bool):
    """Whole passes with nothing written (the unstable tree stays hashed throughout): unique
    pages, pairs, groups and pages freed between passes, so that the tree's log gets
    insertions and erasures, and items freed and allocated again."""
    rng = np.random.default_rng(3)
    h, ksm, ksmd = ksm_host(64, 4096, fast, pages_to_scan=5000, max_page_sharing=4)
    contents = np.concatenate([np.arange(1, 600), rng.integers(1000, 1200, 700),
                               rng.integers(2000, 2010, 300)])
    procs = [mergeable_process(h, f"p{i}", rng.permutation(contents), thp=False,
                               at=0x40000 + 4096 * i) for i in range(3)]
    ksm.write_knob("run", "1")
    history = []
    for step in range(8):
        ksmd._tick()
        history.append(ksm.stats())
        if step == 3:                   # a process unmaps half its pages: their items go
            p, start = procs[0]
            p.mm.munmap(start, 800)
    invariants.check(h)
    history.append(full_state(ksm))
    return history


def test_hashed_unstable_tree_grows_with_its_log(monkeypatch):
    """The hashed unstable tree is sized for the tree a pass can build, and its log and table
    grow (the table re-made from the log) when a pass logs more: from a log of 8 entries,
    every pass, the state is the one the pure-Python scan and the default size give."""
    from vmhost.ksm import unstable_tree
    pure, default = quiet_merges(fast=False), quiet_merges(fast=True)
    grown = []
    mixin = unstable_tree.UnstableTreeMixin
    real_grow, real_size = mixin._grow_unstable_hash, mixin._size_unstable_hash
    monkeypatch.setattr(unstable_tree, "LOG_MIN", 8)
    monkeypatch.setattr(mixin, "_size_unstable_hash", lambda self, entries: real_size(self, 0))
    monkeypatch.setattr(mixin, "_grow_unstable_hash",
                        lambda self: (grown.append(len(self._ulog)), real_grow(self)))
    small = quiet_merges(fast=True)
    assert small == pure and default == pure
    assert len(grown) >= 5
    assert max(s["pages_sharing"] for s in pure if "pages_sharing" in s) > 0


def two_nodes(fast: bool):
    """Two NUMA nodes, merge_across_nodes=0 (an unstable and a stable tree per node), batches
    of a third of a process, and a write in the middle of the third process of every pass
    (from the second on): the hashed unstable tree is built from its log there, after items
    of node 1's tree (the first process's) have merged with the third's pages and hold an
    anon_vma where their nid was."""
    from hw.topology import Topology
    from vmhost.host import Host
    from vmhost.ksm.engine import Ksm
    from vmhost.ksm.ksmd import Ksmd
    from vmhost.mm.mempolicy import MemPolicy
    h = Host(Topology.uniform(2, 64 << 20), block_pages=1024)
    ksm = Ksm(h)
    ksm.fast = fast
    ksmd = Ksmd(ksm, h.clock)
    for name, value in (("merge_across_nodes", 0), ("pages_to_scan", 200)):
        assert ksm.write_knob(name, str(value)) == 0
    rng = np.random.default_rng(11)
    procs = []
    for i in range(4):
        p = h.spawn(f"p{i}", 1 - i % 2)
        v = p.mm.mmap(600, thp=False, policy=MemPolicy("bind", (1 - i % 2,)))
        p.mm.write(v.start, rng.integers(1, 300, 600).astype(np.uint64))
        p.mm.madvise(v.start, 600, "mergeable")
        procs.append((p, v))
    ksm.write_knob("run", "1")
    history = []
    for step in range(50):
        ksmd._tick()
        if step % 12 == 7 and step > 12:            # 12 batches a pass, the third process's
            p, v = procs[step % 4]
            p.mm.write(v.start + int(rng.integers(600)), [int(rng.integers(1, 300))])
        record(history, ksm, full=step % 8 == 0)
    return ended(history, h, ksm)


def test_two_nodes_trees_rebuilt_from_the_log_take_each_items_nid_from_it(monkeypatch):
    from vmhost.ksm import unstable_tree
    erased_nids = []
    real = unstable_tree.UnstableTreeMixin.build_unstable_trees

    def build(self):
        if self._uhashed:
            log = self._ulog[:int(self._ulog_len[0])]
            erased_nids.extend((-log[log < 0][1::2] - 2).tolist())
        real(self)
    monkeypatch.setattr(unstable_tree.UnstableTreeMixin, "build_unstable_trees", build)
    fast, pure = two_nodes(fast=True), two_nodes(fast=False)
    assert fast == pure
    assert 1 in erased_nids                     # node 1's tree was replayed with erasures
    last = pure[-1]
    assert all(root is not None for root in last["stable"])          # both nodes merged
