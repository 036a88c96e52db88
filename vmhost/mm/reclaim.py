"""Page reclaim: kswapd and direct reclaim of anonymous (and KSM) pages to swap.

The policy is an approximation of the kernel's LRU, documented here because
it decides *which* pages go to swap:

- Every node has a CLOCK hand over its frames (physical order). The pages a
  sweep considers are in-use anonymous and KSM pages that are evictable (not
  mlocked, not long-term pinned, not kernel or shmem pages, not isolated).
- For each page the referenced test is ``rmap.page_referenced``: an rmap walk
  that counts and clears the accessed (young) bit of every PTE mapping it;
  for a KSM page the walk goes through its stable node (rmap_walk_ksm), so an
  access through any of its mappings keeps it. A referenced page gets a
  second chance (the kernel would activate it); an unreferenced one is
  swapped out (``Swap.reclaim_page``). A sweep goes round at most twice, so
  pages referenced at the first look are taken at the second if still idle.
- A THP is split when one of its pages is chosen (THP_SWAP fallback).
- Without free swap space nothing anonymous can be reclaimed and reclaim
  returns at once (can_reclaim_anon_pages).

kswapd: the page allocator calls ``on_low(node)`` when an allocation leaves a
node below its low watermark; kswapd is then scheduled on the virtual clock
(it runs asynchronously, never inside the allocation) and reclaims until the
node is back at its high watermark. Direct reclaim is what a failed
allocation does before the OOM killer (see ``vmhost.mm.oom``).
"""

from __future__ import annotations

import functools

from collections import Counter
from typing import TYPE_CHECKING, Sequence

import numpy as np

from vmhost.mm.frames import PG_ANON, PG_ISOLATED, PG_KERNEL, PG_KSM, PG_MLOCKED, PG_PINNED, PG_SHMEM
from vmhost.mm.rmap import page_referenced

if TYPE_CHECKING:
    from vmhost.host import Host

_UNEVICTABLE = PG_MLOCKED | PG_PINNED | PG_KERNEL | PG_SHMEM | PG_ISOLATED


class Reclaim:
    def __init__(self, host: "Host"):
        self.host = host
        self.hand = [0] * host.topology.node_count
        self._pending: set[int] = set()
        self.stats: Counter[str] = Counter()
        host.allocator.on_low = self.wake_kswapd

    # -- kswapd ---------------------------------------------------------------------------------
    def _can_reclaim(self) -> bool:
        swap = self.host.swap
        return bool(swap.areas) and (swap.free_pages > 0 or bool(swap.cache_entry))

    def wake_kswapd(self, node: int) -> None:
        """wakeup_kswapd: schedule a kswapd run for ``node`` (called from the allocator)."""
        if node in self._pending or not self._can_reclaim():
            return
        self._pending.add(node)
        self.host.clock.after(0, functools.partial(self.kswapd, node))

    def kswapd(self, node: int) -> int:
        """balance_pgdat: reclaim until the node is at its high watermark again."""
        self._pending.discard(node)
        alloc = self.host.allocator
        want = alloc.watermarks[node].high - alloc.free_pages(node)
        if want <= 0:
            return 0
        self.stats["kswapd_runs"] += 1
        freed = self.shrink_node(node, want)
        self.stats["kswapd_freed"] += freed
        return freed

    # -- direct reclaim ---------------------------------------------------------------------------
    def direct_reclaim(self, nodes: Sequence[int], nr_pages: int) -> int:
        """try_to_free_pages on the nodes an allocation may use; returns pages freed."""
        self.stats["allocstall"] += 1
        freed = 0
        for node in nodes:
            if freed >= nr_pages:
                break
            freed += self.shrink_node(int(node), nr_pages - freed)
        self.stats["direct_freed"] += freed
        return freed

    # -- the CLOCK sweep ----------------------------------------------------------------------------
    def candidates(self, node: int) -> np.ndarray:
        """Evictable anonymous and KSM pages of the node's online blocks, in pfn order."""
        frames = self.host.frames
        parts = []
        for blk in self.host.phys.online_blocks(node):
            lo, hi = blk.first_pfn, blk.first_pfn + blk.pages
            f = frames.flags[lo:hi]
            ok = ((frames.refcount[lo:hi] > 0) & ((f & (PG_ANON | PG_KSM)) != 0)
                  & ((f & _UNEVICTABLE) == 0))
            parts.append(np.flatnonzero(ok) + lo)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def shrink_node(self, node: int, nr_to_reclaim: int) -> int:
        """Reclaim up to ``nr_to_reclaim`` pages of ``node``; returns pages freed."""
        if nr_to_reclaim <= 0 or not self._can_reclaim():
            return 0
        host, swap = self.host, self.host.swap
        cand = self.candidates(node)
        if len(cand) == 0:
            return 0
        start = int(np.searchsorted(cand, self.hand[node]))
        order = np.concatenate([cand[start:], cand[:start]])
        free_before = host.allocator.free_pages(node)
        freed = 0
        last = int(order[0])
        for sweep in range(2):
            for pfn in order.tolist():
                if not swap.reclaimable(pfn):
                    continue                         # freed or changed during this sweep
                last = pfn
                self.stats["pgscan"] += 1
                if page_referenced(host, pfn) > 0:
                    self.stats["referenced"] += 1
                    continue                         # second chance
                result = swap.reclaim_page(pfn)
                self.stats[f"reclaim_{result.replace(' ', '_')}"] += 1
                if result == "swap full":
                    break
                freed = host.allocator.free_pages(node) - free_before
                if freed >= nr_to_reclaim:
                    break
            else:
                continue
            break
        self.hand[node] = last + 1
        freed = max(host.allocator.free_pages(node) - free_before, 0)
        self.stats["pgsteal"] += freed
        return freed
