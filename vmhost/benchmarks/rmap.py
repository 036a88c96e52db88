"""The multi-process server workload that motivated anon_vma chains (Linux 2.6.34).

A parent maps P anonymous pages and writes them, forks N children, and each
child writes (copies on write) all P pages. Then one rmap walk runs for every
page in the system, as reclaim would when it looks for references. With one
anon_vma per fork family (linux-2.6.33) every walk visits all N+1 VMAs; with
anon_vma chains (linux-6.18) a page a child copied is found through that
child's own anon_vma, and only the parent's P pages still need the long walk.
"""

from __future__ import annotations

import resource
import time

import numpy as np

from guests.errors import InputError
from hw.topology import Topology
from hw.units import PAGE_SIZE
from vmhost.host import Host
from vmhost.mm.rmap import walk_many
from vmhost.profile import get_profile



def run(children: int, pages: int, profile: str = "linux-6.18") -> dict:
    if children < 0:
        raise InputError(f"--children must not be negative (got {children})")
    if pages <= 0:
        raise InputError(f"--pages must be positive (got {pages})")
    get_profile(profile)
    started = time.perf_counter()
    needed = pages * (children + 1)
    mem = max(needed * PAGE_SIZE * 2, 1 << 30)
    host = Host(Topology.uniform(1, mem), profile=profile)
    parent = host.spawn("server")
    vma = parent.mm.mmap(pages)
    parent.mm.write(vma.start, np.arange(1, pages + 1, dtype=np.uint64))
    for i in range(children):
        child = host.fork(parent, f"worker{i}")
        child.mm.write(vma.start, np.arange(1, pages + 1, dtype=np.uint64) + (i + 1) * pages)
    pfns = np.flatnonzero(host.frames.refcount > 0)
    totals = walk_many(host, pfns)
    wall = time.perf_counter() - started
    assert int(totals.found.sum()) == int(host.frames.mapcount[pfns].sum()), "a walk missed a mapping"
    return {
        "profile": profile,
        "children": children,
        "pages": pages,
        "walks": int(len(pfns)),
        "avg_vmas_per_walk": float(totals.visited.mean()) if len(pfns) else 0.0,
        "max_vmas_per_walk": int(totals.visited.max()) if len(pfns) else 0,
        "total_vmas_visited": int(totals.visited.sum()),
        "anon_vmas": len(host.anon_vmas),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "wall_s": round(wall, 3),
    }


def format_table(r: dict) -> str:
    rows = [
        ("profile", r["profile"]),
        ("children x pages", f"{r['children']} x {r['pages']}"),
        ("anon_vmas", r["anon_vmas"]),
        ("walks", r["walks"]),
        ("avg VMAs per walk", f"{r['avg_vmas_per_walk']:.3f}"),
        ("max VMAs per walk", r["max_vmas_per_walk"]),
        ("total VMAs visited", r["total_vmas_visited"]),
        ("peak RSS", f"{r['peak_rss_bytes'] / 2**20:.1f} MiB"),
        ("wall time", f"{r['wall_s']:.2f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
