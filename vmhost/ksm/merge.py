"""Merging: cmp_and_merge_page and the page-table work behind it.

A page visit: an already merged KSM page needs nothing; otherwise the checksum rule, the
KSM zero page (use_zero_pages), a merge into an existing KSM page found in the stable
tree, or, through the unstable tree, two pages merged into a new KSM page.
"""

from __future__ import annotations

import numpy as np

from vmhost.ksm import fastscan, pages
from vmhost.ksm.checksum import checksums
from vmhost.ksm.items import STABLE_FLAG
from vmhost.ksm.pages import EFAULT, ZERO_PAGE, find_mergeable_vma
from vmhost.ksm.rbtree import NIL
from vmhost.ksm.stable import MIGRATE
from vmhost.mm import thp
from vmhost.mm.frames import NO_OWNER, PG_ANON, PG_COMPOUND, PG_KSM
from vmhost.mm.vma import Vma


class MergeMixin:
    """Part of :class:`vmhost.ksm.engine.Ksm` (see the module docstring)."""

    # merging
    def _merge_one(self, vma: Vma, off: int, pfn: int, kpfn: int | None, held: int = -1) -> int:
        """try_to_merge_one_page; ``kpfn`` None turns ``pfn`` itself into a KSM page.

        ``held`` is the other page ksmd holds a reference to: a huge page cannot
        be split while ksmd holds two of its pages, so that merge fails.
        """
        if pfn == kpfn:
            return 0
        frames = self.host.frames
        if not frames.flags[pfn] & (PG_ANON | PG_KSM):
            return EFAULT
        if frames.flags[pfn] & PG_COMPOUND:
            if held >= 0 and thp.same_folio(self.host, pfn, held):
                return EFAULT
            thp.split_huge_page(self.host, pfn)
        if pages.write_protect(self.host, vma, off, pfn):
            return EFAULT
        self.work[fastscan.W_MERGES] += 1
        if kpfn is None:
            frames.flags[pfn] = (frames.flags[pfn] & ~np.uint16(PG_ANON)) | PG_KSM
            frames.owner[pfn] = NO_OWNER          # the stable node is set by stable_tree_insert
            return 0
        if kpfn == ZERO_PAGE:
            if frames.content[pfn] != 0:
                return EFAULT
            rc = pages.replace(self.host, vma, off, pfn, kpfn)
            if rc == 0:
                vma.mm.ksm_zero_pages += 1
                self.c.ksm_zero_pages += 1
            return rc
        if frames.content[pfn] != frames.content[kpfn]:
            return EFAULT                         # pages_identical
        return pages.replace(self.host, vma, off, pfn, kpfn)

    def _merge_with_ksm_page(self, item: int, pfn: int, kpfn: int | None, held: int = -1) -> int:
        """try_to_merge_with_ksm_page: merge and take a reference on the VMA's anon_vma."""
        mm = self._mm(item)
        vpn = self.items.vpn_of(item)
        vma = find_mergeable_vma(mm, vpn)
        if vma is None:
            return EFAULT
        err = self._merge_one(vma, vpn - vma.start, pfn, kpfn, held)
        if err:
            return err
        self.remove_rmap_item_from_tree(item)
        self.host.anon_vmas.get(vma.anon_vma)
        self.items.anon_vma[item] = vma.anon_vma.id
        return 0

    def _break_cow(self, item: int) -> None:
        self._put_anon_vma(item)
        mm = self._mm(item)
        vpn = self.items.vpn_of(item)
        vma = find_mergeable_vma(mm, vpn)
        if vma is not None:
            pages.break_ksm(self.host, vma, vpn - vma.start)

    def _merge_with_zero_page(self, item: int, pfn: int) -> int:
        if self.knobs.use_zero_pages and int(self.items.oldchecksum[item]) == self.zero_checksum:
            mm = self._mm(item)
            vpn = self.items.vpn_of(item)
            vma = find_mergeable_vma(mm, vpn)
            if vma is None:
                return 0
            return self._merge_one(vma, vpn - vma.start, pfn, ZERO_PAGE)
        return EFAULT

    def cmp_and_merge_page(self, pfn: int, item: int) -> None:
        """One page: stable tree first, then the checksum rule, then the unstable tree."""
        frames, nodes, items = self.host.frames, self.nodes, self.items
        node = int(frames.owner[pfn]) if frames.flags[pfn] & PG_KSM else NIL
        if node != NIL:
            if nodes.kind[node] != MIGRATE and self._nid_of_pfn(int(nodes.kpfn[node])) != nodes.nid[node]:
                self._unlink_node(node)
                nodes.kind[node] = MIGRATE
                nodes.migrate_nodes[node] = None
            if nodes.kind[node] != MIGRATE and items.head[item] == node and items.mm_address[item] & STABLE_FLAG:
                return                                   # merged already: nothing to do
            self._merge_candidate(pfn, item, node)
            return
        self.remove_rmap_item_from_tree(item)
        self.work[fastscan.W_CHECKSUMS] += 1
        cs = int(checksums(frames.content[pfn:pfn + 1], self.profile.ksm_checksum)[0])
        if int(items.oldchecksum[item]) != cs:
            items.oldchecksum[item] = cs
            return                                       # volatile: changed since last visit
        self.after_checksum(pfn, item)

    def after_checksum(self, pfn: int, item: int) -> None:
        """The rest of a visit to an unchanged page: zero page, stable tree, unstable tree."""
        if self._merge_with_zero_page(item, pfn) == 0:
            return
        self._merge_candidate(pfn, item, NIL)

    def _merge_candidate(self, pfn: int, item: int, node: int) -> None:
        frames, items = self.host.frames, self.items
        kpfn = self.stable_tree_search(pfn)
        if kpfn == pfn and items.head[item] == node and items.mm_address[item] & STABLE_FLAG:
            return
        self.remove_rmap_item_from_tree(item)
        if kpfn >= 0:
            if self._merge_with_ksm_page(item, pfn, kpfn) == 0:
                self.stable_tree_append(item, int(frames.owner[kpfn]))
            return
        self.after_stable_miss(pfn, item)

    def after_stable_miss(self, pfn: int, item: int) -> None:
        """The rest of a visit the stable tree had nothing for: the unstable tree, and two
        pages merged into a new KSM page."""
        tree_item, tree_pfn = self.unstable_tree_search_insert(item, pfn)
        if tree_item == NIL:
            return
        if self._merge_with_ksm_page(item, pfn, None, held=tree_pfn) != 0:
            if thp.same_folio(self.host, pfn, tree_pfn):
                thp.split_huge_page(self.host, pfn)      # both in one huge page: split it now
            return
        if self._merge_with_ksm_page(tree_item, tree_pfn, pfn, held=pfn) != 0:
            self._break_cow(item)
            return
        new = self.stable_tree_insert(pfn)
        if new != NIL:
            self.stable_tree_append(tree_item, new)
            self.stable_tree_append(item, new)
        else:
            self._break_cow(tree_item)
            self._break_cow(item)
