"""The density search: guests booted one step at a time until a service limit breaks.

Guests are booted in the configured order onto one host (``HostStepper``); after each step
the host is checked against the limits (OOM kills always fail a step; swap-in rate, ksmd CPU
share, free headroom when configured); the first step that breaks one ends the search and
the answer is the step before. Each step scans every guest booted so far, so one guest a
step would cost the square of the guest count; with ``stride: auto`` (the default) a step
boots several guests once there are 8 (about sqrt(n / 2), at most 16). A step that meets
every limit counts for all of its guests; one that breaks a limit is undone (the simulation
is restored from a snapshot taken before it) and redone one guest at a time, so the answer
is the one-by-one answer wherever the limits only get harder with more guests.

**Unmerge storm.** A fraction f of the merged mappings is written apart within a window W:
``f x (pages_sharing + ksm_zero_pages)`` new pages, plus ``W x cow_ksm rate`` pages of the
ordinary churn (ksmd assumed unable to re-merge in time). A step survives the storm when its
free memory above the min watermark covers both.
"""

from __future__ import annotations

import math
import time

from vmhost.density.config import PAGE_SIZE, DensityConfig
from vmhost.density.result import build_result
from vmhost.density.stepper import HostStepper, StepResult

STRIDE_FROM, STRIDE_MAX = 8, 16


class DensitySearch:
    """The search over ``cfg.sequence``; ``run()`` returns the result document."""

    def __init__(self, cfg: DensityConfig, quiet: bool = True, progress=None):
        self.cfg = cfg
        self.progress = progress
        self.stepper = HostStepper(cfg, cfg.mix)
        self.r = cfg.resolution

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

    def run(self) -> dict:
        wall0 = time.perf_counter()
        cfg, st = self.cfg, self.stepper
        st.build()
        steps: list[dict] = []
        failed_at: dict | None = None
        n = 0
        while n < len(cfg.sequence) and failed_at is None:
            stride = min(self._stride(n), len(cfg.sequence) - n)
            snapshot = st.snapshot() if stride > 1 else None
            step = self.boot_step(n, stride)
            if step["ok"] or stride == 1:
                self._keep(steps, step)
                failed_at = None if step["ok"] else step
                n += stride
                continue
            # a limit broke somewhere in the stride: back to before it, one guest at a time
            st.restore(snapshot)
            for _ in range(stride):
                step = self.boot_step(n, 1)
                self._keep(steps, step)
                n += 1
                if not step["ok"]:
                    failed_at = step
                    break
        facts = st.facts([cfg.mix[i] for i in cfg.sequence])
        return build_result(self, steps, facts, failed_at, time.perf_counter() - wall0)

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
            avail = res.free_pages - res.min_watermark_pages
            step["storm"] = {"storm_pages": int(math.ceil(storm)), "churn_pages": int(math.ceil(churn)),
                             "headroom_pages": need, "available_pages": max(avail, 0),
                             "survives": avail >= need}
        step["violations"] = self._violations(step)
        step["ok"] = not step["violations"]
        step["booted"] = booted
        return step

    def _keep(self, steps: list[dict], step: dict) -> None:
        steps.append(step)
        if self.progress:
            self.progress(step)

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
        return v
