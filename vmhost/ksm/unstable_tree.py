"""The unstable tree: pages unchanged for a pass, sorted by their current contents.

Rebuilt from empty every full scan. While nothing has changed since the pass began it
is kept as a hash table plus a log of insertions (see fastscan), and built as the real
red-black tree, from the log, the moment a walk needs the tree itself.
"""

from __future__ import annotations

import numpy as np

from vmhost.ksm import fastscan, pages
from vmhost.ksm.items import SEQNR_MASK, UNSTABLE_FLAG
from vmhost.ksm.pages import find_mergeable_vma
from vmhost.ksm.rbtree import NIL

#: the hashed unstable tree's smallest log (entries); its table has at least twice as many slots
LOG_MIN = 1024


class UnstableTreeMixin:
    """Part of :class:`vmhost.ksm.engine.Ksm` (see the module docstring)."""

    def get_mergeable_page(self, item: int) -> int:
        mm = self._mm(item)
        vpn = self.items.vpn_of(item)
        vma = find_mergeable_vma(mm, vpn)
        if vma is None:
            return -1
        return pages.anon_page_at(self.host, vma, vpn - vma.start)

    def _unstable_hashed(self, item: int, pfn: int) -> tuple[int, int]:
        """The unstable tree as hash + log while nothing changed (see fastscan)."""
        items = self.items
        self._unstable_log_room()
        self._unstable_hash_covers_items()
        nid = self._nid_of_pfn(pfn)
        key = np.uint64(self._key(pfn))
        mask = len(self._uh) - 1
        t, h = fastscan.hash_find(self._uh, mask, items.tree_key, items.nid, key, int(nid))
        self.work[fastscan.W_COMPARES] += fastscan.hashed_search_compares(self._ulog_len)
        if t != NIL:
            tpfn = self.get_mergeable_page(int(t))
            if tpfn < 0 or tpfn == pfn:
                return NIL, -1
            if not self.knobs.merge_across_nodes and int(self.host.phys.node_of(tpfn)) != nid:
                return NIL, -1
            return int(t), tpfn
        items.mm_address[item] |= UNSTABLE_FLAG | (self.seqnr & SEQNR_MASK)
        items.nid[item] = nid
        items.tree_key[item] = key
        self._uh[h] = fastscan.hash_entry(item, key, int(nid), mask)
        self._log_unstable(item)
        self.c.pages_unshared += 1
        return NIL, -1

    def _log_unstable(self, entry: int) -> None:
        n = int(self._ulog_len[0])
        assert n < len(self._ulog), "the unstable log is full: _unstable_log_room() first"
        self._ulog[n] = entry
        self._ulog_len[0] = n + 1

    def _unstable_log_room(self, words: int = 1) -> None:
        """Room for ``words`` more log entries, made before the table is touched (growing
        re-makes it from the log and the items' flags, which must agree)."""
        if self._ulog_len[0] + words > len(self._ulog):
            self._grow_unstable_hash()

    def _table_size(self, log: int) -> int:
        """The hash table for a log of ``log`` entries: a power of two, at least twice the log
        (every entry of the log is at most one occupied slot: an insertion fills one, an erasure
        turns it into a tombstone, which a later insertion may reuse, so the table is at most
        half full) and at least the rmap_items (every item id below its size: a slot keeps a
        tag above the id, ``fastscan.hash_tag``, so that a search that misses, as most do in
        a steady pass, reads the key of few of the items it meets at random: without tags, a
        table up to half full rather than a quarter made the 16 GiB benchmark's steady pass
        11% slower, meeting 1.5 items a search instead of 0.4)."""
        return 1 << (max(2 * log, self.items.capacity) - 1).bit_length()

    def _unstable_hash_covers_items(self) -> None:
        """The hash table re-made, its log kept, if the rmap_item pool has outgrown it (an item
        id must stay below the table's size, under the slot's tag)."""
        if self._uhashed and len(self._uh) < self.items.capacity:
            self._remake_unstable_hash(len(self._ulog))

    def _size_unstable_hash(self, entries: int) -> None:
        """An empty log of ``entries`` (at least ``LOG_MIN``) and its hash table (``_table_size``):
        the compiled loop stops (to have both grown here) before the log overflows. The old
        arrays go before the new are made."""
        cap = max(LOG_MIN, int(entries))
        self._empty_table(self._table_size(cap), keep_larger=False)
        if len(self._ulog) != cap:
            self._ulog = None
            self._ulog = np.zeros(cap, dtype=np.int32)
        self._ulog_len[:] = 0

    def _empty_table(self, size: int, keep_larger: bool) -> None:
        """An empty hash table of ``size`` slots: the present one cleared if it has that size
        (or more, with ``keep_larger``), else the old one freed before the new one is made."""
        if len(self._uh) == size or keep_larger and len(self._uh) > size:
            self._uh.fill(NIL)
        else:
            self._uh = None
            self._uh = np.full(size, NIL, dtype=np.int32)

    def _grow_unstable_hash(self) -> None:
        """Twice the log (kept in order), and the table re-made for it from the items the log says are in
        the tree now (one slot each, no tombstones)."""
        self._remake_unstable_hash(2 * len(self._ulog))

    def _remake_unstable_hash(self, log_size: int) -> None:
        """A log of ``log_size`` (the present one's entries kept in order) and the table re-made
        for it from the items the log says are in the tree now."""
        n = int(self._ulog_len[0])
        if log_size != len(self._ulog):
            log = np.zeros(log_size, dtype=np.int32)
            log[:n] = self._ulog[:n]
            self._ulog = log
        self._empty_table(self._table_size(len(self._ulog)), keep_larger=True)
        it = self.items
        fastscan.hash_rebuild(self._uh, self._ulog, n, it.tree_key, it.nid, it.mm_address,
                              self.seqnr & SEQNR_MASK)

    def build_unstable_trees(self) -> None:
        """Turn the compiled loop's hash table and log into the real rbtrees (same shape)."""
        if not self._uhashed:
            return
        self._uhashed = False
        it, ln = self.items, self.items.links
        fastscan.replay_unstable(self._ulog, int(self._ulog_len[0]), it.tree_key, it.nid, it.mm_address,
                                 ln.left, ln.right, ln.parent, ln.color, ln.roots)

    def _unstable_clean(self) -> bool:
        return int(self.host.changes[0]) == self._pass_changes

    def unstable_tree_search_insert(self, item: int, pfn: int) -> tuple[int, int]:
        """An identical page in the unstable tree (item, pfn); else insert ``item``."""
        if self._uhashed and self._unstable_clean():
            return self._unstable_hashed(item, pfn)
        self.build_unstable_trees()
        nid = self._nid_of_pfn(pfn)
        tree = self.unstable_trees[nid]
        links = self.items.links
        key = self._key(pfn)
        cur, parent, go_left = tree.root, NIL, False
        while cur != NIL:
            self.work[fastscan.W_COMPARES] += 1
            tree_pfn = self.get_mergeable_page(cur)
            if tree_pfn < 0 or tree_pfn == pfn:
                return NIL, -1          # a page vanished, or this very page reached by fork
            tkey = self._key(tree_pfn)
            self.items.tree_key[cur] = tkey
            parent = cur
            if key < tkey:
                cur, go_left = int(links.left[cur]), True
            elif key > tkey:
                cur, go_left = int(links.right[cur]), False
            elif not self.knobs.merge_across_nodes and int(self.host.phys.node_of(tree_pfn)) != nid:
                return NIL, -1
            else:
                return cur, tree_pfn
        self.items.mm_address[item] |= UNSTABLE_FLAG | (self.seqnr & SEQNR_MASK)
        self.items.nid[item] = nid
        self.items.tree_key[item] = key
        tree.link(item, parent, go_left)
        self.c.pages_unshared += 1
        return NIL, -1
