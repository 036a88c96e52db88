"""The calls core memory management makes into KSM (like mm/ksm.h's inline hooks).

Core mm must not depend on the KSM engine, so it calls through this interface;
a host without KSM (CONFIG_KSM=n) keeps these defaults, and the engine in
``vmhost.ksm`` overrides them.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    import numpy as np

    from vmhost.mm.mm import MM
    from vmhost.mm.vma import Vma


class MemoryNotifier(Protocol):
    """A callback on the memory notifier chain (``struct notifier_block``), as KSM registers."""

    priority: int
    name: str
    last_pruned: int            # stable nodes removed by the last MEM_OFFLINE

    def __call__(self, event: str, start_pfn: int, nr_pages: int) -> int: ...


class KsmHooks:
    def madvise(self, vma: "Vma", mergeable: bool) -> int:
        """MADV_MERGEABLE / MADV_UNMERGEABLE on one VMA; returns 0 or -errno."""
        return -errno.EINVAL

    def vma_created(self, vma: "Vma") -> None:
        """A new VMA appeared (prctl merge-any flags it mergeable)."""

    def fork(self, parent: "MM", child: "MM") -> None:
        """``child`` was just forked from ``parent``."""

    def exit(self, mm: "MM") -> None:
        """``mm`` is being torn down; its page tables are already gone."""

    def zero_pages_unmapped(self, mm: "MM", count: int) -> None:
        """``count`` PTEs that KSM had pointed at the zero page were zapped or replaced."""

    def rmap_walk(self, pfn: int, visit: Callable[["Vma", int], bool]) -> int:
        """Visit every mapping of a KSM page; returns the number of VMAs looked at."""
        return 0

    def memory_notifier(self) -> MemoryNotifier | None:
        """KSM's memory-notifier callback (ksm_memory_callback), registered on the host's chain
        the first time memory goes on- or offline; None without KSM."""
        return None

    def migrate_pages(self, old: "np.ndarray", new: "np.ndarray") -> None:
        """folio_migrate_ksm for a batch: the KSM pages at ``old`` now live at ``new``."""

    def stable_node_live(self, pfn: int) -> bool:
        """Is ``pfn`` a KSM page whose stable node still points at it (not stale)?"""
        return False

    def unmerging(self) -> bool:
        """Is ``run`` set to unmerge (KSM_RUN_UNMERGE)? A swapped-in KSM page is then copied."""
        return False

    def run_state(self) -> int | None:
        """What /sys/kernel/mm/ksm/run reads (KSM_RUN_OFFLINE set while memory goes offline),
        or None without KSM."""
        return None

    def write_knob(self, name: str, text: str) -> int:
        """A write to /sys/kernel/mm/ksm/NAME: 0 or -errno (no such file without KSM)."""
        return -errno.ENOENT

    def stats(self) -> dict | None:
        """KSM's global counters (/sys/kernel/mm/ksm), or None without KSM."""
        return None

    def check_invariants(self) -> list[str]:
        """KSM's own consistency problems, for the invariant checker (none without KSM)."""
        return []
