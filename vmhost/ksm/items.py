"""rmap_items and mm_slots: KSM's record of every page it has looked at.

An rmap_item stands for one (mm, virtual page) that ksmd found holding an
anonymous page. Items live in struct-of-arrays form; an item id indexes every
array. Each mm_slot keeps its items in a singly linked list sorted by address
(``rnext``), which ksmd walks in step with the page tables, freeing items
whose pages have gone and inserting new ones in order, exactly as the
kernel's ``rmap_list`` works.

An item is in at most one tree:

- unstable: ``flags`` has UNSTABLE and the low byte of the scan number that
  inserted it; it is a node of the unstable rbtree of ``nid`` (links in
  ``links``);
- stable: ``flags`` has STABLE; ``head`` is its stable_node and it sits on
  that node's list (``hnext``/``hprev``), holding a reference on the
  ``anon_vma`` of its VMA so that rmap can reach the mapping.

As in the kernel's struct ksm_rmap_item, where ``struct rb_node node`` and
``{head, hlist}`` are a union, the unstable tree's ``left``/``right``/``parent``
are the very arrays ``head``/``hnext``/``hprev``: each means something only while
``flags`` says which tree the item is in (``links.color`` is its own array). And as
there, ``nid`` is the array ``anon_vma`` (``union { anon_vma; nid; }``): an item leaving
the unstable tree gets -1 there, as one that never had an anon_vma.

``oldchecksum`` is the checksum seen at the previous visit (0 when fresh);
``age`` and ``remaining_skips`` drive smart scan. An item in the unstable
tree also remembers the memcmp key its page had when last compared (``tree_key``):
while nothing has changed in the pass, the compiled scan loop trusts it (and the hashed
form of the unstable tree is keyed by it); its page is looked up in the page tables,
as get_mergeable_page does, whenever it is needed.

Free items are kept on a list threaded through ``rnext`` (``free_list`` holds its first
item and its length; last freed, first reused, as a slab's free list), which the compiled
loop allocates from and frees to as well.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vmhost.ksm.rbtree import NIL
from vmhost.ksm.slab import FieldPool

if TYPE_CHECKING:
    from vmhost.mm.mm import MM

SEQNR_MASK = 0x0FF
UNSTABLE_FLAG = 0x100
STABLE_FLAG = 0x200
RMAP_ITEM_BYTES = 64          # sizeof(struct ksm_rmap_item) on 64-bit: used in profit figures


class RmapItems(FieldPool):
    _FIELDS = (("mm", np.int32, -1), ("address", np.int64, 0), ("flags", np.uint16, 0),
               ("oldchecksum", np.uint32, 0), ("age", np.uint8, 0), ("remaining_skips", np.uint8, 0),
               ("head", np.int32, NIL), ("hnext", np.int32, NIL), ("hprev", np.int32, NIL),
               ("anon_vma", np.int32, -1), ("rnext", np.int32, NIL),
               ("tree_key", np.uint64, 0))

    #: the unstable tree's links are the stable fields' arrays (a union, see above)
    _UNION = ("head", "hnext", "hprev")
    #: an item in the unstable tree keeps its tree's number where a stable one keeps its
    #: anon_vma (the kernel's ``union { struct anon_vma *anon_vma; int nid; }``)
    _ALIASES = (("nid", "anon_vma"),)

    def __init__(self, capacity: int = 1024, trees: int = 1):
        self._init_fields(capacity, trees)
        # [first free item, free items]: an array, the compiled loop allocates and frees too
        self.free_list = np.array([NIL, 0], dtype=np.int64)
        self._add_free(0, capacity)

    @property
    def count(self) -> int:
        return self.capacity - int(self.free_list[1])

    def _add_free(self, lo: int, hi: int) -> None:
        """Items lo..hi-1 are the free list, in that order (the pool grows only when none is free)."""
        assert self.free_list[1] == 0
        self.rnext[lo:hi - 1] = np.arange(lo + 1, hi, dtype=np.int32)
        self.rnext[hi - 1] = NIL
        self.free_list[0], self.free_list[1] = lo, hi - lo

    def grow(self) -> None:
        old = self.capacity
        self._grow_fields(2 * old)
        self._add_free(old, 2 * old)

    def alloc(self, mm_id: int, address: int) -> int:
        """A zeroed item for (mm, address), as kmem_cache_zalloc gives it."""
        if self.free_list[1] == 0:
            self.grow()
        item = int(self.free_list[0])
        self.free_list[0] = self.rnext[item]
        self.free_list[1] -= 1
        self._reset(item)
        self.mm[item] = mm_id
        self.address[item] = address
        return item

    def free(self, item: int) -> None:
        self.mm[item] = -1
        self.rnext[item] = self.free_list[0]
        self.free_list[0] = item
        self.free_list[1] += 1


class MmSlot:
    """KSM's per-mm record: the mm and the head of its sorted rmap_item list."""

    __slots__ = ("mm", "rmap_list")

    def __init__(self, mm: "MM"):
        self.mm = mm
        self.rmap_list = NIL

    def __repr__(self) -> str:
        return f"MmSlot(mm={self.mm.id})"
