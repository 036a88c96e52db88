"""The KSM benchmark's workload: who maps which page contents, identically in both engines.

``pages`` anonymous 4 KiB pages spread over ``procs`` processes (private, MADV_NOHUGEPAGE,
MADV_MERGEABLE). By default half the pages hold a content nobody else has, a quarter come in
pairs and a quarter in groups of 8 (the last group may be shorter; a lone leftover page is
unique). Every content is a nonzero 64-bit content id; the real page is that id as 8
little-endian bytes repeated over the 4 KiB (``vmhost.ksm.trace.page_bytes``), so equal ids are
equal pages in both engines. Which page goes to which process and address is a seeded
permutation, so the copies of one content sit in different processes at random places, as in
guests of one image.

The kernel side runs every process as a fresh interpreter
(``python -m vmhost.benchmarks.ksm_workload child PAGES PROCS INDEX SEED MIX``) that
recomputes the layout, maps and fills its share, registers it with KSM, prints ``ready PID``
and then waits for its stdin to close.
"""

from __future__ import annotations

import mmap
import os
import sys
from dataclasses import dataclass

import numpy as np

from hw.units import PAGE_SIZE

WORDS = PAGE_SIZE // 8
MADV_MERGEABLE, MADV_NOHUGEPAGE = 12, 15
DEFAULT_SEED = 20240611

#: named mixes: (fraction unique, fraction in pairs, group size of the rest)
MIXES = {
    "default": (0.5, 0.25, 8),      # the benchmark's workload
    "unique": (1.0, 0.0, 8),        # calibration: a steady pass over pages that never merge
    "pairs": (0.0, 1.0, 8),         # calibration: 32 k pairs merging
    "groups": (0.0, 0.0, 8),        # calibration: a pass over pages already merged
}


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: bijective, so distinct group numbers give distinct ids."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


@dataclass(frozen=True)
class Workload:
    pages: int
    procs: int
    seed: int = DEFAULT_SEED
    mix: str = "default"

    def __post_init__(self):
        if self.pages <= 0 or self.procs <= 0 or self.procs > self.pages:
            raise ValueError(f"need 0 < procs <= pages (got pages={self.pages}, procs={self.procs})")
        if self.mix not in MIXES:
            raise ValueError(f"unknown mix {self.mix!r} (one of {', '.join(MIXES)})")

    # -- the groups ---------------------------------------------------------------------------
    def group_sizes(self) -> np.ndarray:
        """Size of every content group (1 = a unique page), summing to ``pages``."""
        f_unique, f_pairs, g = MIXES[self.mix]
        n = self.pages
        n_unique = int(n * f_unique)
        n_pairs = int(n * f_pairs) // 2
        rest = n - n_unique - 2 * n_pairs
        sizes = [np.ones(n_unique, np.int64), np.full(n_pairs, 2, np.int64),
                 np.full(rest // g, g, np.int64)]
        tail = rest % g
        if tail == 1:
            sizes.append(np.ones(1, np.int64))
        elif tail:
            sizes.append(np.array([tail], np.int64))
        out = np.concatenate(sizes)
        assert int(out.sum()) == n
        return out

    def expected(self, max_page_sharing: int = 256) -> dict[str, int]:
        """Steady-state KSM counters for this workload (smart_scan=0)."""
        sizes = self.group_sizes()
        shared = sharing = 0
        for size in np.unique(sizes[sizes > 1]):
            count = int((sizes == size).sum())
            ksm_pages = -(-int(size) // max_page_sharing)
            shared += count * ksm_pages
            sharing += count * (int(size) - ksm_pages)
        return {"pages_shared": shared, "pages_sharing": sharing,
                "pages_unshared": int((sizes == 1).sum())}

    def all_contents(self) -> np.ndarray:
        """Content id of every page slot, slots in process order (process i owns a slice)."""
        sizes = self.group_sizes()
        group_of_page = np.repeat(np.arange(len(sizes), dtype=np.uint64), sizes)
        ids = _mix64(group_of_page + np.uint64(self.seed))
        ids[ids == 0] = np.uint64(0xFFFF_FFFF_FFFF_FFFF)   # never the zero page (splitmix64(x)=0 once)
        perm = np.random.default_rng(self.seed).permutation(self.pages)
        return ids[perm]

    def bounds(self, index: int) -> tuple[int, int]:
        """[lo, hi) slice of the slots owned by process ``index``."""
        base, extra = divmod(self.pages, self.procs)
        lo = index * base + min(index, extra)
        return lo, lo + base + (1 if index < extra else 0)

    def contents(self, index: int) -> np.ndarray:
        lo, hi = self.bounds(index)
        return self.all_contents()[lo:hi]


# --------------------------------------------------------------------------------------------
# the kernel side's processes


def child_argv(w: Workload, index: int) -> list[str]:
    return [sys.executable, "-m", "vmhost.benchmarks.ksm_workload", "child", str(w.pages),
            str(w.procs), str(index), str(w.seed), w.mix]


def _child(pages: int, procs: int, index: int, seed: int, mix: str) -> None:
    ids = Workload(pages, procs, seed, mix).contents(index)
    n = len(ids)
    m = mmap.mmap(-1, n * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                  prot=mmap.PROT_READ | mmap.PROT_WRITE)
    m.madvise(MADV_NOHUGEPAGE)          # 15; 14 would be MADV_HUGEPAGE
    words = np.frombuffer(m, dtype="<u8").reshape(n, WORDS)
    for lo in range(0, n, 8192):          # fill in slices: no 512x temporary of the whole share
        words[lo:lo + 8192] = ids[lo:lo + 8192, None]
    del words
    m.madvise(MADV_MERGEABLE)
    sys.stdout.write(f"ready {os.getpid()}\n")
    sys.stdout.flush()
    sys.stdin.read()                     # until the benchmark closes our stdin (or dies)
    os._exit(0)


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "child":
        _child(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    else:
        print("usage: python -m vmhost.benchmarks.ksm_workload child PAGES PROCS INDEX SEED MIX",
              file=sys.stderr)
        sys.exit(2)
