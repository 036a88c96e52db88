"""KSM tuning policies: who turns ksmd on and how hard it scans, over time.

A policy runs on the host's virtual clock and writes KSM's knobs the way the
real tool writes /sys/kernel/mm/ksm, from what the tool reads (/proc/meminfo,
ps, the KSM files), with the tool's own constants and arithmetic (the tools
work in kB; so do these classes):

- ``fixed``: the configured knobs, once.
- ``ksmtuned`` (ksmtuned.sh, RHEL/Fedora/Proxmox): sleeps its monitor interval
  (60 s), then ``adjust``: with ``total`` = MemTotal, ``thres`` = total x 20 /
  100 but at least KSM_THRES_CONST = 2048 (kB, compared with a kB value), free
  = MemFree + Buffers + Cached and committed = the qemu processes' RSS: if
  committed + thres < total and free > thres, KSM is stopped; otherwise
  ``npages`` (starting at 0) grows by 300 while free < thres and shrinks by 50
  otherwise, clamped to [64, 1250], and pages_to_scan, sleep_millisecs =
  max(10, 10 x 16 GiB / total) and run=1 are written.
- ``mom`` (oVirt MOM with VDSM's 03-ksm.policy): every 10 s (policy engine
  interval, after a first sleep) with free memory averaged over the host
  monitor's last 10 samples (taken every 5 s): threshold = MemTotal x 0.20 (no
  floor); committed = the qemu processes' virtual size (``ksm_shareable``:
  ps -o vsz); stop when threshold + committed < MemTotal and average free >
  threshold; otherwise run=1, sleep_millisecs = max(10, 10 x 16 GiB / MemTotal)
  (the original published rules had no 10 ms floor: ``sleep_min_ms: 0``) and
  pages_to_scan = the current pages_to_scan + 300 (average free under the
  threshold) or - 50, clamped to [64, 1250]; merge_across_nodes is set to the
  policy's value whenever no page is shared, and run=2 (unmerge) is written
  while pages are shared and the value differs. Only changed values are
  written (MOM's KSM controller).
- ``kubevirt`` (virt-handler's KSM handler): at start (twice: Start() and the
  loop's first spin), then every 3 minutes: with MemTotal, MemAvailable and
  ksmd's current run and pages_to_scan, sleep = 100 x 16 GiB / (MemTotal -
  MemAvailable) but at least 10 ms; without pressure (available > 20% of total)
  a running KSM decays pages_to_scan by 50 and stops once it would go under
  64; under pressure a stopped KSM starts at 100 pages, a running one grows by
  300 up to 1250.
- ``advisor``: the kernel's own scan-time advisor (advisor_mode=scan-time,
  6.8+), which retunes pages_to_scan after every full scan.

Every process of an emulated host is a guest's QEMU process, so "the qemu
processes" are all of them. The emulator has no page cache: MemFree + Buffers
+ Cached is the free memory, and MemAvailable is free memory less the high
watermarks (the kernel's ``totalreserve_pages``), never below 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from hw.units import PAGE_SIZE
from vmhost.clock import NS_PER_S

PAGE_KIB = PAGE_SIZE // 1024

if TYPE_CHECKING:
    from vmhost.host import Host
    from vmhost.ksm.engine import Ksm


def scaled_scan_knobs(pages_to_scan: int, sleep_millisecs: int, resolution: int,
                      min_batch: int = 256) -> tuple[int, int]:
    """pages_to_scan and sleep_millisecs for a host simulated at 1/``resolution`` of its pages:
    the same full-scan time and CPU share, with batches of at least ``min_batch`` pages (both
    knobs multiplied by the same factor: a coarser time grain, not a different scan rate)."""
    if resolution == 1:
        return pages_to_scan, sleep_millisecs
    grain = max(1, -(-min_batch * resolution // max(pages_to_scan, 1)))
    return max(1, round(pages_to_scan * grain / resolution)), sleep_millisecs * grain


@dataclass
class Decision:
    """What a policy did at one wake-up (kept for reports)."""
    at_ns: int
    run: int
    pages_to_scan: int
    sleep_millisecs: int
    reason: str


@dataclass
class Policy:
    """Fixed knobs, and the base of the others.

    A host simulated at 1/``resolution`` of its pages (density and fleet studies) is seen by the
    policy at full scale: page counts are multiplied back and the scan knobs it writes are
    scaled down (``scaled_scan_knobs``), so every decision is the one the tool would take on
    the real host, and its history records those full-scale values.
    """
    name: str = "fixed"
    knobs: dict = field(default_factory=dict)
    history: list[Decision] = field(default_factory=list)
    resolution: int = 1
    SCALES: ClassVar[bool] = True       # faithful on a host simulated at 1/N of its pages

    def attach(self, host: "Host", ksm: "Ksm", full_scale_knobs: dict | None = None) -> None:
        """Start on ``host``; ``full_scale_knobs`` are the configured pages_to_scan and
        sleep_millisecs of the real host when the simulation runs at another resolution."""
        self.host, self.ksm = host, ksm
        base = full_scale_knobs or {}
        self.intent = {"pages_to_scan": int(base.get("pages_to_scan", ksm.knobs.pages_to_scan)),
                       "sleep_millisecs": int(base.get("sleep_millisecs", ksm.knobs.sleep_millisecs))}
        self._write(**self.knobs)
        self._record("configured knobs")

    # -- the host as the tool sees it (full scale) -----------------------------------------------
    def host_pages(self) -> int:
        return int(self.host.allocator.managed.sum()) * self.resolution

    def free_pages(self) -> int:
        return self.host.allocator.free_pages() * self.resolution

    def guest_rss_pages(self) -> int:
        return sum(p.mm.rss_anon + p.mm.rss_shmem for p in self.host.processes.values()) * self.resolution

    # -- knobs ----------------------------------------------------------------------------------
    def _record(self, reason: str) -> None:
        self.history.append(Decision(self.host.clock.now, self.ksm.knobs.run,
                                     self.intent["pages_to_scan"], self.intent["sleep_millisecs"],
                                     reason))

    def _write(self, **knobs) -> None:
        scan = {k: int(knobs.pop(k)) for k in ("pages_to_scan", "sleep_millisecs") if k in knobs}
        if scan:
            self.intent.update(scan)
            pts, sleep = scaled_scan_knobs(self.intent["pages_to_scan"],
                                           self.intent["sleep_millisecs"], self.resolution)
            knobs = {"pages_to_scan": pts, "sleep_millisecs": sleep, **knobs}
        for name, value in knobs.items():
            if str(getattr(self.ksm.knobs, name, None)) != str(value):
                rc = self.ksm.write_knob(name, str(value))
                if rc:
                    raise ValueError(f"policy {self.name}: KSM refuses {name}={value} (errno {-rc})")


@dataclass
class Periodic(Policy):
    """A policy that looks at the host every ``interval_s`` seconds (its ``adjust``); the
    first look is after one interval (the tool sleeps first), or at once with
    ``FIRST_AT_START``."""
    interval_s: float = 60.0
    FIRST_AT_START: ClassVar[bool] = False

    def attach(self, host: "Host", ksm: "Ksm", full_scale_knobs: dict | None = None) -> None:
        super().attach(host, ksm, full_scale_knobs)
        interval = int(self.interval_s * NS_PER_S)
        host.clock.after(0 if self.FIRST_AT_START else interval, self._tick)

    def _tick(self) -> None:
        self.adjust()
        self.host.clock.after(int(self.interval_s * NS_PER_S), self._tick)

    def adjust(self) -> None:
        raise NotImplementedError

    # -- /proc/meminfo and ps, full scale, in kB as the tools read them -------------------------
    def mem_total_kb(self) -> int:
        return self.host_pages() * PAGE_KIB

    def mem_free_kb(self) -> int:
        """MemFree + Buffers + Cached (no page cache in the emulator)."""
        return self.free_pages() * PAGE_KIB

    def mem_available_kb(self) -> int:
        """MemAvailable: free memory less the kernel's reserve (the high watermarks)."""
        reserve = sum(wm.high for wm in self.host.allocator.watermarks) * self.resolution
        return max(0, self.free_pages() - reserve) * PAGE_KIB

    def qemu_rss_kb(self) -> int:
        """``ps -o rsz`` summed over the qemu processes."""
        return self.guest_rss_pages() * PAGE_KIB

    def qemu_vsz_kb(self) -> int:
        """``ps -o vsz`` summed over the qemu processes: every mapped page, resident or not."""
        pages = sum(v.pages for p in self.host.processes.values() for v in p.mm.vmas)
        return pages * self.resolution * PAGE_KIB


def _clamp(value: int, lo: int, hi: int) -> int:
    return lo if value < lo else hi if value > hi else value


@dataclass
class KsmTuned(Periodic):
    """ksmtuned's loop: sleep KSM_MONITOR_INTERVAL, then adjust()."""
    name: str = "ksmtuned"
    interval_s: float = 60.0            # KSM_MONITOR_INTERVAL
    boost: int = 300                    # KSM_NPAGES_BOOST
    decay: int = 50                     # -KSM_NPAGES_DECAY
    npages_min: int = 64                # KSM_NPAGES_MIN
    npages_max: int = 1250              # KSM_NPAGES_MAX
    thres_coef: int = 20                # KSM_THRES_COEF, percent of MemTotal
    thres_const_kb: int = 2048          # KSM_THRES_CONST (the script compares it with kB)
    sleep_msec: int = 10                # KSM_SLEEP_MSEC, for a 16 GiB host

    def attach(self, host: "Host", ksm: "Ksm", full_scale_knobs: dict | None = None) -> None:
        self.npages = 0
        super().attach(host, ksm, full_scale_knobs)
        # computed once, when the script starts
        self.total = self.mem_total_kb()
        self.sleep = max(self.sleep_msec * 16 * 1024 * 1024 // max(self.total, 1), 10)
        self.thres = max(self.total * self.thres_coef // 100, self.thres_const_kb)

    def adjust(self) -> None:
        free, committed = self.mem_free_kb(), self.qemu_rss_kb()
        if committed + self.thres < self.total and free > self.thres:
            self._write(run=0)
            self._record("committed memory fits: KSM stopped")
            return
        if free < self.thres:
            self.npages = _clamp(self.npages + self.boost, self.npages_min, self.npages_max)
            reason = "free memory under threshold: boost"
        else:
            self.npages = _clamp(self.npages - self.decay, self.npages_min, self.npages_max)
            reason = "free memory above threshold: decay"
        self._write(pages_to_scan=self.npages, sleep_millisecs=self.sleep, run=1)
        self._record(reason)


@dataclass
class Mom(Periodic):
    """oVirt MOM's policy engine running VDSM's KSM policy (03-ksm.policy)."""
    name: str = "mom"
    interval_s: float = 10.0            # policy-engine-interval
    monitor_interval_s: float = 5.0     # host-monitor-interval
    sample_history: int = 10            # sample-history-length (for StatAvg)
    pages_boost: int = 300              # ksm_pages_boost
    pages_decay: int = 50               # -ksm_pages_decay
    npages_min: int = 64                # ksm_npages_min
    npages_max: int = 1250              # ksm_npages_max
    sleep_ms_baseline: int = 10         # ksm_sleep_ms_baseline, for a 16 GiB host
    sleep_min_ms: int = 10              # VDSM's (max 10 ...); 0 in MOM's first published rules
    free_percent: float = 0.20          # ksm_free_percent
    merge_across_nodes: int = 1         # ksmMergeAcrossNodes

    def attach(self, host: "Host", ksm: "Ksm", full_scale_knobs: dict | None = None) -> None:
        self.samples: list[int] = []
        super().attach(host, ksm, full_scale_knobs)
        host.clock.after(0, self._sample)

    def _sample(self) -> None:
        self.samples = (self.samples + [self.mem_free_kb()])[-self.sample_history:]
        self.host.clock.after(int(self.monitor_interval_s * NS_PER_S), self._sample)

    def adjust(self) -> None:
        total = self.mem_total_kb()                 # HostMemory's "mem_available" is MemTotal
        threshold = total * self.free_percent
        committed = self.qemu_vsz_kb()              # HostKSM's ksm_shareable
        free_avg = sum(self.samples) / len(self.samples)
        shared = self.ksm.c.pages_shared
        if shared == 0:
            try:
                self._write(merge_across_nodes=self.merge_across_nodes)
            except ValueError:                      # MOM logs a failed write and goes on
                self._record("merge_across_nodes write refused")
        action = 2 if shared > 0 and self.ksm.knobs.merge_across_nodes != self.merge_across_nodes else 0
        if (threshold + committed < total and free_avg > threshold) or action != 0:
            self._write(run=action)
            self._record("unmerge for merge_across_nodes" if action else
                         "committed memory fits: KSM stopped")
            return
        sleep = max(self.sleep_min_ms, self.sleep_ms_baseline * 16777216 // max(total, 1))
        delta = self.pages_boost if free_avg < threshold else -self.pages_decay
        npages = _clamp(self.intent["pages_to_scan"] + delta, self.npages_min, self.npages_max)
        self._write(run=1, sleep_millisecs=sleep, pages_to_scan=npages)
        self._record("average free memory under threshold: boost" if delta > 0
                     else "average free memory above threshold: decay")


@dataclass
class KubeVirt(Periodic):
    """virt-handler's KSM handler (pkg/virt-handler/ksm): a spin at start, then every 3 min."""
    name: str = "kubevirt"
    interval_s: float = 180.0
    pages_boost: int = 300
    pages_decay: int = 50               # -pagesDecayDefault
    npages_min: int = 64
    npages_max: int = 1250
    npages_init: int = 100
    sleep_ms_baseline: int = 100
    free_percent: float = 0.2
    FIRST_AT_START: ClassVar[bool] = True

    def attach(self, host: "Host", ksm: "Ksm", full_scale_knobs: dict | None = None) -> None:
        super().attach(host, ksm, full_scale_knobs)
        host.clock.after(0, self.adjust)            # Start() spins, then loop() spins again

    def adjust(self) -> None:
        total, available = self.mem_total_kb(), self.mem_available_kb()
        running = self.ksm.knobs.run == 1
        pages = self.intent["pages_to_scan"]
        sleep = self.sleep_ms_baseline * (16 * 1024 * 1024) // max(total - available, 1)
        sleep = max(sleep, self.sleep_ms_baseline // 10)
        if np.float32(available) > np.float32(total) * np.float32(self.free_percent):
            if not running:
                self._write(run=0)
                self._record("no memory pressure: KSM stays off")
                return
            pages -= self.pages_decay
            if pages < self.npages_min:
                self._write(run=0)
                self._record("no memory pressure: KSM stopped")
                return
            reason = "no memory pressure: decay"
        elif running:
            pages = min(pages + self.pages_boost, self.npages_max)
            reason = "memory pressure: boost"
        else:
            pages = self.npages_init
            reason = "memory pressure: KSM started"
        self._write(sleep_millisecs=sleep, pages_to_scan=pages, run=1)
        self._record(reason)


@dataclass
class Advisor(Policy):
    """The kernel's scan-time advisor drives pages_to_scan."""
    name: str = "advisor"
    target_scan_time_s: int = 200
    max_cpu_percent: int = 70
    # the kernel's advisor reads ksmd's CPU per batch and the scan times of the host it runs
    # on: at 1/N of the pages neither is the full-size host's
    SCALES: ClassVar[bool] = False

    def attach(self, host: "Host", ksm: "Ksm", full_scale_knobs: dict | None = None) -> None:
        super().attach(host, ksm, full_scale_knobs)
        r = self.resolution
        self._write(advisor_mode="scan-time", advisor_target_scan_time=self.target_scan_time_s,
                    advisor_max_cpu=self.max_cpu_percent,
                    advisor_min_pages_to_scan=max(1, 500 // r),
                    advisor_max_pages_to_scan=max(1, 30000 // r), run=1)
        self._record("scan-time advisor")


def _named(cls: type[Policy]) -> dict[str, type[Policy]]:
    """``cls`` and its subclasses, in the order they are defined, each that sets its own
    ``name`` default (a config's ``policy.name``) by that name."""
    out = {vars(cls)["name"]: cls} if "name" in vars(cls) else {}
    for sub_cls in cls.__subclasses__():
        out.update(_named(sub_cls))
    return out


#: Every policy, by name: a dataclass below Policy with its own ``name`` is one.
POLICIES = _named(Policy)


def resolution_refusal(name: str, resolution: int) -> str | None:
    """Why policy ``name`` cannot drive a host simulated at 1/``resolution``, or None."""
    if resolution > 1 and not POLICIES[name].SCALES:
        return f"the {name} policy runs only at resolution 1, not {resolution}"
    return None


def options_of(cls: type[Policy]) -> dict:
    """The options a policy takes in a config (its dataclass fields but its own state)."""
    return {f.name: f for f in fields(cls) if f.name not in ("name", "history", "resolution")}


def make_policy(name: str, **options) -> Policy:
    """A policy by name, with its options (each policy's dataclass fields)."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown KSM policy {name!r} (known: {', '.join(POLICIES)})") from None
    known = set(options_of(cls))
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"KSM policy {name!r}: unknown option(s) {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(sorted(known))})")
    return cls(**options)
