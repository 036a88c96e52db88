"""fork() and exit() of an address space.

fork copies every VMA. Private pages become shared copy-on-write: both the
parent's and the child's PTEs lose their write bit and the frame gains a
mapping; the child's PTEs start old (not young), as copy_present_pte makes
them. The child VMA is linked into the parent's anon_vmas (``anon_vma.fork``).
mlock is not inherited. Shared anonymous VMAs keep mapping the same shmem
pages, writable. KSM learns of the child through ``KsmHooks.fork``.

exit tears every VMA down; KSM hears of it first (``__mmput`` calls
ksm_exit before exit_mmap) and settles its own bookkeeping lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vmhost.mm.mm import MM
from vmhost.mm.vma import PTE_SWAP, PTE_WRITE, PTE_YOUNG, VmFlags, Vma

if TYPE_CHECKING:
    from vmhost.host import Host

_CLEAR_WRITE = np.uint8(~PTE_WRITE & 0xFF)
_CLEAR_YOUNG = np.uint8(~PTE_YOUNG & 0xFF)


def fork_mm(host: "Host", parent: MM, child_id: int) -> MM:
    child = MM(host, child_id, parent.home_node)
    child.policy = parent.policy
    child.ksm_merge_any = parent.ksm_merge_any
    frames = host.frames
    for pvma in parent.vmas:
        cvma = Vma(child, pvma.start, pvma.end, pvma.flags & ~VmFlags.LOCKED, pvma.pgoff,
                   pvma.policy, pvma.shmem)
        cvma.pte = pvma.pte.copy()
        cvma.ptef = pvma.ptef & _CLEAR_YOUNG
        cvma.pgtable = pvma.pgtable.copy()     # copy_page_range copies page tables as they are
        mapped = pvma.present_mask()
        pfns = pvma.pte[mapped]
        np.add.at(frames.mapcount, pfns, 1)
        np.add.at(frames.refcount, pfns, 1)
        if pvma.shmem is not None:
            pvma.shmem.users += 1
            child.rss_shmem += len(pfns)
        else:
            host.anon_vmas.fork(cvma, pvma)
            pvma.ptef[mapped] &= _CLEAR_WRITE
            cvma.ptef[mapped] &= _CLEAR_WRITE
            child.rss_anon += len(pfns)
            swapped = (pvma.ptef & PTE_SWAP) != 0
            if swapped.any():                     # copy_nonpresent_pte: swap_duplicate
                host.swap.dup_entries(pvma.pte[swapped])
                child.swap_ents += int(swapped.sum())
        child.vmas.append(cvma)
    child._reindex()
    host.ksm.fork(parent, child)
    return child


def exit_mm(host: "Host", mm: MM) -> None:
    mm.exiting = True
    host.ksm.exit(mm)
    for vma in list(mm.vmas):
        mm.unmap_vma(vma)
