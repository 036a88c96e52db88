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


def ksm_host(mib: int, block_pages: int, fast: bool = True, **knobs):
    """A one-node host of ``mib`` MiB with KSM (the compiled scan unless ``fast`` is False)
    and ksmd on its clock, KSM's ``knobs`` written in the order given: (host, ksm, ksmd)."""
    from hw.topology import Topology
    from vmhost.host import Host
    from vmhost.ksm.engine import Ksm
    from vmhost.ksm.ksmd import Ksmd

    host = Host(Topology.uniform(1, mib << 20), block_pages=block_pages)
    ksm = Ksm(host)
    ksm.fast = fast
    ksmd = Ksmd(ksm, host.clock)
    for name, value in knobs.items():
        rc = ksm.write_knob(name, str(value))
        if rc:
            raise ValueError(f"KSM knob {name}={value}: {rc}")
    return host, ksm, ksmd


def mergeable_process(host, name: str, contents, thp: bool = False, at=None):
    """A new process whose one anonymous mapping holds ``contents`` (page content ids) and
    is registered MADV_MERGEABLE: (process, first page of the mapping)."""
    import numpy as np

    contents = np.asarray(contents, dtype=np.uint64)
    p = host.spawn(name)
    vma = p.mm.mmap(len(contents), thp=thp, at=at)
    p.mm.write(vma.start, contents)
    p.mm.madvise(vma.start, len(contents), "mergeable")
    return p, vma.start


def warm_up() -> float:
    """Run the compiled scan through all its paths; returns the seconds it took."""
    import numpy as np

    t = time.perf_counter()
    rng = np.random.default_rng(1)
    _, ksm, ksmd = ksm_host(64, 4096, pages_to_scan=200, max_page_sharing=4)
    procs = [mergeable_process(ksm.host, f"w{i}", rng.integers(1, 200, 1024)) for i in range(3)]
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
