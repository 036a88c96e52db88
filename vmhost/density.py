"""Density search: how many guests of an image mix fit on one host, with and without KSM.

A density file is a host configuration (``vmhost.config``: ``host:``, ``ksm:`` and optionally
``policy:``, a KSM tuning policy of ``vmhost.policies`` that runs on the clock from the first
boot, e.g. ``policy: {name: ksmtuned}``) plus::

    density:
      mix:                                 # the guest image mix
        - image: linux-server              # a catalog image (guests/catalog), or a path to an
                                           # image YAML file (relative to this file)
          memory: 4GiB                     # guest RAM (default: the image's size)
          weight: 3                        # relative frequency (default 1) ...
          count: 10                        # ... and/or the most guests of this entry
          domain: tenant-a                 # sharing domain (tenant salt; default "default")
          nosharepages: false              # libvirt <nosharepages/>: never registered with KSM
          locked: false                    # libvirt <locked/>: RAM populated at start
          name: web                        # guest name prefix (default: the image name)
      order: weighted                      # as-listed | round-robin | weighted (default)
      seed: 1                              # weighted order and guest contents
      max_guests: 64                       # stop the search here (default: 4 x RAM / smallest guest)
      resolution: 1                        # simulate every guest at 1/N of its pages (default 1)
      settle:                              # each step runs to KSM steady state ...
        scans: 2                           # counters unchanged (within tolerance) for 2 full scans
        tolerance: 0.001                   # change allowed, relative to the new guest's pages
        max_scans: 30                      # bound: not steady after this many scans
        time: 30s                          # ... or instead: a fixed virtual time per step
      write_period: 1s                     # guests' steady-state writes are issued this often
      warm_start: true                     # each guest's hot set is written once at boot (default)
      stride: auto                         # guests per step: auto (grows with sqrt(n)) or a number
      limits:                              # the service limits (OOM kills always fail a step)
        swapin_rate: 100                   # pages/s swapped in (at full scale), over the step
        ksmd_cpu: 0.25                     # ksmd's CPU share (fraction of one CPU), steady state
        free_headroom: 1GiB                # free memory left at steady state (or "5%")
      unmerge_storm: {fraction: 0.25, window: 60s}   # headroom to survive an unmerge storm

Every mistake is one :class:`InputError` line naming the file, the key path and the reason;
nothing is run or written before the whole file is validated.

The models
----------

**Search.** Guests are booted one by one, in the configured order, onto one host (QEMU process
model, guest contents from ``guests.images``, steady-state writers on the virtual clock, the
complete KSM with ksmd). After each boot the clock runs until KSM is at steady state (``settle``)
and the step is checked against the limits; the first step that breaks one ends the search and
the answer is the step before. Curve (b) is this simulation. Each step scans every guest
booted so far, so one guest a step would cost the square of the guest count; with ``stride:
auto`` (the default) a step boots several guests once there are 8 (about sqrt(n / 2), at most
16). A step that meets every limit counts for all of its guests; one that breaks a limit is
undone (the simulation is restored from a snapshot taken before it) and redone one guest at a
time, so the answer is the one-by-one answer wherever the limits only get harder with more
guests (``stride: 1`` steps one by one throughout). With ``warm_start`` (the default)
each guest writes its whole hot set once right after its boot writes, as a guest that has run
for a while would have: a step then settles to the long-run state that curves (a) and (c)
describe (without it, hot frames still holding their boot contents can merge for a while, and
a short step can come out better than the long-run ideal).

**No KSM (a)** and **ideal (c)** are computed from the same guests' contents for every step up
to ``max_guests``: (a) a guest's footprint is the frames it writes (boot writes plus its
steady-state hot set; all of its RAM if locked); with host THP (``always`` or ``madvise``,
QEMU madvises guest RAM) every 2 MiB range it touches is a whole huge page. (c) merges every
identical page: the distinct non-zero contents of all mergeable guests (a hot-set frame is
counted as its own content: it is rewritten with contents nobody has) plus the zero page
handling: one KSM page (``use_zero_pages=0``) or none (``use_zero_pages=1``); non-mergeable
guests count their whole footprint. Each simulated step also reports ``ideal_now_pages``: the
same ideal over the guests' contents at that moment (frames written so far). Both curves fit
while the pages needed stay within the capacity: RAM managed by the allocator minus the high
watermarks minus ``free_headroom``.

**Steady state and smart scan.** A step is steady when the counters stood still for
``settle.scans`` full scans. With smart_scan (6.18's default) a page that has not merged for a
while is visited only every 2 to 9 scans, and two identical pages merge only in a pass that
visits both, so pages of a guest booted next to an old one can merge many scans after the
counters first stand still (or, out of phase, not at all: the kernel behaves the same). A
short settle window therefore stops early; ``settle.scans: 9`` covers a whole skip cycle.

**Savings** are pages_sharing + ksm_zero_pages (pages_shared are the copies kept).
**Time to X%** of a step's steady-state savings is virtual time from the guest's boot until the
savings gained in the step reach X% of what the step gained at steady state (sampled
``samples_per_scan`` times per full scan). **CPU-seconds per GiB saved** is ksmd's modelled
CPU (``Ksmd.cpu_ns``) from the first boot up to the step's steady state, over the GiB saved then.

**Unmerge storm.** A fraction f of the merged mappings is written apart within a window W. Each
write to a mapping that shares a KSM page (or maps the KSM zero page) makes the guest fault a
private copy: one new page; the stable page's own first mapper keeps it. So the storm needs
``f x (pages_sharing + ksm_zero_pages)`` pages, and during the window the ordinary churn keeps
breaking merges at the rate measured at steady state (vmstat cow_ksm over the settle window)
with ksmd assumed unable to re-merge in time: ``W x cow_ksm rate`` pages more. A step survives
the storm when its free memory above the min watermark covers both.

**Resolution.** At resolution N every guest is simulated with 1/N of its RAM (image class
fractions, self-sharing, pools and per-page write frequencies are scale-free: absolute ``mib``
class sizes and write rates are divided by N), on a host with 1/N of its RAM, block size and
swap (size and bandwidth), and with ksmd's ``pages_to_scan`` divided by N so that a full scan
takes the same virtual time; when that leaves fewer than 256 pages a batch, pages_to_scan and
sleep_millisecs are both multiplied by the same factor (the same scan rate and CPU share, a
coarser time grain; said in the output). Page counts, CPU time and swap-in rates are reported
scaled back (x N); virtual times get back the (N - 1) x ksmd CPU time per batch that the
smaller batches did not take (time to X%); the settle windows themselves are shorter. The
watermarks are the full-size host's / N (the kernel's grow with the square root of RAM).
Effects that do not scale: THP (2 MiB stays 512 pages), small classes rounding to whole pages,
and pages_to_scan rounding.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vmhost.config import (HostConfig, _err, expect_int, expect_mapping, parse_duration_ns,
                           parse_host_config, parse_size, read_yaml)
from vmhost.policies import resolution_refusal

PAGE_SIZE = 4096
PAGES_PER_MIB = 256
HPAGE = 512
GIB_PAGES = (1 << 30) // PAGE_SIZE
ORDERS = ("as-listed", "round-robin", "weighted")
DENSITY_KEYS = ("mix", "order", "seed", "max_guests", "resolution", "settle", "write_period",
                "warm_start", "stride", "limits", "unmerge_storm", "samples_per_scan")
MIX_KEYS = ("image", "memory", "weight", "count", "domain", "nosharepages", "locked", "name")
SETTLE_KEYS = ("scans", "tolerance", "max_scans", "time")
LIMIT_KEYS = ("swapin_rate", "ksmd_cpu", "free_headroom")
STORM_KEYS = ("fraction", "window")
MIN_BATCH_PAGES = 256
TIMELINE_POINTS_PER_STEP = 64
WRITES_PER_SCAN = 8
STRIDE_FROM, STRIDE_MAX = 8, 16
DEFAULT_PAGES_TO_SCAN, DEFAULT_SLEEP_MILLISECS = 100, 20     # the kernel's defaults
POLICY_CHANGES_KEPT = 200
SCALED_KNOBS = ("pages_to_scan", "advisor_max_pages_to_scan", "advisor_min_pages_to_scan")


@dataclass
class MixEntry:
    index: int
    image: Any                     # guests.images.Image
    memory_mib: int
    weight: float = 1.0
    count: int | None = None
    domain: str = "default"
    nosharepages: bool = False
    locked: bool = False
    name: str = ""


@dataclass
class DensityConfig:
    path: str
    host: HostConfig
    mix: list[MixEntry]
    order: str = "weighted"
    seed: int = 1
    max_guests: int = 0
    resolution: int = 1
    settle_scans: int = 2
    tolerance: float = 0.001
    max_scans: int = 30
    settle_time_ns: int | None = None
    write_period_ns: int = 1_000_000_000
    warm_start: bool = True
    stride: str | int = "auto"
    samples_per_scan: int = 32
    swapin_rate: float | None = None
    ksmd_cpu: float | None = None
    free_headroom_bytes: int | None = None
    free_headroom_fraction: float | None = None
    storm_fraction: float | None = None
    storm_window_ns: int | None = None
    sequence: list[int] = field(default_factory=list)     # mix index of each guest, in boot order
    guest_names: list[str] | None = None                  # exact names (a fleet host's VMs)


# ------------------------------------------------------------------------------------------
# validation

def _bool(value: Any, path: str, key: str) -> bool:
    if not isinstance(value, bool):
        raise _err(path, key, f"expected true or false, got {value!r}")
    return value


def _number(value: Any, path: str, key: str, lo: float, hi: float | None = None,
            lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise _err(path, key, f"expected a number, got {value!r}")
    if value < lo or (lo_open and value == lo) or (hi is not None and value > hi):
        rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]"
        raise _err(path, key, f"{value} is out of range {rng}")
    return float(value)


def _fraction_or_percent(value: Any, path: str, key: str) -> float:
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            v = float(value.strip()[:-1]) / 100
        except ValueError:
            raise _err(path, key, f"{value!r} is not a percentage") from None
        return _number(v, path, key, 0.0, 1.0, lo_open=True)
    return _number(value, path, key, 0.0, 1.0, lo_open=True)


def _image(value: Any, path: str, key: str):
    from guests.images import ImageError
    from guests.resolve import resolve_image
    try:
        return resolve_image(value, Path(path).resolve().parent)
    except ImageError as exc:
        raise _err(path, key, str(exc)) from None


def _mix_entry(e: Any, i: int, path: str) -> MixEntry:
    key = f"density.mix[{i}]"
    expect_mapping(e, path, key, MIX_KEYS, ("image",))
    img = _image(e["image"], path, f"{key}.image")
    if "memory" in e:
        if isinstance(e["memory"], (int, float)) and not isinstance(e["memory"], bool) and e["memory"] <= 0:
            raise _err(path, f"{key}.memory", f"{e['memory']!r} is not a positive size")
        if isinstance(e["memory"], str) and e["memory"].strip().startswith("-"):
            raise _err(path, f"{key}.memory", f"{e['memory']!r} is negative")
        size = parse_size(e["memory"], path, f"{key}.memory", minimum=1 << 20)
        if size % (1 << 20):
            raise _err(path, f"{key}.memory", f"{e['memory']!r} is not a whole number of MiB")
        mem = size >> 20
    else:
        mem = img.memory_mib
    entry = MixEntry(i, img, mem, name=str(e.get("name", img.name)))
    if "weight" in e:
        entry.weight = _number(e["weight"], path, f"{key}.weight", 0.0, lo_open=True)
    if "count" in e:
        entry.count = expect_int(e["count"], path, f"{key}.count", 1, 100_000)
    dom = e.get("domain", "default")
    if not isinstance(dom, (str, int)) or isinstance(dom, bool) or str(dom) == "":
        raise _err(path, f"{key}.domain", "expected a sharing domain name")
    entry.domain = str(dom)
    entry.nosharepages = _bool(e.get("nosharepages", False), path, f"{key}.nosharepages")
    entry.locked = _bool(e.get("locked", False), path, f"{key}.locked")
    try:
        img.class_pages(mem)
    except ValueError as exc:
        raise _err(path, f"{key}.memory", f"too small for image {img.name!r} ({exc})") from None
    return entry


def parse_density(doc: Any, path: str) -> DensityConfig:
    hcfg = parse_host_config(doc, path, extra_keys=("density",))
    if "density" not in doc:
        raise _err(path, "density", "missing")
    d = expect_mapping(doc["density"], path, "density", DENSITY_KEYS, ("mix",))
    mix_doc = d["mix"]
    if not isinstance(mix_doc, list) or not mix_doc:
        raise _err(path, "density.mix", "expected a non-empty list of {image, memory, weight or count, ...}")
    mix = [_mix_entry(e, i, path) for i, e in enumerate(mix_doc)]
    cfg = DensityConfig(path, hcfg, mix)
    cfg.order = d.get("order", "weighted")
    if cfg.order not in ORDERS:
        raise _err(path, "density.order", f"{cfg.order!r} is not one of {', '.join(ORDERS)}")
    cfg.seed = expect_int(d.get("seed", 1), path, "density.seed", 0, 2**32 - 1)
    cfg.resolution = expect_int(d.get("resolution", 1), path, "density.resolution", 1, 1 << 16)
    cfg.samples_per_scan = expect_int(d.get("samples_per_scan", 32), path, "density.samples_per_scan", 1, 10_000)
    ram_mib = sum(n.mem_bytes for n in hcfg.topology.nodes) >> 20
    smallest = min(e.memory_mib for e in mix)
    if "max_guests" in d:
        cfg.max_guests = expect_int(d["max_guests"], path, "density.max_guests", 1, 100_000)
    else:
        cfg.max_guests = max(1, min(100_000, 4 * ram_mib // smallest))
    if "write_period" in d:
        cfg.write_period_ns = parse_duration_ns(d["write_period"], path, "density.write_period")
    if "warm_start" in d:
        cfg.warm_start = _bool(d["warm_start"], path, "density.warm_start")
    if "stride" in d and d["stride"] != "auto":
        cfg.stride = expect_int(d["stride"], path, "density.stride", 1, 4096)
    settle = d.get("settle", {}) or {}
    expect_mapping(settle, path, "density.settle", SETTLE_KEYS)
    if "time" in settle:
        if any(k in settle for k in ("scans", "tolerance", "max_scans")):
            raise _err(path, "density.settle", "give either time or scans/tolerance/max_scans")
        cfg.settle_time_ns = parse_duration_ns(settle["time"], path, "density.settle.time")
    cfg.settle_scans = expect_int(settle.get("scans", 2), path, "density.settle.scans", 1, 100)
    cfg.tolerance = _number(settle.get("tolerance", 0.001), path, "density.settle.tolerance", 0.0, 1.0)
    cfg.max_scans = expect_int(settle.get("max_scans", 30), path, "density.settle.max_scans",
                               cfg.settle_scans + 2, 100_000)
    limits = d.get("limits", {}) or {}
    expect_mapping(limits, path, "density.limits", LIMIT_KEYS)
    if "swapin_rate" in limits:
        cfg.swapin_rate = _number(limits["swapin_rate"], path, "density.limits.swapin_rate", 0.0)
    if "ksmd_cpu" in limits:
        cfg.ksmd_cpu = _fraction_or_percent(limits["ksmd_cpu"], path, "density.limits.ksmd_cpu")
    if "free_headroom" in limits:
        v = limits["free_headroom"]
        if isinstance(v, str) and v.strip().endswith("%"):
            cfg.free_headroom_fraction = _fraction_or_percent(v, path, "density.limits.free_headroom")
        else:
            cfg.free_headroom_bytes = parse_size(v, path, "density.limits.free_headroom", minimum=0)
    storm = d.get("unmerge_storm")
    if storm is not None:
        expect_mapping(storm, path, "density.unmerge_storm", STORM_KEYS, ("fraction", "window"))
        cfg.storm_fraction = _fraction_or_percent(storm["fraction"], path, "density.unmerge_storm.fraction")
        cfg.storm_window_ns = parse_duration_ns(storm["window"], path, "density.unmerge_storm.window")
    _check_resolution(cfg, d)
    if cfg.order == "as-listed" and any(e.count is None for e in mix[:-1]):
        i = next(e.index for e in mix[:-1] if e.count is None)
        raise _err(path, f"density.mix[{i}].count", "order as-listed needs a count on every entry but the last")
    cfg.sequence = boot_sequence(cfg)
    return cfg


def _check_resolution(cfg: DensityConfig, d: dict) -> None:
    r, path = cfg.resolution, cfg.path
    if r == 1:
        return
    if cfg.host.policy and (why := resolution_refusal(cfg.host.policy[0], r)):
        raise _err(path, "policy.name", why)
    for e in cfg.mix:
        if e.memory_mib % r:
            raise _err(path, "density.resolution",
                       f"{r} does not divide the memory of mix[{e.index}] ({e.memory_mib} MiB)")
        if e.locked:
            pass
    block = cfg.host.block_pages
    if block // r < 1 or block % r:
        raise _err(path, "density.resolution", f"{r} does not divide the block size ({block} pages)")
    for n in cfg.host.topology.nodes:
        if (n.mem_bytes // PAGE_SIZE) % r:
            raise _err(path, "density.resolution", f"{r} does not divide node {n.id}'s memory")
    for s in cfg.host.swap:
        if s["pages"] < r:
            raise _err(path, "density.resolution", f"swap device {s['name']} is smaller than {r} pages")


def load_density(path: str | Path) -> DensityConfig:
    return parse_density(read_yaml(path), str(path))


def boot_sequence(cfg: DensityConfig) -> list[int]:
    """Mix index of each guest in boot order, up to max_guests (or until every count is used)."""
    left = [e.count if e.count is not None else math.inf for e in cfg.mix]
    out: list[int] = []
    if cfg.order == "as-listed":
        for e in cfg.mix:
            while left[e.index] > 0 and len(out) < cfg.max_guests:
                out.append(e.index)
                left[e.index] -= 1
        return out
    if cfg.order == "round-robin":
        while len(out) < cfg.max_guests and any(v > 0 for v in left):
            for e in cfg.mix:
                if left[e.index] > 0 and len(out) < cfg.max_guests:
                    out.append(e.index)
                    left[e.index] -= 1
        return out
    rng = np.random.default_rng(cfg.seed)
    w = np.array([e.weight for e in cfg.mix], dtype=float)
    while len(out) < cfg.max_guests:
        avail = np.array([v > 0 for v in left])
        if not avail.any():
            break
        p = np.where(avail, w, 0.0)
        i = int(rng.choice(len(w), p=p / p.sum()))
        out.append(i)
        left[i] -= 1
    return out


# ------------------------------------------------------------------------------------------
# the scaled world

def _scaled_image(img, r: int):
    if r == 1:
        return img
    s = copy.deepcopy(img)
    for c in s.classes.values():
        if c.mib is not None:
            c.mib = c.mib / r
        c.steady_rate = c.steady_rate / r
    s.memory_mib = max(1, img.memory_mib // r)
    return s


def _scaled_host(cfg: DensityConfig) -> tuple[HostConfig, list[tuple[str, str]], list[str]]:
    from hw.topology import NumaNode, Topology
    r, h = cfg.resolution, cfg.host
    notes: list[str] = []
    knobs = []
    configured = dict(h.ksm)
    for name, value in h.ksm:
        if name in SCALED_KNOBS and name != "pages_to_scan" and r > 1:
            knobs.append((name, str(max(1, int(round(int(value) / r))))))
        elif name not in ("pages_to_scan", "sleep_millisecs") or r == 1:
            knobs.append((name, value))
    if r > 1:
        # pages_to_scan / r per wake-up keeps a full scan's time; batches of fewer than
        # MIN_BATCH_PAGES pages are grouped (both knobs x the same factor: the same scan rate
        # and CPU share at a coarser time grain), since each batch is a Python event
        from vmhost.policies import scaled_scan_knobs
        pts = int(configured.get("pages_to_scan", DEFAULT_PAGES_TO_SCAN))
        sleep = int(configured.get("sleep_millisecs", DEFAULT_SLEEP_MILLISECS))
        min_batch = 1 if "advisor_mode" in configured else MIN_BATCH_PAGES
        spts, ssleep = scaled_scan_knobs(pts, sleep, r, min_batch)
        knobs = [("pages_to_scan", str(spts)), ("sleep_millisecs", str(ssleep))] + knobs
        if ssleep != sleep:
            notes.append(f"time grain coarsened x{ssleep // sleep}: ksmd simulated as {spts} pages "
                         f"every {ssleep} ms (the same scan rate and CPU share)")
        if abs(spts * sleep / ssleep * r - pts) > 0.01 * pts:
            notes.append(f"ksm.pages_to_scan {pts} at resolution {r} rounds to {spts} pages every "
                         f"{ssleep} ms: a full scan takes {pts * ssleep / (spts * sleep * r):.3g} x "
                         f"the time it would at full scale")
    if r == 1:
        return h, knobs, notes
    s = copy.copy(h)
    s.topology = Topology([NumaNode(n.id, n.mem_bytes // r, n.cpus) for n in h.topology.nodes],
                          [list(row) for row in h.topology.distance])
    s.block_pages = h.block_pages // r
    s.swap = [dict(d, pages=d["pages"] // r, read_bps=d["read_bps"] / r, write_bps=d["write_bps"] / r)
              for d in h.swap]
    return s, knobs, notes


# ------------------------------------------------------------------------------------------
# the analytic curves (a) and (c)

@dataclass
class _GuestFacts:
    footprint: int          # frames allocated without merging (simulated scale)
    mergeable: bool
    contents: np.ndarray    # non-zero content ids of resident mergeable frames (boot contents;
                            # hot frames get a content of their own)
    zero_frames: int        # resident frames reading zero (mergeable guests)


def _guest_facts(gm, entry: MixEntry, thp: bool) -> _GuestFacts:
    res = gm.touched.copy()
    hot = np.zeros(gm.pages, dtype=bool)
    for _c, frames, _rate in gm.steady:
        hot[frames] = True
    res |= hot
    if entry.locked:
        res[:] = True
    if thp and not entry.locked:
        ranges = np.unique(np.flatnonzero(res) // HPAGE)
        footprint = int(sum(min(HPAGE, gm.pages - r * HPAGE) for r in ranges.tolist()))
    else:
        footprint = int(res.sum())
    mergeable = not entry.nosharepages
    cont = gm.content.copy()
    idx = np.flatnonzero(res)
    c = cont[idx]
    hot_r = hot[idx]
    # a hot frame is rewritten with contents nobody has: a distinct marker per frame
    from guests.interning import key64
    salt = np.uint64(key64("density-hot", gm.name, gm.seed) | 1)
    with np.errstate(over="ignore"):
        c = np.where(hot_r, (idx.astype(np.uint64) + np.uint64(1)) * salt | np.uint64(1), c)
    return _GuestFacts(footprint, mergeable, c[c != 0], int(np.count_nonzero(c == 0)))


# ------------------------------------------------------------------------------------------
# running


class _Guest:
    def __init__(self, qp, gm, entry: MixEntry):
        self.qp, self.gm, self.entry = qp, gm, entry
        self.written = np.zeros(gm.pages, dtype=bool)     # frames the guest has written


class DensityRunner:
    def __init__(self, cfg: DensityConfig, quiet: bool = True, progress=None):
        self.cfg = cfg
        self.progress = progress
        self.hcfg, self.knobs, self.notes = _scaled_host(cfg)
        self.r = cfg.resolution
        self.images = {e.index: _scaled_image(e.image, self.r) for e in cfg.mix}

    # -- set-up --------------------------------------------------------------------------------
    def _build(self) -> None:
        from vmhost.ksm.engine import Ksm
        from vmhost.ksm.ksmd import Ksmd
        self.host = self.hcfg.build()
        self.host.allocator.scale_watermarks(self.r)
        self.ksm = Ksm(self.host)
        self.ksmd = Ksmd(self.ksm, self.host.clock)
        for name, value in self.knobs:
            rc = self.ksm.write_knob(name, value)
            if rc:
                raise _err(self.cfg.path, f"ksm.{name}", f"the write is refused at resolution {self.r}")
        self.policy = self.cfg.host.make_policy(self.r)
        configured = dict(self.cfg.host.ksm)
        self.policy.attach(self.host, self.ksm, {
            "pages_to_scan": int(configured.get("pages_to_scan", DEFAULT_PAGES_TO_SCAN)),
            "sleep_millisecs": int(configured.get("sleep_millisecs", DEFAULT_SLEEP_MILLISECS))})
        self.guests: list[_Guest] = []
        self.samples: list[tuple[int, int, int]] = []  # (time, saved pages, ksmd CPU), simulated scale
        self.timeline: list[dict] = []                   # every step's samples, thinned, full scale
        self._writer = None                              # the steady-state writers' next event
        self._write_dt = self.cfg.write_period_ns
        self._sampler = None

    def capacity_pages(self) -> int:
        """Pages the guests may use in the analytic curves (full scale)."""
        a = self.host.allocator
        managed = int(a.managed.sum())
        high = sum(w.high for w in a.watermarks)
        return (managed - high) * self.r - self.headroom_pages()

    def headroom_pages(self) -> int:
        cfg = self.cfg
        total = sum(n.mem_bytes for n in cfg.host.topology.nodes) // PAGE_SIZE
        if cfg.free_headroom_bytes is not None:
            return -(-cfg.free_headroom_bytes // PAGE_SIZE)
        if cfg.free_headroom_fraction is not None:
            return int(math.ceil(cfg.free_headroom_fraction * total))
        return 0

    def _saved(self) -> int:
        c = self.ksm.c
        return int(c.pages_sharing + c.ksm_zero_pages)

    def _sample(self) -> None:
        self.samples.append((self.host.clock.now, self._saved(), self.ksmd.cpu_ns))
        self._sampler = self.host.clock.after(self._sample_dt, self._sample)

    def _eff_now(self) -> int:
        """Now, counting the CPU time of ksmd's last batch (its next wake-up minus the sleep)."""
        ev = self.ksmd._event
        if ev is not None and not ev.cancelled:
            return max(self.host.clock.now, ev.when - self.ksm.knobs.sleep_millisecs * 1_000_000)
        return self.host.clock.now

    def _scan_time_estimate(self) -> int:
        pages = sum(g.qp.mergeable_pages() for g in self.guests) or 1
        k = self.ksm.knobs
        batches = -(-pages // max(k.pages_to_scan, 1))
        return max(batches * k.sleep_millisecs * 1_000_000, 1_000_000)

    def _boot(self, n: int, entry: MixEntry) -> _Guest:
        from guests.spec import GuestSpec
        from vmhost.qemu import QemuProcess
        gm = self._guest_memory(n, entry)
        spec = GuestSpec(gm.name, entry.memory_mib // self.r, nosharepages=entry.nosharepages,
                         locked=entry.locked, image=entry.image.name)
        qp = QemuProcess(self.host, spec)
        g = _Guest(qp, gm, entry)
        self.guests.append(g)
        gpfns, ids = gm.boot_writes()
        self._write(g, gpfns, ids)
        if self.cfg.warm_start:
            self._write(g, *gm.warm_writes())
        return g

    def _write(self, g: _Guest, gpfns, ids) -> None:
        from vmhost.mm.page_alloc import OutOfMemory
        if not g.qp.proc.alive or len(gpfns) == 0:
            return
        g.written[gpfns] = True
        try:
            g.qp.write(gpfns, ids)
        except OutOfMemory:
            pass            # the OOM kill is recorded in host.oom.kills (the step fails)

    def _writer_tick(self) -> None:
        """Every guest's steady-state writes of one write period (one clock event for all)."""
        now = self.host.clock.now
        for g in self.guests:
            if g.gm.steady and g.qp.proc.alive:
                self._write(g, *g.gm.steady_step(now, self._write_dt))
        self._writer = self.host.clock.after(self._write_dt, self._writer_tick)

    def _pace_writes(self) -> None:
        """The write period of the coming step: the configured one, or an eighth of a full
        scan if that is longer. What KSM sees of the writes is how many land on each page
        between two visits, which is the same in fewer, larger batches; the number of clock
        events per step then stays proportional to the guests, not to guests x scan time."""
        self._write_dt = max(self.cfg.write_period_ns, self._scan_time_estimate() // WRITES_PER_SCAN)
        if self._writer is None and any(g.gm.steady for g in self.guests):
            self._writer = self.host.clock.after(self._write_dt, self._writer_tick)

    def _settle(self, deadline_scans: int, new_pages: int = 1) -> dict:
        """Run until steady state (or the configured time); returns what the step measured."""
        cfg, ksm, clock = self.cfg, self.ksm, self.host.clock
        out = {"steady": False, "scans": 0}
        if cfg.settle_time_ns is not None or not ksm.should_run():
            t = cfg.settle_time_ns or 30 * 1_000_000_000
            win_t0, win_cpu, win_cow = self._eff_now(), self.ksmd.cpu_ns, self.host.vmstat["cow_ksm"]
            start_seq = ksm.seqnr
            clock.run_until(clock.now + t)
            out.update(steady=cfg.settle_time_ns is not None, scans=ksm.seqnr - start_seq,
                       settled_by="time" if cfg.settle_time_ns is not None else "ksm not running")
            out["window"] = (win_t0, win_cpu, win_cow)
            return out
        hist = [(ksm.c.pages_shared, ksm.c.pages_sharing, ksm.c.ksm_zero_pages,
                 self._eff_now(), self.ksmd.cpu_ns, self.host.vmstat["cow_ksm"])]
        limit_ns = clock.now + 4 * deadline_scans * self._scan_time_estimate() + 10 * 1_000_000_000
        while out["scans"] < deadline_scans:
            target = ksm.seqnr + 1
            ok = clock.run_while(lambda: ksm.seqnr < target, limit=limit_ns)
            if not ok:
                out["settled_by"] = "time bound"
                break
            out["scans"] += 1
            hist.append((ksm.c.pages_shared, ksm.c.pages_sharing, ksm.c.ksm_zero_pages,
                         self._eff_now(), self.ksmd.cpu_ns, self.host.vmstat["cow_ksm"]))
            k = cfg.settle_scans
            # a new guest needs a scan to checksum its pages and one more to merge them: no
            # verdict before k + 1 scans; tolerance is relative to the new guest's pages
            if out["scans"] > k:
                ref = hist[-1 - k]
                window = hist[-1 - k:]
                tol = cfg.tolerance
                if all(abs(h[j] - ref[j]) <= tol * max(new_pages, 1) for h in window for j in (0, 1, 2)):
                    out["steady"] = True
                    out["settled_by"] = f"{k} scans unchanged"
                    break
        else:
            out["settled_by"] = f"max_scans ({deadline_scans})"
        k = min(cfg.settle_scans, len(hist) - 1)
        ref = hist[-1 - k] if k > 0 else hist[-1]
        out["window"] = (ref[3], ref[4], ref[5])
        return out

    # -- the search ---------------------------------------------------------------------------
    def run(self) -> dict:
        wall0 = time.perf_counter()
        cfg = self.cfg
        self._build()
        steps: list[dict] = []
        failed_at: dict | None = None
        n = 0
        while n < len(cfg.sequence) and failed_at is None:
            stride = min(self._stride(n), len(cfg.sequence) - n)
            snapshot = self._snapshot() if stride > 1 else None
            step = self._boot_step(n, stride)
            if step["ok"] or stride == 1:
                self._keep(steps, step)
                failed_at = None if step["ok"] else step
                n += stride
                continue
            # a limit broke somewhere in the stride: back to before it, one guest at a time
            self._restore(snapshot)
            for _ in range(stride):
                step = self._boot_step(n, 1)
                self._keep(steps, step)
                n += 1
                if not step["ok"]:
                    failed_at = step
                    break
        facts = self._all_facts()
        return self._result(steps, facts, failed_at, time.perf_counter() - wall0)

    def _stride(self, n: int) -> int:
        """Guests booted by the next step. ``stride: auto`` grows it with sqrt(n) (each step
        scans every guest booted so far, so one guest a step costs n^2 scans over a search to
        n): a step that meets the limits counts for every guest in it, and one that breaks a
        limit is redone from before it one guest at a time, so the answer is the same."""
        if self.cfg.stride != "auto":
            return int(self.cfg.stride)
        return 1 if n < STRIDE_FROM else min(STRIDE_MAX, math.isqrt(n // 2))

    def _boot_step(self, n: int, count: int) -> dict:
        mark = self._mark()
        booted = [self._boot(n + j, self.cfg.mix[self.cfg.sequence[n + j - 1]])
                  for j in range(1, count + 1)]
        step = self._step(n + count, booted, mark)
        step["booted"] = count
        return step

    def _keep(self, steps: list[dict], step: dict) -> None:
        steps.append(step)
        if self.progress:
            self.progress(step)

    def _snapshot(self) -> dict:
        """A deep copy of the simulation (host, KSM, clock, guests); the configuration and the
        images are shared, and callbacks bound to this runner stay bound to it."""
        keep = {id(self): self, id(self.cfg): self.cfg, id(self.images): self.images,
                id(self.progress): self.progress}
        return copy.deepcopy({k: v for k, v in self.__dict__.items()
                              if k not in ("cfg", "images", "progress")}, keep)

    def _restore(self, snapshot: dict) -> None:
        self.__dict__.update(snapshot)

    def _all_facts(self) -> list[_GuestFacts]:
        """Curves (a) and (c) for the whole boot sequence, from each guest's own contents (the
        booted guests' memory as it is: writes only ever replace hot frames, which the facts
        count as contents of their own anyway)."""
        thp = self.host.thp_mode in ("always", "madvise")
        facts = []
        for n, idx in enumerate(self.cfg.sequence, start=1):
            entry = self.cfg.mix[idx]
            gm = self.guests[n - 1].gm if n <= len(self.guests) else self._guest_memory(n, entry)
            facts.append(_guest_facts(gm, entry, thp))
        return facts

    def _guest_memory(self, n: int, entry: MixEntry):
        """The contents of the n-th guest of the boot sequence (the same on every run)."""
        from guests.images import GuestMemory
        name = self.cfg.guest_names[n - 1] if self.cfg.guest_names else f"{entry.name}-{n}"
        return GuestMemory.build(self.images[entry.index], name, self.cfg.seed * 100_003 + n,
                                 entry.domain, entry.memory_mib // self.r)

    def run_together(self) -> dict:
        """Boot the whole sequence at once, then run to steady state: one step (a fleet host)."""
        wall0 = time.perf_counter()
        self._build()
        step = self._boot_step(0, len(self.cfg.sequence))
        step["no_ksm_pages"] = sum(f.footprint for f in self._all_facts()) * self.r
        step["policy"] = self._policy_summary()
        step["timeline"] = self.timeline
        step["wall_s"] = round(time.perf_counter() - wall0, 3)
        return step

    def _policy_summary(self) -> dict:
        """The tuning policy and the decisions that changed something (full-scale knobs)."""
        name, options = self.cfg.host.policy or ("fixed", {})
        changes, last = [], None
        for d in self.policy.history:
            now = (d.run, d.pages_to_scan, d.sleep_millisecs)
            if now != last:
                changes.append({"t_s": round(d.at_ns / 1e9, 3), "run": d.run,
                                "pages_to_scan": d.pages_to_scan,
                                "sleep_millisecs": d.sleep_millisecs, "reason": d.reason})
                last = now
        return {"name": name, "options": options, "wakeups": len(self.policy.history),
                "changes": changes[:POLICY_CHANGES_KEPT]}

    def _mark(self) -> tuple:
        """What a step is measured from: time, ksmd CPU, savings, OOM kills, swap-ins."""
        host = self.host
        return (host.clock.now, self.ksmd.cpu_ns, self._saved(), len(host.oom.kills),
                host.vmstat["pswpin"], host.vmstat["pswpout"])

    def _step(self, n: int, booted: list[_Guest], mark: tuple) -> dict:
        """Run the step's guests to steady state and measure it (full-scale numbers)."""
        cfg, r, host, ksm = self.cfg, self.r, self.host, self.ksm
        t0, cpu0, saved0, kills0, pswpin0, pswpout0 = mark
        self._pace_writes()
        self.samples = [(t0, saved0, cpu0)]
        self._sample_dt = max(self._scan_time_estimate() // cfg.samples_per_scan, 1_000_000)
        if self._sampler is not None:
            self._sampler.cancel()
        self._sampler = host.clock.after(self._sample_dt, self._sample)
        st = self._settle(cfg.max_scans, sum(g.gm.pages for g in booted))
        self._sampler.cancel()
        self._sampler = None
        now = self._eff_now()
        saved = self._saved()
        self.samples.append((host.clock.now, saved, self.ksmd.cpu_ns))
        self._keep_timeline(n)
        win_t0, win_cpu, win_cow = st.pop("window")
        win_dt = max(now - win_t0, 1)
        # at resolution r a batch would cost r x the CPU while the sleeps stay the same
        dcpu = self.ksmd.cpu_ns - win_cpu
        cpu_share = r * dcpu / max(r * dcpu + max(win_dt - dcpu, 0), 1)
        cow_rate = (host.vmstat["cow_ksm"] - win_cow) / (win_dt / 1e9) * r
        step_dt = max(host.clock.now - t0, 1)
        swapin_rate = (host.vmstat["pswpin"] - pswpin0) / (step_dt / 1e9) * r
        free = host.allocator.free_pages() * r
        min_wm = sum(w.min for w in host.allocator.watermarks) * r
        kills = host.oom.kills[kills0:]
        c = ksm.c
        last = booted[-1]
        step = {
            "guests": n, "image": last.entry.image.name, "mix": last.entry.index,
            "guest": last.qp.spec.name, "memory_mib": last.entry.memory_mib,
            "domain": last.entry.domain,
            "steady": st["steady"], "settled_by": st.get("settled_by"), "full_scans": st["scans"],
            "virtual_s": round((host.clock.now - t0) / 1e9, 3),
            "used_pages": (host.used_pages()) * r,
            "free_pages": free,
            "per_node": [{"node": nd, "total_pages": int(host.allocator.managed[nd]) * r,
                          "free_pages": host.allocator.free_pages(nd) * r}
                         for nd in range(len(host.allocator.managed))],
            "pages_shared": int(c.pages_shared) * r, "pages_sharing": int(c.pages_sharing) * r,
            "ksm_zero_pages": int(c.ksm_zero_pages) * r,
            "pages_unshared": int(c.pages_unshared) * r,
            "saved_pages": saved * r,
            "ksmd_cpu_share": round(cpu_share, 6),
            "ksmd_cpu_s_total": round(self.ksmd.cpu_ns * r / 1e9, 6),
            "swapin_rate": round(swapin_rate, 3),
            "swapin_pages": (host.vmstat["pswpin"] - pswpin0) * r,
            "swapout_pages": (host.vmstat["pswpout"] - pswpout0) * r,
            "cow_ksm_rate": round(cow_rate, 3),
            "oom_kills": [{"pid": k.pid, "name": k.name, "freed_pages": k.freed_pages * r}
                          for k in kills],
            "time_to": self._time_to(t0, cpu0, saved0, saved),
            "ideal_now_pages": self._ideal_now() * r,
            "swapped_pages": int(host.swap.total_pages - host.swap.free_pages) * r,
        }
        gib_saved = step["saved_pages"] / GIB_PAGES
        step["cpu_s_per_gib_saved"] = (round(step["ksmd_cpu_s_total"] / gib_saved, 6)
                                       if gib_saved > 0 else None)
        if cfg.storm_fraction is not None:
            storm = cfg.storm_fraction * step["saved_pages"]
            churn = cow_rate * cfg.storm_window_ns / 1e9
            need = int(math.ceil(storm + churn))
            step["storm"] = {"storm_pages": int(math.ceil(storm)), "churn_pages": int(math.ceil(churn)),
                             "headroom_pages": need, "available_pages": max(free - min_wm, 0),
                             "survives": free - min_wm >= need}
        step["violations"] = self._violations(step, kills)
        step["ok"] = not step["violations"]
        return step

    def _keep_timeline(self, n: int) -> None:
        """The step's samples, thinned to at most TIMELINE_POINTS_PER_STEP, onto the timeline."""
        r = self.r
        pts = self.samples
        stride = max(1, -(-len(pts) // TIMELINE_POINTS_PER_STEP))
        keep = pts[::stride] + ([pts[-1]] if (len(pts) - 1) % stride else [])
        self.timeline.extend({"t_s": round(t / 1e9, 3), "guests": n, "saved_pages": s * r,
                              "ksmd_cpu_s": round(cpu * r / 1e9, 6)} for t, s, cpu in keep)

    def _ideal_now(self) -> int:
        """Every identical page of the guests' present contents merged (simulated scale)."""
        ids, other, zero = [], 0, False
        for g in self.guests:
            if not g.qp.proc.alive:
                continue
            c = g.gm.content[g.written]
            if g.entry.locked:
                c = g.gm.content
            if g.entry.nosharepages:
                other += len(c)
                continue
            zero = zero or bool((c == 0).any())
            ids.append(c[c != 0])
        distinct = len(np.unique(np.concatenate(ids))) if ids else 0
        return distinct + other + (1 if zero and not self.ksm.knobs.use_zero_pages else 0)

    def _time_to(self, t0: int, cpu0: int, s0: int, s_end: int) -> dict:
        """Virtual seconds from the step's boot to X% of its gain in savings; at resolution r
        the (r - 1) x ksmd CPU time a batch would also take at full scale is added back."""
        gain = s_end - s0
        out = {}
        for pct in (50, 90, 99):
            if gain <= 0:
                out[f"p{pct}_s"] = None
                continue
            want = s0 + pct / 100 * gain
            i = next((i for i, (_t, s, _c) in enumerate(self.samples) if s >= want), None)
            if i is None:
                out[f"p{pct}_s"] = None
                continue
            # the CPU of the batches before the one that got there (the sample before it)
            cpu_before = self.samples[max(i - 1, 0)][2]
            out[f"p{pct}_s"] = round((self.samples[i][0] - t0 + (self.r - 1) * (cpu_before - cpu0)) / 1e9, 3)
        return out

    def _violations(self, step: dict, kills) -> list[str]:
        cfg = self.cfg
        v = []
        if kills:
            v.append(f"OOM kill of {', '.join(k.name for k in kills)}")
        if cfg.swapin_rate is not None and step["swapin_rate"] > cfg.swapin_rate:
            v.append(f"swap-in rate {step['swapin_rate']:.1f} pages/s > {cfg.swapin_rate:g}")
        if cfg.ksmd_cpu is not None and step["ksmd_cpu_share"] > cfg.ksmd_cpu:
            v.append(f"ksmd CPU {step['ksmd_cpu_share']:.1%} > {cfg.ksmd_cpu:.1%}")
        head = self.headroom_pages()
        if (cfg.free_headroom_bytes is not None or cfg.free_headroom_fraction is not None) \
                and step["free_pages"] < head:
            v.append(f"free memory {step['free_pages']} pages < headroom {head}")
        return v

    def _result(self, steps, facts: list[_GuestFacts], failed_at, wall_s: float) -> dict:
        cfg, r = self.cfg, self.r
        cap = self.capacity_pages()
        use_zero = bool(self.ksm.knobs.use_zero_pages)
        curve = []
        by_guests = {s["guests"]: s for s in steps}
        noksm = 0
        seen = np.zeros(0, dtype=np.uint64)
        nonmerge = 0
        zero_any = False
        for n, f in enumerate(facts, start=1):
            noksm += f.footprint * r
            if f.mergeable:
                seen = np.union1d(seen, f.contents)
                zero_any = zero_any or f.zero_frames > 0
            else:
                nonmerge += f.footprint
            ideal = (len(seen) + nonmerge + (1 if zero_any and not use_zero else 0)) * r
            row = {"guests": n, "no_ksm_pages": noksm, "ideal_pages": ideal,
                   "fits_no_ksm": noksm <= cap, "fits_ideal": ideal <= cap}
            s = by_guests.get(n)
            if s is not None:
                row.update(ksm_pages=s["used_pages"], saved_pages=s["saved_pages"], fits_ksm=s["ok"])
            curve.append(row)

        def largest(key):
            best = 0
            for row in curve:
                if row.get(key):
                    best = row["guests"]
                else:
                    break
            return best

        ok_steps = [s for s in steps if s["ok"]]
        best = ok_steps[-1] if ok_steps else None
        vms_ksm = best["guests"] if best else 0
        res = {
            "config": cfg.path, "profile": self.host.profile.name,
            "resolution": r,
            "resolution_note": ("exact: every page simulated" if r == 1 else
                                f"every guest and the host simulated at 1/{r} of their pages; "
                                f"page counts, CPU and swap-in rates scaled back x{r}"),
            "notes": self.notes,
            "host": {"ram_pages": sum(n.mem_bytes for n in cfg.host.topology.nodes) // PAGE_SIZE,
                     "capacity_pages": cap, "headroom_pages": self.headroom_pages(),
                     "thp": self.host.thp_mode, "knobs": dict(self.knobs)},
            "policy": self._policy_summary(),
            "order": cfg.order, "sequence_length": len(cfg.sequence),
            "limits": {"oom_kills": 0, "swapin_rate": cfg.swapin_rate, "ksmd_cpu": cfg.ksmd_cpu,
                       "free_headroom_pages": self.headroom_pages() if (
                           cfg.free_headroom_bytes is not None or cfg.free_headroom_fraction is not None) else None},
            "vms_per_host": {"no_ksm": largest("fits_no_ksm"), "ksm": vms_ksm, "ideal": largest("fits_ideal")},
            "search_capped": failed_at is None,
            "limited_by": failed_at["violations"] if failed_at else
                          [f"the boot sequence ended at {len(cfg.sequence)} guests (max_guests or counts)"],
            "curve": curve,
            "steps": steps,
            "timeline": self.timeline,
            "wall_s": round(wall_s, 3),
        }
        for k in ("no_ksm", "ideal"):
            if res["vms_per_host"][k] == len(curve) and curve:
                res.setdefault("capped_curves", []).append(k)
        if best:
            res["at_best"] = {
                "guests": best["guests"], "saved_pages": best["saved_pages"],
                "saved_gib": round(best["saved_pages"] / GIB_PAGES, 4),
                "cpu_s_per_gib_saved": best["cpu_s_per_gib_saved"],
                "ksmd_cpu_share": best["ksmd_cpu_share"],
                "time_to_first_guest": steps[0]["time_to"], "time_to_last_step": best["time_to"],
                "storm": best.get("storm"),
            }
            if cfg.storm_fraction is not None:
                surv = [s for s in ok_steps if s["storm"]["survives"]]
                res["vms_surviving_storm"] = surv[-1]["guests"] if surv else 0
        return res


# ------------------------------------------------------------------------------------------
# output

def _gib(pages) -> str:
    return "-" if pages is None else f"{pages / GIB_PAGES:.2f}"


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"


def _t(v) -> str:
    return "-" if v is None else f"{v:g}s"


def format_result(res: dict) -> str:
    h = res["host"]
    lines = [f"density {res['config']} ({res['profile']}): host {_gib(h['ram_pages'])} GiB, THP {h['thp']}, "
             f"order {res['order']}, {res['sequence_length']} guests in the boot sequence",
             f"resolution: 1/{res['resolution']} ({res['resolution_note']})"]
    for n in res["notes"]:
        lines.append(f"note: {n}")
    v = res["vms_per_host"]
    lines.append(f"VMs per host: no KSM {v['no_ksm']}, KSM {v['ksm']}, ideal {v['ideal']}"
                 + (f"  (at least: {', '.join(res['capped_curves'])} reached the end of the sequence)"
                    if res.get("capped_curves") else ""))
    lines.append(f"KSM limited by: {'; '.join(res['limited_by'])}")
    pol = res.get("policy")
    if pol and pol["name"] != "fixed":
        last = pol["changes"][-1] if pol["changes"] else None
        lines.append(f"KSM policy {pol['name']}: {pol['wakeups']} wake-ups, {len(pol['changes'])} "
                     f"changes" + (f"; last at {last['t_s']:g}s: run={last['run']} pages_to_scan="
                                   f"{last['pages_to_scan']} sleep_millisecs={last['sleep_millisecs']} "
                                   f"({last['reason']})" if last else ""))
    b = res.get("at_best")
    if b:
        lines.append(f"at {b['guests']} guests: saved {b['saved_gib']} GiB; ksmd CPU {_pct(b['ksmd_cpu_share'])} "
                     f"(steady); {b['cpu_s_per_gib_saved'] if b['cpu_s_per_gib_saved'] is not None else '-'}"
                     f" ksmd CPU-s per GiB saved")
        swapped = next((s["swapped_pages"] for s in res["steps"] if s["guests"] == b["guests"]), 0)
        if swapped:
            lines.append(f"at {b['guests']} guests {_gib(swapped)} GiB are swapped out: the KSM count "
                         f"uses swap, the no-KSM and ideal curves count RAM only")
        t1, tl = b["time_to_first_guest"], b["time_to_last_step"]
        lines.append(f"time to 50/90/99% of steady-state savings: first guest {_t(t1['p50_s'])}/"
                     f"{_t(t1['p90_s'])}/{_t(t1['p99_s'])}; guest {b['guests']} "
                     f"{_t(tl['p50_s'])}/{_t(tl['p90_s'])}/{_t(tl['p99_s'])}")
        if b.get("storm"):
            s = b["storm"]
            lines.append(f"unmerge storm at {b['guests']} guests: needs {_gib(s['headroom_pages'])} GiB "
                         f"({s['storm_pages']} storm + {s['churn_pages']} churn pages), "
                         f"{_gib(s['available_pages'])} GiB free above min watermark: "
                         f"{'survives' if s['survives'] else 'does NOT survive'}; "
                         f"largest N surviving: {res.get('vms_surviving_storm')}")
    lines.append(f"{'N':>4} {'image':<16} {'noKSM GiB':>9} {'KSM GiB':>8} {'ideal GiB':>9} {'saved GiB':>9} "
                 f"{'cpu':>7} {'swapin/s':>8} {'swap GiB':>8} {'free GiB':>8} {'t50':>8} {'t90':>8} {'t99':>8} "
                 f"{'scans':>5} verdict")
    steps = {s["guests"]: s for s in res["steps"]}
    for row in res["curve"]:
        s = steps.get(row["guests"])
        if s is None:
            if row["fits_no_ksm"] or row["fits_ideal"]:
                lines.append(f"{row['guests']:>4} {'':<16} {_gib(row['no_ksm_pages']):>9} {'':>8} "
                             f"{_gib(row['ideal_pages']):>9}")
            continue
        verdict = "ok" if s["ok"] else "FAIL: " + "; ".join(s["violations"])
        if not s["steady"]:
            verdict += f" (not steady: {s['settled_by']})"
        lines.append(f"{row['guests']:>4} {s['image'][:16]:<16} {_gib(row['no_ksm_pages']):>9} "
                     f"{_gib(s['used_pages']):>8} {_gib(row['ideal_pages']):>9} {_gib(s['saved_pages']):>9} "
                     f"{_pct(s['ksmd_cpu_share']):>7} {s['swapin_rate']:>8.1f} {_gib(s['swapped_pages']):>8} "
                     f"{_gib(s['free_pages']):>8} "
                     f"{_t(s['time_to']['p50_s']):>8} {_t(s['time_to']['p90_s']):>8} "
                     f"{_t(s['time_to']['p99_s']):>8} {s['full_scans']:>5} {verdict}")
    lines.append(f"wall time {res['wall_s']:.1f}s")
    return "\n".join(lines)


def write_report(res: dict, directory: str | Path) -> None:
    """The report directory (HTML, JSON, text, CSV): see vmhost.reports.density."""
    from vmhost.reports.density import write_density_report
    write_density_report(res, directory)


def _jsonable(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def run_density(path: str | Path, progress=None) -> dict:
    return DensityRunner(load_density(path), progress=progress).run()
