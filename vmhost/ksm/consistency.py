"""KSM's part of the invariant checker.
"""

from __future__ import annotations

import numpy as np

from vmhost.ksm.items import STABLE_FLAG, UNSTABLE_FLAG
from vmhost.ksm.rbtree import NIL
from vmhost.ksm.stable import DUP, MIGRATE, NODE
from vmhost.mm.frames import PG_KSM
from vmhost.mm.vma import PTE_KSM_ZERO


class ConsistencyMixin:
    """Part of :class:`vmhost.ksm.engine.Ksm` (see the module docstring)."""

    # consistency
    def check_invariants(self) -> list[str]:
        """Recount KSM's state from its structures and compare with the counters.

        - every item on a stable node's list points back at that node, and the node's length
          is the list's; shared/sharing are the nodes with items and the items beyond one;
        - unshared is the number of items flagged as in the unstable tree;
        - each mm's rmap_items and merging pages are its items and its items on stable lists;
        - ksm_zero_pages is the number of PTEs KSM pointed at the zero page;
        - a live node's KSM page points back at it, unless it was freed (stale, to be pruned).
        """
        problems: list[str] = []
        items, nodes, frames = self.items, self.nodes, self.host.frames
        live_items = items.live()
        flags = items.mm_address[live_items]      # a flag bit is tested on the word
        stable = live_items[(flags & STABLE_FLAG) != 0]
        shared = sharing = 0
        on_lists = 0
        for node in np.flatnonzero((nodes.kind == NODE) | (nodes.kind == DUP) | (nodes.kind == MIGRATE)):
            n, it = 0, int(nodes.hhead[node])
            while it != NIL and n <= len(stable):
                if items.head[it] != node or not items.mm_address[it] & STABLE_FLAG:
                    problems.append(f"ksm: rmap_item {it} is on stable node {node}'s list but "
                                    "does not belong to it")
                n += 1
                it = int(items.hnext[it])
            if n != nodes.hlist_len[node]:
                problems.append(f"ksm: stable node {node} has {n} items listed, "
                                f"rmap_hlist_len {nodes.hlist_len[node]}")
            shared += n > 0
            sharing += max(n - 1, 0)
            on_lists += n
            pfn = int(nodes.kpfn[node])
            live = frames.flags[pfn] & PG_KSM and frames.owner[pfn] == node
            if not live and not nodes.stale[node] and frames.refcount[pfn] > 0:
                problems.append(f"ksm: stable node {node} lost its page {pfn} without being stale")
        if on_lists != len(stable):
            problems.append(f"ksm: {len(stable)} items flagged stable, {on_lists} on stable lists")
        c = self.c
        if (shared, sharing) != (c.pages_shared, c.pages_sharing):
            problems.append(f"ksm: counters say shared {c.pages_shared} sharing {c.pages_sharing}, "
                            f"the lists {shared} and {sharing}")
        unstable = int(np.count_nonzero(flags & UNSTABLE_FLAG))
        if unstable != c.pages_unshared:
            problems.append(f"ksm: pages_unshared {c.pages_unshared}, items flagged {unstable}")
        zero_ptes = sum(int(np.count_nonzero(v.ptef & PTE_KSM_ZERO)) for mm in self.host.live_mms()
                        for v in mm.vmas)
        if zero_ptes != c.ksm_zero_pages:
            problems.append(f"ksm: ksm_zero_pages {c.ksm_zero_pages}, KSM zero PTEs {zero_ptes}")
        for mm_id, slot in self.slot_of.items():
            mine = live_items[items.mms(live_items) == mm_id]
            merging = int(np.count_nonzero(items.mm_address[mine] & STABLE_FLAG))
            if (len(mine), merging) != (slot.mm.ksm_rmap_items, slot.mm.ksm_merging_pages):
                problems.append(f"ksm: mm {mm_id} counts {slot.mm.ksm_rmap_items} items and "
                                f"{slot.mm.ksm_merging_pages} merging, has {len(mine)} and {merging}")
        return problems
