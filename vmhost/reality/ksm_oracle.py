"""Run a KSM trace in the running kernel's KSM: the fidelity oracle for the emulator.

Why this is shaped the way it is:

* KSM counters are system-wide, so the oracle refuses to run unless it is root, KSM is idle
  (``run`` != 1) and no other process has a mergeable mm; runs of the oracle itself are serialised
  with a lock file. It resets KSM (``run=2``, ``run=0``), puts every knob at its kernel default,
  and restores the values it found in a ``finally`` that also runs on Ctrl-C and SIGTERM.
* Each trace process is a real OS process (a *worker*: a fresh interpreter running
  ``python -m vmhost.reality.ksm_oracle --worker FD``, so it shares no copy-on-write memory with the
  oracle) that owns the trace's mappings and does nothing but obey small pickled commands on a
  Unix ``SOCK_SEQPACKET`` socket. A trace ``fork`` makes the worker itself ``fork()``, so the child
  inherits the copy-on-write mappings exactly as a forked guest would; the child gets its own
  socket, passed over the parent's with ``SCM_RIGHTS``. Workers never register anything with KSM
  except through the trace (a ``prctl`` step is the one exception: it makes the worker's
  interpreter heap mergeable too, so such traces are not expected to agree with the emulator).
* ksmd is stepped deterministically: ``pages_to_scan`` = 1,000,000 (more than any trace maps) and
  ``sleep_millisecs`` = 50, so each ksmd wake-up performs exactly one full scan (a batch never
  crosses a full-scan boundary). ``scan: N`` writes ``run=1``, polls ``full_scans`` every
  millisecond and writes ``run=0`` as soon as it grew by N; everything else happens while ksmd
  sleeps. A pass that overran the target is detected and reported as a failure.
* Idle scans: with no mm registered, ksmd does not scan and ``full_scans`` never grows. The kernel
  offers no direct view of "an mm is registered" (``ksm_mergeable`` in ksm_stat is per-VMA and an
  mm stays registered until the pass that drops it), so the rule is by observation: the step ends
  when neither ``full_scans`` nor ``pages_scanned`` moved for ``IDLE_PERIODS`` (10) sleep periods,
  at least 0.5 s. The snapshot then simply shows the counters that did (not) move.
* Refused writes are data, not failures: a refused ``madvise`` is recorded as
  ``{"step": i, "madvise": ADVICE, "errno": NAME}``, a refused knob write (``knobs`` section: step
  -1, or a ``knob`` step) as ``{"step": i, "knob": NAME, "errno": NAME}``, a refused ``prctl`` as
  ``{"step": i, "prctl": MERGE, "errno": NAME}``.
* Before the first step KSM must be truly at rest: after ``run=2`` every counter must read 0 and a
  trial ``max_page_sharing`` change must succeed (it fails with EBUSY while any KSM page is still
  mapped, even by a process without rmap_items, which no counter shows); otherwise the run is
  refused rather than polluted.
* Traces own the knobs: one that sets ``sleep_millisecs`` very low makes ksmd start the next pass
  before ``run=0`` lands (detected as an overrun); a small ``pages_to_scan`` is fine, only slower.
* Every wait is bounded (worker replies, process exits, scans, the whole trace), so a bug cannot
  hang CI; a timeout raises :class:`OracleError` after restoring KSM.

Run one trace: ``python -m vmhost.reality.ksm_oracle TRACE [--json]`` (exit 2 on bad input or refusal).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from guests.errors import InputError
from hw.units import PAGE_SIZE, HPAGE_SIZE
from vmhost.ksm.knobs import reset_order
from vmhost.ksm.trace import (IDLE_MIN_MS, IDLE_PERIODS, PROC_FIELDS, SNAPSHOT_FIELDS,
                              WORDS_PER_PAGE, Region, Trace, content_ids, dumps_result,
                              format_result, load_trace, page_bytes)

KSM_DIR = Path("/sys/kernel/mm/ksm")
LOCK_PATH = "/run/vmhost-ksm-oracle.lock"

#: Kernel defaults of the writable knobs, in the order they are reset at the start of a run
#: (advisor_mode first: leaving scan-time rewrites pages_to_scan).
DEFAULTS = reset_order()
ORACLE_PAGES_TO_SCAN = 1_000_000   # u32 knob; far above any trace's page count
ORACLE_SLEEP_MS = 50
POLL_S = 0.001
REPLY_TIMEOUT_S = 30.0
TRACE_TIMEOUT_S = 300.0
LOCK_TIMEOUT_S = 300.0

MADV = {"mergeable": 12, "unmergeable": 13, "dontneed": 4}
MADV_HUGEPAGE, MADV_NOHUGEPAGE = 14, 15
PR_SET_MEMORY_MERGE = 67
PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37
PROT_NONE, PROT_RW = 0, 3
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS, MAP_NORESERVE = 1, 2, 0x10, 0x20, 0x4000


class OracleError(RuntimeError):
    """The oracle could not produce a trustworthy result (timeout, interference, worker crash)."""


class _Terminated(BaseException):
    """Raised by the SIGTERM handler so that the ``finally`` restoring KSM runs."""


# --------------------------------------------------------------------------------------------
# sysfs / procfs access


def read_knob(name: str) -> str:
    text = (KSM_DIR / name).read_text().strip()
    if name == "advisor_mode":  # "[none] scan-time" -> "none"
        text = text.split("[", 1)[1].split("]", 1)[0]
    return text


def write_knob(name: str, value) -> str | None:
    """Write one knob exactly as given; the errno name if the kernel refused it, else None."""
    try:
        fd = os.open(KSM_DIR / name, os.O_WRONLY)
        try:
            os.write(fd, str(value).encode())
        finally:
            os.close(fd)
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return None


def _must_write(name: str, value) -> None:
    err = write_knob(name, value)
    if err:
        raise OracleError(f"cannot set KSM knob {name}={value}: {err}")


def read_vmstat(*keys: str) -> dict[str, int]:
    """The named counters of /proc/vmstat (a counter the kernel lacks is left out)."""
    out = {}
    with open("/proc/vmstat") as fh:
        for line in fh:
            k, v = line.split()
            if k in keys:
                out[k] = int(v)
    return out


def read_globals() -> dict[str, int]:
    out = {f: int((KSM_DIR / f).read_text()) for f in SNAPSHOT_FIELDS
           if f not in ("cow_ksm", "ksm_swpin_copy")}
    out.update(read_vmstat("cow_ksm", "ksm_swpin_copy"))
    return out


def read_ksm_stat(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/ksm_stat") as fh:
        return dict(line.replace(":", " ").split(None, 1) for line in fh if line.strip())


def mergeable_pids() -> list[int]:
    """PIDs of processes that currently have a KSM-mergeable mapping."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if read_ksm_stat(int(entry)).get("ksm_mergeable", "").split() == ["yes"]:
                    pids.append(int(entry))
            except (OSError, ValueError):
                pass  # gone, kernel thread, or no permission
    return pids


# --------------------------------------------------------------------------------------------
# Worker side (runs in the trace processes)

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long)
libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong)


def _errname() -> str:
    e = ctypes.get_errno()
    return errno.errorcode.get(e, str(e))


def _map_regions(regions: list[Region]) -> dict[str, int]:
    """Map the regions back to back in order (THP ones 2 MiB aligned); name -> address."""
    offsets, off = {}, 0
    for r in regions:
        if r.thp:
            off = -(-off // HPAGE_SIZE) * HPAGE_SIZE
        offsets[r.name] = off
        off += r.pages * PAGE_SIZE
    total = off + HPAGE_SIZE
    res = libc.mmap(None, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    if res in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), f"mmap reserve: {_errname()}")
    base = -(-res // HPAGE_SIZE) * HPAGE_SIZE
    addrs, used = {}, []
    for r in regions:
        addr, size = base + offsets[r.name], r.pages * PAGE_SIZE
        flags = MAP_FIXED | MAP_ANONYMOUS | (MAP_SHARED if r.shared else MAP_PRIVATE)
        prot = PROT_NONE if r.prot == "none" else PROT_RW
        if libc.mmap(addr, size, prot, flags, -1, 0) != addr:
            raise OSError(ctypes.get_errno(), f"mmap {r.name}: {_errname()}")
        if libc.madvise(addr, size, MADV_HUGEPAGE if r.thp else MADV_NOHUGEPAGE):
            raise OSError(ctypes.get_errno(), f"madvise hugepage {r.name}: {_errname()}")
        addrs[r.name] = addr
        used.append((addr, addr + size))
    # give back the parts of the reservation no region uses (head, alignment gaps, tail)
    cursor = res
    for start, end in used + [(res + total, res + total)]:
        if start > cursor:
            libc.munmap(cursor, start - cursor)
        cursor = max(cursor, end)
    return addrs


class _WorkerLoop:
    """The body of a worker: obey commands until told to exit or the oracle goes away."""

    def __init__(self, sock: socket.socket, regions: list[Region], addrs: dict[str, int]):
        self.sock, self.regions, self.addrs = sock, {r.name: r for r in regions}, addrs

    def run(self):
        while True:
            msg, fds, _, _ = socket.recv_fds(self.sock, 1 << 16, 1)
            if not msg:          # the oracle died: do not linger
                os._exit(0)
            cmd, *args = pickle.loads(msg)
            if cmd == "exit":
                os._exit(0)
            try:
                reply = getattr(self, "do_" + cmd)(*args, fds=fds)
            except Exception as exc:  # reported to the oracle, which fails the run
                reply = ("fail", f"{cmd}: {exc!r}")
            self.sock.send(pickle.dumps(reply))

    def do_fill(self, region, start, count, content, fds):
        reg, addr = self.regions[region], self.addrs[region] + start * PAGE_SIZE
        ids = content_ids(content, count)
        if reg.prot == "none":
            # like a debugger: a forced write through /proc/self/mem (FOLL_FORCE write fault)
            fd = os.open("/proc/self/mem", os.O_RDWR)
            try:
                data = page_bytes(ids)
                if os.pwrite(fd, data, addr) != len(data):
                    raise OSError("short write to /proc/self/mem")
            finally:
                os.close(fd)
        else:
            words = (ctypes.c_uint64 * (count * WORDS_PER_PAGE)).from_address(addr)
            np.frombuffer(words, dtype=np.uint64).reshape(count, WORDS_PER_PAGE)[:] = ids[:, None]
        return ("ok", None)

    def do_madvise(self, region, advice, start, count, fds):
        addr = self.addrs[region] + start * PAGE_SIZE
        rc = libc.madvise(addr, count * PAGE_SIZE, MADV[advice])
        return ("ok", _errname() if rc else None)

    def do_prctl(self, merge, fds):
        rc = libc.prctl(PR_SET_MEMORY_MERGE, 1 if merge else 0, 0, 0, 0)
        return ("ok", _errname() if rc else None)

    def do_fork(self, fds):
        pid = os.fork()
        if pid == 0:  # the trace child: talk on the socket the oracle passed along
            self.sock.close()
            self.sock = socket.socket(fileno=fds[0])
            self.sock.settimeout(None)
            return ("hello", os.getpid())
        os.close(fds[0])
        return ("ok", pid)


def serve_worker(fd: int, loop_class=_WorkerLoop):
    """Entry of a worker (a fresh interpreter started by an oracle); never returns: maps the
    regions of the first message, says hello, then ``loop_class(sock, regions, addrs).run()``.

    The worker is exec'ed rather than merely forked so that none of its memory is a
    copy-on-write copy of the oracle's: otherwise a ``prctl`` step could make KSM convert pages
    the oracle itself still maps, leaving KSM pages that no trace process accounts for.
    """
    sock = socket.socket(fileno=fd)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # the oracle handles Ctrl-C and kills us
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # forked trace children reap themselves
        msg = sock.recv(1 << 20)
        if not msg:
            os._exit(0)
        cmd, regions = pickle.loads(msg)
        loop = loop_class(sock, regions, _map_regions(regions))
        sock.send(pickle.dumps(("hello", os.getpid())))
        loop.run()
    except BaseException as exc:  # noqa: BLE001 - last resort in a child process
        try:
            sock.send(pickle.dumps(("fail", f"worker: {exc!r}")))
        finally:
            os._exit(1)
    os._exit(0)


# --------------------------------------------------------------------------------------------
# Oracle side


class WorkerHandle:
    """The oracle's handle on one trace process."""

    def __init__(self, name: str, pid: int, sock: socket.socket, popen=None):
        self.name, self.pid, self.sock, self.popen = name, pid, sock, popen
        self.pidfd = os.pidfd_open(pid)
        self.alive = True

    def send(self, *cmd, fds=()):
        socket.send_fds(self.sock, [pickle.dumps(cmd)], list(fds))

    def reply(self, sock=None):
        return recv_reply(sock or self.sock, f"process {self.name}", self.pid)

    def call(self, *cmd):
        self.send(*cmd)
        return self.reply()

    def wait_gone(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.pidfd], [], [], timeout)
        if ready:
            self.alive = False
            self.reap()
        return bool(ready)

    def reap(self):
        """Collect the exit status if it is ours to collect (a worker, or an orphan of one)."""
        if self.popen is not None:
            self.popen.poll()
            return
        try:
            os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pass  # reaped by its parent worker (SIGCHLD ignored there)

    def close(self):
        self.sock.close()
        os.close(self.pidfd)


def recv_reply(sock: socket.socket, who: str, pid: int, timeout: float = REPLY_TIMEOUT_S):
    """The value of a worker's next reply; an ``OracleError`` naming ``who`` when it failed,
    died or did not answer within ``timeout`` seconds."""
    sock.settimeout(timeout)
    try:
        msg = sock.recv(1 << 16)
    except socket.timeout:
        raise OracleError(f"{who} (pid {pid}) did not answer") from None
    if not msg:
        raise OracleError(f"{who} (pid {pid}) died unexpectedly")
    status, value = pickle.loads(msg)
    if status == "fail":
        raise OracleError(f"{who}: {value}")
    return value


def spawn_worker(name: str, regions: list[Region], module: str = "vmhost.reality.ksm_oracle") -> WorkerHandle:
    """A worker process (``python -m MODULE --worker FD``, which calls :func:`serve_worker`)
    holding ``regions``, once it said hello."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    try:
        child = subprocess.Popen(
            [sys.executable, "-m", module, "--worker", str(theirs.fileno())],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env, cwd="/")
    finally:
        theirs.close()
    proc = WorkerHandle(name, child.pid, mine, popen=child)
    proc.send("init", regions)
    hello = proc.reply()
    if hello != child.pid:
        raise OracleError(f"process {name}: unexpected hello {hello!r}")
    return proc


class _Run:
    """One oracle run of one trace (KSM already reset, lock held)."""

    def __init__(self, trace: Trace, deadline: float):
        self.trace, self.deadline = trace, deadline
        self.procs: dict[str, WorkerHandle] = {}
        self.all_procs: list[WorkerHandle] = []
        self.snapshots: list[dict] = []
        self.errors: list[dict] = []
        self.base = read_globals()

    def check_time(self, what: str):
        if time.monotonic() > self.deadline:
            raise OracleError(f"{self.trace.path}: global timeout during {what}")

    def execute(self) -> dict:
        for name, value in self.trace.knobs:
            err = write_knob(name, value)
            if err:
                self.errors.append({"step": -1, "knob": name, "errno": err})
        for name, regions in self.trace.processes.items():
            self.add(spawn_worker(name, regions))
        for step in self.trace.steps:
            self.check_time(f"step {step.index} ({step.kind})")
            getattr(self, "step_" + step.kind)(step.index, **step.args)
        return {"version": 1, "engine": "kernel", "profile": self.trace.profile,
                "snapshots": self.snapshots, "errors": self.errors}

    def add(self, proc: WorkerHandle):
        self.procs[proc.name] = proc
        self.all_procs.append(proc)

    # -- steps -----------------------------------------------------------------------------
    def step_fill(self, i, proc, region, start, count, content):
        self.procs[proc].call("fill", region, start, count, content)

    def step_madvise(self, i, proc, region, advice, start, count):
        err = self.procs[proc].call("madvise", region, advice, start, count)
        if err:
            self.errors.append({"step": i, "madvise": advice, "errno": err})

    def step_prctl(self, i, proc, merge):
        err = self.procs[proc].call("prctl", merge)
        if err:
            self.errors.append({"step": i, "prctl": merge, "errno": err})

    def step_knob(self, i, **writes):
        for name, value in writes.items():
            err = write_knob(name, value)
            if err:
                self.errors.append({"step": i, "knob": name, "errno": err})

    def step_fork(self, i, proc, child):
        parent = self.procs[proc]
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            parent.send("fork", fds=[theirs.fileno()])
        finally:
            theirs.close()
        pid = parent.reply()
        kid = WorkerHandle(child, pid, mine)
        self.add(kid)
        if kid.reply() != pid:
            raise OracleError(f"step {i}: forked child did not report pid {pid}")

    def step_exit(self, i, proc):
        p = self.procs.pop(proc)
        p.send("exit")
        if not p.wait_gone(REPLY_TIMEOUT_S):
            raise OracleError(f"step {i}: process {proc} (pid {p.pid}) did not exit")

    def step_scan(self, i, count):
        start_fs = int(read_knob("full_scans"))
        target = start_fs + count
        sleep_ms = int(read_knob("sleep_millisecs"))
        idle_s = max(IDLE_PERIODS * sleep_ms, IDLE_MIN_MS) / 1000.0
        last = (start_fs, int(read_knob("pages_scanned")))
        last_move = time.monotonic()
        _must_write("run", 1)
        try:
            while True:
                fs = int(read_knob("full_scans"))
                if fs >= target:
                    break
                now = time.monotonic()
                seen = (fs, int(read_knob("pages_scanned")))
                if seen != last:
                    last, last_move = seen, now
                elif now - last_move > idle_s:
                    break  # nothing registered: ksmd is idle (documented rule)
                self.check_time(f"step {i} (scan)")
                time.sleep(POLL_S)
        finally:
            _must_write("run", 0)
        if int(read_knob("full_scans")) > target:
            raise OracleError(f"step {i}: ksmd ran past the requested scans; "
                              "raise sleep_millisecs or pages_to_scan")
        self.snapshot(i)

    def step_snapshot(self, i):
        self.snapshot(i)

    def snapshot(self, i):
        g = read_globals()
        snap = {"step": i}
        for f in SNAPSHOT_FIELDS:
            delta = f in ("pages_scanned", "pages_skipped", "cow_ksm", "ksm_swpin_copy")
            snap[f] = g[f] - self.base[f] if delta else g[f]
        procs = {}
        for name, p in self.procs.items():
            stat = read_ksm_stat(p.pid)
            procs[name] = {f: int(stat[f]) for f in PROC_FIELDS}
        snap["procs"] = procs
        self.snapshots.append(snap)

    # -- teardown --------------------------------------------------------------------------
    def kill_all(self):
        for p in self.all_procs:
            if p.alive:
                try:
                    signal.pidfd_send_signal(p.pidfd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.all_procs:
            if p.alive and not p.wait_gone(10.0):
                print(f"vmhost oracle: pid {p.pid} did not die", file=sys.stderr)
        for p in self.all_procs:  # orphans reparented to us (subreaper): reap them too
            p.reap()
            p.close()


def _refuse_unless_safe():
    if os.geteuid() != 0:
        raise InputError("ksm oracle: must run as root (it drives /sys/kernel/mm/ksm)")
    if not KSM_DIR.is_dir():
        raise InputError("ksm oracle: this kernel has no KSM (/sys/kernel/mm/ksm missing)")
    if read_knob("run") == "1":
        raise InputError("ksm oracle: KSM is running (run=1); refusing to disturb it")
    others = mergeable_pids()
    if others:
        raise InputError(f"ksm oracle: process(es) {', '.join(map(str, others[:5]))} already "
                         "use KSM (ksm_mergeable: yes); refusing to disturb them")


_held_lock: list[int] = []   # the lock kept by holding_lock() across several runs


@contextmanager
def holding_lock():
    """Keep the oracle's lock across several ``run_oracle`` calls (a turn of short traces).

    Each run still checks that KSM is free, resets it and restores the knobs; only the lock
    is not given up between them. Keep a turn short: other users wait for the lock
    (``LOCK_TIMEOUT_S``).
    """
    fd = _acquire_lock()
    _held_lock.append(fd)
    try:
        yield
    finally:
        _held_lock.remove(fd)
        os.close(fd)


def _acquire_lock():
    if _held_lock:      # the same open file: already locked by us
        return os.dup(_held_lock[-1])
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    end = time.monotonic() + LOCK_TIMEOUT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > end:
                os.close(fd)
                raise InputError(f"ksm oracle: another oracle run holds {LOCK_PATH}") from None
            time.sleep(0.05)


REST_FIELDS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
               "stable_node_chains", "stable_node_dups", "ksm_zero_pages", "full_scans")
SETTLE_S = 2.0


def ksm_leftovers() -> dict[str, int]:
    """Counters that are not zero although nothing should be merged (empty dict = at rest)."""
    vals = {f: int((KSM_DIR / f).read_text()) for f in REST_FIELDS}
    return {f: v for f, v in vals.items() if v}


def _reset_ksm():
    """Unmerge everything and put every knob at its default, then the stepping knobs.

    Right after the processes of a previous run died, a stable node can briefly survive a
    ``run=2`` (its page is not freed yet), so ``run=2`` is repeated until every counter reads 0.
    """
    end = time.monotonic() + SETTLE_S
    while True:
        _must_write("run", 2)
        _must_write("run", 0)
        left = ksm_leftovers()
        if not left:
            # Stable nodes without rmap_items are invisible in the counters but make a
            # max_page_sharing change fail with EBUSY: use that as a probe.
            probe = "3" if read_knob("max_page_sharing") == "2" else "2"
            if write_knob("max_page_sharing", probe) is None:
                break
            left = {"max_page_sharing": "EBUSY (a KSM page is still mapped somewhere)"}
        if time.monotonic() > end:
            raise InputError(f"ksm oracle: KSM does not come to rest after run=2 ({left}); "
                             "is a KSM page still mapped by some process?")
        if os.environ.get("VMHOST_ORACLE_DEBUG"):
            print(f"vmhost oracle: KSM not at rest after run=2: {left}", file=sys.stderr)
        time.sleep(0.05)
    for name, value in DEFAULTS.items():
        err = write_knob(name, value)
        if err:
            raise InputError(f"ksm oracle: cannot reset KSM knob {name} to {value} ({err}); "
                             "is a KSM page still mapped by some process?")
    _must_write("pages_to_scan", ORACLE_PAGES_TO_SCAN)
    _must_write("sleep_millisecs", ORACLE_SLEEP_MS)


def _restore_ksm(saved: dict[str, str]) -> list[str]:
    """Unmerge, stop, and put back every knob as found; returns the failures (best effort)."""
    failed = []
    for name, value in [("run", 2), ("run", 0)] + list(saved.items()):
        if name == "pages_to_scan" and saved.get("advisor_mode") == "scan-time":
            continue  # the advisor owns pages_to_scan then
        err = write_knob(name, value)
        if err:
            failed.append(f"{name}={value}: {err}")
    return failed


def saved_knobs() -> dict[str, str]:
    """Current value of every writable knob, in restore order (run handled separately)."""
    return {name: read_knob(name) for name in DEFAULTS}


@contextmanager
def exclusive_kernel_ksm():
    """Hold the real KSM for a measurement other than a trace (benchmarks, live guests).

    Takes the oracle's lock, refuses when another process uses KSM, brings KSM to rest with
    every knob at its default (then pages_to_scan 1,000,000 and sleep_millisecs 50), and on
    the way out, even on error, unmerges everything and puts every knob back as it was found.
    The caller starts its own mergeable processes inside the block and stops them before it
    ends.
    """
    lock = _acquire_lock()
    try:
        _refuse_unless_safe()
        saved = saved_knobs()
        try:
            _reset_ksm()
            yield
        finally:
            failed = _restore_ksm(saved)
            if failed and sys.exc_info()[0] is None:
                raise OracleError("could not restore KSM knobs: " + "; ".join(failed))
    finally:
        os.close(lock)


def run_oracle(trace: Trace, timeout: float = TRACE_TIMEOUT_S) -> dict:
    """Run ``trace`` in the kernel's KSM and return the output document (engine "kernel")."""
    if trace.profile != "linux-6.18":
        raise InputError(f"{trace.path}: field 'profile': the oracle runs only linux-6.18, "
                         f"not {trace.profile}")
    if trace.total_pages() >= ORACLE_PAGES_TO_SCAN:
        raise InputError(f"{trace.path}: trace maps {trace.total_pages()} pages; the oracle "
                         f"steps ksmd only below {ORACLE_PAGES_TO_SCAN}")
    lock = _acquire_lock()
    run = None
    main = threading.current_thread() is threading.main_thread()
    old_term = old_reaper = None
    try:
        _refuse_unless_safe()
        saved = saved_knobs()
        if main:
            def on_term(signum, frame):
                raise _Terminated()
            old_term = signal.signal(signal.SIGTERM, on_term)
        flag = ctypes.c_int(0)
        libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.cast(ctypes.pointer(flag), ctypes.c_void_p)
                    .value, 0, 0, 0)
        old_reaper = flag.value
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        try:
            _reset_ksm()
            run = _Run(trace, time.monotonic() + timeout)
            result = run.execute()
            intruders = [p for p in mergeable_pids()
                         if p not in {q.pid for q in run.all_procs}]
            if intruders:
                raise OracleError(f"process(es) {intruders[:5]} started using KSM during the "
                                  "run; result discarded")
            return result
        finally:
            if run is not None:
                run.kill_all()
            failed = _restore_ksm(saved)
            if failed and sys.exc_info()[0] is None:
                raise OracleError("could not restore KSM knobs: " + "; ".join(failed))
            elif failed:
                print("vmhost oracle: could not restore KSM knobs: " + "; ".join(failed),
                      file=sys.stderr)
    except _Terminated:
        raise SystemExit(143) from None
    finally:
        if old_reaper is not None:
            libc.prctl(PR_SET_CHILD_SUBREAPER, old_reaper, 0, 0, 0)
        if main and old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        os.close(lock)


def outcome(what: str, run):
    """``(run(), 0)``, or ``(None, status)`` after one line on stderr: 2 for bad input, 1 when
    the kernel run failed (``WHAT: reason``)."""
    try:
        return run(), 0
    except InputError as exc:
        print(exc, file=sys.stderr)
        return None, 2
    except OracleError as exc:
        print(f"{what}: {exc}", file=sys.stderr)
        return None, 1


def main(argv: list[str] | None = None) -> int:
    """``python -m vmhost.reality.ksm_oracle TRACE [--json]``: run one trace, print the result."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 2 and args[0] == "--worker":  # internal: a trace process
        serve_worker(int(args[1]))
    as_json = "--json" in args
    paths = [a for a in args if a != "--json"]
    if len(paths) != 1:
        print("usage: python -m vmhost.reality.ksm_oracle TRACE [--json]", file=sys.stderr)
        return 2
    result, status = outcome("ksm oracle", lambda: run_oracle(load_trace(paths[0])))
    if status:
        return status
    print(dumps_result(result) if as_json else format_result(result), end="" if as_json else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
