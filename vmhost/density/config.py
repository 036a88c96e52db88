"""The density file: parsing and validation (the ``density:`` section of a host config).

The keys and what they mean are in the package docstring (``vmhost.density``). Every mistake
is one :class:`InputError` line naming the file, the key path and the reason; nothing is run
or written before the whole file is validated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hw.units import PAGE_SIZE
from vmhost.config import HostConfig, parse_host_config
from vmhost.policies import resolution_refusal
from vmhost.schema import (expect_bool, expect_domain, expect_enum, expect_fraction, expect_image,
                           expect_int, expect_list, expect_mapping, expect_mib, expect_number, fail,
                           is_percentage, parse_duration_ns, parse_size, read_yaml)

ORDERS = ("as-listed", "round-robin", "weighted")
DENSITY_KEYS = ("mix", "order", "seed", "max_guests", "resolution", "settle", "write_period",
                "warm_start", "stride", "limits", "unmerge_storm", "samples_per_scan")
MIX_KEYS = ("image", "memory", "weight", "count", "domain", "nosharepages", "locked", "name")
SETTLE_KEYS = ("scans", "tolerance", "max_scans", "time")
LIMIT_KEYS = ("swapin_rate", "ksmd_cpu", "free_headroom")
STORM_KEYS = ("fraction", "window")


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
class HostRun:
    """One host simulated with guests booted onto it: what the host stepper needs (a density
    search's host, or a fleet's host). The settle rule: counters unchanged for ``settle_scans``
    full scans (``tolerance`` x the new guests' pages), at most ``max_scans``; or a fixed
    ``settle_time_ns`` per step."""
    path: str
    host: HostConfig
    resolution: int = 1
    seed: int = 1
    settle_scans: int = 2
    tolerance: float = 0.001
    max_scans: int = 30
    settle_time_ns: int | None = None
    write_period_ns: int = 1_000_000_000
    warm_start: bool = True
    samples_per_scan: int = 32
    guest_names: list[str] | None = None                  # exact names (a fleet host's VMs)


@dataclass
class DensityConfig(HostRun):
    mix: list[MixEntry] = field(default_factory=list)
    order: str = "weighted"
    max_guests: int = 0
    stride: str | int = "auto"
    swapin_rate: float | None = None
    ksmd_cpu: float | None = None
    free_headroom_bytes: int | None = None
    free_headroom_fraction: float | None = None
    storm_fraction: float | None = None
    storm_window_ns: int | None = None
    sequence: list[int] = field(default_factory=list)     # mix index of each guest, in boot order


# ------------------------------------------------------------------------------------------
# validation

def _mix_entry(e: Any, i: int, path: str) -> MixEntry:
    key = f"density.mix[{i}]"
    expect_mapping(e, path, key, MIX_KEYS, ("image",))
    img = expect_image(e["image"], path, f"{key}.image")
    mem = expect_mib(e["memory"], path, f"{key}.memory") if "memory" in e else img.memory_mib
    entry = MixEntry(i, img, mem, name=str(e.get("name", img.name)))
    if "weight" in e:
        entry.weight = expect_number(e["weight"], path, f"{key}.weight", 0.0, lo_open=True)
    if "count" in e:
        entry.count = expect_int(e["count"], path, f"{key}.count", 1, 100_000)
    entry.domain = expect_domain(e.get("domain", "default"), path, f"{key}.domain")
    entry.nosharepages = expect_bool(e.get("nosharepages", False), path, f"{key}.nosharepages")
    entry.locked = expect_bool(e.get("locked", False), path, f"{key}.locked")
    try:
        img.class_pages(mem)
    except ValueError as exc:
        raise fail(path, f"{key}.memory", f"too small for image {img.name!r} ({exc})") from None
    return entry


def parse_density(doc: Any, path: str) -> DensityConfig:
    hcfg = parse_host_config(doc, path, extra_keys=("density",))
    if "density" not in doc:
        raise fail(path, "density", "missing")
    d = expect_mapping(doc["density"], path, "density", DENSITY_KEYS, ("mix",))
    mix_doc = expect_list(d["mix"], path, "density.mix", "{image, memory, weight or count, ...}",
                          nonempty=True)
    mix = [_mix_entry(e, i, path) for i, e in enumerate(mix_doc)]
    cfg = DensityConfig(path, hcfg, mix=mix)
    cfg.order = expect_enum(d.get("order", "weighted"), path, "density.order", ORDERS)
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
        cfg.warm_start = expect_bool(d["warm_start"], path, "density.warm_start")
    if "stride" in d and d["stride"] != "auto":
        cfg.stride = expect_int(d["stride"], path, "density.stride", 1, 4096)
    (cfg.settle_scans, cfg.tolerance, cfg.max_scans,
     cfg.settle_time_ns) = parse_settle(d.get("settle", {}) or {}, path, "density.settle")
    limits = d.get("limits", {}) or {}
    expect_mapping(limits, path, "density.limits", LIMIT_KEYS)
    if "swapin_rate" in limits:
        cfg.swapin_rate = expect_number(limits["swapin_rate"], path, "density.limits.swapin_rate", 0.0)
    if "ksmd_cpu" in limits:
        cfg.ksmd_cpu = expect_fraction(limits["ksmd_cpu"], path, "density.limits.ksmd_cpu")
    if "free_headroom" in limits:
        v = limits["free_headroom"]
        if is_percentage(v):
            cfg.free_headroom_fraction = expect_fraction(v, path, "density.limits.free_headroom")
        else:
            cfg.free_headroom_bytes = parse_size(v, path, "density.limits.free_headroom", minimum=0)
    storm = d.get("unmerge_storm")
    if storm is not None:
        expect_mapping(storm, path, "density.unmerge_storm", STORM_KEYS, ("fraction", "window"))
        cfg.storm_fraction = expect_fraction(storm["fraction"], path, "density.unmerge_storm.fraction")
        cfg.storm_window_ns = parse_duration_ns(storm["window"], path, "density.unmerge_storm.window")
    check_resolution(cfg)
    if cfg.order == "as-listed" and any(e.count is None for e in mix[:-1]):
        i = next(e.index for e in mix[:-1] if e.count is None)
        raise fail(path, f"density.mix[{i}].count", "order as-listed needs a count on every entry but the last")
    cfg.sequence = boot_sequence(cfg)
    return cfg


def check_resolution(cfg: DensityConfig) -> None:
    """Refuse a resolution that does not divide the host and every guest (or whose policy
    cannot run scaled): one error naming ``density.resolution`` (or ``policy.name``)."""
    r, path = cfg.resolution, cfg.path
    if r == 1:
        return
    if cfg.host.policy and (why := resolution_refusal(cfg.host.policy[0], r)):
        raise fail(path, "policy.name", why)
    for e in cfg.mix:
        if e.memory_mib % r:
            raise fail(path, "density.resolution",
                       f"{r} does not divide the memory of mix[{e.index}] ({e.memory_mib} MiB)")
    block = cfg.host.block_pages
    if block // r < 1 or block % r:
        raise fail(path, "density.resolution", f"{r} does not divide the block size ({block} pages)")
    from vmhost.density.scale import scaled_block_pages
    sblock = scaled_block_pages(cfg.host, r)
    for n in cfg.host.topology.nodes:
        if (n.mem_bytes // PAGE_SIZE) % r:
            raise fail(path, "density.resolution", f"{r} does not divide node {n.id}'s memory")
        if (n.mem_bytes // PAGE_SIZE // r) % sblock:
            raise fail(path, "density.resolution", f"at 1/{r} node {n.id}'s memory is not a whole number "
                                                   f"of {sblock}-page blocks (a block holds at least one "
                                                   f"huge page when THP is on)")
    for s in cfg.host.swap:
        if s["pages"] < r:
            raise fail(path, "density.resolution", f"swap device {s['name']} is smaller than {r} pages")


def parse_settle(settle: Any, path: str, key: str) -> tuple[int, float, int, int | None]:
    """A ``settle:`` mapping: (scans, tolerance, max_scans, time in ns or None)."""
    expect_mapping(settle, path, key, SETTLE_KEYS)
    time_ns = None
    if "time" in settle:
        if any(k in settle for k in ("scans", "tolerance", "max_scans")):
            raise fail(path, key, "give either time or scans/tolerance/max_scans")
        time_ns = parse_duration_ns(settle["time"], path, f"{key}.time")
    scans = expect_int(settle.get("scans", 2), path, f"{key}.scans", 1, 100)
    tolerance = expect_number(settle.get("tolerance", 0.001), path, f"{key}.tolerance", 0.0, 1.0)
    max_scans = expect_int(settle.get("max_scans", 30), path, f"{key}.max_scans", scans + 2, 100_000)
    return scans, tolerance, max_scans, time_ns


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

