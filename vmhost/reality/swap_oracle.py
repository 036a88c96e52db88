"""Swap of KSM pages on this machine's kernel, next to the emulator (``vmhost.mm.swap``).

One process holds ``contents`` distinct values over ``mappings`` pages each (merged by
KSM into ``contents`` KSM pages) plus ``private`` unique pages. Then:

1. ``swap_out``: every page of the process is reclaimed to swap. For real, the process
   lives in its own memory cgroup (v1 here: ``/sys/fs/cgroup/memory``); its limit goes
   to 0 (the kernel reclaims until a pass frees nothing: EBUSY, with the just-merged,
   referenced KSM pages still there), then ``memory.force_empty`` reclaims the rest (a
   KSM page is unmapped from every PTE through its stable node's rmap, written once);
   ``MADV_PAGEOUT`` would not do: it skips pages mapped more than once, i.e. every KSM
   page. In the emulator: ``reclaim_page`` on each page of the process.
2. one KSM pass (``scan_after``): the counters fall one pass after swap-out, not at it;
3. ``swap_in``: the process reads every page; a KSM page read back from swap is mapped by
   its first faulter and copied for every other PTE (``ksm_swpin_copy`` in /proc/vmstat);
4. two KSM passes: the copies are merged again.

After each phase: KSM's counters, pswpout/pswpin/ksm_swpin_copy deltas, how many of the
process's PTEs are swap entries, and the content check.

Safety: a swap file (``/var/tmp``, 64 MiB, made and removed here) and the memory cgroup
are made by a child process that journals them first; the parent (``vmhost.reality.guard``)
swaps the file off and removes it and the cgroup however the child ends, and holds the
real-KSM lock (which also serialises swap and offlining between oracles) throughout. The
swap file is system-wide while it exists (a few seconds): a process elsewhere that
reclaims in that time could use it; nothing is lost by that, swapoff reads its pages back.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from guests.errors import InputError
from vmhost.ksm.trace import Region
from vmhost.reality import guard
from vmhost.reality.hotremove_oracle import KSM_KEYS
from vmhost.reality.ksm_oracle import (OracleError, exclusive_kernel_ksm, mergeable_pids, outcome, read_globals,
                                       read_knob, read_vmstat, spawn_worker, write_knob)

SWAP_MIB = 64
MEMCG_ROOT = Path("/sys/fs/cgroup/memory")
VMSTAT = ("pswpout", "pswpin", "ksm_swpin_copy")
PM_SWAP = 1 << 62
DEFAULT = {"contents": 5, "mappings": 104, "private": 100}
CHILD_TIMEOUT_S = 180.0


def _ksm() -> dict[str, int]:
    g = read_globals()
    return {k: g[k] for k in KSM_KEYS}


def _swapped(pid: int, addr: int, pages: int) -> int:
    with open(f"/proc/{pid}/pagemap", "rb") as fh:
        fh.seek(addr // 4096 * 8)
        ent = np.frombuffer(fh.read(pages * 8), dtype=np.uint64)
    return int(((ent & np.uint64(PM_SWAP)) != 0).sum())


def _scans(n: int) -> None:
    start = int(read_knob("full_scans"))
    write_knob("run", 1)
    end = time.monotonic() + 60
    try:
        while int(read_knob("full_scans")) < start + n:
            if time.monotonic() > end:
                raise OracleError("ksmd did not finish its scans")
            time.sleep(0.001)
    finally:
        write_knob("run", 0)


class _Experiment:
    def __init__(self, journal: guard.Journal, contents: int, mappings: int, private: int,
                 crash_at: str | None):
        self.journal, self.crash_at = journal, crash_at
        self.contents, self.mappings, self.private = contents, mappings, private
        self.phases: list[dict] = []

    def crash(self, where: str):
        if self.crash_at == where:
            os.kill(os.getpid(), signal.SIGKILL)

    def run(self) -> dict:
        swapfile = f"/var/tmp/vmhost-swap-oracle-{os.getpid()}"
        cg = MEMCG_ROOT / f"vmhost-swap-oracle-{os.getpid()}"
        if not (MEMCG_ROOT / "memory.limit_in_bytes").exists():
            raise InputError("swap oracle: no cgroup v1 memory controller at /sys/fs/cgroup/memory")
        self.journal.record("swapfile", path=swapfile)
        with open(swapfile, "wb") as fh:
            os.fchmod(fh.fileno(), 0o600)
            chunk = b"\0" * (1 << 20)
            for _ in range(SWAP_MIB):
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        subprocess.run(["mkswap", swapfile], check=True, capture_output=True)
        r = subprocess.run(["swapon", swapfile], capture_output=True, text=True)
        if r.returncode:
            raise InputError(f"swap oracle: swapon {swapfile}: {r.stderr.strip()}")
        self.crash("after_swapon")
        self.journal.record("cgroup", path=str(cg))
        cg.mkdir()
        (cg / "memory.swappiness").write_text("100")
        n = self.contents * self.mappings
        regions = [Region("ram", n), Region("private", max(self.private, 1))]
        proc = spawn_worker("vm", regions, "vmhost.reality.hotremove_oracle")
        try:
            (cg / "cgroup.procs").write_text(str(proc.pid))
            addrs = proc.call("addrs")
            proc.call("fill", "ram", 0, n, {"cycle": list(range(11, 11 + self.contents))})
            if self.private:
                proc.call("fill", "private", 0, self.private, {"unique": 7})
            proc.call("madvise", "ram", "mergeable", 0, n)
            expected = {"ram": (list(range(n)), [11 + i % self.contents for i in range(n)])}
            base = read_vmstat(*VMSTAT)

            def phase(name, **extra):
                vm = read_vmstat(*VMSTAT)
                self.phases.append({"phase": name, "ksm": _ksm(),
                                    **{k: vm.get(k, 0) - base.get(k, 0) for k in VMSTAT},
                                    "swapped_ptes": _swapped(proc.pid, addrs["ram"], n)
                                    + _swapped(proc.pid, addrs["private"], self.private), **extra})
            _scans(2)
            phase("merged")
            # swap out: the limit goes down to almost nothing, then back up
            usage = int((cg / "memory.usage_in_bytes").read_text())
            err = None
            try:
                # 0: reclaim all it can (KSM pages were just mapped: referenced, so they
                # need a few passes); EBUSY if some charge (page tables) cannot go
                (cg / "memory.limit_in_bytes").write_text("0")
            except OSError as exc:
                err = errno.errorcode.get(exc.errno, str(exc.errno))
            self.crash("after_limit")
            # v1's force_empty keeps reclaiming through passes that free nothing; a KSM page
            # whose PTEs are young is activated first and may need more rounds (8-10+ measured
            # here; each round ages every PTE once more), so up to 60 (about 3 s)
            err2, rounds = None, 0
            while rounds < 60 and _swapped(proc.pid, addrs["ram"], n) < n:
                rounds += 1
                try:
                    (cg / "memory.force_empty").write_text("0")
                    err2 = None
                except OSError as exc:
                    err2 = errno.errorcode.get(exc.errno, str(exc.errno))
                time.sleep(0.05)
            stat = dict(line.split() for line in (cg / "memory.stat").read_text().splitlines())
            (cg / "memory.limit_in_bytes").write_text("-1")
            phase("swap_out", usage_before=usage, limit_write=err or "ok", force_empty=err2 or "ok",
                  reclaim_rounds=rounds,
                  memcg={k: int(stat[k]) // 4096 for k in ("rss", "swap", "active_anon", "inactive_anon")
                         if k in stat})
            _scans(1)
            phase("scan_after")
            bad = proc.call("check", expected)
            phase("swap_in", content_mismatches=bad)
            _scans(2)
            bad = proc.call("check", expected)
            phase("remerged", content_mismatches=bad)
            intruders = [p for p in mergeable_pids() if p != proc.pid]
            if intruders:
                raise OracleError(f"process(es) {intruders[:5]} used KSM during the run (KSM's "
                                  "counters are global); result discarded")
        finally:
            proc.send("exit")
            proc.wait_gone(10)
            proc.close()
        problems = guard.undo([{"kind": "swapfile", "path": swapfile}, {"kind": "cgroup", "path": str(cg)}])
        if problems:
            raise OracleError("; ".join(problems))
        return {"phases": self.phases}


def _run_experiment(journal: guard.Journal, req: dict) -> dict:
    return _Experiment(journal, req["contents"], req["mappings"], req["private"], req.get("crash_at")).run()


def run_real(contents: int = DEFAULT["contents"], mappings: int = DEFAULT["mappings"],
             private: int = DEFAULT["private"], crash_at: str | None = None) -> dict:
    if os.geteuid() != 0:
        raise InputError("swap oracle: must run as root (swapon, memory cgroups)")
    req = {"contents": contents, "mappings": mappings, "private": private, "crash_at": crash_at}
    with exclusive_kernel_ksm():
        return guard.guarded_result("vmhost.reality.swap_oracle", req, CHILD_TIMEOUT_S,
                                    "the swap oracle")


def run_emulator(contents: int = DEFAULT["contents"], mappings: int = DEFAULT["mappings"],
                 private: int = DEFAULT["private"]) -> dict:
    """The same experiment in the emulator (one node, a 64 MiB swap device)."""
    from hw.swap import SwapDevice
    from hw.topology import Topology
    from vmhost.host import Host
    from vmhost.ksm.engine import Ksm
    from vmhost.ksm.ksmd import Ksmd
    from vmhost.ksm.trace import content_ids
    from vmhost.mm import invariants
    from vmhost.mm.vma import PTE_PRESENT, PTE_SWAP, PTE_ZERO

    host = Host(Topology.uniform(1, 256 << 20), block_pages=32768,
                swap=[SwapDevice("swapfile", SWAP_MIB * 256, -2, 500e6, 400e6)])
    ksm = Ksm(host)
    ksmd = Ksmd(ksm, host.clock)
    for k, v in (("pages_to_scan", "1000000"), ("sleep_millisecs", "50")):
        ksm.write_knob(k, v)
    n = contents * mappings
    proc = host.spawn("vm", 0)
    ram = proc.mm.mmap(n, thp=False)
    proc.mm.write(ram.start, content_ids({"cycle": list(range(11, 11 + contents))}, n))
    priv = proc.mm.mmap(max(private, 1), thp=False)
    if private:
        proc.mm.write(priv.start, content_ids({"unique": 7}, private))
    proc.mm.madvise(ram.start, n, "mergeable")
    base = {k: host.vmstat[k] for k in VMSTAT}
    phases = []

    def scans(c):
        ksm.write_knob("run", "1")
        ksmd.run_full_scans(c)
        ksm.write_knob("run", "0")

    def phase(name, **extra):
        swapped = sum(int(((v.ptef & PTE_SWAP) != 0).sum()) for v in proc.mm.vmas)
        phases.append({"phase": name, "ksm": {k: ksm.stats()[k] for k in KSM_KEYS},
                       **{k: host.vmstat[k] - base[k] for k in VMSTAT}, "swapped_ptes": swapped, **extra})
    scans(2)
    phase("merged")
    before = invariants.views(host)
    for vma in proc.mm.vmas:
        present = (vma.ptef & (PTE_PRESENT | PTE_ZERO)) == PTE_PRESENT
        for pfn in np.unique(vma.pte[present]).tolist():
            host.swap.reclaim_page(pfn)
    phase("swap_out")
    scans(1)
    phase("scan_after")
    got = proc.mm.read(ram.start, n)
    bad = int((got != content_ids({"cycle": list(range(11, 11 + contents))}, n)).sum())
    phase("swap_in", content_mismatches=bad)
    scans(2)
    invariants.check(host, before)
    phase("remerged", content_mismatches=bad)
    return {"phases": phases}


COMPARED = ("ksm", "ksm_swpin_copy", "swapped_ptes", "content_mismatches")


def compare(contents: int = DEFAULT["contents"], mappings: int = DEFAULT["mappings"],
            private: int = DEFAULT["private"]) -> dict:
    for attempt in range(3):
        try:
            real = run_real(contents, mappings, private)
            break
        except OracleError as exc:        # another process used KSM meanwhile: again
            if "used KSM during the run" not in str(exc) or attempt == 2:
                raise
    emu = run_emulator(contents, mappings, private)
    rows = []
    for r, e in zip(real["phases"], emu["phases"]):
        diffs = [k for k in COMPARED if k in r and r.get(k) != e.get(k)]
        rows.append({"phase": r["phase"], "real": r, "emulator": e, "agree": not diffs,
                     "differences": diffs})
    return {"contents": contents, "mappings": mappings, "private": private, "phases": rows,
            "agree": all(x["agree"] for x in rows)}


def format_comparison(cmp: dict) -> str:
    lines = [f"swap oracle: {cmp['contents']} KSM pages x {cmp['mappings']} mappings + "
             f"{cmp['private']} private pages; kernel vs emulator"]
    lines.append(f"  {'phase':<11} {'shared/sharing/unshared/volatile':<34} {'pswpout':>15} "
                 f"{'ksm_swpin_copy':>15} {'swapped PTEs':>15}")
    for row in cmp["phases"]:
        r, e = row["real"], row["emulator"]
        lines.append(f"  {row['phase']:<11} {_kl(r['ksm']) + ' | ' + _kl(e['ksm']):<34} "
                     f"{str(r['pswpout']) + ' | ' + str(e['pswpout']):>15} "
                     f"{str(r['ksm_swpin_copy']) + ' | ' + str(e['ksm_swpin_copy']):>15} "
                     f"{str(r['swapped_ptes']) + ' | ' + str(e['swapped_ptes']):>15}"
                     + ("" if row["agree"] else "   DIFFER: " + ", ".join(row["differences"])))
    lines.append("(kernel | emulator) " + ("agree" if cmp["agree"] else "DIFFER"))
    return "\n".join(lines)


def _kl(d):
    return "/".join(str(d[k]) for k in KSM_KEYS)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 3 and args[0] == "--child":
        return guard.child_main(args, _run_experiment)
    as_json = "--json" in args
    cmp, status = outcome("swap oracle", compare)
    if status:
        return status
    print(json.dumps(cmp) if as_json else format_comparison(cmp))
    return 0 if cmp["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
