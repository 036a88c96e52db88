"""Replaying a KSM trace (format v1) in the emulator.

The host is laid out the way the oracle lays out the real one: each trace
process is a process with its regions mapped back to back in ascending order
(THP regions 2 MiB aligned, MADV_HUGEPAGE or MADV_NOHUGEPAGE as asked), and
ksmd starts with pages_to_scan 1,000,000 and sleep_millisecs 50 so that every
wake-up is one full scan, before the trace's own knobs are written. A ``scan``
step runs ksmd on the virtual clock until ``full_scans`` grew by N, or until
nothing moved for as long as the oracle waits before it calls ksmd idle
(nothing registered, or no progress); that wait passes on the clock too. Between
steps ksmd's pending sleep stays pending: the next ``scan`` step's run=1 does
not cut it short, as in the kernel, so time-based rules see ksmd's sleeps.
"""

from __future__ import annotations

import errno as errno_mod

from hw.topology import Topology
from hw.units import PAGE_SIZE, HPAGE_PAGES
from vmhost.clock import NS_PER_MS
from vmhost.host import Host
from vmhost.ksm.engine import Ksm
from vmhost.ksm.ksmd import Ksmd
from vmhost.ksm.trace import (IDLE_MIN_MS, IDLE_PERIODS, PROC_FIELDS, SNAPSHOT_FIELDS, Trace,
                              content_ids)
from vmhost.mm.invariants import check
from vmhost.mm.mm import PROT_NONE, PROT_READ, PROT_WRITE
from vmhost.profile import get_profile

REGION_BASE = 0x7E0000000           # a 2 MiB-aligned virtual page number
ORACLE_KNOBS = (("pages_to_scan", 1_000_000), ("sleep_millisecs", 50))


class Replay:
    def __init__(self, trace: Trace, check_invariants: bool = False):
        self.trace = trace
        self.check_invariants = check_invariants
        pages = max(trace.total_pages(), 1)
        mem = max(4 * pages * PAGE_SIZE, 256 << 20)
        self.host = Host(Topology.uniform(1, mem), block_pages=32768, profile=get_profile(trace.profile))
        self.ksm = Ksm(self.host)
        self.ksmd = Ksmd(self.ksm, self.host.clock)
        self.procs = {}
        self.addrs: dict[str, dict[str, int]] = {}
        self.snapshots: list[dict] = []
        self.errors: list[dict] = []
        self.base = dict(self.host.vmstat)

    def run(self) -> dict:
        for name, value in ORACLE_KNOBS:
            self.ksm.write_knob(name, str(value))
        for name, value in self.trace.knobs:
            rc = self.ksm.write_knob(name, str(value))
            if rc:
                self.errors.append({"step": -1, "knob": name, "errno": errno_mod.errorcode[-rc]})
        for name, regions in self.trace.processes.items():
            self._spawn(name, regions)
        for step in self.trace.steps:
            getattr(self, f"_{step.kind}")(step.index, **step.args)
            if self.check_invariants:
                check(self.host)
        return {"version": 1, "engine": "emulator", "profile": self.trace.profile,
                "snapshots": self.snapshots, "errors": self.errors}

    # -- set-up ------------------------------------------------------------------------------
    def _spawn(self, name: str, regions) -> None:
        proc = self.host.spawn(name)
        addrs, at = {}, REGION_BASE
        for r in regions:
            if r.thp:
                at = -(-at // HPAGE_PAGES) * HPAGE_PAGES
            prot = PROT_NONE if r.prot == "none" else PROT_READ | PROT_WRITE
            proc.mm.mmap(r.pages, prot=prot, shared=r.shared, thp=bool(r.thp), at=at)
            addrs[r.name] = at
            at += r.pages
        self.procs[name] = proc
        self.addrs[name] = addrs

    # -- steps -------------------------------------------------------------------------------
    def _fill(self, i, proc, region, start, count, content):
        p = self.procs[proc]
        p.mm.write(self.addrs[proc][region] + start, content_ids(content, count), force=True)

    def _madvise(self, i, proc, region, advice, start, count):
        rc = self.procs[proc].mm.madvise(self.addrs[proc][region] + start, count, advice)
        if rc:
            self.errors.append({"step": i, "madvise": advice, "errno": errno_mod.errorcode[-rc]})

    def _prctl(self, i, proc, merge):
        rc = self.ksm.prctl_set_memory_merge(self.procs[proc].mm, bool(merge))
        if rc:
            self.errors.append({"step": i, "prctl": merge, "errno": errno_mod.errorcode[-rc]})

    def _knob(self, i, **writes):
        for name, value in writes.items():
            rc = self.ksm.write_knob(name, str(value))
            if rc:
                self.errors.append({"step": i, "knob": name, "errno": errno_mod.errorcode[-rc]})

    def _fork(self, i, proc, child):
        self.procs[child] = self.host.fork(self.procs[proc], child)
        self.addrs[child] = self.addrs[proc]

    def _exit(self, i, proc):
        self.host.exit(self.procs.pop(proc))

    def _scan(self, i, count):
        ksm, clock = self.ksm, self.host.clock
        target = ksm.seqnr + count
        idle_ns = max(IDLE_PERIODS * ksm.knobs.sleep_millisecs, IDLE_MIN_MS) * NS_PER_MS
        last, last_move = (ksm.seqnr, ksm.c.pages_scanned), clock.now
        ksm.write_knob("run", "1")
        while ksm.seqnr < target:
            # the oracle's rule: give up once nothing moved for idle_ns (ksmd waits for
            # work, or makes no progress), and that much time passes
            nxt = clock.next_time()
            if nxt is None or nxt > last_move + idle_ns:
                clock.run_until(last_move + idle_ns)
                break
            clock.step()
            seen = (ksm.seqnr, ksm.c.pages_scanned)
            if seen != last:
                last, last_move = seen, clock.now
        ksm.write_knob("run", "0")
        self._snapshot(i)

    def _snapshot(self, i):
        stats = self.ksm.stats()
        snap = {"step": i}
        for f in SNAPSHOT_FIELDS:
            if f in ("cow_ksm", "ksm_swpin_copy"):
                snap[f] = self.host.vmstat[f] - self.base.get(f, 0)
            else:
                snap[f] = stats[f]
        snap["procs"] = {name: {f: self.ksm.ksm_stat(p.mm)[f] for f in PROC_FIELDS}
                         for name, p in self.procs.items()}
        self.snapshots.append(snap)


def replay(trace: Trace, check_invariants: bool = False) -> dict:
    """Run ``trace`` in the emulator; the result has the oracle's shape (engine "emulator")."""
    return Replay(trace, check_invariants).run()
