"""ksmd: the KSM thread on the virtual clock, and what its work costs in CPU time.

ksmd wakes, processes up to ``pages_to_scan`` pages (a full-scan boundary
always ends the batch), then sleeps ``sleep_millisecs``; with nothing
registered, or run != 1, it waits to be woken (by a run=1 write or the first
mm registering). While memory goes offline it is parked.

The two waits are woken by different writers, as in ksm_scan_thread: the
wait for work (ksm_thread_wait) ends on a run=1 write or the first mm
registering, but those do not cut short the timed sleep between batches
(ksm_iter_wait), which only a write of a *different* sleep_millisecs ends
early. So ksmd's sleeps always pass on the clock, also across run=0/run=1
toggles, and time-based rules (stable_node chain pruning) see them.

CPU time is modelled per operation, from the engine's work counters (and the
huge pages KSM split), with costs fitted to the real ksmd on this project's
machines: ``ksmd_calibration.json``, key ``cost_ns``, is the one source of the
costs (ns per operation: ``ptes_walked`` every PTE ksmd looks at, ``pages``
every page it processes, ``checksums``, ``tree_compares`` (memcmp of two pages,
mostly cache misses), ``merges`` (try_to_merge_one_page), ``thp_splits``,
``dups_walked``, ``batches`` a wake-up's own cost). The file also holds the data and the error of the fit:
``vmhost.reality.ksmd_fit`` refits them from density runs on the kernel
(ksmd's schedstat per full pass against the emulator's work on the same pass),
``vmhost bench ksm --calibrate`` from stepped single-pass workloads.

**The timed sleep** lasts longer than ``sleep_millisecs``: the kernel sleeps a whole number of
jiffies and its timer wheel rounds a timeout up to the next tick (it never fires early), and
the wake-up itself takes a little; measured here (HZ=250) a 20 ms sleep lasted 23.6 ms on
average (between full-scan ticks: wall time less ksmd's CPU and its run-queue wait, per batch).
The calibration file's ``sleep_extra_ns`` (what ``ksmd_fit`` measured) is added to every timed
sleep (``Ksmd.timed_sleep_ns``); a sleep of 0 does not sleep.

**Running ahead.** Between two other events on the clock (a guest's writes, a sample, a
policy's wake-up), ksmd's batches follow each other with nothing else in between, so ksmd runs
the next batch at once instead of through the event heap when its wake-up falls before the
clock's horizon, and the compiled scan runs whole batches inside one VMA back to back
(``fastscan.scan_ahead``, with the same per-batch CPU charge and wake-up times). It never runs
past the end of a full scan (conditions on full_scans are checked there). The results are
those of one event per batch.

The scan-time advisor (advisor_mode=scan-time) retunes pages_to_scan at the
end of every full scan from the scan time and ksmd's CPU share, as 6.8 does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vmhost.clock import NS_PER_MS, Clock, Event
from vmhost.ksm import fastscan
from vmhost.ksm.counters import WORK_NAMES

if TYPE_CHECKING:
    from vmhost.ksm.engine import Ksm

CALIBRATION_PATH = Path(__file__).resolve().parent / "ksmd_calibration.json"
#: ns per operation (work counter names, "pages" and "thp_splits"): the calibration's cost_ns
_CALIBRATION = json.loads(CALIBRATION_PATH.read_text())
COST_NS: dict[str, float] = _CALIBRATION["cost_ns"]
#: ns every timed sleep lasts beyond sleep_millisecs (the calibration's sleep_extra_ns)
SLEEP_EXTRA_NS: int = int(_CALIBRATION.get("sleep_extra_ns", 0))
EWMA_WEIGHT = 30
ADVISOR_MIN_CPU = 10


class Pace:
    """ksmd's side of ``fastscan.scan_ahead``: the clock, the sleep and the CPU charge of a
    batch; what the compiled scan ran ahead is charged to ksmd at once (the advisor reads it
    at a full scan's end)."""

    def __init__(self, ksmd: "Ksmd"):
        self.ksmd = ksmd
        self.ksm = ksmd.ksm
        self.i = np.zeros(fastscan.N_PACE_I, dtype=np.int64)
        self.f = np.zeros(fastscan.N_PACE_F, dtype=np.float64)
        self.before = 0.0           # Ksmd._work_ns() when the current batch started
        self.batches = 0            # whole batches run ahead during the current tick's batch
        self.costs = np.array([COST_NS.get(k, 0) for k in WORK_NAMES], dtype=np.float64)

    def arrays(self, clock: Clock, done: int, cand_gen: int):
        i, f = self.i, self.f
        i[fastscan.PACE_CAND_GEN] = cand_gen
        i[fastscan.PACE_NOW] = clock.now
        i[fastscan.PACE_HORIZON] = clock.horizon()
        i[fastscan.PACE_SLEEP_NS] = self.ksmd.timed_sleep_ns(self.ksm.knobs.sleep_millisecs)
        i[fastscan.PACE_DONE] = done
        i[fastscan.PACE_BATCHES] = 0
        i[fastscan.PACE_CPU_NS] = 0
        f[fastscan.PACE_BEFORE_NS] = self.before
        f[fastscan.PACE_THP_NS] = self.ksm.host.vmstat["thp_split_page"] * COST_NS.get("thp_splits", 0)
        f[fastscan.PACE_PAGE_NS] = COST_NS["pages"]
        f[fastscan.PACE_BATCH_NS] = COST_NS.get("batches", 0)
        return i, f, self.costs

    def ran_ahead(self, clock: Clock) -> None:
        """Take over what the compiled scan ran ahead; the clock moves to the wake-up of the
        batch it returned."""
        n = int(self.i[fastscan.PACE_BATCHES])
        if n:
            self.batches += n
            self.ksmd.batches += n
            self.ksmd.batches_ahead += n
            self.ksmd.cpu_ns += int(self.i[fastscan.PACE_CPU_NS])
            self.before = float(self.f[fastscan.PACE_BEFORE_NS])
            clock.advance(int(self.i[fastscan.PACE_NOW]))


class Ksmd:
    run_ahead = True                          # False: one clock event per batch (the reference)
    grain = 1                                 # full-size batches one batch stands for (see _sleep_ns)

    def __init__(self, ksm: "Ksm", clock: Clock):
        self.ksm = ksm
        self.clock = clock
        self.cpu_ns = 0                      # ksmd's CPU time so far
        self.batches = 0
        self._event: Event | None = None      # the end of the timed sleep, or a wake-up now
        self._slept_ms: int | None = None     # sleep_millisecs the pending timed sleep was taken with
        self._advisor = {"start": 0, "scan_time": 0, "change": 0, "cpu_ns": 0}
        self._pace = Pace(self)
        self.batches_ahead = 0                # batches run at once, without a clock event
        ksm.wakeup = self.wake
        ksm.on_scan_start = self._advisor_start
        ksm.on_scan_end = self._advisor_stop
        ksm.on_advisor_reset = self._advisor_reset

    # -- the thread loop -------------------------------------------------------------------
    def wake(self) -> None:
        """A writer wakes ksmd (run=1, the first mm registering, a sleep_millisecs write,
        the end of an offline).

        Waiting for work (no timed sleep pending): ksmd runs now if it has work
        (``wait_event(ksm_thread_wait, ksmd_should_run())``). In the timed sleep
        between batches: only a changed sleep_millisecs ends it early
        (``wait_event_timeout(ksm_iter_wait, sleep_ms != ksm_thread_sleep_millisecs)``);
        anything else leaves ksmd asleep until the sleep ends.
        """
        ev = self._event
        if ev is not None and not ev.cancelled:
            if self._slept_ms is None or self.ksm.knobs.sleep_millisecs == self._slept_ms:
                return                        # a wake-up now already pending, or still asleep
            ev.cancel()
        elif not self.ksm.should_run():
            return                            # the wait's condition is still false
        self._slept_ms = None
        self._event = self.clock.at(self.clock.now, self._tick)

    def _tick(self) -> None:
        self._event = None
        self._slept_ms = None
        ksm, clock, pace = self.ksm, self.clock, self._pace
        while ksm.should_run():               # else wait to be woken
            seqnr = ksm.seqnr
            pace.before = self._work_ns()
            pace.batches = 0
            done = ksm.do_scan(ksm.knobs.pages_to_scan, pace if self.run_ahead else None)
            cost = int(self._work_ns() - pace.before + done * COST_NS["pages"]
                       + COST_NS.get("batches", 0))
            self.cpu_ns += cost
            self.batches += 1
            if not ksm.should_run():
                return
            sleep_ms = ksm.knobs.sleep_millisecs
            when = clock.now + cost + self._sleep_ns(done, ksm.seqnr != seqnr)
            if self.run_ahead and ksm.seqnr == seqnr and when < clock.horizon():
                clock.advance(when)           # nothing else happens before: the next batch now
                self.batches_ahead += 1
                continue
            self._slept_ms = sleep_ms
            self._event = clock.at(when, self._tick)
            return

    def _sleep_ns(self, done: int, pass_ended: bool) -> int:
        """The sleep after a batch of ``done`` pages. A scaled host whose batches were grouped
        (``grain`` full-size batches in one, the sleep x ``grain``: the same scan rate) sleeps
        less after a pass's last batch, cut short by the pass's end: the full-size ksmd would
        have taken only the full-size batches those pages fill, one sleep each. With smart scan
        most passes of a steady host visit few pages, and a whole grouped sleep per pass would
        stretch them (lowering ksmd's CPU share the coarser the grain)."""
        k = self.ksm.knobs
        sleep = self.timed_sleep_ns(k.sleep_millisecs)
        if self.grain == 1 or not pass_ended or done >= k.pages_to_scan:
            return sleep
        full_batches = max(1, -(-done * self.grain // k.pages_to_scan))   # done < pages_to_scan
        return sleep * full_batches // self.grain

    def timed_sleep_ns(self, sleep_ms: int) -> int:
        """How long a timed sleep of ``sleep_ms`` lasts: the knob plus the measured extra of a
        timed sleep (module docstring), ``grain`` of them for a grouped batch (its knob is
        ``grain`` x the full-size one)."""
        if sleep_ms <= 0:
            return 0
        return sleep_ms * NS_PER_MS + self.grain * SLEEP_EXTRA_NS

    def _work_ns(self) -> float:
        return (sum(v * COST_NS.get(k, 0) for k, v in self.ksm.work_counts().items())
                + self.ksm.host.vmstat["thp_split_page"] * COST_NS.get("thp_splits", 0))

    def run_full_scans(self, count: int) -> int:
        """Let ksmd run until ``count`` more full scans completed or it went idle."""
        target = self.ksm.seqnr + count
        self.wake()
        self.clock.run_while(lambda: self.ksm.seqnr < target, fast_forward=True)
        return self.ksm.seqnr - (target - count)

    # -- the scan-time advisor ----------------------------------------------------------------
    def _advisor_start(self) -> None:
        if self.ksm.knobs.advisor_mode == "scan-time":
            self._advisor["start"] = self.clock.now

    def _advisor_reset(self) -> None:
        self._advisor = {"start": 0, "scan_time": 0, "change": 0, "cpu_ns": 0}

    def _advisor_stop(self) -> None:
        k = self.ksm.knobs
        if k.advisor_mode != "scan-time":
            return
        a = self._advisor
        scan_time = max((self.clock.now - a["start"]) // (1000 * NS_PER_MS), 1)
        cpu_ms = (self.cpu_ns - a["cpu_ns"]) // NS_PER_MS
        cpu_percent = max(cpu_ms * 100 // (scan_time * 1000), 1)
        last = a["scan_time"] or scan_time
        factor = max(k.advisor_target_scan_time * 100 // scan_time, 1)
        change = max(scan_time * 100 // last, 1)
        change = ((100 - EWMA_WEIGHT) * a["change"] + EWMA_WEIGHT * change) // 100
        pages = k.pages_to_scan * 100 // factor * change // 100
        per_page_cost = max(k.pages_to_scan // cpu_percent, 1)
        pages = min(pages, per_page_cost * k.advisor_max_cpu)
        pages = max(pages, per_page_cost * ADVISOR_MIN_CPU)
        pages = min(pages, k.advisor_max_pages_to_scan)
        a.update(change=change, scan_time=scan_time, cpu_ns=self.cpu_ns)
        k.pages_to_scan = pages
