"""The mergeable VMAs of every registered mm, where compiled code can reach their page tables.

mm/ksm.c finds an rmap_item's page by ``find_mergeable_vma(mm, address)`` and a page-table
walk. The compiled scan needs the same from any rmap_item (merging two pages touches the
other item's PTE, in another process), so this registry lists, for every mm with an mm_slot
that is not exiting, its VMAs that are VM_MERGEABLE and have an anon_vma (exactly what
find_mergeable_vma accepts), sorted by (mm, start), with their page-table arrays in typed
lists. It is rebuilt whenever ``vmhost.mm.vma.LAYOUT_GEN`` moves (any VMA created, removed,
split, merged, re-flagged, given an anon_vma or new page-table arrays, an mm exiting or a
slot coming or going), so a lookup is never out of date.
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np
from numba import njit, types
from numba.typed import List

from vmhost.mm.vma import LAYOUT_GEN, VmFlags

VmaArrays = namedtuple("VmaArrays", "start end locked anon_vma mm_first mm_count pte ptef")

#: the registry is rebuilt whenever an anon_vma is attached to a VMA, so this bound on live
#: anon_vma ids (for the compiled code's table of reference changes) is kept with it

_PTE_T = types.Array(types.int64, 1, "C")
_PTEF_T = types.Array(types.uint8, 1, "C")


@njit(cache=True, nogil=True)
def find_vma(V, mm, vpn):
    """Registry index of the mergeable VMA of ``mm`` holding ``vpn``, or -1."""
    if mm < 0 or mm >= V.mm_first.shape[0]:
        return -1
    lo = V.mm_first[mm]
    hi = lo + V.mm_count[mm]
    while lo < hi:                                   # first VMA whose end is past vpn
        mid = (lo + hi) >> 1
        if V.end[mid] <= vpn:
            lo = mid + 1
        else:
            hi = mid
    if lo < V.mm_first[mm] + V.mm_count[mm] and V.start[lo] <= vpn:
        return lo
    return -1


class VmaRegistry:
    def __init__(self) -> None:
        self.gen = -1
        self.arrays: VmaArrays | None = None
        self.anon_vma_ids = 1           # every live anon_vma id is below this

    def __getstate__(self) -> dict:
        """A snapshot (pickle, deepcopy) keeps no page-table arrays: they are rebuilt on use."""
        return {"gen": -1, "arrays": None, "anon_vma_ids": 1}

    def current(self, ksm) -> VmaArrays:
        if self.gen != int(LAYOUT_GEN[0]) or self.arrays is None:
            self.arrays = self._build(ksm)
            self.gen = int(LAYOUT_GEN[0])
            self.anon_vma_ids = max(ksm.host.anon_vmas.by_id, default=0) + 1
        return self.arrays

    @staticmethod
    def _build(ksm) -> VmaArrays:
        rows = []
        for mm_id in sorted(ksm.slot_of):
            mm = ksm.slot_of[mm_id].mm
            if mm.exiting:
                continue
            for vma in mm.vmas:
                if vma.flags & VmFlags.MERGEABLE and vma.anon_vma is not None:
                    rows.append((mm_id, vma))
        n_mm = len(ksm.host.pt_epoch)
        mm_first = np.zeros(n_mm, dtype=np.int32)
        mm_count = np.zeros(n_mm, dtype=np.int32)
        pte, ptef = List.empty_list(_PTE_T), List.empty_list(_PTEF_T)
        for i, (mm_id, vma) in enumerate(rows):
            if mm_count[mm_id] == 0:
                mm_first[mm_id] = i
            mm_count[mm_id] += 1
            pte.append(vma.pte)
            ptef.append(vma.ptef)
        return VmaArrays(
            np.array([v.start for _, v in rows], dtype=np.int64),
            np.array([v.end for _, v in rows], dtype=np.int64),
            np.array([bool(v.flags & VmFlags.LOCKED) for _, v in rows], dtype=np.bool_),
            np.array([v.anon_vma.id for _, v in rows], dtype=np.int32),
            mm_first, mm_count, pte, ptef)
