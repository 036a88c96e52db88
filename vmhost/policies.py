"""KSM tuning policies: who turns ksmd on and how hard it scans, over time.

A policy runs on the host's virtual clock and writes KSM's knobs the way the
real tool would write /sys/kernel/mm/ksm. Each is a small class with
``attach(host, ksm)`` that schedules its own wake-ups:

- ``fixed``: the configured knobs, once.
- ``ksmtuned``: the ksmtuned daemon's loop (RHEL, Proxmox): every 60 s, if the
  guests' committed memory (the QEMU processes' RSS) plus a threshold still
  fits in RAM and free memory is above the threshold, KSM is stopped;
  otherwise ksmd runs, pages_to_scan grows by 300 (up to 1250) while free
  memory is under the threshold and shrinks by 50 (down to 64) when it is not,
  and sleep_millisecs is 10 ms scaled by 16 GiB over the host's RAM (at least
  10). The threshold is 20% of RAM, at least 2048 MiB.
- ``mom``: oVirt MOM's KSM controller: the same rule with the same constants,
  evaluated every 10 s, with "committed" taken as the resident size of the
  guests rather than their configured size.
- ``kubevirt``: KubeVirt's node handler: KSM runs only while the node is under
  memory pressure (available memory below 20%), with fixed knobs; it stops
  when available memory is back above the threshold plus a 5% margin.
- ``advisor``: the kernel's own scan-time advisor (advisor_mode=scan-time,
  6.8+), which retunes pages_to_scan after every full scan.

The constants are the published defaults of those tools (``docs/field.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar

from vmhost.clock import NS_PER_S

if TYPE_CHECKING:
    from vmhost.host import Host
    from vmhost.ksm.engine import Ksm

MIB_PAGES = 256          # 4 KiB pages in a MiB


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
    """A policy that looks at the host every ``interval_s`` seconds (its ``adjust``)."""
    interval_s: float = 60.0

    def attach(self, host: "Host", ksm: "Ksm", full_scale_knobs: dict | None = None) -> None:
        super().attach(host, ksm, full_scale_knobs)
        host.clock.after(0, self._tick)

    def _tick(self) -> None:
        self.adjust()
        self.host.clock.after(int(self.interval_s * NS_PER_S), self._tick)

    def adjust(self) -> None:
        raise NotImplementedError


@dataclass
class KsmTuned(Periodic):
    """ksmtuned's adjust() loop."""
    name: str = "ksmtuned"
    interval_s: float = 60.0
    boost: int = 300
    decay: int = 50
    npages_min: int = 64
    npages_max: int = 1250
    thres_coef: int = 20                # percent of RAM
    thres_const_mib: int = 2048
    sleep_msec: int = 10                # for a 16 GiB host
    committed: Callable[["Host"], int] | None = None

    def attach(self, host: "Host", ksm: "Ksm", full_scale_knobs: dict | None = None) -> None:
        self.npages = 0
        super().attach(host, ksm, full_scale_knobs)

    def _committed_pages(self) -> int:
        if self.committed is not None:
            return self.committed(self.host)
        # ksmtuned sums the qemu processes' RSS
        return self.guest_rss_pages()

    def adjust(self) -> None:
        total = self.host_pages()
        thres = max(total * self.thres_coef // 100, self.thres_const_mib * MIB_PAGES)
        sleep = max(self.sleep_msec * 16 * 1024 * MIB_PAGES // max(total, 1), 10)
        if self._committed_pages() + thres < total and self.free_pages() > thres:
            self._write(run=0)
            self._record("committed memory fits: KSM stopped")
        else:
            if self.free_pages() < thres:
                self.npages = min(self.npages + self.boost, self.npages_max)
                reason = "free memory under threshold: boost"
            else:
                self.npages = max(self.npages - self.decay, self.npages_min)
                reason = "free memory above threshold: decay"
            self._write(pages_to_scan=self.npages, sleep_millisecs=sleep, run=1)
            self._record(reason)


@dataclass
class Mom(KsmTuned):
    """oVirt MOM's KSM controller: ksmtuned's rule, every 10 s, on resident guest memory."""
    name: str = "mom"
    interval_s: float = 10.0


@dataclass
class KubeVirt(Periodic):
    """KSM only under memory pressure, with fixed knobs."""
    name: str = "kubevirt"
    interval_s: float = 10.0
    pressure_percent: int = 20
    margin_percent: int = 5
    pages_to_scan: int = 100
    sleep_millisecs: int = 20

    def adjust(self) -> None:
        total = self.host_pages()
        available = self.free_pages() * 100 // max(total, 1)
        if available < self.pressure_percent:
            self._write(pages_to_scan=self.pages_to_scan, sleep_millisecs=self.sleep_millisecs, run=1)
            self._record(f"available {available}% < {self.pressure_percent}%: KSM on")
        elif available >= self.pressure_percent + self.margin_percent and self.ksm.knobs.run:
            self._write(run=0)
            self._record(f"available {available}%: pressure over, KSM off")


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


POLICIES = {"fixed": Policy, "ksmtuned": KsmTuned, "mom": Mom, "kubevirt": KubeVirt,
            "advisor": Advisor}


def resolution_refusal(name: str, resolution: int) -> str | None:
    """Why policy ``name`` cannot drive a host simulated at 1/``resolution``, or None."""
    if resolution > 1 and not POLICIES[name].SCALES:
        return f"the {name} policy runs only at resolution 1, not {resolution}"
    return None


def make_policy(name: str, **options) -> Policy:
    """A policy by name, with its options (each policy's dataclass fields)."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown KSM policy {name!r} (known: {', '.join(POLICIES)})") from None
    known = set(cls.__dataclass_fields__) - {"name", "history", "resolution", "committed"}
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"KSM policy {name!r}: unknown option(s) {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(sorted(known))})")
    return cls(**options)
