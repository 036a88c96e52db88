"""rmap_items and mm_slots: KSM's record of every page it has looked at.

An rmap_item stands for one (mm, virtual page) that ksmd found holding an
anonymous page. Items live in struct-of-arrays form; an item id indexes every
array. As the kernel keeps an item's flags in the low bits of ``rmap_item->address``
(a page-aligned address has them to spare), one 64-bit word, ``mm_address``, holds the
flags (bits 0-9), the virtual page number (bits 10-44: the 47-bit user address space) and
the mm's id (bits 45-63: fewer than ``MAX_MM`` mms; -1 for a free item, whose address and
flags are left as they were). ``item_mm``, ``item_vpn``, ``item_flags``, ``with_flags`` and
``pack_item`` are the only readers and writers of that layout, compiled for the scan loop
and called by the Python path; a flag bit is tested on the word itself.

Each mm_slot keeps its items in a singly linked list sorted by address
(``rnext``), which ksmd walks in step with the page tables, freeing items
whose pages have gone and inserting new ones in order, exactly as the
kernel's ``rmap_list`` works.

An item is in at most one tree:

- unstable: the flags have UNSTABLE and the low byte of the scan number that
  inserted it; it is a node of the unstable rbtree of ``nid`` (links in
  ``links``);
- stable: the flags have STABLE; ``head`` is its stable_node and it sits on
  that node's list (``hnext``/``hprev``), holding a reference on the
  ``anon_vma`` of its VMA so that rmap can reach the mapping.

As in the kernel's struct ksm_rmap_item, where ``struct rb_node node`` and
``{head, hlist}`` are a union, the unstable tree's ``left``/``right``/``parent``
are the very arrays ``head``/``hnext``/``hprev``: each means something only while
the flags say which tree the item is in (``links.color`` is its own array). And as
there, ``nid`` is the array ``anon_vma`` (``union { anon_vma; nid; }``): an item leaving
the unstable tree gets -1 there, as one that never had an anon_vma.

``oldchecksum`` is the checksum seen at the previous visit (0 when fresh);
``smart`` drives smart scan: the kernel's ``age`` in its low 4 bits (saturating at 15, which
the rule cannot tell from 255: ``fastscan.smart_step``) and ``remaining_skips`` (at most 8)
in its high 4. An item in the unstable
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

from numba import njit

from vmhost.ksm.rbtree import NIL
from vmhost.ksm.slab import FieldPool

if TYPE_CHECKING:
    from vmhost.mm.mm import MM

SEQNR_MASK = 0x0FF
UNSTABLE_FLAG = 0x100
STABLE_FLAG = 0x200
FLAG_BITS = 0x3FF             # the flags' bits of ``mm_address``: SEQNR_MASK | UNSTABLE | STABLE
VPN_SHIFT = 10
VPN_BITS = 35                 # a 47-bit user address space (TASK_SIZE) in 4 KiB pages
VPN_MASK = (1 << VPN_BITS) - 1
MM_SHIFT = VPN_SHIFT + VPN_BITS
MAX_MM = 1 << (63 - MM_SHIFT)  # mm ids below this (the sign bit marks a free item)
FREE_MM = -(1 << MM_SHIFT)     # a free item's word: mm -1, address and flags 0
_LOW = (1 << MM_SHIFT) - 1
SMART_AGE_MAX = 0xF            # ``smart``: age in bits 0-3, remaining_skips in 4-7
SMART_SKIPS_SHIFT = 4
RMAP_ITEM_BYTES = 64          # sizeof(struct ksm_rmap_item) on 64-bit: used in profit figures


@njit(cache=True, nogil=True)
def item_mm(word):
    """The id of the item's mm (-1: a free item)."""
    return word >> MM_SHIFT


@njit(cache=True, nogil=True)
def item_vpn(word):
    """The item's virtual page number."""
    return (word >> VPN_SHIFT) & VPN_MASK


@njit(cache=True, nogil=True)
def item_flags(word):
    """The item's flags (SEQNR_MASK, UNSTABLE_FLAG, STABLE_FLAG)."""
    return word & FLAG_BITS


@njit(cache=True, nogil=True)
def with_flags(word, flags):
    """The word with its flags replaced by ``flags``."""
    return (word & ~FLAG_BITS) | flags


@njit(cache=True, nogil=True)
def pack_item(mm, vpn):
    """A fresh item's word: ``mm``'s page ``vpn``, no flags."""
    return (mm << MM_SHIFT) | (vpn << VPN_SHIFT)


@njit(cache=True, nogil=True)
def freed_word(word):
    """The word of an item being freed: mm -1, its address and flags kept."""
    return (word & _LOW) | FREE_MM


def check_item_range(mm_id: int, vpn_end: int) -> None:
    """Refuse an mm or an address the word cannot hold (InputError: one line, exit status 2)."""
    if mm_id >= MAX_MM:
        from guests.errors import InputError
        raise InputError(f"mm {mm_id}: KSM can track at most {MAX_MM} mms in a host's life")
    if vpn_end > VPN_MASK + 1:
        from guests.errors import InputError
        raise InputError(f"page {vpn_end - 1}: above the 47-bit user address space")


class RmapItems(FieldPool):
    _FIELDS = (("mm_address", np.int64, FREE_MM),
               ("oldchecksum", np.uint32, 0), ("smart", np.uint8, 0),
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

    # the word's fields, read and written through the shared helpers above
    def mm_of(self, item: int) -> int:
        return int(item_mm.py_func(self.mm_address[item]))

    def vpn_of(self, item: int) -> int:
        return int(item_vpn.py_func(self.mm_address[item]))

    def flags_of(self, item: int) -> int:
        return int(item_flags.py_func(self.mm_address[item]))

    def set_flags(self, item: int, flags: int) -> None:
        self.mm_address[item] = with_flags.py_func(self.mm_address[item], flags)

    def live(self) -> np.ndarray:
        """The items in use (their mm id is not negative)."""
        return np.flatnonzero(self.mm_address >= 0)

    def mms(self, items: np.ndarray) -> np.ndarray:
        return item_mm.py_func(self.mm_address[items])

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
        self.mm_address[item] = pack_item(mm_id, address)
        return item

    def free(self, item: int) -> None:
        self.mm_address[item] = freed_word(self.mm_address[item])
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
