"""The density study on this machine's kernel: real processes holding the guests' pages, the
real ksmd merging them. The oracle that ``vmhost density`` (the emulator) is held against.

``vmhost density CONFIG --oracle`` boots the config's boot sequence as the emulator does
(``vmhost.density``: the same guests, contents, order and strides), but every guest is a real
process on this kernel:

* **A guest** is a fresh interpreter (``python -m vmhost.reality.density_oracle --guest FD``, so
  it shares no copy-on-write memory with anything) that maps its RAM (2 MiB aligned, as QEMU
  does), madvises ``MADV_HUGEPAGE`` when the host config's THP mode says QEMU's RAM is
  THP-backed (``always``/``madvise``; ``MADV_NOHUGEPAGE`` for ``never``), and writes its boot
  contents (and, with ``warm_start``, its hot sets once) as page bytes of the trace contract
  (``ksm-trace-v1``: a content id repeated over the page's 512 words; id 0 = zeros). A locked
  guest writes every page. Then, at the step's start, it registers ``MADV_MERGEABLE`` (not with
  ``nosharepages``) and runs its image's steady write model in real time, every
  ``write_period``.
* **When a step starts.** The emulator boots a step's guests right after the full scan that
  ended the previous step, so their first pass is the next one: the oracle pauses ksmd
  (``run`` 0) as soon as it sees the full scan that ends a step, fills the next guests
  (seconds of real time), registers them (the kernel inserts a new mm_slot just behind ksmd's
  cursor) and lets ksmd go on (``run`` 1). Without the pause ksmd would run extra passes over
  the older guests during the fill; with smart scan each pass moves every skipped page's skip
  cycle, and the next guest met the older guests' pages one pass off the emulator's.
* **Steady state** is the emulator's rule, the same code (``vmhost.density.settle``) fed the
  kernel's counters after each full scan: ``pages_shared``, ``pages_sharing`` and
  ``ksm_zero_pages`` moved by at most ``tolerance`` x the step's new pages over the last
  window of full scans (``settle.scans``, raised under smart scan to its longest skip cycle,
  9 scans; no verdict before ``window + 1`` scans), at most ``max_scans``; under smart scan a
  step ends only after a whole number of skip cycles (a multiple of 9 full scans, ``max_scans``
  rounded up to one), so that the next guest meets the older guests' skip cycles at the same
  phase in every run; or a fixed ``settle.time``.
* **Sampling.** Counters and ksmd's CPU time (``/proc/<ksmd>/schedstat``, its on-CPU ns) are
  polled every few milliseconds; every full-scan boundary is kept (the steady rule, the CPU
  window) and the savings timeline is thinned like the emulator's. At each step's end the
  oracle reads each guest's ``/proc/PID/ksm_stat`` and its RAM mapping's ``Rss`` and
  ``AnonHugePages`` (``/proc/PID/smaps``).
* **Measures.** used memory = the guests' resident RAM minus ``pages_sharing`` (a KSM page is
  resident in every mapper; pages mapped to the zero page are resident in none); ksmd's CPU
  share over the settle window (its last ``window`` scans, as the emulator's); time to 50/90/99% of the step's
  gain in savings (``pages_sharing + ksm_zero_pages``) from the registration.

ksmd's CPU. The emulator's ksmd always finds a CPU free; on this shared 2-CPU machine other
work would take it (ksmd runs at nice 5), stretching every time and lowering its CPU share.
So during a run ksmd runs at nice -20 (put back afterwards), and its time waiting for a CPU
(schedstat's run_delay) is reported per step, with the CPU share it would have had without it
(``kernel.ksmd_cpu_share_unwaited``).

What it does not reproduce (and says so in every result): swap, OOM, the host's watermarks and
RAM size (the machine must never be pushed there; free memory is the config host's RAM minus
the measured use), NUMA placement (one node here), tuning policies (refused), and a step that
breaks a limit ends the run (the kernel cannot be restored from a snapshot to redo the stride
one guest at a time).

Emulator against kernel. ``--compare`` runs the emulator on the same config (at its resolution,
or ``--emulator-resolution N``) and prints, per step, the kernel's mean over ``--runs`` runs, their
spread ((max - min) / mean) and the emulator's error, against the tolerances: pages_sharing at
steady state 2%, time to 50% and 90% of the step's savings 15% or one full scan, ksmd's CPU
share 10%, used memory 1%. Saved runs compare with ``python -m vmhost.reality.density_oracle
--table EMULATOR.json KERNEL.json...``. The bundled comparisons: ``configs/oracle/density-small.yaml``
(2 GiB, CI) and ``configs/oracle/density-{vdi,tenants,jvm}.yaml`` (6-6.5 GiB each) with
``smart_scan: 0`` (every page visited every pass: the kernel repeats itself exactly), and
``configs/oracle/density-{vdi-12g,tenants-10g,jvm-10g}.yaml`` (10-12 GiB) at 6.18's default
``smart_scan: 1``: a page that did not merge is skipped for up to 8 passes, so the settle window
covers a whole skip cycle on both sides (README, Real density).

Safety. It refuses, with one line and exit 2, when not root, when another process uses KSM or
holds the oracle lock too long (``exclusive_kernel_ksm``), and when the guests' memory (touched
pages, whole 2 MiB ranges with THP) does not fit in ``SAFE_FRACTION`` of MemAvailable (it says
how many guests would). The work runs in a *driver* process in its own process group; the CLI
process holds the lock and the saved knobs, waits for it, and whatever happens (Ctrl-C,
SIGTERM, a crash or kill of the driver) kills the whole group (every guest with it), then
unmerges and restores every knob. Guests and driver die with their parent (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from guests.errors import InputError
from hw.units import HPAGE_PAGES, HPAGE_SIZE, PAGE_SIZE, PAGES_PER_GIB
from vmhost.density.settle import COUNTERS as SETTLE_COUNTERS, SettleRule
from vmhost.footprint import available_bytes
from vmhost.reports.files import dumps_json
from vmhost.reality.ksm_oracle import (KSM_DIR, OracleError, exclusive_kernel_ksm, libc, read_knob, recv_reply,
                                       read_ksm_stat, read_vmstat, write_knob)

WORDS = PAGE_SIZE // 8
SAFE_FRACTION = 0.6             # of MemAvailable: the most the guests may take
GUEST_OVERHEAD_BYTES = 64 << 20  # a guest process's own interpreter, numpy, content arrays
POLL_S = 0.004                  # counter polling period
REPLY_TIMEOUT_S = 300.0
KSMD_NICE = -20                 # during a run (the kernel starts ksmd at 5): see the docstring
TIMELINE_POINTS_PER_STEP = 64
KNOB_DEFAULTS = {"pages_to_scan": "100", "sleep_millisecs": "20"}
COUNTERS = ("full_scans", "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
            "ksm_zero_pages", "stable_node_chains", "stable_node_dups", "pages_scanned", "pages_skipped")
PROC_FIELDS = ("ksm_rmap_items", "ksm_zero_pages", "ksm_merging_pages", "ksm_process_profit")
COVERS = ("KSM counters, ksmd CPU (schedstat) and the guests' resident memory measured on this "
          "machine's kernel ({kernel}) with one real process per guest; not reproduced: swap, OOM, "
          "the host's RAM size and watermarks (free memory is the config host's RAM minus the "
          "measured use), NUMA placement, tuning policies; a step that breaks a limit ends the run")

MADV_MERGEABLE, MADV_HUGEPAGE, MADV_NOHUGEPAGE = 12, 14, 15
PR_SET_PDEATHSIG = 1
PROT_RW, MAP_PRIVATE, MAP_ANONYMOUS, MAP_NORESERVE = 3, 2, 0x20, 0x4000



def _die_with_parent() -> None:        # preexec_fn of the driver and the guests
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _env() -> dict:
    root = str(Path(__file__).resolve().parents[2])
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))


# ==============================================================================================
# the guest process

class _Guest:
    """Body of one guest process: its RAM and its writers."""

    def __init__(self, spec: dict):
        from guests.images import GuestMemory
        self.gm = GuestMemory.build(spec["image"], spec["name"], spec["seed"], spec["domain"],
                                    spec["memory_mib"])
        self.pages = self.gm.pages
        size = self.pages * PAGE_SIZE
        raw = libc.mmap(None, size + HPAGE_SIZE, PROT_RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if raw in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap of guest RAM failed")
        self.addr = -(-raw // HPAGE_SIZE) * HPAGE_SIZE       # QEMU aligns RAM to 2 MiB
        if self.addr > raw:
            libc.munmap(raw, self.addr - raw)
        tail = raw + size + HPAGE_SIZE - (self.addr + size)
        if tail:
            libc.munmap(self.addr + size, tail)
        advice = MADV_HUGEPAGE if spec["thp"] else MADV_NOHUGEPAGE
        if libc.madvise(self.addr, size, advice):
            raise OSError(ctypes.get_errno(), "madvise(HUGEPAGE) of guest RAM failed")
        words = (ctypes.c_uint64 * (self.pages * WORDS)).from_address(self.addr)
        self.ram = np.frombuffer(words, dtype=np.uint64).reshape(self.pages, WORDS)
        self.mergeable = not spec["nosharepages"]
        self.period_ns = spec["write_period_ns"]
        self.next_write = None
        self.writes = 0
        if spec["locked"]:
            self.write(np.arange(self.pages), self.gm.content)
        else:
            self.write(*self.gm.boot_writes())
        if spec["warm_start"]:
            self.write(*self.gm.warm_writes())

    def write(self, gpfns, ids) -> None:
        """Page images of the trace contract: the id in each of the page's 512 words."""
        gpfns = np.asarray(gpfns, dtype=np.int64)
        ids = np.asarray(ids, dtype=np.uint64)
        step = 1 << 16
        for i in range(0, len(gpfns), step):
            self.ram[gpfns[i:i + step]] = ids[i:i + step, None]
        self.writes += len(gpfns)

    def register(self) -> dict:
        if self.mergeable and libc.madvise(self.addr, self.pages * PAGE_SIZE, MADV_MERGEABLE):
            raise OSError(ctypes.get_errno(), "madvise(MERGEABLE) of guest RAM failed")
        if self.gm.steady:
            self.next_write = time.monotonic_ns() + self.period_ns
        return {"registered": self.mergeable}

    def tick(self) -> None:
        now = time.monotonic_ns()
        while self.next_write is not None and now >= self.next_write:
            self.write(*self.gm.steady_step(self.next_write, self.period_ns))
            self.next_write += self.period_ns

    def timeout(self) -> float | None:
        if self.next_write is None:
            return None
        return max(0.0, (self.next_write - time.monotonic_ns()) / 1e9)


def _guest_main(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the CLI process handles Ctrl-C
    try:
        msg = sock.recv(1 << 20)
        if not msg:
            os._exit(0)
        _cmd, spec = pickle.loads(msg)
        g = _Guest(spec)
        sock.send(pickle.dumps(("ok", {"pid": os.getpid(), "addr": g.addr, "pages": g.pages})))
        while True:
            ready, _, _ = select.select([sock], [], [], g.timeout())
            if ready:
                msg = sock.recv(1 << 16)
                if not msg:
                    os._exit(0)            # the driver is gone: so are we
                cmd = pickle.loads(msg)[0]
                if cmd == "exit":
                    os._exit(0)
                if cmd == "register":
                    sock.send(pickle.dumps(("ok", g.register())))
                elif cmd == "writes":
                    sock.send(pickle.dumps(("ok", g.writes)))
            g.tick()
    except BaseException as exc:  # noqa: BLE001 - reported to the driver
        try:
            sock.send(pickle.dumps(("fail", repr(exc))))
        finally:
            os._exit(1)


class _GuestHandle:
    """The driver's handle on one guest process."""

    def __init__(self, spec: dict):
        self.name = spec["name"]
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "vmhost.reality.density_oracle", "--guest", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=_env(), cwd="/",
                preexec_fn=_die_with_parent)
        finally:
            theirs.close()
        self.pid = self.popen.pid
        self.sock.send(pickle.dumps(("init", spec)))
        self.info: dict | None = None

    def reply(self):
        return recv_reply(self.sock, f"guest {self.name}", self.pid, REPLY_TIMEOUT_S)

    def call(self, *cmd):
        self.sock.send(pickle.dumps(cmd))
        return self.reply()

    def ram(self) -> dict:
        """Rss and AnonHugePages of the guest RAM mapping, in pages (from smaps)."""
        start = f"{self.info['addr']:x}-"
        out, inside = {}, False
        with open(f"/proc/{self.pid}/smaps") as fh:
            for line in fh:
                if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
                    if inside:
                        break
                    inside = line.startswith(start)
                elif inside:
                    key, _, rest = line.partition(":")
                    if key in ("Rss", "AnonHugePages"):
                        out[key] = int(rest.split()[0]) * 1024 // PAGE_SIZE
        return out

    def close(self) -> None:
        try:
            self.sock.send(pickle.dumps(("exit",)))
        except OSError:
            pass
        try:
            self.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        self.sock.close()


# ==============================================================================================
# the machine

def ksmd_pid() -> int:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/comm").read_text().strip() == "ksmd":
                    return int(entry)
            except OSError:
                pass
    raise OracleError("no ksmd thread on this machine")


def _schedstat(pid: int) -> tuple[int, int]:
    """ksmd's time on CPU and waiting for a CPU (ns)."""
    f = Path(f"/proc/{pid}/schedstat").read_text().split()
    return int(f[0]), int(f[1])


def _counters() -> dict[str, int]:
    return {f: int((KSM_DIR / f).read_text()) for f in COUNTERS}


def _cow_ksm() -> int:
    return read_vmstat("cow_ksm").get("cow_ksm", 0)


KHUGEPAGED_DIR = Path("/sys/kernel/mm/transparent_hugepage/khugepaged")
KHUGEPAGED_VMSTAT = ("thp_collapse_alloc", "thp_collapse_alloc_failed", "thp_split_page")


def _khugepaged() -> dict[str, int]:
    """khugepaged's counters (machine-wide: full_scans, pages_collapsed) and its /proc/vmstat
    events, to tell how much of a step khugepaged re-collapsed."""
    out = {f: int((KHUGEPAGED_DIR / f).read_text()) for f in ("full_scans", "pages_collapsed")
           if (KHUGEPAGED_DIR / f).exists()}
    vm = read_vmstat(*KHUGEPAGED_VMSTAT)
    out.update({f: vm.get(f, 0) for f in KHUGEPAGED_VMSTAT})
    return out


# ==============================================================================================
# the plan: what the emulator would boot

def _full_scale(cfg):
    """The config at resolution 1 (the oracle always runs every page)."""
    return dataclasses.replace(cfg, resolution=1)


def _thp(cfg) -> bool:
    return cfg.host.thp in ("always", "madvise")


def guest_specs(cfg) -> list[dict]:
    """Every guest of the boot sequence as the emulator builds it (name, seed, contents)."""
    from vmhost.density import DensityRunner
    runner = DensityRunner(_full_scale(cfg))
    specs = []
    for n, idx in enumerate(cfg.sequence, start=1):
        e = cfg.mix[idx]
        gm_name = cfg.guest_names[n - 1] if cfg.guest_names else f"{e.name}-{n}"
        specs.append({"n": n, "mix": idx, "name": gm_name, "image": e.image,
                      "seed": cfg.seed * 100_003 + n, "domain": e.domain,
                      "memory_mib": e.memory_mib, "nosharepages": e.nosharepages,
                      "locked": e.locked, "thp": _thp(cfg), "warm_start": cfg.warm_start,
                      "write_period_ns": cfg.write_period_ns})
    # the emulator's own seed and name rule, checked rather than trusted
    gm = runner._guest_memory(1, cfg.mix[cfg.sequence[0]]) if cfg.sequence else None
    if gm is not None and (gm.name, gm.seed) != (specs[0]["name"], specs[0]["seed"]):
        raise OracleError("the emulator names or seeds its guests differently from the oracle")
    return specs


def _footprint_pages(spec: dict) -> int:
    """Pages the guest process will have resident before any merging."""
    from guests.images import GuestMemory
    gm = GuestMemory.build(spec["image"], spec["name"], spec["seed"], spec["domain"], spec["memory_mib"])
    res = gm.touched.copy()
    for _c, frames, _r in gm.steady:
        res[frames] = True
    if spec["locked"]:
        return gm.pages
    if spec["thp"]:
        return int(len(np.unique(np.flatnonzero(res) // HPAGE_PAGES))) * HPAGE_PAGES
    return int(res.sum())


def check_fits(cfg) -> list[dict]:
    """The guest specs, or one line (InputError) when they do not fit this machine safely."""
    specs = guest_specs(cfg)
    safe = int(SAFE_FRACTION * available_bytes())
    need = 0
    for i, s in enumerate(specs):
        more = _footprint_pages(s) * PAGE_SIZE + GUEST_OVERHEAD_BYTES
        if need + more > safe:
            raise InputError(
                f"{cfg.path}: density.mix: the oracle's {len(specs)} guests do not fit in "
                f"{SAFE_FRACTION:.0%} of this machine's available memory ({safe / 2**30:.1f} GiB): "
                f"the first {i} fit ({need / 2**30:.1f} GiB), guest {i + 1} ({s['name']}) would bring "
                f"it to {(need + more) / 2**30:.1f} GiB; lower density.max_guests or the guests' memory")
        need += more
    return specs


def check_reproducible(cfg) -> None:
    """What the oracle cannot reproduce is refused here (one line each)."""
    if cfg.host.profile != "linux-6.18":
        raise InputError(f"{cfg.path}: host.profile: the oracle runs this machine's kernel "
                         f"(linux-6.18), not {cfg.host.profile}")
    if cfg.host.policy and cfg.host.policy[0] != "fixed":
        raise InputError(f"{cfg.path}: policy.name: the oracle does not run tuning policies "
                         f"({cfg.host.policy[0]}); remove policy: to compare the fixed knobs")
    if len(cfg.host.topology.nodes) > 1 and len(_machine_nodes()) < len(cfg.host.topology.nodes):
        raise InputError(f"{cfg.path}: host.nodes: {len(cfg.host.topology.nodes)} NUMA nodes; this "
                         f"machine has {len(_machine_nodes())}")
    if cfg.host.thp in ("always", "madvise") and _machine_thp() == "never":
        raise InputError(f"{cfg.path}: host.thp: {cfg.host.thp}, but THP is disabled on this machine")
    if cfg.host.thp == "always" and _machine_thp() not in ("always", "madvise"):
        raise InputError(f"{cfg.path}: host.thp: always is not available here")


def _machine_nodes() -> list[str]:
    return [p.name for p in Path("/sys/devices/system/node").glob("node[0-9]*")]


def _machine_thp() -> str:
    text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    return text.split("[", 1)[1].split("]", 1)[0]


# ==============================================================================================
# the driver (a child of the CLI process: it may die, the CLI cleans up)

class _Driver:
    def __init__(self, cfg, specs: list[dict], progress):
        from vmhost.density import DensityRunner
        self.cfg, self.specs, self.progress = cfg, specs, progress
        self.stride_of = DensityRunner(_full_scale(cfg))._stride
        self.settle = SettleRule.of(cfg)       # the emulator's rule, on the kernel's counters
        self.ksmd = ksmd_pid()
        self.guests: list[_GuestHandle] = []
        self.t_start = time.monotonic_ns()
        self.timeline: list[dict] = []
        self.collapsed0 = _khugepaged_collapsed()
        self.proc_timeline: list[dict] = []    # every guest's ksm_stat at every full-scan end

    # -- knobs ---------------------------------------------------------------------------------
    def set_knobs(self) -> bool:
        knobs = dict(KNOB_DEFAULTS)
        knobs.update({k: v for k, v in self.cfg.host.ksm if k != "run"})
        for name, value in knobs.items():
            err = write_knob(name, value)
            if err:
                raise InputError(f"{self.cfg.path}: ksm.{name}: the kernel refuses {value!r} ({err})")
        run = dict(self.cfg.host.ksm).get("run", "0")
        err = write_knob("run", run)
        if err:
            raise InputError(f"{self.cfg.path}: ksm.run: the kernel refuses {run!r} ({err})")
        self.expected = {k: read_knob(k) for k in list(knobs) + ["run"]}
        return str(run) == "1"

    def set_run(self, value: str) -> None:
        """Pause (0) or resume (1) ksmd between steps: filling the next guests takes seconds of
        real time, in which ksmd would run passes the emulator's boot sequence does not have
        (with smart scan, passes that move every skipped page's skip cycle)."""
        err = write_knob("run", value)
        if err:
            raise OracleError(f"KSM refused run={value} ({err})")
        self.expected["run"] = value

    def check_interference(self) -> None:
        """Every oracle user takes the lock, but a stray write (run=2 unmerges everything)
        would silently spoil the measurement: the knobs set at the start must still hold."""
        for k, v in self.expected.items():
            now = read_knob(k)
            if now != v:
                raise OracleError(f"KSM knob {k} changed from {v} to {now} during the run (another "
                                  f"process wrote it without the oracle lock); result discarded")

    # -- sampling --------------------------------------------------------------------------------
    def sample(self):
        c = _counters()
        cpu, wait = _schedstat(self.ksmd)
        return (time.monotonic_ns(), c, cpu, wait, _cow_ksm())

    def proc_sample(self, t: int) -> dict:
        procs = {}
        for g in self.guests:
            if g.info is None:
                continue
            try:
                stat = read_ksm_stat(g.pid)
            except OSError:
                continue
            procs[g.name] = {f: int(stat[f]) for f in PROC_FIELDS if f in stat}
        return {"t_s": round((t - self.t_start) / 1e9, 3), "procs": procs}

    @staticmethod
    def saved(c: dict) -> int:
        return c["pages_sharing"] + c["ksm_zero_pages"]

    # -- one step --------------------------------------------------------------------------------
    def run(self) -> dict:
        running = self.set_knobs()
        steps, failed_at = [], None
        n = 0
        while n < len(self.specs) and failed_at is None:
            count = min(self.stride_of(n), len(self.specs) - n)
            step = self.step(n, count, running)
            steps.append(step)
            if self.progress:
                self.progress(step)
            if not step["ok"]:
                failed_at = step
            n += count
        return self.result(steps, failed_at)

    def step(self, n: int, count: int, running: bool) -> dict:
        cfg = self.cfg
        booted = []
        for spec in self.specs[n:n + count]:
            g = _GuestHandle(spec)
            self.guests.append(g)
            booted.append(g)
        for g in booted:
            g.info = g.reply()
        paused = running and n > 0            # ksmd was paused at the previous step's last boundary
        self.check_interference()
        t0, c0, cpu0, wait0, cow0 = self.sample()
        self._khp0 = _khugepaged()
        for g in booted:
            g.call("register")
        if paused:
            self.set_run("1")
        new_pages = sum(g.info["pages"] for g in booted)
        samples = [(t0, self.saved(c0), cpu0)]
        hist = [(t0, c0, cpu0, cow0, wait0)]
        st = {"steady": False, "scans": 0}
        scan_est = self._scan_time_estimate_s()
        if cfg.settle_time_ns is not None or not running:
            t_end = t0 + (cfg.settle_time_ns or 30_000_000_000)
            while time.monotonic_ns() < t_end:
                time.sleep(POLL_S)
                t, c, cpu, wait, cow = self.sample()
                samples.append((t, self.saved(c), cpu))
            hist.append((t, c, cpu, cow, wait))
            st.update(steady=cfg.settle_time_ns is not None, scans=c["full_scans"] - c0["full_scans"],
                      settled_by="time" if cfg.settle_time_ns is not None else "ksm not running")
            window = hist[0]
        else:
            rule = self.settle
            limit = time.monotonic() + 4 * rule.max_scans * scan_est + 10
            fs = c0["full_scans"]
            while True:
                if time.monotonic() > limit:
                    st["settled_by"] = "time bound"
                    break
                time.sleep(POLL_S)
                t, c, cpu, wait, cow = self.sample()
                samples.append((t, self.saved(c), cpu))
                if c["full_scans"] == fs:
                    continue
                fs = c["full_scans"]
                if len(hist) == 1 and c["pages_scanned"] == hist[0][1]["pages_scanned"]:
                    # a full scan that visited no page: ksmd ended a cycle over an empty list
                    # just as the first guests registered (once in 19 runs); counted as a pass,
                    # it put every guest's skip cycle a pass behind the emulator's. The step's
                    # passes are the ones after it
                    hist[0] = (t, c, cpu, cow, wait)
                    continue
                self.check_interference()
                hist.append((t, c, cpu, cow, wait))
                self.proc_timeline.append(self.proc_sample(t))
                if rule.after_scan(st, [tuple(h[1][f] for f in SETTLE_COUNTERS) for h in hist], new_pages):
                    break
            window = rule.window_start(hist)
            if n + count < len(self.specs):
                self.set_run("0")             # the next guests register before ksmd goes on
        t1, c1, cpu1, wait1, cow1 = self.sample()
        self.check_interference()
        samples.append((t1, self.saved(c1), cpu1))
        return self.measure(n + count, booted, st, samples, hist, window, (t1, c1, cpu1, wait1, cow1),
                            (t0, c0, cpu0, wait0, cow0))

    def _scan_time_estimate_s(self) -> float:
        pages = sum(g.info["pages"] for g, s in zip(self.guests, self.specs) if not s["nosharepages"]) or 1
        pts = max(int(read_knob("pages_to_scan")), 1)
        sleep = int(read_knob("sleep_millisecs"))
        return max(-(-pages // pts) * sleep / 1000.0, 0.001)

    def measure(self, n, booted, st, samples, hist, window, end, start) -> dict:
        cfg = self.cfg
        t1, c1, cpu1, wait1, cow1 = end
        t0, c0, cpu0, wait0, cow0 = start
        wt, _wc, wcpu, wcow, wwait = window
        win_dt = max(t1 - wt, 1)
        cpu_share = (cpu1 - wcpu) / win_dt
        # the same share had ksmd never waited for a CPU (this machine is shared)
        cpu_share_unwaited = (cpu1 - wcpu) / max(win_dt - (wait1 - wwait), 1)
        cow_rate = (cow1 - wcow) / (win_dt / 1e9)
        procs, resident, huge = {}, 0, 0
        for g in self.guests:
            ram = g.ram()
            resident += ram.get("Rss", 0)
            huge += ram.get("AnonHugePages", 0)
            stat = read_ksm_stat(g.pid)
            procs[g.name] = {**{f: int(stat[f]) for f in PROC_FIELDS if f in stat},
                             "rss_pages": ram.get("Rss", 0), "anon_huge_pages": ram.get("AnonHugePages", 0)}
        used = resident - c1["pages_sharing"]
        ram_pages = sum(nd.mem_bytes for nd in cfg.host.topology.nodes) // PAGE_SIZE
        saved = self.saved(c1)
        scans = [b[0] for b in hist[1:]]
        k = min(self.settle.window, len(scans) - 1)
        scan_s = round((scans[-1] - scans[-1 - k]) / 1e9 / k, 3) if k > 0 else None
        last = self.specs[n - 1]
        e = cfg.mix[last["mix"]]
        step = {
            "guests": n, "image": e.image.name, "mix": e.index, "guest": last["name"],
            "memory_mib": e.memory_mib, "domain": e.domain,
            "steady": st["steady"], "settled_by": st.get("settled_by"), "full_scans": st["scans"],
            "virtual_s": round((t1 - t0) / 1e9, 3),
            "used_pages": used,
            "free_pages": ram_pages - used,
            "per_node": [{"node": 0, "total_pages": ram_pages, "free_pages": ram_pages - used}],
            "pages_shared": c1["pages_shared"], "pages_sharing": c1["pages_sharing"],
            "ksm_zero_pages": c1["ksm_zero_pages"], "pages_unshared": c1["pages_unshared"],
            "saved_pages": saved,
            "ksmd_cpu_share": round(cpu_share, 6),
            "ksmd_cpu_s_total": round((cpu1 - self._cpu_first) / 1e9, 6),
            "ksmd_wait_s": round((wait1 - wait0) / 1e9, 3),
            "swapin_rate": 0.0, "swapin_pages": 0, "swapout_pages": 0,
            "cow_ksm_rate": round(cow_rate, 3),
            "oom_kills": [],
            "time_to": _time_to(samples, t0, self.saved(c0), saved),
            "ideal_now_pages": None,
            "swapped_pages": 0,
            "booted": len(booted),
            "kernel": {"ksmd_cpu_share_unwaited": round(cpu_share_unwaited, 6),
                       "scans": [{"t_s": round((h[0] - t0) / 1e9, 4), "cpu_s": round((h[2] - cpu0) / 1e9, 6),
                                  "wait_s": round((h[4] - wait0) / 1e9, 6),
                                  **{f: h[1][f] for f in COUNTERS}} for h in hist],
                       "resident_pages": resident, "anon_huge_pages": huge, "full_scan_s": scan_s,
                       "pages_volatile": c1["pages_volatile"],
                       "stable_node_chains": c1["stable_node_chains"],
                       "stable_node_dups": c1["stable_node_dups"], "procs": procs,
                       "khugepaged": {k: v - self._khp0.get(k, 0) for k, v in _khugepaged().items()}},
        }
        gib = saved / PAGES_PER_GIB
        step["cpu_s_per_gib_saved"] = round(step["ksmd_cpu_s_total"] / gib, 6) if gib > 0 else None
        if cfg.storm_fraction is not None:
            storm = cfg.storm_fraction * saved
            churn = cow_rate * cfg.storm_window_ns / 1e9
            need = int(math.ceil(storm + churn))
            avail = step["free_pages"]
            step["storm"] = {"storm_pages": int(math.ceil(storm)), "churn_pages": int(math.ceil(churn)),
                             "headroom_pages": need, "available_pages": max(avail, 0),
                             "survives": avail >= need}
        v = []
        if cfg.ksmd_cpu is not None and cpu_share > cfg.ksmd_cpu:
            v.append(f"ksmd CPU {cpu_share:.1%} > {cfg.ksmd_cpu:.1%}")
        head = _headroom_pages(cfg)
        if head is not None and step["free_pages"] < head:
            v.append(f"free memory {step['free_pages']} pages < headroom {head}")
        step["thp_collapse_alloc"] = step["kernel"]["khugepaged"].get("thp_collapse_alloc", 0)
        step["held_pages"] = used              # guest pages in RAM or swap (no swap here)
        step["violations"] = v
        step["ok"] = not v
        self._keep_timeline(n, samples)
        return step

    _cpu_first = 0

    def _keep_timeline(self, n: int, pts: list) -> None:
        stride = max(1, -(-len(pts) // TIMELINE_POINTS_PER_STEP))
        keep = pts[::stride] + ([pts[-1]] if (len(pts) - 1) % stride else [])
        self.timeline.extend({"t_s": round((t - self.t_start) / 1e9, 3), "guests": n, "saved_pages": s,
                              "ksmd_cpu_s": round((cpu - self._cpu_first) / 1e9, 6)} for t, s, cpu in keep)

    # -- the result ------------------------------------------------------------------------------
    def result(self, steps: list[dict], failed_at) -> dict:
        from vmhost.density import DensityRunner
        from vmhost.density.curves import curve_pages, guest_facts
        from vmhost.density.result import ACCOUNTING, add_answer, largest_fitting
        cfg = self.cfg
        runner = DensityRunner(cfg)       # the config's own host, for its capacity
        runner._build()
        cap = runner.capacity_pages()
        use_zero = dict(cfg.host.ksm).get("use_zero_pages", "0") == "1"
        from guests.images import GuestMemory
        curve = []
        by_guests = {s["guests"]: s for s in steps}
        facts = (guest_facts(GuestMemory.build(spec["image"], spec["name"], spec["seed"], spec["domain"],
                                               spec["memory_mib"]), cfg.mix[spec["mix"]], _thp(cfg))
                 for spec in self.specs)           # one guest's memory at a time
        for spec, (_, noksm, ideal) in zip(self.specs, curve_pages(facts, use_zero)):
            row = {"guests": spec["n"], "no_ksm_pages": noksm, "ideal_pages": ideal,
                   "fits_no_ksm": noksm <= cap, "fits_ideal": ideal <= cap}
            s = by_guests.get(spec["n"])
            if s is not None:
                s["ideal_now_pages"] = ideal
                row.update(ksm_pages=s["held_pages"], ksm_ram_pages=s["used_pages"],
                           saved_pages=s["saved_pages"], fits_ksm=s["ok"])
            curve.append(row)

        ok = [s for s in steps if s["ok"]]
        best = ok[-1] if ok else None
        kernel = os.uname().release
        res = {
            "config": cfg.path, "profile": cfg.host.profile, "engine": "kernel",
            "resolution": 1,
            "resolution_note": f"exact: every page on this machine's kernel ({kernel})",
            "covers": COVERS.format(kernel=kernel),
            "notes": [COVERS.format(kernel=kernel)] + [n for n in (self.settle.note(),) if n],
            "unfaithful": [],
            "accounting": ACCOUNTING,
            "host": {"ram_pages": sum(nd.mem_bytes for nd in cfg.host.topology.nodes) // PAGE_SIZE,
                     "capacity_pages": cap, "headroom_pages": runner.headroom_pages(),
                     "thp": cfg.host.thp, "knobs": {k: v for k, v in cfg.host.ksm},
                     "machine": {"kernel": kernel, "thp": _machine_thp(),
                                 "khugepaged_collapses_during_run": (_khugepaged_collapsed() or 0)
                                 - (self.collapsed0 or 0)}},
            "policy": {"name": "fixed", "options": {}, "wakeups": 0, "changes": []},
            "order": cfg.order, "sequence_length": len(cfg.sequence),
            "limits": {"oom_kills": 0, "swapin_rate": cfg.swapin_rate, "ksmd_cpu": cfg.ksmd_cpu,
                       "free_headroom_pages": _headroom_pages(cfg)},
            "vms_per_host": {"no_ksm": largest_fitting(curve, "fits_no_ksm"),
                             "ksm": best["guests"] if best else 0,
                             "ideal": largest_fitting(curve, "fits_ideal")},
            "search_capped": failed_at is None,
            "limited_by": failed_at["violations"] if failed_at else
                          [f"the boot sequence ended at {len(cfg.sequence)} guests (max_guests or counts)"],
            "curve": curve, "steps": steps, "timeline": self.timeline,
            "kernel_proc_timeline": self.proc_timeline,
            "wall_s": round((time.monotonic_ns() - self.t_start) / 1e9, 3),
        }
        return add_answer(res, cfg, steps, curve)

    def close(self) -> None:
        for g in self.guests:
            g.close()
        self.guests = []


def _khugepaged_collapsed() -> int | None:
    try:
        return int(Path("/sys/kernel/mm/transparent_hugepage/khugepaged/pages_collapsed").read_text())
    except OSError:
        return None


def _headroom_pages(cfg) -> int | None:
    total = sum(n.mem_bytes for n in cfg.host.topology.nodes) // PAGE_SIZE
    if cfg.free_headroom_bytes is not None:
        return -(-cfg.free_headroom_bytes // PAGE_SIZE)
    if cfg.free_headroom_fraction is not None:
        return int(math.ceil(cfg.free_headroom_fraction * total))
    return None


def _time_to(samples: list[tuple[int, int, int]], t0: int, s0: int, s_end: int) -> dict:
    """Seconds from the registration until the step's gain in savings reached X% of its gain."""
    gain = s_end - s0
    out = {}
    for pct in (50, 90, 99):
        want = s0 + pct / 100 * gain
        hit = next((t for t, s, _c in samples if s >= want), None) if gain > 0 else None
        out[f"p{pct}_s"] = None if hit is None else round((hit - t0) / 1e9, 3)
    return out


def _driver_main(cfg_path: str, out_fd: int) -> None:
    """Entry of the driver process: run the study, write the result as JSON to ``out_fd``."""
    from vmhost.density import load_density
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = os.fdopen(out_fd, "w")
    drv = None
    try:
        cfg = load_density(cfg_path)
        specs = guest_specs(cfg)

        def progress(step):
            print(f"oracle: {step['guests']} guests ({step['image']}): pages_sharing {step['pages_sharing']}, "
                  f"{step['full_scans']} scans, {step['virtual_s']:.1f}s, ksmd CPU {step['ksmd_cpu_share']:.1%}"
                  f"{'' if step['ok'] else ' FAIL: ' + '; '.join(step['violations'])}",
                  file=sys.stderr, flush=True)
        drv = _Driver(cfg, specs, progress)
        drv._cpu_first = _schedstat(drv.ksmd)[0]
        res = drv.run()
        out.write(dumps_json({"ok": res}, compact=True))
    except InputError as exc:
        json.dump({"input_error": str(exc)}, out)
    except BaseException as exc:  # noqa: BLE001 - reported to the CLI process
        import traceback
        json.dump({"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}, out)
    finally:
        out.flush()
        if drv is not None:
            drv.close()
    os._exit(0)


# ==============================================================================================
# the CLI side: refusals, the lock, the driver, and the clean-up that always runs

class _Terminated(BaseException):
    pass


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _drive(cfg, quiet: bool) -> tuple[str, int]:
    """Run the driver to its end; whatever happens, its whole process group dies with it."""
    with tempfile.TemporaryFile("w+") as out:
        driver = subprocess.Popen(
            [sys.executable, "-m", "vmhost.reality.density_oracle", "--driver",
             str(Path(cfg.path).resolve()), str(out.fileno())],
            pass_fds=[out.fileno()], stdin=subprocess.DEVNULL, env=_env(), cwd="/",
            start_new_session=True, preexec_fn=_die_with_parent,
            stderr=subprocess.DEVNULL if quiet else None)
        try:
            driver.wait()
        finally:
            _kill_group(driver.pid)            # every guest goes with the driver
            driver.wait()
            end = time.monotonic() + 30
            while _group_alive(driver.pid) and time.monotonic() < end:
                time.sleep(0.05)
        out.seek(0)
        return out.read(), driver.returncode


def run_oracle(cfg, quiet: bool = False) -> dict:
    """Run the density study ``cfg`` on this machine's kernel; the result (emulator schema)."""
    if os.geteuid() != 0:
        raise InputError(f"{cfg.path}: the density oracle must run as root (it drives /sys/kernel/mm/ksm)")
    check_reproducible(cfg)
    check_fits(cfg)
    main = threading.current_thread() is threading.main_thread()
    old_term = None
    if main:
        def on_term(signum, frame):
            raise _Terminated()
        old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        with exclusive_kernel_ksm():
            kpid = ksmd_pid()
            nice0 = os.getpriority(os.PRIO_PROCESS, kpid)
            os.setpriority(os.PRIO_PROCESS, kpid, KSMD_NICE)
            try:
                text, rc = _drive(cfg, quiet)
            finally:
                os.setpriority(os.PRIO_PROCESS, kpid, nice0)
    except _Terminated:
        raise SystemExit(143) from None
    finally:
        if main and old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    try:
        doc = json.loads(text)
    except ValueError:
        raise OracleError(f"the oracle's driver died (exit {rc}) without a result") from None
    if "input_error" in doc:
        raise InputError(doc["input_error"])
    if "error" in doc:
        raise OracleError(doc["error"] + ("\n" + doc["trace"] if os.environ.get("VMHOST_ORACLE_DEBUG") else ""))
    return doc["ok"]


# ==============================================================================================
# emulator against kernel

def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _spread(xs):
    xs = [x for x in xs if x is not None]
    if len(xs) < 2 or not _mean(xs):
        return None
    return (max(xs) - min(xs)) / abs(_mean(xs))


def _err(emu, ker):
    if emu is None or ker is None or ker == 0:
        return None
    return (emu - ker) / abs(ker)


TOLERANCES = {"pages_sharing": 0.02, "time": 0.15, "ksmd_cpu_share": 0.10, "used_pages": 0.01}


def _scan_around(step: dict, t_s) -> float | None:
    """How long the kernel's full scan lasted in which time ``t_s`` of the step fell (from the
    step's per-scan samples, ``kernel.scans``); None without them."""
    ts = [h["t_s"] for h in step.get("kernel", {}).get("scans", ())]
    if t_s is None or len(ts) < 2:
        return None
    for a, b in zip(ts, ts[1:]):
        if a < t_s <= b + 5e-4:          # the times are rounded to 1 ms, the scans to 0.1 ms
            return b - a
    return None


def compare(emulator: dict, kernels: list[dict]) -> dict:
    """Per step: the emulator's figure, the mean of the kernel runs, their spread, the error and
    whether it is within the issue's tolerance (time to X%: 15% or one full scan)."""
    rows = []
    ksteps = [{s["guests"]: s for s in k["steps"]} for k in kernels]
    for es in emulator["steps"]:
        n = es["guests"]
        ks = [d[n] for d in ksteps if n in d]
        if not ks:
            continue
        row = {"guests": n, "image": es["image"], "runs": len(ks)}
        scan = _mean([k.get("kernel", {}).get("full_scan_s") for k in ks])
        for key in ("pages_sharing", "saved_pages", "used_pages", "ksmd_cpu_share"):
            kv = [k[key] for k in ks]
            e = _err(es[key], _mean(kv))
            row[key] = {"emulator": es[key], "kernel": _mean(kv), "spread": _spread(kv), "err": e,
                        "ok": None if e is None or key == "saved_pages" else abs(e) <= TOLERANCES.get(key, 1)}
        for p in ("p50_s", "p90_s"):
            kv = [k["time_to"][p] for k in ks]
            km, ev = _mean(kv), es["time_to"][p]
            e = _err(ev, km)
            # "one full scan" is the kernel's full scan in which the time falls (the mean over
            # the runs): the savings come in passes, and under smart scan the window's passes,
            # which skip most pages, are several times shorter than the early ones that merge
            at = _mean([_scan_around(k, k["time_to"][p]) for k in ks])
            one_scan = at if at is not None else scan
            ok = None
            if e is not None:
                ok = abs(e) <= TOLERANCES["time"] or (one_scan is not None and abs(ev - km) <= one_scan)
            row[p] = {"emulator": ev, "kernel": km, "spread": _spread(kv), "err": e, "ok": ok,
                      "full_scan_s": one_scan}
        row["full_scan_s"] = scan
        # huge pages khugepaged collapsed in the step (the kernel's count is machine-wide)
        row["thp_collapse_alloc"] = {"emulator": es.get("thp_collapse_alloc"),
                                     "kernel": _mean([k.get("kernel", {}).get("khugepaged", {}).get("thp_collapse_alloc")
                                                        for k in ks])}
        rows.append(row)
    held = [r[k]["ok"] for r in rows for k in ("pages_sharing", "used_pages", "ksmd_cpu_share", "p50_s", "p90_s")
            if r[k]["ok"] is not None]
    return {"config": emulator["config"], "emulator_resolution": emulator["resolution"],
            "kernel_runs": len(kernels), "tolerances": TOLERANCES, "steps": rows,
            "all_within": bool(held) and all(held),
            "emulator_wall_s": emulator.get("wall_s"), "kernel_wall_s": [k.get("wall_s") for k in kernels]}


def format_compare(cmp: dict) -> str:
    def pct(v):
        return "-" if v is None else f"{v:+.1%}"

    def sp(v):
        return "-" if v is None else f"{v:.1%}"

    def mark(ok):
        return "" if ok is None else (" ok" if ok else " NO")

    lines = [f"emulator (resolution 1/{cmp['emulator_resolution']}) vs kernel (mean of {cmp['kernel_runs']} "
             f"run(s); spread = (max - min) / mean) for {cmp['config']}",
             f"tolerances: pages_sharing {TOLERANCES['pages_sharing']:.0%}, time to 50/90% "
             f"{TOLERANCES['time']:.0%} or one full scan, ksmd CPU {TOLERANCES['ksmd_cpu_share']:.0%}, "
             f"used memory {TOLERANCES['used_pages']:.0%}",
             f"{'N':>3} {'image':<14} {'kernel sharing':>14} {'spread':>7} {'emu err':>8} "
             f"{'kernel used GiB':>15} {'emu err':>8} {'kernel cpu':>10} {'spread':>7} {'emu err':>8} "
             f"{'kernel t50':>10} {'emu err':>8} {'kernel t90':>10} {'emu err':>8} {'scan s':>7} "
             f"{'collapses k/e':>13}"]
    for r in cmp["steps"]:
        ps, u, c, t5, t9 = r["pages_sharing"], r["used_pages"], r["ksmd_cpu_share"], r["p50_s"], r["p90_s"]

        def t(v):
            return "-" if v is None else f"{v:.1f}s"
        lines.append(
            f"{r['guests']:>3} {r['image'][:14]:<14} {ps['kernel']:>14,.0f} {sp(ps['spread']):>7} "
            f"{pct(ps['err']) + mark(ps['ok']):>11} {u['kernel'] / PAGES_PER_GIB:>12.3f} "
            f"{pct(u['err']) + mark(u['ok']):>11} {c['kernel']:>10.1%} {sp(c['spread']):>7} "
            f"{pct(c['err']) + mark(c['ok']):>11} {t(t5['kernel']):>10} {pct(t5['err']) + mark(t5['ok']):>11} "
            f"{t(t9['kernel']):>10} {pct(t9['err']) + mark(t9['ok']):>11} "
            f"{'-' if r['full_scan_s'] is None else format(r['full_scan_s'], '.1f'):>7} "
            f"{_collapses(r.get('thp_collapse_alloc')):>13}")
    lines.append(f"all within tolerance: {'yes' if cmp['all_within'] else 'no'}; wall: emulator "
                 f"{cmp['emulator_wall_s']}s, kernel {cmp['kernel_wall_s']}s")
    return "\n".join(lines)


def _collapses(c: dict | None) -> str:
    if not c or c.get("kernel") is None or c.get("emulator") is None:
        return "-"
    return f"{c['kernel']:.0f}/{c['emulator']}"


def run_cli(args) -> int:
    """``vmhost density CONFIG --oracle [--compare] [--runs N]``: the kernel's run(s), and with
    ``--compare`` the emulator's beside them (at the config's resolution, or
    ``--emulator-resolution``)."""
    from vmhost.density import DensityRunner, format_result, load_density, write_report
    cfg = load_density(args.config)
    runs = getattr(args, "runs", 1) or 1
    if runs < 1:
        raise InputError(f"--runs: {runs} is not a positive number of runs")
    kernels = []
    for i in range(runs):
        if not args.quiet and runs > 1:
            print(f"oracle: kernel run {i + 1} of {runs}", file=sys.stderr, flush=True)
        try:
            kernels.append(run_oracle(cfg, quiet=args.quiet))
        except KeyboardInterrupt:
            print("vmhost: density oracle: interrupted (guests killed, KSM restored)", file=sys.stderr)
            return 130
        except OracleError as exc:
            print(f"vmhost: density oracle: {str(exc).splitlines()[0]}", file=sys.stderr)
            return 1
    res = kernels[0]
    out: dict = {"kernel": kernels}
    if args.compare:
        ecfg = cfg
        er = getattr(args, "emulator_resolution", None)
        if er:
            from vmhost.density import check_resolution
            ecfg = dataclasses.replace(cfg, resolution=er)
            check_resolution(ecfg)
        emu = DensityRunner(ecfg).run()
        cmp = compare(emu, kernels)
        res["comparison"] = cmp
        out.update(emulator=emu, compare=cmp)
    if args.report:
        write_report(res, args.report)
    if args.json:
        print(dumps_json(out if args.compare or runs > 1 else res, compact=True))
    else:
        for k in kernels:
            print(format_result(k))
        if args.compare:
            print(format_compare(out["compare"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 2 and args[0] == "--guest":
        _guest_main(int(args[1]))
    if len(args) == 3 and args[0] == "--driver":
        _driver_main(args[1], int(args[2]))
    if len(args) >= 3 and args[0] == "--table":
        # compare saved runs: EMULATOR.json (vmhost density --json) KERNEL.json ... (--oracle --json)
        emu = json.loads(Path(args[1]).read_text())
        kernels = [json.loads(Path(a).read_text()) for a in args[2:]]
        print(format_compare(compare(emu, kernels)))
        return 0
    print("internal entry point of vmhost density --oracle", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
