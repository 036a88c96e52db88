"""The mergeable VMAs of every registered mm, where compiled code can reach their page tables.

mm/ksm.c finds an rmap_item's page by ``find_mergeable_vma(mm, address)`` and a page-table
walk. The compiled scan needs the same from any rmap_item (merging two pages touches the
other item's PTE, in another process), so this registry lists, for every mm with an mm_slot
that is not exiting, its VMAs that are VM_MERGEABLE and have an anon_vma (exactly what
find_mergeable_vma accepts), sorted by (mm, start), with the addresses of their page-table
arrays (the registry keeps the arrays alive). It is rebuilt whenever
``vmhost.mm.vma.LAYOUT_GEN`` moves (any VMA created, removed, split, merged, re-flagged, given
an anon_vma or new page-table arrays, an mm exiting or a slot coming or going), so a lookup
is never out of date.
"""

from __future__ import annotations

import numpy as np
from numba import from_dtype, njit, types

from vmhost.ksm import arraygroup
from vmhost.mm.vma import LAYOUT_GEN, PTE_DTYPE, VmFlags


VmaArrays, VmaArraysType = arraygroup.group(
    "VmaArrays", ("start", "end", "locked", "anon_vma", "mm_first", "mm_count", "pte_at",
                  "ptef_at"),
    """The registry as compiled code reads it: per VMA its pages [start, end), VM_LOCKED,
    anon_vma id and the addresses of its page-table arrays (``page_tables``); per mm the
    first and the number of its VMAs.""", __name__)
_pte_view = arraygroup.view(from_dtype(PTE_DTYPE))
_ptef_view = arraygroup.view(types.uint8)


@njit(cache=True, nogil=True, no_cpython_wrapper=True, no_cfunc_wrapper=True)
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


@njit(cache=True, nogil=True, no_cpython_wrapper=True, no_cfunc_wrapper=True)
def page_tables(V, v):
    """The page-table arrays (pte, ptef) of registry VMA ``v``."""
    n = V.end[v] - V.start[v]
    return _pte_view(V.pte_at[v], n), _ptef_view(V.ptef_at[v], n)


class VmaRegistry:
    def __init__(self) -> None:
        self.gen = -1
        self.arrays: VmaArrays | None = None
        self.tables: list = []          # the page-table arrays whose addresses it holds
        self.anon_vma_ids = 1           # every live anon_vma id is below this

    def __getstate__(self) -> dict:
        """A snapshot (pickle, deepcopy) keeps no page-table arrays: they are rebuilt on use."""
        return {"gen": -1, "arrays": None, "tables": [], "anon_vma_ids": 1}

    def current(self, ksm) -> VmaArrays:
        if self.gen != int(LAYOUT_GEN[0]) or self.arrays is None:
            self.arrays, self.tables = self._build(ksm)
            self.gen = int(LAYOUT_GEN[0])
            self.anon_vma_ids = max(ksm.host.anon_vmas.by_id, default=0) + 1
        return self.arrays

    @staticmethod
    def _build(ksm) -> tuple[VmaArrays, list]:
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
        tables = []
        for i, (mm_id, vma) in enumerate(rows):
            if mm_count[mm_id] == 0:
                mm_first[mm_id] = i
            mm_count[mm_id] += 1
            pte, ptef = vma.pte, vma.ptef
            assert (pte.dtype == PTE_DTYPE and ptef.dtype == np.uint8 and pte.flags.c_contiguous
                    and ptef.flags.c_contiguous and len(pte) == len(ptef) == vma.end - vma.start)
            tables += (pte, ptef)
        arrays = VmaArrays(
            np.array([v.start for _, v in rows], dtype=np.int64),
            np.array([v.end for _, v in rows], dtype=np.int64),
            np.array([bool(v.flags & VmFlags.LOCKED) for _, v in rows], dtype=np.bool_),
            np.array([v.anon_vma.id for _, v in rows], dtype=np.int32),
            mm_first, mm_count,
            np.array([t.ctypes.data for t in tables[0::2]], dtype=np.int64),
            np.array([t.ctypes.data for t in tables[1::2]], dtype=np.int64))
        return arrays, tables
