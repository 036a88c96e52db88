"""A hash index from page key to tree node, for lookups that need no tree walk.

Open addressing with linear probing over an int32 slot array; deletions leave
tombstones and the table is rebuilt when it fills up. The node arrays hold
the keys (``key``) and tree numbers (``nid``) the index matches against, so
the index itself stores only node ids. Lookups are compiled so that the scan
loop (``fastscan``) can use them.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from vmhost.ksm.slab import ArrayCell

EMPTY, TOMB = -1, -2
REBUILT_SPARE = 3       # a rebuilt table has at least 3 slots per entry (rebuilt again at half full)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX = np.uint64(0xBF58476D1CE4E5B9)


@njit(cache=True, nogil=True)
def key_mix(key, nid):
    """The 64-bit hash of (key, tree): its high half picks a slot (``slot_of``), and the
    unstable tree's table keeps some of its low half as a tag (``fastscan.hash_tag``)."""
    x = (key ^ np.uint64(nid)) * _GOLDEN
    return (x ^ (x >> np.uint64(29))) * _MIX


@njit(cache=True, nogil=True)
def slot_of(key, nid, mask):
    return np.int64(key_mix(key, nid) >> np.uint64(32)) & mask


@njit(cache=True, nogil=True)
def ki_find(slots, keys, nids, key, nid):
    mask = slots.shape[0] - 1
    h = slot_of(np.uint64(key), np.int64(nid), np.int64(mask))
    while slots[h] != EMPTY:
        t = slots[h]
        if t >= 0 and keys[t] == key and nids[t] == nid:
            return t
        h = (h + 1) & mask
    return EMPTY


@njit(cache=True, nogil=True)
def ki_insert(slots, keys, nids, node):
    mask = slots.shape[0] - 1
    h = slot_of(keys[node], np.int64(nids[node]), np.int64(mask))
    while slots[h] >= 0:
        h = (h + 1) & mask
    reused = slots[h] == TOMB
    slots[h] = node
    return reused


@njit(cache=True, nogil=True)
def _insert_all(slots, keys, nids, nodes):
    for node in nodes:
        ki_insert(slots, keys, nids, np.int64(node))


@njit(cache=True, nogil=True)
def ki_locate(slots, keys, nids, node):
    mask = slots.shape[0] - 1
    h = slot_of(keys[node], np.int64(nids[node]), np.int64(mask))
    while slots[h] != EMPTY:
        if slots[h] == node:
            return h
        h = (h + 1) & mask
    return -1


class KeyIndex:
    """Node ids by (key, tree); ``keys`` and ``nids`` are read from the owner's arrays."""

    def __init__(self, owner, capacity: int = 1024):
        self.owner = owner                      # has .key and .nid arrays
        self.slots = np.full(capacity, EMPTY, dtype=np.int32)
        self.state = np.zeros(2, dtype=np.int64)    # [entries, tombstones]: compiled code inserts too

    count = ArrayCell("state", 0)            # entries
    tombs = ArrayCell("state", 1)            # tombstones

    def needs_rebuild(self) -> bool:
        return 2 * (self.count + self.tombs + 1) > len(self.slots)

    def insert(self, node: int) -> None:
        if self.needs_rebuild():
            self._rebuild(max(len(self.slots), REBUILT_SPARE * (self.count + 1)))
        if ki_insert(self.slots, self.owner.key, self.owner.nid, int(node)):
            self.tombs -= 1
        self.count += 1

    def delete(self, node: int) -> None:
        h = ki_locate(self.slots, self.owner.key, self.owner.nid, int(node))
        assert h >= 0, "node missing from the key index"
        self.slots[h] = TOMB
        self.count -= 1
        self.tombs += 1

    def replace(self, old: int, new: int) -> None:
        """``new`` (same key and tree) takes ``old``'s entry."""
        h = ki_locate(self.slots, self.owner.key, self.owner.nid, int(old))
        assert h >= 0, "node missing from the key index"
        self.slots[h] = new

    def grow(self) -> None:
        """Make room for one more entry (what insert does first), ahead of compiled inserts."""
        self._rebuild(max(len(self.slots), REBUILT_SPARE * (self.count + 1)))

    def _rebuild(self, size: int) -> None:
        live = self.slots[self.slots >= 0]
        self.slots = np.full(1 << (int(size) - 1).bit_length(), EMPTY, dtype=np.int32)
        self.tombs = 0
        _insert_all(self.slots, self.owner.key, self.owner.nid, live)
