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

from guests.resolve import expect_image
from guests.schema import (ABSENT, Section, expect_bool, expect_domain, expect_enum, expect_fraction,
                           expect_int, expect_list, expect_mib, expect_number, fail, is_percentage,
                           nested, parse_duration_ns, parse_size, read_yaml, rule)
from hw.units import PAGE_SIZE
from vmhost.config import HostConfig, parse_host_config
from vmhost.policies import resolution_refusal

ORDERS = ("as-listed", "round-robin", "weighted")


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
# validation: one rule per key (guests.schema.Section), in the order they are read

def _mix_memory(value: Any, path: str, key: str, entry: MixEntry) -> None:
    entry.memory_mib = entry.image.memory_mib if value is ABSENT else expect_mib(value, path, key)


def _mix_name(value: Any, path: str, key: str, entry: MixEntry) -> None:
    entry.name = str(entry.image.name if value is ABSENT else value)


MIX = Section(
    rule("image", expect_image, required=True),
    rule("memory", apply=_mix_memory),
    rule("weight", expect_number, 0.0, lo_open=True),
    rule("count", expect_int, 1, 100_000),
    rule("domain", expect_domain, default="default"),
    rule("nosharepages", expect_bool, default=False),
    rule("locked", expect_bool, default=False),
    rule("name", apply=_mix_name),
)


def _mix_entry(e: Any, i: int, path: str) -> MixEntry:
    key = f"density.mix[{i}]"
    entry = MIX.fill(e, path, key, MixEntry(i, None, 0))
    try:
        entry.image.class_pages(entry.memory_mib)
    except ValueError as exc:
        raise fail(path, f"{key}.memory", f"too small for image {entry.image.name!r} ({exc})") from None
    return entry


def _mix(value: Any, path: str, key: str, cfg: DensityConfig) -> None:
    mix_doc = expect_list(value, path, key, "{image, memory, weight or count, ...}", nonempty=True)
    cfg.mix = [_mix_entry(e, i, path) for i, e in enumerate(mix_doc)]


def _max_guests(value: Any, path: str, key: str, cfg: DensityConfig) -> None:
    if value is ABSENT:        # four times what fits in RAM without sharing
        ram_mib = sum(n.mem_bytes for n in cfg.host.topology.nodes) >> 20
        smallest = min(e.memory_mib for e in cfg.mix)
        cfg.max_guests = max(1, min(100_000, 4 * ram_mib // smallest))
    else:
        cfg.max_guests = expect_int(value, path, key, 1, 100_000)


def _stride(value: Any, path: str, key: str, cfg: DensityConfig) -> None:
    if value is not ABSENT and value != "auto":
        cfg.stride = expect_int(value, path, key, 1, 4096)


def _settle(value: Any, path: str, key: str, cfg: HostRun) -> None:
    (cfg.settle_scans, cfg.tolerance, cfg.max_scans,
     cfg.settle_time_ns) = parse_settle({} if value is ABSENT else value or {}, path, key)


def _free_headroom(value: Any, path: str, key: str, cfg: DensityConfig) -> None:
    if value is ABSENT:
        return
    if is_percentage(value):
        cfg.free_headroom_fraction = expect_fraction(value, path, key)
    else:
        cfg.free_headroom_bytes = parse_size(value, path, key, minimum=0)


LIMITS = Section(
    rule("swapin_rate", expect_number, 0.0),
    rule("ksmd_cpu", expect_fraction),
    rule("free_headroom", apply=_free_headroom),
)
STORM = Section(
    rule("fraction", expect_fraction, required=True, attr="storm_fraction"),
    rule("window", parse_duration_ns, required=True, attr="storm_window_ns"),
)
DENSITY = Section(
    rule("mix", apply=_mix, required=True),
    rule("order", expect_enum, ORDERS, default="weighted"),
    rule("seed", expect_int, 0, 2**32 - 1, default=1),
    rule("max_guests", apply=_max_guests),
    rule("resolution", expect_int, 1, 1 << 16, default=1),
    rule("settle", apply=_settle),
    rule("write_period", parse_duration_ns, attr="write_period_ns"),
    rule("warm_start", expect_bool),
    rule("stride", apply=_stride),
    rule("limits", apply=nested(LIMITS)),
    rule("unmerge_storm", apply=nested(STORM, null="skip")),
    rule("samples_per_scan", expect_int, 1, 10_000, default=32),
)


def parse_density(doc: Any, path: str) -> DensityConfig:
    hcfg = parse_host_config(doc, path, extra_keys=("density",))
    if "density" not in doc:
        raise fail(path, "density", "missing")
    cfg = DENSITY.fill(doc["density"], path, "density", DensityConfig(path, hcfg))
    check_resolution(cfg)
    mix = cfg.mix
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


@dataclass
class Settle:
    """A ``settle:`` mapping's values (see ``HostRun``)."""
    scans: int = 2
    tolerance: float = 0.001
    max_scans: int = 30
    time: int | None = None


def _max_scans(value: Any, path: str, key: str, settle: Settle) -> None:
    settle.max_scans = expect_int(value, path, key, settle.scans + 2, 100_000)


SETTLE = Section(
    rule("scans", expect_int, 1, 100, default=2),
    rule("tolerance", expect_number, 0.0, 1.0, default=0.001),
    rule("max_scans", apply=_max_scans, default=30),
    rule("time", parse_duration_ns),
)


def parse_settle(settle: Any, path: str, key: str) -> tuple[int, float, int, int | None]:
    """A ``settle:`` mapping: (scans, tolerance, max_scans, time in ns or None)."""
    SETTLE.check(settle, path, key)
    if "time" in settle and any(k in settle for k in ("scans", "tolerance", "max_scans")):
        raise fail(path, key, "give either time or scans/tolerance/max_scans")
    s = SETTLE.fill(settle, path, key, Settle())
    return s.scans, s.tolerance, s.max_scans, s.time


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

