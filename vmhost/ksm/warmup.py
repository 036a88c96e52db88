"""Compile the KSM engine's numba code once, ahead of its first real use, into numba's cache.

Every compiled function is ``cache=True``: the first process that runs it writes its machine
code next to the source (or in ``NUMBA_CACHE_DIR``) and later processes load it in a fraction
of a second. ``python -m vmhost.ksm.warmup`` (run after installing) drives a small host
through every compiled path (new KSM pages, merges into existing ones, chains and dups, the
hashed and the real unstable tree, writes between batches) so that no user command pays the
compile.
"""

from __future__ import annotations

import sys
import time


def warm_up() -> float:
    """Run the compiled scan through all its paths; returns the seconds it took."""
    import numpy as np

    from hw.topology import Topology
    from vmhost.host import Host
    from vmhost.ksm.engine import Ksm
    from vmhost.ksm.ksmd import Ksmd

    t = time.perf_counter()
    rng = np.random.default_rng(1)
    h = Host(Topology.uniform(1, 64 << 20), block_pages=4096)
    ksm = Ksm(h)
    ksmd = Ksmd(ksm, h.clock)
    ksm.write_knob("pages_to_scan", "200")
    ksm.write_knob("max_page_sharing", "4")
    procs = []
    for i in range(3):
        p = h.spawn(f"w{i}")
        vma = p.mm.mmap(1024, thp=False)
        p.mm.write(vma.start, rng.integers(1, 200, 1024).astype(np.uint64))
        p.mm.madvise(vma.start, 1024, "mergeable")
        procs.append((p, vma.start))
    ksm.write_knob("run", "1")
    for step in range(60):
        ksmd._tick()
        p, start = procs[step % 3]
        p.mm.write(start + int(rng.integers(0, 1024)), [int(rng.integers(1, 200))])
    ksmd.run_full_scans(2)
    return time.perf_counter() - t


if __name__ == "__main__":
    took = warm_up()
    print(f"vmhost: KSM engine compiled and cached in {took:.1f} s", file=sys.stderr)
