"""The density search: guests booted one step at a time until a service limit breaks.

Guests are booted in the configured order onto one host (``HostStepper``); after each step
the host is checked against the limits (OOM kills always fail a step; swap-in rate, ksmd CPU
share, free headroom when configured); the first step that breaks one ends the search and
the answer is the step before. Each step scans every guest booted so far, so one guest a
step would cost the square of the guest count; with ``stride: auto`` (the default) a step
boots several guests once there are 8 (about sqrt(n / 2), at most 16). A step that meets
every limit counts for all of its guests; one that breaks a limit is undone (the simulation
is restored from a snapshot taken before it) and redone one guest at a time, so the answer
is the one-by-one answer wherever the limits only get harder with more guests. A step of
several guests during which the host swapped out is redone one guest at a time too: booting
several guests before ksmd merges them can put the host under a memory pressure that the
one-by-one sequence never meets, and reclaim leaves the host in another state (density-mix at
its suggested pages_to_scan: guests 13 and 14 booted together swapped 2.2 GiB out and ended
1.7% of the capacity lower in guest pages, inside it; booted one by one, nothing swaps and the
14th misses the capacity by 0.2%: the answer depended on which resolutions took the stride). So
is a step of several guests across which the storm verdict turned, so that the storm-safe count
is found one by one as well. (A kept stride still registers its guests at another point of the
older guests' skip cycles than one by one would; density-mix at 1/256 gives the same counts
both ways, tested.)

**Unmerge storm.** A fraction f of the merged mappings is written apart within a window W:
``f x (pages_sharing + ksm_zero_pages)`` new pages, plus ``W x cow_ksm rate`` pages of the
ordinary churn (ksmd assumed unable to re-merge in time). A step survives the storm when its
free memory above the min watermark covers both.
"""

from __future__ import annotations

import math
import time

import numpy as np

from hw.units import PAGE_SIZE, PAGES_PER_MIB
from vmhost.density.config import DensityConfig
from vmhost.density.result import build_result
from vmhost.density.stepper import HostStepper, StepResult

STRIDE_FROM, STRIDE_MAX = 8, 16
MAX_CPU_TRIES = 6            # searches spent finding the largest pages_to_scan within the CPU limit
# a guest's model per page: its content id, class and boot-touched flag, and the frames written
GUEST_MODEL_BYTES = np.dtype(np.uint64).itemsize + np.dtype(np.int8).itemsize + 2 * np.dtype(np.bool_).itemsize
EDGE = 0.01                  # a limit broken by less than this: the count is at the edge (``at_edge``)


class DensitySearch:
    """The search over ``cfg.sequence``; ``run()`` returns the result document."""

    def __init__(self, cfg: DensityConfig, progress=None, workers: int = 1):
        self.cfg = cfg
        self.progress = progress
        self.stepper = HostStepper(cfg, cfg.mix)
        self.r = cfg.resolution
        self.workers = workers          # processes for the CPU limit's searches (see _cpu_suggestion)

    # the simulated host, for callers that look inside a finished search
    host = property(lambda self: self.stepper.host)
    ksm = property(lambda self: self.stepper.ksm)
    ksmd = property(lambda self: self.stepper.ksmd)
    policy = property(lambda self: self.stepper.policy)
    guests = property(lambda self: self.stepper.guests)

    # the names the density oracle (vmhost/reality) uses
    def _build(self) -> None:
        self.stepper.build()

    def _guest_memory(self, n, entry):
        return self.stepper.guest_memory(n, entry)

    def headroom_pages(self) -> int:
        cfg = self.cfg
        total = sum(n.mem_bytes for n in cfg.host.topology.nodes) // PAGE_SIZE
        if cfg.free_headroom_bytes is not None:
            return -(-cfg.free_headroom_bytes // PAGE_SIZE)
        if cfg.free_headroom_fraction is not None:
            return int(math.ceil(cfg.free_headroom_fraction * total))
        return 0

    def capacity_pages(self) -> int:
        """Pages the guests may use (full scale): RAM managed by the allocator minus the high
        watermarks minus the free headroom."""
        a = self.stepper.host.allocator
        managed = int(a.managed.sum())
        high = sum(w.high for w in a.watermarks)
        return (managed - high) * self.r - self.headroom_pages()

    def run(self, suggest: bool = True) -> dict:
        """The search; when the ksmd CPU limit is what stopped it (and the knobs are the
        configured ones, not a policy's), also the largest pages_to_scan that meets the limit
        and the answer with it (``cpu_limit``)."""
        res = self._search()
        if suggest and res["failed_step"] is not None and self.cfg.ksmd_cpu is not None \
                and any(v.startswith("ksmd CPU") for v in res["failed_step"]["violations"]) \
                and (self.cfg.host.policy or ("fixed",))[0] == "fixed" \
                and dict(self.cfg.host.ksm).get("advisor_mode", "none") == "none":
            res["cpu_limit"] = self._cpu_suggestion(res)
        del res["failed_step"]
        return res

    def _cpu_suggestion(self, res: dict) -> dict:
        """ksmd's share of a CPU at steady state is c / (c + sleep) with c the CPU time of a
        batch, which grows with pages_to_scan (per page visited, checksummed, compared): the
        pages_to_scan that meets the limit L is estimated from the share s measured at the
        failing step as p x (L / (1 - L)) / (s / (1 - s)) (p: pages_to_scan, or the pages a
        full scan visits if fewer), checked by searching again with it (lowered again from
        that search's failing step while it breaks the limit), then raised by bisection
        towards the smallest value known to break it, until the two are within 10%: at most
        MAX_CPU_TRIES searches in all.

        With ``workers`` > 1 the search the next step would run if this one meets the limit
        (its pages_to_scan is known in advance: the bisection's upper end does not move) runs
        at the same time in another process (multiprocessing); a search is a function of its
        pages_to_scan, so the answer is the one of one search after the other."""
        from vmhost.density.scale import full_scale_scan_knobs
        cfg, lim = self.cfg, self.cfg.ksmd_cpu
        configured = full_scale_scan_knobs(cfg.host)["pages_to_scan"]
        pts, failed = configured, res["failed_step"]
        out = {"configured_pages_to_scan": configured, "limit": lim,
               "fails_at_guests": failed["guests"], "ksmd_cpu_share": failed["ksmd_cpu_share"],
               "vms_ksm_configured": res["vms_per_host"]["ksm"], "tries": []}
        good, bad = None, (pts, failed)
        tries = 0
        probes = _Probes(self, self.workers)

        def scan_pages(step):
            return sum(cfg.mix[i].memory_mib * PAGES_PER_MIB for i in cfg.sequence[:step["guests"]]
                       if not cfg.mix[i].nosharepages)

        def next_try(good, bad):
            """The next pages_to_scan to search with (None: done), and ``bad`` as it stands."""
            # a batch ends at a full scan: pages_to_scan beyond the pages registered does nothing
            bad = (min(bad[0], scan_pages(bad[1]) + 1), bad[1])
            if good is None:
                bp, bf = bad
                share = min(max(bf["ksmd_cpu_share"], 1e-9), 1 - 1e-9)
                target = 0.99 * lim
                new = int(bp * (target / (1 - target)) / (share / (1 - share)))
                new = min(max(new, 1), bp - 1)
                return (None if new >= bp else new), bad
            # the largest that meets it: bisect (geometrically) between good and bad
            if bad[0] <= good[0] * 1.1:
                return None, bad
            return int(round((good[0] * bad[0]) ** 0.5)), bad

        while tries < MAX_CPU_TRIES:
            new, bad = next_try(good, bad)
            if new is None:
                break
            tries += 1
            probes.ahead(new)
            if tries < MAX_CPU_TRIES:
                probes.ahead(next_try((new, None), bad)[0])     # the next one if this one meets it
            again = probes.result(new)
            out["tries"].append({"pages_to_scan": new, "vms_ksm": again["vms_per_host"]["ksm"],
                                 "limited_by": again["limited_by"]})
            f = again["failed_step"]
            if f is None or not any(v.startswith("ksmd CPU") for v in f["violations"]):
                good = (new, again)
            else:
                bad = (new, f)
                if new <= 1:
                    break
        probes.close()
        if good is None:
            out.update(pages_to_scan=None, vms_ksm=None)
            return out
        new, again = good
        out.update(pages_to_scan=new, breaks_at_pages_to_scan=bad[0],
                   vms_ksm=again["vms_per_host"]["ksm"],
                   vms_surviving_storm=again.get("vms_surviving_storm"),
                   at_best=again.get("at_best"), limited_by=again["limited_by"],
                   limit_margin=again.get("limit_margin"), at_edge=again.get("at_edge"))
        return out

    def _with_pages_to_scan(self, pts: int) -> DensityConfig:
        import copy
        cfg = copy.copy(self.cfg)
        cfg.host = copy.copy(cfg.host)
        knobs = [(k, v) for k, v in cfg.host.ksm if k != "pages_to_scan"]
        cfg.host.ksm = [("pages_to_scan", str(pts))] + knobs
        return cfg

    def footprint(self):
        """The simulation's memory at most (``vmhost.footprint``): the host's frames and every
        guest of the boot sequence booted (the most the search can boot), at the resolution;
        twice that when the search steps several guests at a time (it keeps a snapshot, a
        copy of the whole simulation, from before each such step)."""
        from vmhost.footprint import Footprint
        cfg = self.cfg
        host = sum(n.mem_bytes for n in cfg.host.topology.nodes) // PAGE_SIZE
        guests = [cfg.mix[i] for i in cfg.sequence]
        mapped = sum(e.memory_mib * PAGES_PER_MIB for e in guests)
        scanned = sum(e.memory_mib * PAGES_PER_MIB for e in guests if not e.nosharepages)
        copies = 2 if any(self._stride(n) > 1 for n in range(len(guests))) else 1
        return Footprint(copies * host, copies * mapped, copies * scanned,
                         other_bytes=copies * mapped * GUEST_MODEL_BYTES).scaled(self.r)

    def check_fits(self) -> None:
        """Refuse (one line: InputError) a search whose simulation would not fit in this
        machine's memory, with the estimate and a resolution that would."""
        from vmhost.footprint import check_fits
        check_fits(self.footprint(), f"density {self.cfg.path}", self.r)

    def _search(self) -> dict:
        wall0 = time.perf_counter()
        cfg, st = self.cfg, self.stepper
        self.check_fits()
        st.build()
        steps: list[dict] = []
        failed_at: dict | None = None
        n = 0
        while n < len(cfg.sequence) and failed_at is None:
            stride = min(self._stride(n), len(cfg.sequence) - n)
            snapshot = None               # the last one goes first: two copies at most
            snapshot = st.snapshot() if stride > 1 else None
            step = self.boot_step(n, stride)
            if stride == 1 or (step["ok"] and not step["swapout_pages"]
                               and not self._storm_turns(steps, step)):
                self._keep(steps, step)
                failed_at = None if step["ok"] else step
                n += stride
                continue
            # a limit broke somewhere in the stride, the host swapped during it or the storm
            # verdict turned in it: back to before it, one guest at a time
            st.restore(snapshot)
            for _ in range(stride):
                step = self.boot_step(n, 1)
                self._keep(steps, step)
                n += 1
                if not step["ok"]:
                    failed_at = step
                    break
        facts = st.facts([cfg.mix[i] for i in cfg.sequence])
        res = build_result(self, steps, facts, failed_at, time.perf_counter() - wall0)
        res["failed_step"] = failed_at
        if failed_at is not None:
            res["limit_margin"] = self._margin(failed_at)
            res["at_edge"] = res["limit_margin"] < EDGE
        return res

    def _storm_turns(self, steps: list[dict], step: dict) -> bool:
        """Whether the storm verdict of ``step`` differs from the step before it's: the guest
        count at which it turned lies inside the stride, and the storm-safe count is the
        one-by-one count (a stride from 10 to 12 guests that survives at 10 and not at 12 says
        nothing of 11)."""
        if self.cfg.storm_fraction is None or not steps:
            return False
        return steps[-1]["storm"]["survives"] != step["storm"]["survives"]

    def _stride(self, n: int) -> int:
        """Guests booted by the next step. ``stride: auto`` grows it with sqrt(n) (each step
        scans every guest booted so far, so one guest a step costs n^2 scans over a search to
        n): a step that meets the limits counts for every guest in it, and one that breaks a
        limit is redone from before it one guest at a time, so the answer is the same."""
        if self.cfg.stride != "auto":
            return int(self.cfg.stride)
        return 1 if n < STRIDE_FROM else min(STRIDE_MAX, math.isqrt(n // 2))

    def boot_step(self, n: int, count: int) -> dict:
        """Guests n+1 ... n+count of the sequence booted, settled, measured, judged."""
        cfg = self.cfg
        res = self.stepper.step(n, [cfg.mix[cfg.sequence[n + j]] for j in range(count)])
        return self.judge(res)

    def judge(self, res: StepResult) -> dict:
        """The step's record: the measurement, the storm check and the limits it breaks."""
        cfg = self.cfg
        step = res.as_dict()
        booted = step.pop("booted")
        if cfg.storm_fraction is not None:
            storm = cfg.storm_fraction * res.saved_pages
            churn = res.cow_ksm_rate * cfg.storm_window_ns / 1e9
            need = int(math.ceil(storm + churn))
            # in the one accounting: guest pages in swap would need RAM too (a host that
            # survives a storm only because part of its guests sits in swap is not safe)
            avail = res.free_pages - res.swapped_pages - res.min_watermark_pages
            step["storm"] = {"storm_pages": int(math.ceil(storm)), "churn_pages": int(math.ceil(churn)),
                             "headroom_pages": need, "available_pages": max(avail, 0),
                             "survives": avail >= need}
        step["held_pages"] = res.used_pages + res.swapped_pages
        step["violations"] = self._violations(step)
        step["ok"] = not step["violations"]
        step["booted"] = booted
        return step

    def _keep(self, steps: list[dict], step: dict) -> None:
        steps.append(step)
        if self.progress:
            self.progress(step)

    def _margin(self, step: dict) -> float:
        """By how much (relative) the step that ended the search broke its limits: the
        largest excess over the limits it broke (OOM kills count as infinitely broken; memory
        limits relative to the capacity). An
        answer decided within a resolution's error of a limit is at the edge."""
        cfg, out = self.cfg, 0.0
        for v in step["violations"]:
            if v.startswith("OOM"):
                return float("inf")
            if v.startswith("ksmd CPU"):
                out = max(out, step["ksmd_cpu_share"] / cfg.ksmd_cpu - 1)
            elif v.startswith("swap-in"):
                out = max(out, step["swapin_rate"] / cfg.swapin_rate - 1 if cfg.swapin_rate else float("inf"))
            elif v.startswith("free memory"):
                # a shortfall of memory, as the guest-page limit's: relative to the capacity
                # (a resolution's error in used memory moves free memory by a share of RAM,
                # not of the headroom)
                out = max(out, (self.headroom_pages() - step["free_pages"]) / self.capacity_pages())
            elif v.startswith("guest pages"):
                out = max(out, step["held_pages"] / self.capacity_pages() - 1)
        return round(out, 6)

    def _violations(self, step: dict) -> list[str]:
        cfg = self.cfg
        v = []
        if step["oom_kills"]:
            v.append(f"OOM kill of {', '.join(k['name'] for k in step['oom_kills'])}")
        if cfg.swapin_rate is not None and step["swapin_rate"] > cfg.swapin_rate:
            v.append(f"swap-in rate {step['swapin_rate']:.1f} pages/s > {cfg.swapin_rate:g}")
        if cfg.ksmd_cpu is not None and step["ksmd_cpu_share"] > cfg.ksmd_cpu:
            v.append(f"ksmd CPU {step['ksmd_cpu_share']:.1%} > {cfg.ksmd_cpu:.1%}")
        head = self.headroom_pages()
        if (cfg.free_headroom_bytes is not None or cfg.free_headroom_fraction is not None) \
                and step["free_pages"] < head:
            v.append(f"free memory {step['free_pages']} pages < headroom {head}")
        # the one accounting of all three columns: the guests' pages, in RAM or in swap, within
        # the capacity (RAM less the high watermarks and the headroom); swap is not capacity
        cap = self.capacity_pages()
        if step["held_pages"] > cap:
            v.append(f"guest pages {step['held_pages']} (RAM {step['used_pages']} + swap "
                     f"{step['swapped_pages']}) > capacity {cap}")
        return v


def _search_with(cfg: DensityConfig) -> dict:
    return DensitySearch(cfg)._search()


class _Probes:
    """The CPU limit's searches by pages_to_scan: run here, or with ``workers`` > 1 in a
    process pool (multiprocessing), where searches asked for ahead run meanwhile and the ones
    nobody needs are ended with the pool."""

    def __init__(self, search: DensitySearch, workers: int):
        self.search = search
        self.pool = None
        if workers > 1:
            from vmhost.footprint import available_bytes
            if 2 * search.footprint().bytes() <= available_bytes():      # two searches at once
                import multiprocessing
                self.pool = multiprocessing.get_context("fork").Pool(min(workers, 2))
        self.running: dict[int, object] = {}

    def ahead(self, pts: int | None) -> None:
        if self.pool is not None and pts is not None and pts not in self.running:
            self.running[pts] = self.pool.apply_async(
                _search_with, (self.search._with_pages_to_scan(pts),))

    def result(self, pts: int) -> dict:
        if self.pool is None:
            return _search_with(self.search._with_pages_to_scan(pts))
        self.ahead(pts)
        return self.running.pop(pts).get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None
