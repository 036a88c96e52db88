"""How much of this machine's memory a simulation needs, before it starts.

The emulator's memory is per-page numpy state: every host frame (``FrameTable``), every
guest page's PTE (``Vma.pte``/``ptef``), and for every page ksmd scans an rmap_item (with
its tree links and the scan's hash tables) and, for the pages that merge, stable nodes.
``estimate`` adds these up from the structures' own dtypes, with the headroom the pools
need while they grow (the rmap_item pool doubles by copying, the stable node pool grows by
half: either holds up to 1.5x what it needs, on average), and a
fixed allowance for the interpreter, numpy and the compiled scan. ``check_fits`` refuses a
simulation that would not fit in the memory this machine has available now, with one line
that gives the estimate and the coarsest-needed resolution that would fit, instead of the OOM
killer ending it half-way.
"""

from __future__ import annotations

from dataclasses import dataclass

from guests.errors import InputError

GiB = 1 << 30
BASE_BYTES = 400 << 20            # interpreter, numpy, numba and the compiled scan, measured


def _frame_bytes() -> int:
    from vmhost.mm.frames import FrameTable
    return FrameTable(1).nbytes


def _pte_bytes() -> int:
    import numpy as np
    from vmhost.mm.vma import NO_PFN, PTE_DTYPE
    return np.array([NO_PFN], dtype=PTE_DTYPE).nbytes + 1


def _item_bytes() -> int:
    """One rmap_item with its tree links, plus its share of the scan's tables (the hashed
    unstable tree: 2 slots per item, ``UnstableTreeMixin._table_size``, the next power of two of
    twice the log or the item pool: 1 slot an item only in a steady pass with half the pages
    merged; its log, sized for the tree a pass can build: 1 in a steady pass, though a merging pass logs about 1.5 words per
    new page and may double the log, and the table with it, mid-pass: the pools' growth
    headroom below and the measured allowance cover that, not this count; the candidate
    offsets of the VMA being scanned: 1, since one VMA may hold every page)."""
    from vmhost.ksm.items import RmapItems
    items = RmapItems(capacity=1, trees=1)
    return items.nbytes + 4 * 4


def _node_bytes() -> int:
    """One stable node with its links and its share of the key index."""
    from vmhost.ksm.keyindex import REBUILT_SPARE
    from vmhost.ksm.stable import StableNodes
    nodes = StableNodes(capacity=1, trees=1)
    return nodes.nbytes + nodes.free_stack.nbytes + REBUILT_SPARE * 4


@dataclass(frozen=True)
class Footprint:
    host_pages: int           # frames of the host (all memory blocks)
    mapped_pages: int         # guest pages with a PTE
    scanned_pages: int        # pages in MADV_MERGEABLE areas (an rmap_item each, at most)
    merged_fraction: float = 0.5   # pages expected to become KSM pages' mappings
    other_bytes: int = 0           # the caller's own per-page state (a study's guest models)

    def bytes(self) -> int:
        pool = 1.5                                   # a pool growing geometrically
        per_item = _item_bytes() * pool
        per_node = _node_bytes() * pool
        nodes = self.scanned_pages * self.merged_fraction / 2     # >= 2 mappings per KSM page
        return int(BASE_BYTES + self.host_pages * _frame_bytes() + self.mapped_pages * _pte_bytes()
                   + self.scanned_pages * per_item + nodes * per_node + self.other_bytes)

    def scaled(self, resolution: int) -> "Footprint":
        return Footprint(-(-self.host_pages // resolution), -(-self.mapped_pages // resolution),
                         -(-self.scanned_pages // resolution), self.merged_fraction,
                         -(-self.other_bytes // resolution))


def available_bytes() -> int:
    """Memory this machine can give a new process now (MemAvailable)."""
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")


def fitting_resolution(fp: Footprint, available: int, resolution: int = 1,
                       max_resolution: int = 1 << 16) -> int | None:
    """The smallest power-of-two multiple of ``resolution`` whose simulation fits."""
    r = resolution
    while r <= max_resolution:
        if fp.scaled(r).bytes() <= available:
            return r
        r *= 2
    return None


def check_fits(fp: Footprint, what: str, resolution: int = 1, available: int | None = None) -> None:
    """Refuse (InputError, one line) a simulation of ``fp`` (already at ``resolution``) that
    would not fit in this machine's available memory."""
    avail = available_bytes() if available is None else available
    need = fp.bytes()
    if need <= avail:
        return
    full = Footprint(fp.host_pages * resolution, fp.mapped_pages * resolution,
                     fp.scanned_pages * resolution, fp.merged_fraction)
    fit = fitting_resolution(full, avail, resolution * 2)
    hint = f"resolution {fit} would need {full.scaled(fit).bytes() / GiB:.1f} GiB" if fit else \
        "no resolution fits"
    raise InputError(f"{what}: simulating it at resolution {resolution} needs about "
                     f"{need / GiB:.1f} GiB of memory but this machine has {avail / GiB:.1f} GiB "
                     f"available; {hint}")
