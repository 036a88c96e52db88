"""A host and its guests at resolution 1/N: what is divided by N, and ksmd's knobs for it.

At resolution N every guest is simulated with 1/N of its RAM (image class fractions,
self-sharing, pools and per-page write frequencies are scale-free: absolute ``mib`` class
sizes and write rates are divided by N), on a host with 1/N of its RAM, block size and swap
(size and bandwidth), with ksmd's ``pages_to_scan`` divided by N so that a full scan takes the
same virtual time; when that leaves fewer than ``MIN_BATCH_PAGES`` a batch, pages_to_scan and
sleep_millisecs are both multiplied by the same factor (the same scan rate and CPU share, a
coarser time grain). The watermarks are the full-size host's / N (``build_system``).
"""

from __future__ import annotations

import copy
import math

from hw.units import HPAGE_PAGES, PAGES_PER_MIB
from vmhost.config import HostConfig
from vmhost.density.config import HostRun
from vmhost.density.settle import smart_scan_on
from vmhost.ksm import knobs as ksm_knobs

MIN_BATCH_PAGES = 256


def full_scale_scan_knobs(hcfg: HostConfig) -> dict:
    """The configured pages_to_scan and sleep_millisecs (the kernel's defaults if not set)."""
    configured = dict(hcfg.ksm)
    return {name: int(configured.get(name, ksm_knobs.BY_NAME[name].default))
            for name in ("pages_to_scan", "sleep_millisecs")}


def scaled_image(img, r: int):
    if r == 1:
        return img
    s = copy.deepcopy(img)
    for c in s.classes.values():
        if c.mib is not None:
            c.mib = c.mib / r
        c.steady_rate = c.steady_rate / r
    s.memory_mib = max(1, img.memory_mib // r)
    return s


def scaled_block_pages(h: HostConfig, r: int) -> int:
    """The memory block size at 1/r: block / r, but never below one huge page when THP is on
    (a block smaller than 2 MiB cannot hold a huge page, and the guests would silently lose THP
    at coarse resolutions while they have it at fine ones)."""
    b = max(1, h.block_pages // r)
    if h.thp != "never" and b < HPAGE_PAGES:
        return HPAGE_PAGES
    return b


def scaled_host(cfg: HostRun) -> tuple[HostConfig, list[tuple[str, str]], list[str]]:
    from hw.topology import NumaNode, Topology
    r, h = cfg.resolution, cfg.host
    notes: list[str] = []
    knobs = []
    configured = dict(h.ksm)
    for name, value in h.ksm:
        if name in ksm_knobs.SCALED and name != "pages_to_scan" and r > 1:
            knobs.append((name, str(max(1, int(round(int(value) / r))))))
        elif name not in ("pages_to_scan", "sleep_millisecs") or r == 1:
            knobs.append((name, value))
    if r > 1:
        # pages_to_scan / r per wake-up keeps a full scan's time; batches of fewer than
        # MIN_BATCH_PAGES pages are grouped (both knobs x the same factor: the same scan rate
        # and CPU share at a coarser time grain), since each batch is a Python event
        from vmhost.policies import scaled_scan_knobs
        full = full_scale_scan_knobs(h)
        pts, sleep = full["pages_to_scan"], full["sleep_millisecs"]
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
    s.block_pages = scaled_block_pages(h, r)
    s.swap = [dict(d, pages=d["pages"] // r, read_bps=d["read_bps"] / r, write_bps=d["write_bps"] / r)
              for d in h.swap]
    return s, knobs, notes


SEARCHES_PER_CHECKSUM = 1.5


def depth_extra_ns(r: int, work: dict) -> int:
    """ksmd CPU time (simulated scale) that tree searches would take on the full-size host
    beyond what they took on the 1/r host: every stable- and unstable-tree search walks a tree
    r times larger there, log2(r) levels deeper, one page comparison a level. Searches are
    counted as pages checksummed x SEARCHES_PER_CHECKSUM (ksmd looks a page up in the stable
    tree, checksums it and, if the checksum held, looks it up in the unstable tree: between 1
    and 2 searches a checksum; 1.5 keeps the first density-mix guest's CPU share and CPU
    seconds within 3% of each other from 1/512 to 1/64, where 1 or 2 leave one of them 5%
    off). The engine does not count searches themselves, so this is an estimate."""
    if r <= 1:
        return 0
    from vmhost.ksm.ksmd import COST_NS
    return int(math.log2(r) * SEARCHES_PER_CHECKSUM * work["checksums"] * COST_NS["tree_compares"])


def unfaithful_figures(run: HostRun, mix) -> list[str]:
    """What a host simulated at 1/r cannot show, one sentence each (empty at r = 1)."""
    r, out = run.resolution, []
    if r == 1:
        return out
    small = sorted({e.memory_mib for e in mix if e.memory_mib * PAGES_PER_MIB // r < HPAGE_PAGES and not e.locked})
    if small and run.host.thp != "never":
        finest = max(1, min(small) * PAGES_PER_MIB // HPAGE_PAGES)
        out.append(f"THP: guests of {', '.join(f'{m} MiB' for m in small)} are below one huge page at 1/{r}, "
                   f"so KSM merges the zero subpages that splitting a huge page maps to the zero page: "
                   f"memory saved, pages_sharing and ksmd CPU are not the full-size host's "
                   f"(resolution {finest} or finer shows them)")
    if run.settle_time_ns is None and smart_scan_on(run.host):
        # steps end on whole skip cycles at every resolution (settle.py), so the older guests'
        # cycles stand at the same phase; what still moves is measured on the oracle configs
        out.append(f"smart scan: the times to X% can move by a full scan at 1/{r} (a scaled pass merges whole "
                   f"scaled pages and the clock's grain is coarser; on the oracle configs at 1/16, against "
                   f"the kernel: times -31%..+62% where resolution 1 is -11%..+38%, pages_sharing within "
                   f"1.5% but VDI clones' +5.4% (khugepaged, which runs 1/{r} as often, does not collapse "
                   f"split ranges again within the step), ksmd CPU within 12%); resolution 1 shows them")
    return out
