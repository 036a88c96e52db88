"""The compiled scan loop gives exactly what the pure-Python scan gives.

The corpus traces cover the kernel's behaviours; here the two scan paths are
held against each other on every trace, and on a time-driven workload where
processes write between ksmd batches (so that the compiled loop's caches,
the hashed unstable tree and the stable-tree key index go stale mid-pass and
must be noticed).
"""

import json
from pathlib import Path

import numpy as np
import pytest

from hw.topology import Topology
from vmhost.host import Host
from vmhost.ksm.engine import Ksm
from vmhost.ksm.ksmd import Ksmd
from vmhost.ksm.replay import Replay
from vmhost.ksm.trace import load_trace
from vmhost.mm import invariants

CORPUS = Path(__file__).parent / "ksm_traces"
TRACES = sorted(CORPUS.glob("*.yaml"))


@pytest.mark.parametrize("path", TRACES, ids=[p.stem for p in TRACES])
def test_pure_python_scan_gives_the_same_result(path):
    run = Replay(load_trace(path))
    run.ksm.fast = False
    assert run.run() == json.loads(json.dumps(Replay(load_trace(path)).run()))


def churn(fast: bool, seed: int = 7, prune_ms: int = 2000):
    """Four processes, small batches, random writes and forks between batches."""
    rng = np.random.default_rng(seed)
    h = Host(Topology.uniform(1, 256 << 20), block_pages=4096)
    ksm = Ksm(h)
    ksm.fast = fast
    ksmd = Ksmd(ksm, h.clock)
    ksm.write_knob("pages_to_scan", "300")
    ksm.write_knob("max_page_sharing", "8")
    ksm.write_knob("stable_node_chains_prune_millisecs", str(prune_ms))
    procs = []
    for i in range(4):
        p = h.spawn(f"p{i}")
        vma = p.mm.mmap(2048, thp=(i % 2 == 0), at=0x40000 + 4096 * i)
        p.mm.write(vma.start, rng.integers(0, 40, 2048).astype(np.uint64))
        p.mm.madvise(vma.start, 2048, "mergeable")
        procs.append((p, vma.start))
    ksm.write_knob("run", "1")
    history = []
    for step in range(150):
        ksmd._tick()
        p, start = procs[rng.integers(len(procs))]
        offs = rng.integers(0, 2048, 20)
        for off in offs:
            p.mm.write(start + int(off), [int(rng.integers(0, 40))])
        if step == 25:
            child = h.fork(procs[0][0], "child")
            procs.append((child, procs[0][1]))
        if step == 40:
            h.exit(procs[1][0])
            procs.pop(1)
        history.append(ksm.stats())
    invariants.check(h)
    return history


@pytest.mark.parametrize("prune_ms", [0, 2000])
def test_compiled_scan_follows_changes_between_batches(prune_ms):
    fast, pure = churn(fast=True, prune_ms=prune_ms), churn(fast=False, prune_ms=prune_ms)
    assert fast == pure
    assert max(s["stable_node_chains"] for s in pure) > 0        # chains were on the paths


def thp_pairs(fast: bool):
    """Huge-page-backed memory whose merges split THPs mid-pass (which invalidates the
    hashed unstable tree after merged items already left it)."""
    h = Host(Topology.uniform(1, 128 << 20), block_pages=4096)
    ksm = Ksm(h)
    ksm.fast = fast
    ksmd = Ksmd(ksm, h.clock)
    ksm.write_knob("pages_to_scan", "100000")
    ksm.write_knob("max_page_sharing", "4")
    rng = np.random.default_rng(11)
    for i in range(3):
        p = h.spawn(f"g{i}")
        vma = p.mm.mmap(4 * 512, thp=True, at=0x80000)
        p.mm.write(vma.start, rng.integers(1, 300, vma.pages).astype(np.uint64))
        p.mm.madvise(vma.start, vma.pages, "mergeable")
    before = invariants.views(h)
    ksm.write_knob("run", "1")
    history = []
    for _ in range(4):
        ksmd.run_full_scans(1)
        history.append(ksm.stats())
    invariants.check(h, before)
    return history


def test_compiled_scan_with_thp_splits_mid_pass():
    assert thp_pairs(fast=True) == thp_pairs(fast=False)


def merged_then_materialized(fast: bool):
    """A merge takes an item out of the hashed unstable tree; a write elsewhere later in the
    same pass forces the real tree to be built from the log, which must not disturb the
    merged item's place on its stable node."""
    h = Host(Topology.uniform(1, 64 << 20), block_pages=1024)
    ksm = Ksm(h)
    ksm.fast = fast
    ksmd = Ksmd(ksm, h.clock)
    ksm.write_knob("pages_to_scan", "3")
    starts = []
    for name, contents in (("a", [5, 6, 7]), ("b", [5, 8, 9]), ("c", [10, 11, 12])):
        p = h.spawn(name)
        vma = p.mm.mmap(3, thp=False)
        p.mm.write(vma.start, np.array(contents, dtype=np.uint64))
        p.mm.madvise(vma.start, 3, "mergeable")
        starts.append((p, vma.start))
    ksm.write_knob("run", "1")
    history = []
    for batch in range(12):
        ksmd._tick()
        if batch % 4 == 1:                       # a write in c while a pass is under way
            c, start = starts[2]
            c.mm.write(start + 2, [100 + batch])
        history.append(ksm.stats())
    invariants.check(h)
    ksm.write_knob("run", "2")                   # walks every stable list
    history.append(ksm.stats())
    return history


def test_merged_item_survives_building_the_tree_from_the_log():
    assert merged_then_materialized(fast=True) == merged_then_materialized(fast=False)
