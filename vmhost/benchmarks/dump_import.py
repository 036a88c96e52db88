"""Throughput of dump import: fingerprinting a synthetic raw guest dump.

The dump is written to a temporary directory and imported right away, so it is read from the
page cache: the figure is the hashing and zero-detection rate, not the disk's. Page contents
follow a guest-like mix: ``zero_fraction`` of the pages are zero (a booted idle guest is about a
third zero), one in seven non-zero pages repeats one content, the rest are random and distinct.
Zero pages are detected without hashing, so ``zero_fraction=0`` is the worst case.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from guests import dumps
from guests.errors import InputError
from hw.units import PAGE_SIZE

MIB = 1 << 20
GIB = 1 << 30


def write_synthetic(path: str, size_mib: int, zero_fraction: float = 0.33, seed: int = 1) -> None:
    """A raw dump of ``size_mib`` MiB with the mix described in the module doc."""
    rng = np.random.default_rng(seed)
    chunk = dumps.CHUNK_PAGES
    block = rng.integers(0, 2**63, size=(chunk, PAGE_SIZE // 8), dtype=np.uint64)
    total = size_mib * MIB // PAGE_SIZE
    with open(path, "wb") as fh:
        for first in range(0, total, chunk):
            n = min(chunk, total - first)
            pages = block[:n].copy()
            pfn = np.arange(first, first + n, dtype=np.uint64)
            pages[:, 0] = pfn + 1                    # every page distinct ...
            pages[pfn % 7 == 3, :] = block[0]        # ... but one in seven the same content
            pages[rng.random(n) < zero_fraction] = 0
            fh.write(pages.tobytes())


def run(size_mib: int = 1024, jobs: int = 1, zero_fraction: float = 0.33,
        directory: str | None = None) -> dict:
    if size_mib <= 0:
        raise InputError(f"--size-mib must be positive (got {size_mib})")
    if jobs < 1:
        raise InputError(f"--jobs must be at least 1 (got {jobs})")
    if not 0.0 <= zero_fraction <= 1.0:
        raise InputError(f"--zero-fraction must be between 0 and 1 (got {zero_fraction})")
    with tempfile.TemporaryDirectory(prefix="vmhost-bench-import-", dir=directory) as tmp:
        dump = os.path.join(tmp, "synthetic.raw")
        write_synthetic(dump, size_mib, zero_fraction)
        t = time.perf_counter()
        image = dumps.fingerprint_dump(dump, "raw", jobs=jobs, layout="flat")
        seconds = time.perf_counter() - t
        t = time.perf_counter()
        dumps.save_fingerprints(image, os.path.join(tmp, "synthetic.img"))
        save_seconds = time.perf_counter() - t
    cores = min(jobs, os.cpu_count() or 1)
    rate = size_mib * MIB / GIB / seconds
    return {"size_mib": size_mib, "jobs": jobs, "cores_used": cores,
            "zero_fraction": image.header["stats"]["zero_fraction"],
            "pages": image.pages, "seconds": round(seconds, 3),
            "gib_per_s": round(rate, 3), "gib_per_s_per_core": round(rate / cores, 3),
            "save_seconds": round(save_seconds, 3)}


def format_result(r: dict) -> str:
    return (f"dump import: {r['size_mib']} MiB ({r['pages']} pages, zero fraction "
            f"{r['zero_fraction']:.2f}) in {r['seconds']} s with {r['jobs']} job(s): "
            f"{r['gib_per_s']} GiB/s, {r['gib_per_s_per_core']} GiB/s per core "
            f"(writing the image: {r['save_seconds']} s)")
