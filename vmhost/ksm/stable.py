"""stable_nodes: one per KSM page, plus the chains that group copies of one content.

A stable node is the stable tree's record of a KSM page: ``kpfn`` is the
frame (a pfn, not a reference: the node does not pin the page; the page's
``owner`` pointing back at the node is the "keyhole" that proves the node is
still valid), ``hlist_len`` counts the rmap_items on its list (``hhead``).
``key`` caches the memcmp key of the page's contents, which cannot change
while the node is valid (a KSM page is write-protected everywhere).
``stale`` marks a node whose page has been freed and that nobody has pruned
yet; while no node is stale and no chain exists, a stable-tree search cannot
meet anything but plain live nodes, which lets the compiled scan look pages
up by key (``index``) instead of walking the tree.

Since 4.13 a content may need several KSM pages, each shared by at most
max_page_sharing mappings. Then the tree holds a *chain* node for the content
and the KSM pages' nodes become its *dups*, listed from ``dhead`` through
``dnext``/``dprev``; a chain remembers when it was last pruned of stale dups.
A node whose page migrated to another NUMA node while merge_across_nodes=0
waits on the ``migrate_nodes`` list to be re-homed.

As in the kernel's struct ksm_stable_node, where the tree's ``rb_node`` and a dup's
``hlist_dup`` are a union, a node's tree links ``left``/``right``/``parent`` are the very
arrays ``dnext``/``dprev``/``chain``: a dup is never in the tree, and a node in the tree
is nobody's dup (``kind`` says which; ``links.color`` is its own array). And as there, a
chain's list of dups (``dhead``) is the list head where a KSM page's node keeps its rmap_items
(``hhead``, the kernel's ``hlist``): one array, since a chain has no rmap_items and a KSM page's
node has no dups.
"""

from __future__ import annotations

import numpy as np

from vmhost.ksm.hlist import hlist_add_head, hlist_del
from vmhost.ksm.rbtree import NIL
from vmhost.ksm.slab import ArrayCell, FieldPool, zalloc

FREE, NODE, DUP, CHAIN, MIGRATE = 0, 1, 2, 3, 4


class StableNodes(FieldPool):
    _FIELDS = (("kind", np.uint8, FREE), ("kpfn", np.int32, -1), ("prune_time", np.int64, 0),
               ("hlist_len", np.int32, 0), ("hhead", np.int32, NIL), ("nid", np.int16, 0),
               ("chain", np.int32, NIL), ("dnext", np.int32, NIL),
               ("dprev", np.int32, NIL), ("key", np.uint64, 0), ("stale", np.uint8, 0))

    #: the tree links are a dup's list fields' arrays (a union, see above)
    _UNION = ("dnext", "dprev", "chain")
    #: a chain's list of dups is the list head a node keeps its rmap_items on (see above)
    _ALIASES = (("dhead", "hhead"),)

    def __init__(self, capacity: int = 256, trees: int = 1):
        self._init_fields(capacity, trees)
        # free nodes on a stack the compiled scan can pop from too (top of stack = next node)
        self.free_stack = np.arange(capacity - 1, -1, -1, dtype=np.int32)
        self.free_top = np.array([capacity], dtype=np.int64)
        self.migrate_nodes: dict[int, None] = {}     # ordered: newest first is list_add's order
        self.stale_state = np.zeros(1, dtype=np.int64)  # nodes marked stale: compiled code prunes too

    stale_count = ArrayCell("stale_state", 0)

    def grow(self) -> None:
        """Half as many nodes again (the pool is at most 1.5 times its peak, where doubling
        left it up to twice; the stable nodes of a merging pass arrive at a steady rate, so the
        extra copies cost little), the new ones on top of the free stack, lowest first."""
        old = self.capacity
        new = old + max(1, old // 2)
        self._grow_fields(new)
        top = int(self.free_top[0])
        stack = np.empty(new, dtype=np.int32)
        stack[:new - old] = np.arange(new - 1, old - 1, -1, dtype=np.int32)
        stack[new - old:new - old + top] = self.free_stack[:top]
        self.free_stack = stack
        self.free_top[0] = top + new - old

    def alloc(self, kind: int) -> int:
        node = zalloc(self)
        self.kind[node] = kind
        return node

    def free(self, node: int) -> None:
        if self.stale[node]:
            self.stale[node] = 0
            self.stale_count -= 1
        self.kind[node] = FREE
        self.free_stack[self.free_top[0]] = node
        self.free_top[0] += 1

    def mark_stale(self, pfns: np.ndarray, owners: np.ndarray) -> None:
        """Frames ``pfns`` that were KSM pages of ``owners`` were freed."""
        for pfn, node in zip(pfns, owners):
            if 0 <= node < self.capacity and self.kind[node] != FREE and self.kpfn[node] == pfn \
                    and not self.stale[node]:
                self.stale[node] = 1
                self.stale_count += 1

    def unmark_stale(self, node: int) -> None:
        if self.stale[node]:
            self.stale[node] = 0
            self.stale_count -= 1

    def live(self) -> np.ndarray:
        return np.flatnonzero(self.kind != FREE)

    # -- the dup list of a chain (hlist_add_head / hlist_del) --------------------------------
    def add_dup(self, chain: int, dup: int) -> None:
        self.kind[dup] = DUP
        self.chain[dup] = chain
        hlist_add_head(self.dhead, self.dnext, self.dprev, int(chain), int(dup))

    def del_dup(self, dup: int) -> None:
        hlist_del(self.dhead, self.dnext, self.dprev, int(self.chain[dup]), int(dup))
        self.chain[dup] = NIL

    def dups(self, chain: int) -> list[int]:
        out, d = [], int(self.dhead[chain])
        while d != NIL:
            out.append(d)
            d = int(self.dnext[d])
        return out
