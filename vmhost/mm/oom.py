"""The OOM killer, and what a failed allocation does before it gives up.

The flow when an allocation fails (installed as ``host.oom_handler`` and run
by the fault code around every fault, see ``fault.retry_fault``):

1. direct reclaim on the nodes the allocation may use (``Reclaim``), asking
   for what was wanted plus the gap to the high watermark; if it freed
   anything, the fault runs again;
2. otherwise (no swap, swap full, nothing evictable) the OOM killer picks a
   victim and kills it: SIGKILL recorded in its ``signals``, its address
   space torn down at once (the oom_reaper's work, done synchronously), its
   swap entries freed; then the fault runs again;
3. if the victim is the faulting process itself, :class:`OomKilled` (an
   ``OutOfMemory``) ends its access; with no killable process left the
   original ``OutOfMemory`` propagates (the kernel would panic).

After 16 failed attempts (MAX_RECLAIM_RETRIES) the fault gives up.

Victim selection follows mm/oom_kill.c (select_bad_process /
oom_evaluate_task / oom_badness):

- a task marked as an OOM origin (``set_current_oom_origin``: the writer of
  ``run=2`` while KSM unmerges, swapoff) is chosen outright;
- otherwise badness = rss (anon + shmem) + swap entries + page-table pages,
  plus oom_score_adj x totalpages/1000 (totalpages = RAM + swap); a task with
  oom_score_adj -1000 is never chosen; ties go to the later task in process
  order (the kernel keeps the last candidate with points >= the best).
- page-table pages are modelled as one PTE page per 2 MiB range holding any
  used PTE, one PMD page per 1 GiB, one PUD page per 512 GiB, plus the PGD.
- the allocation's constraint is always CONSTRAINT_NONE (no cpuset/mempolicy
  narrowing of the candidate set).

Unmerging that runs out of memory: ``write_ksm_run`` is the sysfs write of
``run`` (the writer is an OOM origin while run=2 unmerges, as "ksm: unmerge
is an origin of OOMs" made it); ``madvise`` is the madvise(2) syscall layer:
an unmerge (MADV_UNMERGEABLE) that fails for lack of memory tries reclaim
and the OOM killer like a fault, and reports EAGAIN if it still fails, as
madvise_vma_behavior turns -ENOMEM into -EAGAIN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from vmhost.mm.page_alloc import OutOfMemory

if TYPE_CHECKING:
    from vmhost.host import Host
    from vmhost.mm.mm import MM
    from vmhost.process import Process

OOM_SCORE_ADJ_MIN = -1000
OOM_SCORE_ADJ_MAX = 1000


class OomKilled(OutOfMemory):
    """The process was chosen by the OOM killer while it allocated (SIGKILL)."""

    def __init__(self, pid: int, wanted: int, nodes):
        super().__init__(wanted, nodes)
        self.pid = pid
        self.args = (f"pid {pid} was OOM-killed while allocating {wanted} pages",)


@dataclass
class OomKill:
    pid: int
    name: str
    points: int
    origin: bool
    rss: int
    swap: int
    pgtables: int
    freed_pages: int
    time_ns: int


def pgtable_pages(mm: "MM") -> int:
    """mm_pgtables_bytes / PAGE_SIZE, modelled from the ranges with used PTEs."""
    pte, pmd, pud = set(), set(), set()
    for vma in mm.vmas:
        used = np.flatnonzero(vma.ptef != 0)
        if len(used) == 0:
            continue
        vpn = used + vma.start
        for s, shift in ((pte, 9), (pmd, 18), (pud, 27)):
            s.update(np.unique(vpn >> shift).tolist())
    return len(pte) + len(pmd) + len(pud) + 1


class OomKiller:
    def __init__(self, host: "Host"):
        self.host = host
        self.origins: set[int] = set()          # pids marked with set_current_oom_origin
        self.kills: list[OomKill] = []
        host.oom_handler = self.handle_alloc_failure

    # -- badness ----------------------------------------------------------------------------------
    def totalpages(self) -> int:
        return int(self.host.allocator.managed.sum()) + self.host.swap.total_pages

    def badness(self, proc: "Process", totalpages: int | None = None) -> int | None:
        """oom_badness: None for a task that must not be killed."""
        if proc.oom_score_adj == OOM_SCORE_ADJ_MIN or not proc.alive:
            return None
        total = self.totalpages() if totalpages is None else totalpages
        mm = proc.mm
        points = mm.rss_anon + mm.rss_shmem + mm.swap_ents + pgtable_pages(mm)
        return points + proc.oom_score_adj * (total // 1000)

    def select_victim(self) -> tuple["Process | None", int]:
        """select_bad_process over every process, in process (pid) order."""
        total = self.totalpages()
        chosen, best = None, None
        for pid in sorted(self.host.processes):
            proc = self.host.processes[pid]
            if pid in self.origins:
                return proc, 2**63 - 1               # an OOM origin is chosen outright (before badness)
            points = self.badness(proc, total)
            if points is None or (best is not None and points < best):
                continue
            chosen, best = proc, points
        return chosen, (best if best is not None else 0)

    # -- killing ----------------------------------------------------------------------------------
    def kill(self, proc: "Process", points: int) -> OomKill:
        host = self.host
        mm = proc.mm
        rec = OomKill(proc.pid, proc.name, int(points), proc.pid in self.origins, mm.rss_anon + mm.rss_shmem,
                      mm.swap_ents, pgtable_pages(mm), 0, host.clock.now)
        before = host.allocator.free_pages()
        proc.signals.append("SIGKILL")
        host.exit(proc)
        self.origins.discard(proc.pid)
        rec.freed_pages = host.allocator.free_pages() - before
        host.vmstat["oom_kill"] += 1
        self.kills.append(rec)
        return rec

    def out_of_memory(self) -> OomKill | None:
        """Choose and kill a victim; None when no process may be killed."""
        victim, points = self.select_victim()
        if victim is None:
            return None
        return self.kill(victim, points)

    # -- the allocation-failure path ---------------------------------------------------------------------
    def handle_alloc_failure(self, exc: OutOfMemory, mm: "MM | None", attempt: int = 1) -> bool:
        """Reclaim, else OOM-kill; True when the caller should retry its allocation."""
        host = self.host
        nodes = exc.nodes or list(range(host.topology.node_count))
        gap = sum(max(host.allocator.watermarks[n].high - host.allocator.free_pages(n), 0) for n in nodes)
        if host.reclaim.direct_reclaim(nodes, exc.wanted + gap) > 0:
            return True
        rec = self.out_of_memory()
        if rec is None:
            return False
        if mm is not None and rec.pid == mm.id:
            raise OomKilled(rec.pid, exc.wanted, nodes) from exc
        return True

    # -- system-call layers for unmerging -------------------------------------------------------------
    def write_ksm_run(self, value: str, writer: "Process | None" = None) -> int:
        """echo VALUE > /sys/kernel/mm/ksm/run; run=2 makes the writer an OOM origin while unmerging.

        When unmerging runs out of memory the OOM killer runs with the writer as the
        preferred victim, and the write returns -ENOMEM (run is left at 0).
        """
        ksm = self.host.ksm
        unmerge = str(value).strip() == "2"
        if unmerge and writer is not None:
            self.origins.add(writer.pid)
        self.host.current_task = writer       # whose allocations these are (the writer's)
        try:
            # the unshare faults reclaim and OOM-kill on their own (fault.retry_fault); once
            # the writer is killed the unmerge stops and the write fails
            return ksm.write_knob("run", value)
        finally:
            self.host.current_task = None
            if writer is not None:
                self.origins.discard(writer.pid)
