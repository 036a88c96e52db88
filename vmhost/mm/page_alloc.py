"""The page allocator: per-node free lists, watermarks and NUMA policies.

Free frames of each (node, zone) sit on a stack (a numpy array and a top
index) so that allocating or freeing thousands of pages is one slice. User
pages are movable: they may come from ZONE_MOVABLE (tried first, as the
kernel's zonelist does) or ZONE_NORMAL; kernel allocations only from
ZONE_NORMAL.

Free memory of a zone is kept in two piles, a rough stand-in for the buddy
allocator's orders: whole free 2 MiB chunks (what a transparent huge page
needs) and single free pages. Single pages are taken from the single pile
first and a chunk is broken up only when that runs dry; freed single pages do
not coalesce back, so, as on a real host, memory fragments with use and huge
page allocations can fail while enough single pages are free.

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
from hw.units import HPAGE_PAGES, PAGE_SIZE

PAGE_KIB = PAGE_SIZE // 1024
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
    """Free pfns on a stack, 32 bits each (a pfn is below 2**31: ``vmhost.mm.vma.PTE_DTYPE``);
    the kernel threads its free lists through struct page, here they are an array."""

    __slots__ = ("pfns", "top")

    def __init__(self) -> None:
        self.pfns = np.zeros(0, dtype=np.int32)   # pfns < MAX_FRAMES (2^31: frames.py refuses more)
        self.top = 0

    def push(self, pfns: np.ndarray) -> None:
        need = self.top + len(pfns)
        if need > len(self.pfns):
            grown = np.zeros(max(need, 2 * len(self.pfns)), dtype=np.int32)
            grown[: self.top] = self.pfns[: self.top]
            self.pfns = grown
        self.pfns[self.top:need] = pfns
        self.top = need

    def pop(self, count: int) -> np.ndarray:
        count = min(count, self.top)
        out = self.pfns[self.top - count: self.top][::-1].astype(np.int64)
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


class _FreeArea:
    """The free frames of one (node, zone): whole 2 MiB chunks and single pages."""

    __slots__ = ("small", "chunks")

    def __init__(self) -> None:
        self.small = _FreeStack()
        self.chunks = _FreeStack()     # first pfn of each free, aligned 2 MiB chunk

    @property
    def count(self) -> int:
        return self.small.top + HPAGE_PAGES * self.chunks.top

    def release(self, pfns: np.ndarray) -> None:
        """Add free frames: complete aligned chunks go to the chunk pile."""
        pfns = np.sort(np.asarray(pfns, dtype=np.int64))
        heads, counts = np.unique(pfns // HPAGE_PAGES, return_counts=True)
        whole = heads[counts == HPAGE_PAGES] * HPAGE_PAGES
        rest = pfns[~np.isin(pfns // HPAGE_PAGES, heads[counts == HPAGE_PAGES])]
        self.chunks.push(whole[::-1])
        self.small.push(rest[::-1])

    def pop_small(self, count: int) -> np.ndarray:
        while self.small.top < count and self.chunks.top:
            head = int(self.chunks.pop(1)[0])
            self.small.push(np.arange(head + HPAGE_PAGES - 1, head - 1, -1, dtype=np.int64))
        return self.small.pop(count)

    def pop_chunk(self) -> int | None:
        return int(self.chunks.pop(1)[0]) if self.chunks.top else None

    def remove_range(self, lo: int, hi: int) -> np.ndarray:
        small = self.small.pfns[: self.small.top]
        heads = self.chunks.pfns[: self.chunks.top]
        taken = [small[(small >= lo) & (small < hi)]]
        taken += [np.arange(h, h + HPAGE_PAGES, dtype=np.int64) for h in heads[(heads >= lo) & (heads < hi)]]
        self.small.remove_range(lo, hi)
        self.chunks.remove_range(lo, hi)
        return np.concatenate(taken).astype(np.int64, copy=False)

    def all_pfns(self) -> np.ndarray:
        heads = self.chunks.pfns[: self.chunks.top]
        expanded = (heads[:, None] + np.arange(HPAGE_PAGES, dtype=np.int64)).ravel()
        return np.concatenate([self.small.pfns[: self.small.top], expanded])


class PageAllocator:
    def __init__(self, phys: PhysicalMemory):
        self.phys = phys
        nodes = phys.topology.node_count
        self._areas = {(n, z): _FreeArea() for n in range(nodes) for z in Zone}
        self.managed = np.zeros(nodes, dtype=np.int64)   # online pages per node
        self.watermarks = [Watermarks() for _ in range(nodes)]
        self.watermark_scale = 1                          # 1/N-scale host: see scale_watermarks
        self.on_low: Callable[[int], None] | None = None  # kswapd wake-up hook
        self._fallback = [phys.topology.fallback_order(n) for n in range(nodes)]

    # -- block membership -------------------------------------------------------------
    def _area(self, blk: MemoryBlock) -> _FreeArea:
        return self._areas[(blk.node, blk.zone)]

    def online_block(self, blk: MemoryBlock) -> None:
        usable = blk.pages - blk.hole_pages
        self._area(blk).release(np.arange(blk.first_pfn, blk.first_pfn + usable, dtype=np.int64))
        self.managed[blk.node] += usable
        self._recompute_watermarks()

    def isolate_block(self, blk: MemoryBlock) -> np.ndarray:
        """Take the block's free frames off the free lists (MIGRATE_ISOLATE); returns them."""
        return self._area(blk).remove_range(blk.first_pfn, blk.first_pfn + blk.pages)

    def unisolate_block(self, blk: MemoryBlock, free_pfns: np.ndarray) -> None:
        self._area(blk).release(free_pfns)

    def offline_block(self, blk: MemoryBlock) -> None:
        """The block's frames (all free and isolated) leave the allocator."""
        self.managed[blk.node] -= blk.pages - blk.hole_pages
        self._recompute_watermarks()

    def _recompute_watermarks(self) -> None:
        for wm, (wmin, low, high) in zip(self.watermarks, watermarks(self.managed.tolist(),
                                                                      self.watermark_scale)):
            wm.min, wm.low, wm.high = wmin, low, high

    def scale_watermarks(self, scale: int) -> None:
        """Watermarks of the host this one stands for at 1/``scale`` of its pages."""
        self.watermark_scale = scale
        self._recompute_watermarks()

    # -- queries ------------------------------------------------------------------------
    def free_pages(self, node: int | None = None) -> int:
        return sum(a.count for (n, _), a in self._areas.items() if node is None or n == node)

    def free_pfns(self) -> np.ndarray:
        """Every frame on a free list (for the invariant checker)."""
        return np.concatenate([a.all_pfns() for a in self._areas.values()])

    def _headroom(self, node: int) -> int:
        return self.free_pages(node) - self.watermarks[node].min

    def _zones(self, kernel: bool) -> tuple[Zone, ...]:
        return (Zone.NORMAL,) if kernel else (Zone.MOVABLE, Zone.NORMAL)

    def _after_alloc(self, node: int) -> None:
        if self.on_low is not None and self.free_pages(node) < self.watermarks[node].low:
            self.on_low(node)

    # -- allocation ---------------------------------------------------------------------
    def alloc(self, count: int, preferred: int, allowed: Sequence[int] | None = None,
              kernel: bool = False) -> np.ndarray:
        """Allocate ``count`` frames, preferring ``preferred`` then the nearest nodes."""
        order = [n for n in self._fallback[preferred] if allowed is None or n in allowed]
        taken: list[np.ndarray] = []
        need = count
        for node in order:
            room = self._headroom(node)
            for zone in self._zones(kernel):
                if need == 0 or room <= 0:
                    break
                got = self._areas[(node, zone)].pop_small(min(need, room))
                taken.append(got)
                need -= len(got)
                room -= len(got)
            self._after_alloc(node)
            if need == 0:
                break
        if need:
            self.free(np.concatenate(taken) if taken else np.zeros(0, np.int64))
            raise OutOfMemory(count, order)
        return np.concatenate(taken) if len(taken) != 1 else taken[0]

    def alloc_huge(self, preferred: int, allowed: Sequence[int] | None = None) -> int | None:
        """The first frame of a free, aligned 2 MiB chunk, or None (the caller falls back)."""
        for node in self._fallback[preferred]:
            if allowed is not None and node not in allowed:
                continue
            if self._headroom(node) < HPAGE_PAGES:
                continue
            for zone in self._zones(False):
                head = self._areas[(node, zone)].pop_chunk()
                if head is not None:
                    self._after_alloc(node)
                    return head
        return None

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
        """Return single frames to their zone's free list (they must be clear already)."""
        if len(pfns) == 0:
            return
        pfns = np.asarray(pfns, dtype=np.int64)
        blocks = pfns // self.phys.block_pages
        for b in np.unique(blocks):
            blk = self.phys.blocks[int(b)]
            if blk.state.value == "online":
                self._area(blk).small.push(pfns[blocks == b])
            # frames of a block going offline stay isolated: offlining collects them

    def free_in_order(self, pfns: np.ndarray) -> None:
        """free_one() for each frame in turn (the order the next allocations see), in runs of
        frames that go to the same free list."""
        if len(pfns) == 0:
            return
        pfns = np.asarray(pfns, dtype=np.int64)
        blocks = pfns // self.phys.block_pages
        areas = [None if self.phys.blocks[int(b)].state.value != "online"
                 else self._area(self.phys.blocks[int(b)]) for b in np.unique(blocks)]
        if len({id(a) for a in areas}) == 1 and areas[0] is not None:
            areas[0].small.push(pfns)
            return
        for pfn in pfns.tolist():
            self.free_one(pfn)

    def free_one(self, pfn: int) -> None:
        """free() for a single frame."""
        blk = self.phys.blocks[pfn // self.phys.block_pages]
        if blk.state.value == "online":
            small = self._area(blk).small
            if small.top == len(small.pfns):
                small.push(np.array([pfn], dtype=np.int64))
            else:
                small.pfns[small.top] = pfn
                small.top += 1

    def free_huge(self, head: int) -> None:
        """Return a whole 2 MiB chunk (a freed transparent huge page)."""
        blk = self.phys.blocks[head // self.phys.block_pages]
        if blk.state.value == "online":
            self._area(blk).chunks.push(np.array([head], dtype=np.int64))


def watermarks(managed: list[int], scale: int = 1) -> list[tuple[int, int, int]]:
    """(min, low, high) in pages for nodes managing ``managed`` pages each: min_free_kbytes =
    sqrt(16 x KiB managed), clamped, shared among the nodes by size; low and high one and two
    gaps above it (a quarter of min, or watermark_scale_factor of the node). A host simulated
    at 1/``scale`` of its pages gets 1/``scale`` of the full-size host's watermarks (the square
    root would otherwise keep a scaled-down host relatively far more free)."""
    total = sum(managed)
    min_free_kib = min(max(int(math.isqrt(total * scale * PAGE_KIB * 16)), 128), 262144)
    out = []
    for pages in managed:
        wmin = int(min_free_kib * (pages / max(total, 1))) // PAGE_KIB // scale
        gap = max(wmin // 4, pages * WATERMARK_SCALE_FACTOR // 10000)
        out.append((wmin, wmin + gap, wmin + 2 * gap))
    return out

