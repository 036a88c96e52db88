"""The page allocator: per-node free lists, watermarks and NUMA policies.

Free frames of each (node, zone) sit on a stack (a numpy array and a top
index) so that allocating or freeing thousands of pages is one slice. User
pages are movable: they may come from ZONE_MOVABLE (tried first, as the
kernel's zonelist does) or ZONE_NORMAL; kernel allocations only from
ZONE_NORMAL.

Watermarks follow mm/page_alloc.c: min_free_kbytes = sqrt(16 x lowmem KiB)
clamped to [128 KiB, 256 MiB] and shared among nodes by size; low and high
sit min/4 (or watermark_scale_factor of the node, whichever is larger) and
twice that above min. An allocation may not take a node below its min
watermark; dropping below low is when kswapd would wake (see ``on_low``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from hw.memory import MemoryBlock, PhysicalMemory, Zone

PAGE_KIB = 4
WATERMARK_SCALE_FACTOR = 10  # in 1/10000 of managed pages, the kernel default


class OutOfMemory(Exception):
    """No allowed node can satisfy the allocation above its min watermark."""

    def __init__(self, wanted: int, nodes: Sequence[int]):
        super().__init__(f"cannot allocate {wanted} pages on nodes {list(nodes)}")
        self.wanted = wanted
        self.nodes = list(nodes)


@dataclass
class Watermarks:
    min: int = 0
    low: int = 0
    high: int = 0


class _FreeStack:
    __slots__ = ("pfns", "top")

    def __init__(self) -> None:
        self.pfns = np.zeros(0, dtype=np.int64)
        self.top = 0

    def push(self, pfns: np.ndarray) -> None:
        need = self.top + len(pfns)
        if need > len(self.pfns):
            grown = np.zeros(max(need, 2 * len(self.pfns)), dtype=np.int64)
            grown[: self.top] = self.pfns[: self.top]
            self.pfns = grown
        self.pfns[self.top:need] = pfns
        self.top = need

    def pop(self, count: int) -> np.ndarray:
        count = min(count, self.top)
        out = self.pfns[self.top - count: self.top][::-1].copy()
        self.top -= count
        return out

    def remove_range(self, lo: int, hi: int) -> int:
        """Take every free frame in [lo, hi) off the stack; returns how many."""
        live = self.pfns[: self.top]
        keep = (live < lo) | (live >= hi)
        kept = live[keep]
        removed = self.top - len(kept)
        self.pfns[: len(kept)] = kept
        self.top = len(kept)
        return removed


class PageAllocator:
    def __init__(self, phys: PhysicalMemory):
        self.phys = phys
        nodes = phys.topology.node_count
        self._stacks = {(n, z): _FreeStack() for n in range(nodes) for z in Zone}
        self.managed = np.zeros(nodes, dtype=np.int64)   # online pages per node
        self.watermarks = [Watermarks() for _ in range(nodes)]
        self.on_low: Callable[[int], None] | None = None  # kswapd wake-up hook
        self._fallback = [phys.topology.fallback_order(n) for n in range(nodes)]
        self._interleave_next = 0

    # -- block membership -------------------------------------------------------------
    def online_block(self, blk: MemoryBlock) -> None:
        usable = blk.pages - blk.hole_pages
        pfns = np.arange(blk.first_pfn + usable - 1, blk.first_pfn - 1, -1, dtype=np.int64)
        self._stacks[(blk.node, blk.zone)].push(pfns)   # lowest pfn on top
        self.managed[blk.node] += usable
        self._recompute_watermarks()

    def isolate_block(self, blk: MemoryBlock) -> int:
        """Take the block's free frames off the free lists (MIGRATE_ISOLATE)."""
        return self._stacks[(blk.node, blk.zone)].remove_range(blk.first_pfn, blk.first_pfn + blk.pages)

    def unisolate_block(self, blk: MemoryBlock, free_pfns: np.ndarray) -> None:
        self._stacks[(blk.node, blk.zone)].push(free_pfns[::-1])

    def offline_block(self, blk: MemoryBlock) -> None:
        """The block's frames (all free and isolated) leave the allocator."""
        self.managed[blk.node] -= blk.pages - blk.hole_pages
        self._recompute_watermarks()

    def _recompute_watermarks(self) -> None:
        total_kib = int(self.managed.sum()) * PAGE_KIB
        min_free_kib = min(max(int(math.isqrt(total_kib * 16)), 128), 262144)
        for n, wm in enumerate(self.watermarks):
            share = int(self.managed[n]) / max(int(self.managed.sum()), 1)
            wm.min = int(min_free_kib * share) // PAGE_KIB
            gap = max(wm.min // 4, int(self.managed[n]) * WATERMARK_SCALE_FACTOR // 10000)
            wm.low = wm.min + gap
            wm.high = wm.min + 2 * gap

    # -- queries ------------------------------------------------------------------------
    def free_pages(self, node: int | None = None) -> int:
        return sum(s.top for (n, _), s in self._stacks.items() if node is None or n == node)

    def _headroom(self, node: int) -> int:
        return self.free_pages(node) - self.watermarks[node].min

    # -- allocation ---------------------------------------------------------------------
    def alloc(self, count: int, preferred: int, allowed: Sequence[int] | None = None,
              kernel: bool = False) -> np.ndarray:
        """Allocate ``count`` frames, preferring ``preferred`` then the nearest nodes."""
        order = [n for n in self._fallback[preferred] if allowed is None or n in allowed]
        zones = (Zone.NORMAL,) if kernel else (Zone.MOVABLE, Zone.NORMAL)
        taken: list[np.ndarray] = []
        need = count
        for node in order:
            room = self._headroom(node)
            for zone in zones:
                if need == 0 or room <= 0:
                    break
                got = self._stacks[(node, zone)].pop(min(need, room))
                taken.append(got)
                need -= len(got)
                room -= len(got)
            if self.on_low is not None and self.free_pages(node) < self.watermarks[node].low:
                self.on_low(node)
            if need == 0:
                break
        if need:
            self.free(np.concatenate(taken) if taken else np.zeros(0, np.int64))
            raise OutOfMemory(count, order)
        return np.concatenate(taken) if len(taken) != 1 else taken[0]

    def alloc_per_node(self, nodes: np.ndarray, allowed: Sequence[int] | None = None) -> np.ndarray:
        """One frame per entry of ``nodes`` (each entry the node that page prefers)."""
        out = np.zeros(len(nodes), dtype=np.int64)
        done: list[np.ndarray] = []
        try:
            for node in np.unique(nodes):
                where = np.flatnonzero(nodes == node)
                out[where] = self.alloc(len(where), int(node), allowed)
                done.append(out[where])
        except OutOfMemory:
            for pfns in done:
                self.free(pfns)
            raise
        return out

    def free(self, pfns: np.ndarray) -> None:
        """Return frames to their node's free list (they must be clear already)."""
        if len(pfns) == 0:
            return
        pfns = np.asarray(pfns, dtype=np.int64)
        blocks = pfns // self.phys.block_pages
        for b in np.unique(blocks):
            blk = self.phys.blocks[int(b)]
            sel = pfns[blocks == b]
            if blk.state.value == "online":
                self._stacks[(blk.node, blk.zone)].push(sel)
            # frames of a block going offline stay isolated: offlining collects them
