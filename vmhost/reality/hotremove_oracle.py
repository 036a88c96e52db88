"""The hot-remove oracle: a scenario's offline done by this machine's kernel, next to the emulator.

``vmhost hotremove SCENARIO --oracle`` runs a scenario (``vmhost.hotremove``) twice: in
the emulator, and for real -- its process as a real process whose pages sit in a real
128 MiB memory block, KSM merging them, the block offlined through
``/sys/devices/system/memory/memoryN/state`` and timed -- and compares the two offline
by offline: outcome and errno, pages migrated (KSM and ordinary), KSM counters before
and after, whether every mapping of a KSM page still maps a KSM page, content, what
``run`` read during the offline and how long a writer of ``run`` waited, and time.

Placing pages in a chosen block. User pages land wherever the page allocator finds
them, and on a busy machine every ZONE_NORMAL block also holds other processes' pages.
So the oracle takes a block whose every page is free (``/proc/kpageflags``: all buddy),
offlines it and onlines it again as ZONE_MOVABLE, which movable (user) allocations try
first; the scenario's process then faults in the pages the scenario writes (they come
from that block), and at once the hugetlb pool grows by a block's worth of huge pages,
which takes every whole free 2 MiB chunk left in the block within a millisecond (pool
pages are not zeroed): from then on hardly anyone else can allocate there. Offlining
dissolves free pool pages without migrating them; the pool is put back afterwards.
Pages of other processes that still reach the block (the remains of partly used chunks,
pages freed by merging) are counted right before the offline (``foreign``: mapped or LRU
pages in the block that are not the scenario's) and the emulator is given as many
ordinary pages of another process in the same block, so migrations and time compare
like with like; the scenario's own migrations are counted exactly, with
``/proc/PID/pagemap`` before and after. A run whose block caught more than
``FOREIGN_RETRY`` foreign pages is redone.

A pin. A long-term pin (``pinned:``; io_uring's registered buffers, FOLL_LONGTERM) would
first migrate its page out of ZONE_MOVABLE, so the oracle holds the scenario's pinned
pages with ``vmsplice`` into a pipe instead: a plain reference, which makes migration
fail with -EAGAIN in the same way. The kernel retries it until the writer of ``state``
gets a signal (the step's ``signal_after``): EINTR.

Safety. Everything that touches real blocks runs in a child process
(``vmhost.reality.guard``): it journals each block (and its zone) before changing it,
and the parent -- which holds the real-KSM lock for the whole run and restores KSM's
knobs -- puts every journalled block back online in its zone however the child ended.
Only blocks whose every page is free are chosen; when none is, the oracle refuses in
one line.

What a scenario may hold for the oracle: one process with pages (no NUMA policy, no
THP, no shared mappings), ``ksm_scans``, ``ksm`` knob writes, ``write`` and ``offline``
steps whose target is ``pages_of`` (that process; its written pages must fit in a
block) or ``empty``; host and KSM sections as the emulator reads them (a block size
equal to this machine's). Anything else is refused in one line.
"""

from __future__ import annotations

import ctypes
import errno
import os
import pickle
import signal
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

from guests.errors import InputError
from vmhost.ksm.trace import PAGE_SIZE, Region, content_ids
from vmhost.reality import guard
from vmhost.reality.ksm_oracle import (MADV, OracleError, WorkerHandle, exclusive_kernel_ksm, libc,
                                       mergeable_pids, read_globals, read_knob, read_vmstat, serve_worker,
                                       spawn_worker, write_knob)

KSM_KEYS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile")
STEPPING = ("run", "pages_to_scan", "sleep_millisecs")
CHILD_TIMEOUT_S = 240.0
FOREIGN_RETRY = 512                 # a run whose block caught more foreign pages is redone...
MAX_ATTEMPTS = 3                    # ... up to this many times per run wanted
POLL_S = 0.001
SCAN_TIMEOUT_S = 60.0

SPLICE_F_NONBLOCK = 2
F_SETPIPE_SZ = 1031


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


libc.vmsplice.argtypes = (ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.c_uint)
libc.vmsplice.restype = ctypes.c_ssize_t


# --------------------------------------------------------------------------------------------
# what the oracle can run

def check_scenario(scn) -> tuple[object | None, dict[str, list[int]]]:
    """The scenario's one process with pages (or None) and, per region, the pages it writes.

    Raises InputError (one line) for anything the oracle cannot do for real."""
    path = scn.path
    bp = guard.block_pages()
    if scn.config.block_pages != bp:
        raise InputError(f"{path}: host.block_size: the oracle needs this machine's block size "
                         f"({bp * PAGE_SIZE >> 20} MiB)")
    if scn.kernel_pages:
        raise InputError(f"{path}: kernel_pages: the oracle cannot make unmovable kernel allocations")
    procs = [p for p in scn.procs if p.regions]
    if len(procs) > 1:
        raise InputError(f"{path}: processes: the oracle places one process's pages in a block; "
                         f"this scenario has {len(procs)}")
    proc = procs[0] if procs else None
    written: dict[str, list[int]] = {}
    if proc is not None:
        if proc.policy is not None:
            raise InputError(f"{path}: processes.{proc.name}.policy: not supported by the oracle")
        for r in proc.regions:
            if r.thp:
                raise InputError(f"{path}: processes.{proc.name}: region {r.name}: thp is not "
                                 "supported by the oracle")
            mask = np.zeros(r.pages, dtype=bool)
            for start, count, _ in r.fills:
                mask[start:start + count] = True
            for start, count in r.pinned:
                mask[start:start + count] = True
            written[r.name] = np.flatnonzero(mask).tolist()
        for s in scn.steps:
            if s.kind == "write":
                mask = np.zeros(next(r.pages for r in proc.regions if r.name == s.args["region"]), bool)
                mask[written[s.args["region"]]] = True
                mask[s.args["start"]:s.args["start"] + s.args["count"]] = True
                written[s.args["region"]] = np.flatnonzero(mask).tolist()
        total = sum(len(v) for v in written.values())
        if total > bp - 1024:
            raise InputError(f"{path}: processes.{proc.name}: {total} pages written; the oracle "
                             f"fits at most {bp - 1024} in one block")
    for s in scn.steps:
        key = f"{path}: timeline[{s.index}].{s.kind}"
        if s.kind not in ("ksm_scans", "ksm", "write", "offline"):
            raise InputError(f"{key}: not supported by the oracle (ksm_scans, ksm, write, offline)")
        if s.kind == "offline" and not ("empty" in s.args or "pages_of" in s.args):
            raise InputError(f"{key}: the oracle offlines {{pages_of: PROC}} or {{empty: true}}")
        if s.kind == "offline" and "pages_of" in s.args and (proc is None or s.args["pages_of"] != proc.name):
            raise InputError(f"{key}.pages_of: {s.args['pages_of']!r} has no pages")
        if s.kind == "ksm" and any(k in STEPPING[1:] for k, _ in s.args):
            raise InputError(f"{key}: the oracle owns pages_to_scan and sleep_millisecs")
    for name, _ in scn.config.ksm:
        if name not in STEPPING and name not in ("max_page_sharing", "use_zero_pages",
                                                  "merge_across_nodes", "smart_scan"):
            raise InputError(f"{path}: ksm.{name}: not supported by the oracle")
    return proc, written


# --------------------------------------------------------------------------------------------
# the scenario's process (a fresh interpreter obeying commands on a socket)

class _Worker:
    def __init__(self, sock: socket.socket, regions: list[Region], addrs: dict[str, int]):
        self.sock, self.regions, self.addrs = sock, {r.name: r for r in regions}, addrs
        self.pipes: list[tuple[int, int]] = []

    def run(self):
        while True:
            msg = self.sock.recv(1 << 20)
            if not msg:
                os._exit(0)
            cmd, *args = pickle.loads(msg)
            if cmd == "exit":
                os._exit(0)
            try:
                reply = ("ok", getattr(self, "do_" + cmd)(*args))
            except Exception as exc:  # reported to the oracle, which fails the run
                reply = ("fail", f"{cmd}: {exc!r}")
            self.sock.send(pickle.dumps(reply))

    def do_addrs(self):
        return self.addrs

    def do_touch(self, region, offsets):
        """Write fault each listed page of ``region`` (placeholder content, distinct per page)."""
        n = self.regions[region].pages
        words = np.frombuffer((ctypes.c_uint64 * (n * 512)).from_address(self.addrs[region]),
                              dtype=np.uint64).reshape(n, 512)
        offs = np.asarray(offsets, dtype=np.int64)
        words[offs, 0] = offs.astype(np.uint64) + np.uint64(0x5A5A << 32)
        return len(offs)

    def do_fill(self, region, start, count, content):
        addr = self.addrs[region] + start * PAGE_SIZE
        words = np.frombuffer((ctypes.c_uint64 * (count * 512)).from_address(addr), dtype=np.uint64)
        words.reshape(count, 512)[:] = content_ids(content, count)[:, None]

    def do_madvise(self, region, advice, start, count):
        rc = libc.madvise(self.addrs[region] + start * PAGE_SIZE, count * PAGE_SIZE, MADV[advice])
        return errno.errorcode.get(ctypes.get_errno(), "?") if rc else None

    def do_pin(self, region, start, count):
        """Hold a reference on each page: vmsplice it into a pipe nobody reads."""
        r, w = os.pipe()
        size = 1 << max(16, (count * PAGE_SIZE - 1).bit_length())
        import fcntl
        fcntl.fcntl(w, F_SETPIPE_SZ, size)
        self.pipes.append((r, w))
        for i in range(count):
            iov = _Iovec(self.addrs[region] + (start + i) * PAGE_SIZE, PAGE_SIZE)
            if libc.vmsplice(w, ctypes.byref(iov), 1, SPLICE_F_NONBLOCK) != PAGE_SIZE:
                raise OSError(ctypes.get_errno(), "vmsplice")
        return count

    def do_unpin(self):
        for r, w in self.pipes:
            os.close(r)
            os.close(w)
        self.pipes = []

    def do_check(self, expected):
        """Pages (region, index) whose content differs from ``expected`` {region: (idx, ids)}."""
        bad = 0
        for region, (idx, ids) in expected.items():
            n = self.regions[region].pages
            words = np.frombuffer((ctypes.c_uint64 * (n * 512)).from_address(self.addrs[region]),
                                  dtype=np.uint64).reshape(n, 512)
            idx = np.asarray(idx, dtype=np.int64)
            got = words[idx]
            bad += int((got != np.asarray(ids, dtype=np.uint64)[:, None]).any(axis=1).sum())
        return bad


# --------------------------------------------------------------------------------------------
# the child: one run of the scenario on real blocks

def _ksm() -> dict[str, int]:
    g = read_globals()
    return {k: g[k] for k in KSM_KEYS}


class _Case:
    def __init__(self, scn, journal: guard.Journal, crash_at: str | None):
        self.scn, self.journal, self.crash_at = scn, journal, crash_at
        self.proc_spec, self.written = check_scenario(scn)
        self.bp = guard.block_pages()
        self.proc: WorkerHandle | None = None
        self.addrs: dict[str, int] = {}
        self.block: int | None = None
        self.zone0 = ""
        self.expected: dict[str, np.ndarray] = {}       # region -> content id per page
        self.steps: list[dict] = []
        self.placement: dict = {}

    def crash(self, where: str):
        if self.crash_at == where:
            os.kill(os.getpid(), signal.SIGKILL)

    # -- setup ------------------------------------------------------------------------------
    def run(self) -> dict:
        for name, value in self.scn.config.ksm:
            if name not in STEPPING:
                err = write_knob(name, value)
                if err:
                    raise OracleError(f"ksm.{name}={value}: {err}")
        try:
            if self.proc_spec is not None:
                self.setup()
            for step in self.scn.steps:
                self.steps.append(getattr(self, "step_" + step.kind)(step))
        finally:
            if self.proc is not None:
                try:
                    self.proc.send("exit")
                    self.proc.wait_gone(10)
                finally:
                    self.proc.close()
            if self.block is not None:
                problem = guard.restore_block(self.block, self.zone0)
                if problem:
                    raise OracleError(problem)
        return {"placement": self.placement, "steps": self.steps}

    def setup(self):
        spec = self.proc_spec
        regions = [Region(r.name, r.pages) for r in spec.regions]
        self.proc = spawn_worker(spec.name, regions, "vmhost.reality.hotremove_oracle")   # before the block turns movable: its heap goes elsewhere
        self.addrs = self.proc.call("addrs")
        for block in guard.free_blocks(("DMA32", "Normal")):
            if self._prepare_block(block):
                break
        else:
            raise InputError("hotremove oracle: no free memory block can be offlined and put in "
                             "ZONE_MOVABLE on this machine now")
        self.crash("after_movable")
        # the scenario's pages first (they come from the block: ZONE_MOVABLE is tried
        # first), then huge pages for the hugetlb pool fill the rest of it at once (pool
        # pages are not zeroed, so this takes a millisecond): nobody else can allocate
        # there any more. Offlining dissolves free pool pages without migrating them.
        for reg in spec.regions:
            self.proc.call("touch", reg.name, self.written[reg.name])
        hp = Path("/proc/sys/vm/nr_hugepages")
        old = hp.read_text().strip()
        self.journal.record("sysctl", path=str(hp), value=old)
        hp.write_text(str(int(old) + self.bp // 512))
        need = sum(len(v) for v in self.written.values())
        self.placement = {"block": self.block, "zone": self.zone0, "pages_written": need,
                          "hugetlb_pool_added": int(hp.read_text()) - int(old)}
        inb = self.pages_in_block()
        self.placement.update(placed_in_block=inb["ours"], free_after_fill=inb["free"],
                              foreign_after_fill=inb["foreign"])
        if inb["ours"] < need:
            raise OracleError(f"only {inb['ours']} of the scenario's {need} pages landed in block "
                              f"{self.block}")
        for reg in spec.regions:
            self.expected[reg.name] = np.zeros(reg.pages, dtype=np.uint64)
            for start, count, content in reg.fills:
                self.fill(reg.name, start, count, content)
            if reg.mergeable:
                err = self.proc.call("madvise", reg.name, "mergeable", 0, reg.pages)
                if err:
                    raise OracleError(f"madvise mergeable {reg.name}: {err}")
        for reg in spec.regions:
            for start, count in reg.pinned:
                self.proc.call("pin", reg.name, start, count)

    def _prepare_block(self, block: int) -> bool:
        zone = guard.block_zones(block)
        self.journal.record("block", block=block, zone=zone)
        err, _ = guard.write_state(block, "offline")
        if err:
            return False
        self.block, self.zone0 = block, zone
        err, _ = guard.write_state(block, "online_movable")
        if err:
            raise OracleError(f"memory block {block}: online_movable: {err}")
        return True

    def fill(self, region, start, count, content):
        self.proc.call("fill", region, start, count, content)
        self.expected[region][start:start + count] = content_ids(content, count)

    # -- what the block holds ---------------------------------------------------------------
    def our_pfns(self) -> dict[str, np.ndarray]:
        return {r.name: guard.pagemap(self.proc.pid, self.addrs[r.name], r.pages) for r in self.proc_spec.regions}

    def pages_in_block(self, allp: np.ndarray | None = None) -> dict:
        """Pages of the block: ours (KSM, ordinary), foreign (other processes' LRU pages), free."""
        b, bp = self.block, self.bp
        if allp is None:
            allp = np.concatenate(list(self.our_pfns().values()))
        allp = allp[allp >= 0]
        flags = guard.kpageflags(b * bp, bp)
        ours_in = np.unique(allp[allp // bp == b])
        is_ours = np.zeros(bp, dtype=bool)
        is_ours[ours_in - b * bp] = True
        ksm = (flags & np.uint64(guard.KPF_KSM)) != 0
        free = (flags & np.uint64(guard.KPF_BUDDY)) != 0
        anon = (flags & np.uint64(guard.KPF_ANON)) != 0
        used = (flags & np.uint64(guard.KPF_LRU | guard.KPF_ANON | guard.KPF_MMAP)) != 0
        used &= (flags & np.uint64(guard.KPF_HUGE)) == 0
        return {"ours": int(is_ours.sum()), "ksm": int((is_ours & ksm).sum()),
                "ordinary": int((is_ours & ~ksm).sum()), "foreign": int((used & ~is_ours).sum()),
                "foreign_anon": int((used & anon & ~is_ours).sum()), "free": int(free.sum()),
                "hugetlb": int(((flags & np.uint64(guard.KPF_HUGE)) != 0).sum())}

    def ksm_mappings(self) -> dict:
        """Mapped pages of the scenario that map a KSM page, and the distinct KSM pages."""
        pf = np.concatenate(list(self.our_pfns().values()))
        pf = pf[pf >= 0]
        with open("/proc/kpageflags", "rb") as fh:
            flags = np.array([int.from_bytes((fh.seek(p * 8), fh.read(8))[1], "little") for p in pf.tolist()],
                             dtype=np.uint64)
        k = (flags & np.uint64(guard.KPF_KSM)) != 0
        return {"ksm_mappings": int(k.sum()), "ksm_pages": int(len(np.unique(pf[k])))}

    # -- steps --------------------------------------------------------------------------------
    def step_ksm(self, step):
        return {"step": step.index, "kind": "ksm",
                "writes": [{"knob": k, "value": v, "rc": write_knob(k, v) or "ok"} for k, v in step.args]}

    def step_write(self, step):
        a = step.args
        self.fill(a["region"], a["start"], a["count"], a["content"])
        return {"step": step.index, "kind": "write"}

    def step_ksm_scans(self, step):
        start = int(read_knob("full_scans"))
        was = read_knob("run")
        write_knob("run", 1)
        end = time.monotonic() + SCAN_TIMEOUT_S
        try:
            while int(read_knob("full_scans")) < start + step.args:
                if time.monotonic() > end:
                    raise OracleError(f"step {step.index}: ksmd did not finish {step.args} scans")
                time.sleep(POLL_S)
        finally:
            if was != "1":
                write_knob("run", was)
        return {"step": step.index, "kind": "ksm_scans", "ksm": _ksm()}

    def step_offline(self, step):
        a = step.args
        out = {"step": step.index, "kind": "offline"}
        if "empty" in a:
            cands = [b for b in guard.free_blocks(("DMA32", "Normal")) if b != self.block]
            if not cands:
                raise InputError("hotremove oracle: no free memory block to offline now")
            b = cands[-1]
            self.journal.record("block", block=b, zone=guard.block_zones(b))
            err, dt = guard.write_state(b, "offline")
            self.crash("after_offline")
            out.update(block=b, ok=err is None, errno=err, time_ms=round(dt * 1e3, 3),
                       pages_migrated=0, state_after=guard.block_state(b))
            guard.write_state(b, "online")
            return out
        b = self.block
        before_map = self.ksm_mappings()
        ksm_before = _ksm()
        before_in = self.pages_in_block()
        vm0 = read_vmstat("pgmigrate_success", "pgmigrate_fail")
        probe = _Probe(a.get("run_write_after"), a.get("signal_after"))
        probe.start()
        err, dt = guard.write_state(b, "offline")
        probe.done()
        self.crash("after_offline")
        vm1 = read_vmstat("pgmigrate_success", "pgmigrate_fail")
        state = guard.block_state(b)
        migrated = vm1["pgmigrate_success"] - vm0["pgmigrate_success"]
        after_map = self.ksm_mappings()
        after_in = self.pages_in_block()
        bad = self.proc.call("check", {r: (self.written[r], e[self.written[r]].tolist())
                                       for r, e in self.expected.items()})
        if state == "online":
            self.proc.call("unpin")
        intruders = [p for p in mergeable_pids() if p != self.proc.pid]
        out.update(block=b, ok=err is None, errno=err, time_ms=round(dt * 1e3, 3),
                   state_after=state, pgmigrate_success=migrated, intruders=intruders,
                   foreign_pages=before_in["foreign"], block_before=before_in,
                   pages_migrated=before_in["ours"] - after_in["ours"],
                   ksm_pages_in_block=before_in["ksm"], ordinary_pages_in_block=before_in["ordinary"],
                   ksm_before=ksm_before, ksm_after=_ksm(), mappings_before=before_map,
                   mappings_after=after_map, content_mismatches=bad, **probe.result())
        return out


class _Probe:
    """During an offline: read KSM's run, start another writer of run, signal the writer."""

    def __init__(self, run_write_after_ns: int | None, signal_after_ns: int | None):
        self.rwa = None if run_write_after_ns is None else run_write_after_ns / 1e9
        self.sig = None if signal_after_ns is None else signal_after_ns / 1e9
        self.main = threading.get_ident()
        self.run_during = None
        self.writer_start = self.writer_end = None
        self.writer_rc = None
        self.t_signal = None
        self.threads: list[threading.Thread] = []
        self.t0 = self.t_end = 0.0
        self.stop = threading.Event()

    def start(self):
        signal.signal(signal.SIGUSR1, lambda *a: None)
        self.t0 = time.perf_counter()
        if self.rwa is not None or self.sig is not None:
            t = threading.Thread(target=self._timer, daemon=True)
            t.start()
            self.threads.append(t)

    def _timer(self):
        if self.rwa is not None:
            if self.stop.wait(self.rwa):
                return
            self.run_during = int(read_knob("run"))
            w = threading.Thread(target=self._writer, daemon=True)
            w.start()
            self.threads.append(w)
        if self.sig is not None:
            left = self.t0 + self.sig - time.perf_counter()
            if left > 0 and self.stop.wait(left):
                return
            self.t_signal = time.perf_counter()
            signal.pthread_kill(self.main, signal.SIGUSR1)

    def _writer(self):
        value = str(self.run_during & 3)
        self.writer_start = time.perf_counter()
        self.writer_rc = write_knob("run", value) or "ok"
        self.writer_end = time.perf_counter()

    def done(self):
        self.t_end = time.perf_counter()
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def result(self) -> dict:
        out = {"run_during": self.run_during}
        if self.writer_start is not None:
            out["run_write_wait_ms"] = round((self.writer_end - self.writer_start) * 1e3, 3)
            out["run_write_rc"] = self.writer_rc
            out["run_write_ended_after_offline_ms"] = round((self.writer_end - self.t_end) * 1e3, 3)
        if self.t_signal is not None:
            out["signal_to_return_ms"] = round((self.t_end - self.t_signal) * 1e3, 3)
        return out


def _run_case(journal: guard.Journal, req: dict) -> dict:
    from vmhost.hotremove import load_scenario
    return _Case(load_scenario(req["scenario"]), journal, req.get("crash_at")).run()


# --------------------------------------------------------------------------------------------
# the parent: lock, child, restore; then the emulator and the comparison

def run_real(path: str, crash_at: str | None = None) -> dict:
    """One real run of the scenario at ``path`` (root; holds the real-KSM lock)."""
    return run_real_many(path, 1, crash_at)[0]


def run_real_many(path: str, count: int, crash_at: str | None = None, retry_foreign: bool = False
                  ) -> list[dict]:
    """``count`` real runs, one after the other, holding the real-KSM lock across all of them.

    With ``retry_foreign``, a run whose block caught more than ``FOREIGN_RETRY`` pages of
    other processes is done again (at most ``MAX_ATTEMPTS`` times per run kept)."""
    if os.geteuid() != 0:
        raise InputError("hotremove oracle: must run as root (it offlines memory blocks)")
    out, attempts = [], 0
    with exclusive_kernel_ksm():
        while len(out) < count:
            attempts += 1
            r = _one_real(path, crash_at)
            offl = [x for x in r["steps"] if x["kind"] == "offline"]
            foreign = max([x.get("foreign_pages", 0) for x in offl] or [0])
            intruded = any(x.get("intruders") for x in offl)   # KSM's counters are not ours alone
            if retry_foreign and (foreign > FOREIGN_RETRY or intruded) and attempts < count * MAX_ATTEMPTS:
                continue
            if intruded:
                raise OracleError(f"process(es) {offl[0]['intruders'][:5]} used KSM during the run "
                                  "(KSM's counters are global); result discarded")
            r["attempt"] = attempts
            out.append(r)
    return out


def _one_real(path: str, crash_at: str | None) -> dict:
    return guard.guarded_result(
        "vmhost.reality.hotremove_oracle", {"scenario": str(Path(path).resolve()), "crash_at": crash_at},
        CHILD_TIMEOUT_S, "the oracle")


FOREIGN = "(other processes)"


def run_emulator(path: str, foreign: int = 0) -> dict:
    """The scenario in the emulator; ``foreign`` ordinary pages of another process share the
    block with the scenario's (what the real block held besides the scenario's pages)."""
    from vmhost.hotremove import ProcSpec, RegionSpec, Runner, load_scenario
    scn = load_scenario(path)
    if foreign:
        scn.procs.append(ProcSpec(FOREIGN, regions=[RegionSpec("anon", foreign,
                                                               fills=[(0, foreign, {"unique": 0xF0})])]))
    return Runner(scn).run()


def _emu_offlines(emu: dict) -> dict[int, dict]:
    out = {}
    for s in emu["steps"]:
        if s["kind"] == "offline":
            out[s["step"]] = s["blocks"][0] if s["blocks"] else None
    return out


def compare(path: str, repeat: int = 3) -> dict:
    """Run the scenario ``repeat`` times for real and once in the emulator; compare offlines."""
    from vmhost.hotremove import load_scenario
    check_scenario(load_scenario(path))
    real = run_real_many(path, repeat, retry_foreign=True)
    attempts = real[-1]["attempt"]
    emus = []
    for r in real:
        foreign = max([x.get("foreign_pages", 0) for x in r["steps"] if x["kind"] == "offline"] or [0])
        emus.append(run_emulator(path, foreign))
    rows = []
    for s in real[0]["steps"]:
        if s["kind"] != "offline":
            continue
        runs = [next(x for x in r["steps"] if x["step"] == s["step"]) for r in real]
        es = [_emu_offlines(e).get(s["step"]) for e in emus]
        rows.append(_compare_one(s["step"], runs, es, all(e["content_unchanged"] for e in emus)))
    return {"scenario": str(path), "repeat": repeat, "attempts": attempts, "offlines": rows,
            "agree": all(r["agree"] for r in rows), "real": real, "emulator": emus}


def _compare_one(step: int, runs: list[dict], es: list[dict | None], emu_content_ok: bool) -> dict:
    """One offline: the real runs against the emulator runs (one per real run, each given
    the foreign pages that run's block held)."""
    k = runs[0]
    if any(e is None for e in es):
        return {"step": step, "agree": False, "differences": ["the emulator did not offline"],
                "real": None, "emulator": None}
    e = es[0]
    times = [r["time_ms"] for r in runs]
    etimes = [x["time_ms"] for x in es]
    real = {"outcome": "ok" if k["ok"] else k["errno"],
            "pages_migrated": [r.get("pages_migrated") for r in runs],
            "ksm_pages_migrated": k.get("ksm_pages_in_block", 0) if k["ok"] else None,
            "ksm_before": k.get("ksm_before"), "ksm_after": k.get("ksm_after"),
            "content_ok": all(r.get("content_mismatches", 0) == 0 for r in runs),
            "ksm_mappings_kept": (k["mappings_after"] == k["mappings_before"]) if "mappings_after" in k else None,
            "run_during": k.get("run_during"),
            "run_writer_waited_to_end": (None if "run_write_wait_ms" not in k else
                                         all(abs(r["run_write_ended_after_offline_ms"]) < 50 for r in runs)),
            "foreign_pages": [r.get("foreign_pages", 0) for r in runs],
            "time_ms": {"mean": round(statistics.mean(times), 3), "min": min(times), "max": max(times)}}
    emu = {"outcome": "ok" if e["ok"] else e["errno"],
           "pages_migrated": [x["pages_migrated"] - f for x, f in zip(es, real["foreign_pages"])],
           "ksm_pages_migrated": e["ksm_pages_migrated"] if e["ok"] else None,
           "ksm_before": {x: e["ksm_before"][x] for x in KSM_KEYS} if e["ksm_before"] else None,
           "ksm_after": {x: e["ksm_after"][x] for x in KSM_KEYS} if e["ksm_after"] else None,
           "content_ok": emu_content_ok, "run_during": e.get("run_during"),
           "run_writer_waited_to_end": None if e.get("run_write_wait_ms") is None else True,
           "time_ms": {"mean": round(statistics.mean(etimes), 3), "min": min(etimes), "max": max(etimes)}}
    diffs = [key for key in ("outcome", "ksm_pages_migrated", "content_ok",
                             "run_writer_waited_to_end", "pages_migrated") if real[key] != emu[key]]
    if real["run_during"] is not None and real["run_during"] != emu["run_during"]:
        diffs.append("run_during")     # (read by the oracle only when a run writer is asked for)
    if k.get("ksm_before") is not None:
        diffs += [key for key in ("ksm_before", "ksm_after") if real[key] != emu[key]]
    if real["ksm_mappings_kept"] is False:
        diffs.append("ksm_mappings_kept")
    rt, et = real["time_ms"]["mean"], emu["time_ms"]["mean"]
    ratio = et / rt if rt else float("inf")
    if not 0.5 <= ratio <= 2.0:
        diffs.append("time")
    return {"step": step, "real": real, "emulator": emu, "time_ratio": round(ratio, 2),
            "agree": not diffs, "differences": diffs}


def format_comparison(cmp: dict) -> str:
    lines = [f"hotremove oracle: {cmp['scenario']} ({cmp['repeat']} real run(s) vs the emulator)"]
    for r in cmp["offlines"]:
        real, emu = r["real"], r["emulator"]
        if real is None:
            lines.append(f"offline at step {r['step']}: DIFFER: {r['differences']}")
            continue
        lines.append(f"offline at step {r['step']}: {'agree' if r['agree'] else 'DIFFER: ' + ', '.join(r['differences'])}")
        lines.append(f"  {'':<24} {'kernel':<40} {'emulator':<30}")

        def row(name, a, b):
            lines.append(f"  {name:<24} {str(a):<40} {str(b):<30}")
        row("outcome", real["outcome"], emu.get("outcome"))
        row("pages migrated", real["pages_migrated"], emu.get("pages_migrated"))
        row("KSM pages migrated", real["ksm_pages_migrated"], emu.get("ksm_pages_migrated"))
        row("KSM before", _kl(real["ksm_before"]), _kl(emu.get("ksm_before")))
        row("KSM after", _kl(real["ksm_after"]), _kl(emu.get("ksm_after")))
        row("content unchanged", real["content_ok"], emu.get("content_ok"))
        row("run during offline", real["run_during"], emu.get("run_during"))
        row("run writer waited", real["run_writer_waited_to_end"], emu.get("run_writer_waited_to_end"))
        t, et = real["time_ms"], emu["time_ms"]
        row("time ms (mean, range)", f"{t['mean']} ({t['min']}-{t['max']})",
            f"{et['mean']} ({et['min']}-{et['max']}) x{r.get('time_ratio')}")
        if any(real["foreign_pages"]):
            row("other processes' pages", real["foreign_pages"], "(given the same)")
    lines.append("agree" if cmp["agree"] else "DIFFER")
    return "\n".join(lines)


def _kl(d):
    if not d:
        return "-"
    return "/".join(str(d[k]) for k in KSM_KEYS)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 2 and args[0] == "--worker":
        serve_worker(int(args[1]), _Worker)
    if len(args) == 3 and args[0] == "--child":
        return guard.child_main(args, _run_case)
    print("usage: vmhost hotremove SCENARIO --oracle", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
