"""The calls core memory management makes into KSM (like mm/ksm.h's inline hooks).

Core mm must not depend on the KSM engine, so it calls through this interface;
a host without KSM (CONFIG_KSM=n) keeps these defaults, and the engine in
``vmhost.ksm`` overrides them.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from vmhost.mm.mm import MM
    from vmhost.mm.vma import Vma


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

    def check_invariants(self) -> list[str]:
        """KSM's own consistency problems, for the invariant checker (none without KSM)."""
        return []
