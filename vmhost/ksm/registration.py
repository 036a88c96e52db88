"""Registration and unmerging: madvise, prctl, fork, exit, run=2, KSM rmap walks.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import numpy as np

from vmhost.ksm import pages
from vmhost.ksm.items import MmSlot
from vmhost.ksm.knobs import RUN_UNMERGE
from vmhost.ksm.rbtree import NIL
from vmhost.ksm.stable import CHAIN, FREE
from vmhost.mm.frames import NO_OWNER, PG_KSM
from vmhost.mm.fault import retry_fault
from vmhost.mm.page_alloc import OutOfMemory
from vmhost.mm.vma import LAYOUT_GEN, PTE_KSM_ZERO, PTE_PRESENT, PTE_ZERO, VmFlags, Vma

if TYPE_CHECKING:
    from vmhost.mm.mm import MM


class RegistrationMixin:
    """Part of :class:`vmhost.ksm.engine.Ksm` (see the module docstring)."""

    # registration: madvise, prctl, fork, exit
    def _drop_slot(self, slot: MmSlot) -> None:
        LAYOUT_GEN[0] += 1                      # the VMA registry follows the slots
        self.slots.remove(slot)
        del self.slot_of[slot.mm.id]
        slot.mm.ksm_mergeable = False
        slot.mm.ksm_merge_any = False

    def ksm_enter(self, mm: "MM") -> None:
        """__ksm_enter: a new slot goes just behind the cursor (at the tail during run=2)."""
        LAYOUT_GEN[0] += 1
        slot = MmSlot(mm)
        was_empty = not self.slots
        self.slot_of[mm.id] = slot
        if self.knobs.run & RUN_UNMERGE or self.cursor is None:
            self.slots.append(slot)
        else:
            self.slots.insert(self.slots.index(self.cursor), slot)
        mm.ksm_mergeable = True
        if was_empty:
            self.wakeup()

    def madvise(self, vma: Vma, mergeable: bool) -> int:
        if mergeable:
            if vma.flags & VmFlags.MERGEABLE or not vma.ksm_compatible:
                return 0
            if not vma.mm.ksm_mergeable:
                self.ksm_enter(vma.mm)
            vma.flags |= VmFlags.MERGEABLE
            return 0
        if not vma.flags & VmFlags.MERGEABLE:
            return 0
        if vma.anon_vma is not None:
            rc = self.unmerge_range(vma, 0, vma.pages)
            if rc:
                return rc
        vma.flags &= ~VmFlags.MERGEABLE
        vma.mm.touch_ptes()             # its pages stop being mergeable: scan caches are stale
        return 0

    def unmerge_range(self, vma: Vma, lo: int, hi: int) -> int:
        """unmerge_ksm_pages: break every KSM page and KSM zero page in [lo, hi)."""
        flags = vma.ptef[lo:hi]
        present = (flags & (PTE_PRESENT | PTE_ZERO)) == PTE_PRESENT
        ksm = np.zeros(hi - lo, dtype=bool)
        ksm[present] = (self.host.frames.flags[vma.pte[lo:hi][present]] & PG_KSM) != 0
        targets = np.flatnonzero(ksm | ((flags & PTE_KSM_ZERO) != 0)) + lo
        try:
            for off in targets:
                # the unshare fault allocates like any fault: reclaim, then the OOM killer
                retry_fault(self.host, vma, lambda off=int(off): pages.break_ksm(self.host, vma, off))
        except OutOfMemory:
            return -errno.ENOMEM
        return 0

    def vma_created(self, vma: Vma) -> None:
        if vma.mm.ksm_merge_any and vma.ksm_compatible:
            vma.flags |= VmFlags.MERGEABLE

    def prctl_set_memory_merge(self, mm: "MM", enable: bool) -> int:
        """PR_SET_MEMORY_MERGE: merge-any on (every compatible VMA) or off (unmerge all)."""
        if enable:
            if mm.ksm_merge_any:
                return 0
            if not mm.ksm_mergeable:
                self.ksm_enter(mm)
            mm.ksm_merge_any = True
            for vma in mm.vmas:
                if vma.ksm_compatible:
                    vma.flags |= VmFlags.MERGEABLE
            return 0
        if not mm.ksm_merge_any:
            return 0
        for vma in mm.vmas:
            rc = self.madvise(vma, False)
            if rc:
                for v in mm.vmas:
                    if v.ksm_compatible:
                        v.flags |= VmFlags.MERGEABLE
                return rc
        mm.ksm_merge_any = False
        return 0

    def fork(self, parent: "MM", child: "MM") -> None:
        """ksm_fork: the child of a registered mm is registered; its counters start afresh."""
        child.ksm_merging_pages = 0
        child.ksm_rmap_items = 0
        child.ksm_zero_pages = parent.ksm_zero_pages      # the KSM zero PTEs were copied
        self.c.ksm_zero_pages += child.ksm_zero_pages
        if parent.ksm_mergeable:
            self.ksm_enter(child)
        else:
            child.ksm_merge_any = False

    def exit(self, mm: "MM") -> None:
        """__ksm_exit: free an idle slot now, else leave it right after the cursor for ksmd."""
        LAYOUT_GEN[0] += 1                      # an exiting mm's VMAs are no longer mergeable
        slot = self.slot_of.get(mm.id)
        if slot is None or slot is self.cursor:
            return
        self.slots.remove(slot)
        if slot.rmap_list == NIL:
            del self.slot_of[mm.id]
            mm.ksm_mergeable = False
            mm.ksm_merge_any = False
        else:
            at = 0 if self.cursor is None else self.slots.index(self.cursor) + 1
            self.slots.insert(at, slot)

    def zero_pages_unmapped(self, mm: "MM", count: int) -> None:
        mm.ksm_zero_pages -= count
        self.c.ksm_zero_pages -= count

    # rmap of KSM pages
    def rmap_walk(self, pfn: int, visit) -> int:
        """rmap_walk_ksm: each item's anon_vma, own mm first, then forked mms."""
        node = int(self.host.frames.owner[pfn])
        if node == NO_OWNER or self.nodes.kind[node] == FREE:
            return 0
        visited = 0
        items = self.items
        for search_new_forks in (False, True):
            it = int(self.nodes.hhead[node])
            while it != NIL:
                av = self.host.anon_vmas.by_id.get(int(items.anon_vma[it]))
                vpn = items.vpn_of(it)
                mm_id = items.mm_of(it)
                for vma in (list(av.vmas) if av is not None else ()):
                    if not vma.start <= vpn < vma.end or (vma.mm.id == mm_id) == search_new_forks:
                        continue
                    visited += 1
                    off = vpn - vma.start
                    if pages.anon_page_at(self.host, vma, off) == pfn and visit(vma, off) is False:
                        return visited
                it = int(items.hnext[it])
        return visited

    # run=2 and the knobs
    def unmerge_all(self) -> int:
        """unmerge_and_remove_all_rmap_items: break every merge, free every item, seqnr=0."""
        self.cursor = self.slots[0] if self.slots else None
        while self.cursor is not None:
            slot = self.cursor
            mm = slot.mm
            for vma in list(mm.vmas):
                if mm.exiting:
                    break
                if vma.flags & VmFlags.MERGEABLE and vma.anon_vma is not None:
                    rc = self.unmerge_range(vma, 0, vma.pages)
                    if rc:
                        self.cursor = None
                        return rc
            self.prev_item = NIL
            self._remove_trailing(slot, NIL)
            idx = self.slots.index(slot)
            self.cursor = self.slots[idx + 1] if idx + 1 < len(self.slots) else None
            if mm.exiting:
                self._drop_slot(slot)
        self.remove_all_stable_nodes()
        self.seqnr = 0
        return 0

    def _remove_stable_node(self, node: int) -> bool:
        """remove_stable_node: False (busy) when the KSM page is still mapped somewhere."""
        pfn = self.get_page(node)
        if pfn < 0:
            return True
        if self.host.frames.mapcount[pfn] > 0:
            return False
        self.host.frames.owner[pfn] = NO_OWNER
        self.remove_node_from_stable_tree(node)
        return True

    def remove_all_stable_nodes(self) -> bool:
        """Remove every stable node whose page is unmapped; False if any stays busy."""
        ok = True
        for nid, tree in enumerate(self.stable_trees):
            while tree.root != NIL:
                node = tree.root
                if self.nodes.kind[node] == CHAIN:
                    busy = any(not self._remove_stable_node(d) for d in self.nodes.dups(node))
                    if busy:
                        ok = False
                        break
                    self._free_chain(node)
                elif not self._remove_stable_node(node):
                    ok = False
                    break
        for node in list(self.nodes.migrate_nodes):
            if not self._remove_stable_node(node):
                ok = False
        return ok
