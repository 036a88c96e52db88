"""Benchmark: offline GiBs of memory blocks full of KSM-merged pages.

Two guests hold the same image of ``gib`` GiB: guest A on node 0, guest B bound to
node 1 (ZONE_MOVABLE, ``gib`` GiB of 128 MiB blocks). KSM merges them (two full
scans): every KSM page is one of B's frames, so node 1's blocks are full of KSM
pages with two mappings each. Then the ``gib`` GiB of node 1's blocks holding them
are offlined (node 1 has two more blocks, headroom for its watermarks); each KSM
page migrates to node 0 and its stable node's kpfn follows.

Reported: pages migrated, the wall-clock time of the offline in this emulator
and pages migrated per wall second, the virtual time of the cost model
(``vmhost.mm.migrate`` / ``vmhost.mm.hotplug``) and the pages per virtual
second it implies, the KSM counters before and after (equal), and the
invariant checker's verdict.
"""

from __future__ import annotations

import time

import numpy as np

from hw.topology import NumaNode, Topology
from hw.units import GIB, PAGE_SIZE, PAGES_PER_GIB
from vmhost.host import Host
from vmhost.mm import invariants
from vmhost.mm.mempolicy import MemPolicy
from vmhost.system import attach_ksm

BLOCK_PAGES = 32768


def run(gib: int = 16, check: bool = True) -> dict:
    t_start = time.perf_counter()
    pages = gib * PAGES_PER_GIB
    topo = Topology([NumaNode(0, (gib + 2) * GIB, (0, 1)), NumaNode(1, gib * GIB + 2 * BLOCK_PAGES * PAGE_SIZE, (2, 3))],
                    [[10, 21], [21, 10]])
    host = Host(topo, block_pages=BLOCK_PAGES, movable_nodes=(1,))
    ksm, ksmd = attach_ksm(host, (("pages_to_scan", pages * 4), ("sleep_millisecs", 20), ("run", 1)))
    image = np.arange(1, pages + 1, dtype=np.uint64)
    for name, node, policy in (("guest-a", 0, None), ("guest-b", 1, MemPolicy("bind", (1,)))):
        proc = host.spawn(name, node)
        vma = proc.mm.mmap(pages, thp=False, policy=policy)
        proc.mm.write(vma.start, image)
        proc.mm.madvise(vma.start, pages, "mergeable")
    t_setup = time.perf_counter()
    ksmd.run_full_scans(2)
    t_merged = time.perf_counter()
    before_stats = ksm.stats()
    before = invariants.views(host) if check else None
    blocks = [b.index for b in host.phys.online_blocks(1)][: gib * GIB // (BLOCK_PAGES * PAGE_SIZE)]
    migrated = ksm_migrated = 0
    virtual_ns = 0
    failures = []
    t0 = time.perf_counter()
    for b in blocks:
        r = host.hotplug.offline_block(b)
        migrated += r.migration.migrated
        ksm_migrated += r.migration.migrated_ksm
        virtual_ns += r.time_ns
        if not r.ok:
            failures.append({"block": b, "reason": r.reason})
    wall = time.perf_counter() - t0
    after_stats = ksm.stats()
    verdict = "not run"
    if check:
        t_check = time.perf_counter()
        invariants.check(host, before)
        verdict = f"ok ({time.perf_counter() - t_check:.1f} s)"
    return {
        "gib_offlined": gib, "blocks": len(blocks), "block_mib": BLOCK_PAGES * PAGE_SIZE >> 20,
        "pages_migrated": migrated, "ksm_pages_migrated": ksm_migrated, "failures": failures,
        "wall_s": round(wall, 3), "pages_per_wall_s": round(migrated / wall) if wall else None,
        "virtual_s": round(virtual_ns / 1e9, 4),
        "pages_per_virtual_s": round(migrated / (virtual_ns / 1e9)) if virtual_ns else None,
        "ksm_before": {k: before_stats[k] for k in ("pages_shared", "pages_sharing", "full_scans")},
        "ksm_after": {k: after_stats[k] for k in ("pages_shared", "pages_sharing", "full_scans")},
        "counters_unchanged": all(before_stats[k] == after_stats[k]
                                  for k in ("pages_shared", "pages_sharing", "pages_unshared")),
        "invariants": verdict,
        "setup_s": round(t_setup - t_start, 1), "merge_s": round(t_merged - t_setup, 1),
    }


def format_result(r: dict) -> str:
    return "\n".join([
        f"offlined {r['gib_offlined']} GiB: {r['blocks']} blocks of {r['block_mib']} MiB, "
        f"failures: {len(r['failures'])}",
        f"pages migrated: {r['pages_migrated']} ({r['ksm_pages_migrated']} KSM pages)",
        f"emulator wall time: {r['wall_s']} s = {r['pages_per_wall_s']} pages/s",
        f"modelled kernel time: {r['virtual_s']} s = {r['pages_per_virtual_s']} pages/s",
        f"KSM before: {r['ksm_before']}  after: {r['ksm_after']}  unchanged: {r['counters_unchanged']}",
        f"invariant check (content of every page unchanged): {r['invariants']}",
        f"(set-up {r['setup_s']} s, KSM merge {r['merge_s']} s)",
    ])
