"""The host stepper: guests booted onto one host, KSM run to steady state, the step measured.

A step is what a capacity planner watches when a VM is started on a host: QEMU allocates the
guest's RAM and the guest writes it at boot (``vmhost.qemu``), the guest's working set keeps
being written (steady-state writers on the virtual clock), ksmd scans and merges until its
counters stand still, and then the host's memory, KSM counters, swap traffic, OOM kills and
ksmd's CPU are read. :class:`HostStepper` does exactly that for one or more guests at a time
and returns a :class:`StepResult` (full-scale numbers at any resolution). The density search
(``vmhost.density.search``) and a fleet's host simulation (``vmhost.hostsim``) both drive it.

With ``warm_start`` each guest writes its whole hot set once right after its boot writes, as
a guest that has run for a while would have; a step then settles to the long-run state.

**Steady state and smart scan.** A step is steady when the counters stood still for a window
of full scans (``vmhost.density.settle``): ``settle_scans``, raised under smart scan (6.18's
default) to the longest skip cycle (9 scans), since a page that has not merged for a while is
visited only every 2 to 9 scans and a shorter window stops wherever the skip cycles stand.

**Time to X%** of a step's steady-state savings is virtual time from the guest's boot until the
savings gained in the step reach X% of what the step gained at steady state (sampled
``samples_per_scan`` times per full scan). ksmd's CPU share and the COW-break rate are measured
over the settle window (its last ``window`` scans).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import numpy as np

from hw.units import PAGES_PER_GIB
from vmhost.density.config import HostRun, MixEntry
from vmhost.density.curves import GuestFacts, guest_facts, ideal_now
from vmhost.density.settle import SettleRule
from vmhost.density.scale import (depth_extra_ns, full_scale_scan_knobs, scaled_host, scaled_image,
                                  unfaithful_figures)

TIMELINE_POINTS_PER_STEP = 64
WRITES_PER_SCAN = 8
POLICY_CHANGES_KEPT = 200


@dataclass
class StepResult:
    """One step, at steady state (or where settling stopped); page counts, CPU time and rates
    at full scale. ``as_dict`` is the step's JSON record."""
    guests: int                    # guests on the host after the step
    image: str                     # the last booted guest's image, mix entry, name, RAM, domain
    mix: int
    guest: str
    memory_mib: int
    domain: str
    steady: bool
    settled_by: str | None
    full_scans: int
    virtual_s: float
    used_pages: int
    free_pages: int
    per_node: list[dict]
    pages_shared: int
    pages_sharing: int
    ksm_zero_pages: int
    pages_unshared: int
    saved_pages: int               # pages_sharing + ksm_zero_pages
    ksmd_cpu_share: float          # of one CPU, over the settle window
    ksmd_cpu_s_total: float        # ksmd's CPU seconds since the first boot
    swapin_rate: float
    swapin_pages: int
    swapout_pages: int
    cow_ksm_rate: float            # merges broken by writes, pages/s over the settle window
    oom_kills: list[dict]
    time_to: dict                  # p50_s, p90_s, p99_s
    ideal_now_pages: int
    swapped_pages: int
    cpu_s_per_gib_saved: float | None
    booted: int = 1                # guests booted by this step
    thp_collapse_alloc: int = 0    # huge pages khugepaged collapsed during the step (full scale)
    min_watermark_pages: int = field(default=0, repr=False)     # not part of the record

    def as_dict(self) -> dict:
        d = asdict(self)
        del d["min_watermark_pages"]
        booted = d.pop("booted")
        d["booted"] = booted
        return d


class Guest:
    """A booted guest: its QEMU process, its memory model and the frames it has written."""

    def __init__(self, qp, gm, entry: MixEntry):
        self.qp, self.gm, self.entry = qp, gm, entry
        self.written = np.zeros(gm.pages, dtype=bool)


class HostStepper:
    """One host (``run.host`` at ``run.resolution``) onto which guests of ``mix`` are booted."""

    def __init__(self, run: HostRun, mix: list[MixEntry]):
        self.run = run
        self.r = run.resolution
        self.hcfg, self.knobs, self.notes = scaled_host(run)
        self.unfaithful = unfaithful_figures(run, mix)
        self.settle = SettleRule.of(run)
        note = self.settle.note()
        if note:
            self.notes.append(note)
        self.images = {e.index: scaled_image(e.image, self.r) for e in mix}
        self.built = False

    # -- set-up --------------------------------------------------------------------------------
    def build(self) -> None:
        from vmhost.system import build_system
        sysm = build_system(self.hcfg, resolution=self.r, knobs=self.knobs,
                            full_scale_knobs=full_scale_scan_knobs(self.run.host))
        self.host, self.ksm, self.ksmd, self.policy = sysm.host, sysm.ksm, sysm.ksmd, sysm.policy
        self.guests: list[Guest] = []
        # (time, saved pages, ksmd CPU as the full-size host's / r, ksmd CPU as simulated)
        self.samples: list[tuple[int, int, int, int]] = []
        self.timeline: list[dict] = []                   # every step's samples, thinned, full scale
        self._writer = None                              # the steady-state writers' next event
        self._write_dt = self.run.write_period_ns
        self._sampler = None
        self.built = True

    # -- what the host is ----------------------------------------------------------------------
    def saved(self) -> int:
        c = self.ksm.c
        return int(c.pages_sharing + c.ksm_zero_pages)

    def guest_memory(self, n: int, entry: MixEntry):
        """The contents of the n-th guest booted (the same on every run)."""
        from guests.images import GuestMemory
        run = self.run
        name = run.guest_names[n - 1] if run.guest_names else f"{entry.name}-{n}"
        return GuestMemory.build(self.images[entry.index], name, run.seed * 100_003 + n,
                                 entry.domain, entry.memory_mib // self.r)

    def facts(self, sequence: list[MixEntry]) -> list[GuestFacts]:
        """Curves (a) and (c) inputs for the guests of ``sequence`` (the booted ones' memory as
        it is: writes only ever replace hot frames, which the facts count as contents of their
        own anyway; the others built as they would boot)."""
        thp = self.host.thp_mode in ("always", "madvise")
        out = []
        for n, entry in enumerate(sequence, start=1):
            gm = self.guests[n - 1].gm if n <= len(self.guests) else self.guest_memory(n, entry)
            out.append(guest_facts(gm, entry, thp))
        return out

    def policy_summary(self) -> dict:
        """The tuning policy and the decisions that changed something (full-scale knobs)."""
        name, options = self.run.host.policy or ("fixed", {})
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

    # -- snapshots -----------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """A deep copy of the simulation (host, KSM, clock, guests); the configuration and the
        images are shared, and callbacks bound to this stepper stay bound to it."""
        keep = {id(self): self, id(self.run): self.run, id(self.images): self.images}
        return copy.deepcopy({k: v for k, v in self.__dict__.items()
                              if k not in ("run", "images")}, keep)

    def restore(self, snapshot: dict) -> None:
        self.__dict__.update(snapshot)

    # -- a step --------------------------------------------------------------------------------
    def step(self, first: int, entries: list[MixEntry]) -> StepResult:
        """Boot guests number ``first + 1`` ... of ``entries``, run KSM to steady state, measure."""
        mark = self._mark()
        booted = [self._boot(first + j, e) for j, e in enumerate(entries, start=1)]
        res = self._measure(first + len(entries), booted, mark)
        res.booted = len(entries)
        return res

    def _cpu(self) -> int:
        """ksmd's CPU time so far, as the full-size host's ksmd would spend it / r: the
        simulated batches' CPU plus the tree levels a 1/r host lacks (``scale.depth_extra_ns``)."""
        return self.ksmd.cpu_ns + depth_extra_ns(self.r, self.ksm.work_counts())

    def _eff_now(self) -> int:
        """Now, counting the CPU time of ksmd's last batch (its next wake-up minus the sleep,
        as long as a timed sleep lasts: ``Ksmd.timed_sleep_ns``)."""
        ev = self.ksmd._event
        if ev is not None and not ev.cancelled:
            return max(self.host.clock.now, ev.when - self.ksmd.timed_sleep_ns(self.ksm.knobs.sleep_millisecs))
        return self.host.clock.now

    def _scan_time_estimate(self) -> int:
        pages = sum(g.qp.mergeable_pages() for g in self.guests) or 1
        k = self.ksm.knobs
        batches = -(-pages // max(k.pages_to_scan, 1))
        return max(batches * self.ksmd.timed_sleep_ns(k.sleep_millisecs), 1_000_000)

    def _boot(self, n: int, entry: MixEntry) -> Guest:
        from guests.spec import GuestSpec
        from vmhost.qemu import QemuProcess
        gm = self.guest_memory(n, entry)
        spec = GuestSpec(gm.name, entry.memory_mib // self.r, nosharepages=entry.nosharepages,
                         locked=entry.locked, image=entry.image.name)
        qp = QemuProcess(self.host, spec)
        g = Guest(qp, gm, entry)
        self.guests.append(g)
        gpfns, ids = gm.boot_writes()
        self._write(g, gpfns, ids)
        if self.run.warm_start:
            self._write(g, *gm.warm_writes())
        return g

    def _write(self, g: Guest, gpfns, ids) -> None:
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
        self._write_dt = max(self.run.write_period_ns, self._scan_time_estimate() // WRITES_PER_SCAN)
        if self._writer is None and any(g.gm.steady for g in self.guests):
            self._writer = self.host.clock.after(self._write_dt, self._writer_tick)

    def _sample(self) -> None:
        self.samples.append((self.host.clock.now, self.saved(), self._cpu(), self.ksmd.cpu_ns))
        self._sampler = self.host.clock.after(self._sample_dt, self._sample)

    def _settle(self, new_pages: int = 1) -> dict:
        """Run until steady state (or the configured time); returns what the step measured."""
        run, ksm, clock = self.run, self.ksm, self.host.clock
        out = {"steady": False, "scans": 0}
        if run.settle_time_ns is not None or not ksm.should_run():
            t = run.settle_time_ns or 30 * 1_000_000_000
            win_t0, win_cpu, win_cow = self._eff_now(), (self._cpu(), self.ksmd.cpu_ns), self.host.vmstat["cow_ksm"]
            start_seq = ksm.seqnr
            clock.run_until(clock.now + t)
            out.update(steady=run.settle_time_ns is not None, scans=ksm.seqnr - start_seq,
                       settled_by="time" if run.settle_time_ns is not None else "ksm not running")
            out["window"] = (win_t0, win_cpu, win_cow)
            return out
        rule = self.settle
        hist = [(ksm.c.pages_shared, ksm.c.pages_sharing, ksm.c.ksm_zero_pages,
                 self._eff_now(), (self._cpu(), self.ksmd.cpu_ns), self.host.vmstat["cow_ksm"])]
        limit_ns = clock.now + 4 * self.settle.max_scans * self._scan_time_estimate() + 10 * 1_000_000_000
        while True:
            target = ksm.seqnr + 1
            ok = clock.run_while(lambda: ksm.seqnr < target, limit=limit_ns, fast_forward=True)
            if not ok:
                out["settled_by"] = "time bound"
                break
            hist.append((ksm.c.pages_shared, ksm.c.pages_sharing, ksm.c.ksm_zero_pages,
                         self._eff_now(), (self._cpu(), self.ksmd.cpu_ns), self.host.vmstat["cow_ksm"]))
            # tolerance is relative to the new guests' pages (vmhost.density.settle)
            if rule.after_scan(out, hist, new_pages):
                break
        ref = rule.window_start(hist)
        out["window"] = (ref[3], ref[4], ref[5])
        return out

    def _mark(self) -> tuple:
        """What a step is measured from: time, ksmd CPU, savings, OOM kills, swap-ins."""
        host = self.host
        self._collapses0 = host.vmstat["thp_collapse_alloc"]
        return (host.clock.now, (self._cpu(), self.ksmd.cpu_ns), self.saved(), len(host.oom.kills),
                host.vmstat["pswpin"], host.vmstat["pswpout"])

    def _measure(self, n: int, booted: list[Guest], mark: tuple) -> StepResult:
        """Run the step's guests to steady state and measure it (full-scale numbers)."""
        run, r, host, ksm = self.run, self.r, self.host, self.ksm
        t0, cpu0, saved0, kills0, pswpin0, pswpout0 = mark
        self._pace_writes()
        self.samples = [(t0, saved0, *cpu0)]
        self._sample_dt = max(self._scan_time_estimate() // run.samples_per_scan, 1_000_000)
        if self._sampler is not None:
            self._sampler.cancel()
        self._sampler = host.clock.after(self._sample_dt, self._sample)
        st = self._settle(sum(g.gm.pages for g in booted))
        self._sampler.cancel()
        self._sampler = None
        now = self._eff_now()
        saved = self.saved()
        self.samples.append((host.clock.now, saved, self._cpu(), self.ksmd.cpu_ns))
        self._keep_timeline(n)
        win_t0, win_cpu, win_cow = st.pop("window")
        win_dt = max(now - win_t0, 1)
        # at resolution r a batch would cost r x the CPU while the sleeps stay the same (the
        # sleeps: the window less the CPU time the simulated batches took)
        dcpu = self._cpu() - win_cpu[0]
        slept = max(win_dt - (self.ksmd.cpu_ns - win_cpu[1]), 0)
        cpu_share = r * dcpu / max(r * dcpu + slept, 1)
        cow_rate = (host.vmstat["cow_ksm"] - win_cow) / (win_dt / 1e9) * r
        step_dt = max(host.clock.now - t0, 1)
        swapin_rate = (host.vmstat["pswpin"] - pswpin0) / (step_dt / 1e9) * r
        c = ksm.c
        last = booted[-1]
        saved_pages = saved * r
        cpu_total = round(self._cpu() * r / 1e9, 6)
        gib_saved = saved_pages / PAGES_PER_GIB
        return StepResult(
            guests=n, image=last.entry.image.name, mix=last.entry.index, guest=last.qp.spec.name,
            memory_mib=last.entry.memory_mib, domain=last.entry.domain,
            steady=st["steady"], settled_by=st.get("settled_by"), full_scans=st["scans"],
            virtual_s=round((host.clock.now - t0) / 1e9, 3),
            used_pages=host.used_pages() * r,
            free_pages=host.allocator.free_pages() * r,
            per_node=[{"node": nd, "total_pages": int(host.allocator.managed[nd]) * r,
                       "free_pages": host.allocator.free_pages(nd) * r}
                      for nd in range(len(host.allocator.managed))],
            pages_shared=int(c.pages_shared) * r, pages_sharing=int(c.pages_sharing) * r,
            ksm_zero_pages=int(c.ksm_zero_pages) * r, pages_unshared=int(c.pages_unshared) * r,
            saved_pages=saved_pages,
            ksmd_cpu_share=round(cpu_share, 6),
            ksmd_cpu_s_total=cpu_total,
            swapin_rate=round(swapin_rate, 3),
            swapin_pages=(host.vmstat["pswpin"] - pswpin0) * r,
            swapout_pages=(host.vmstat["pswpout"] - pswpout0) * r,
            cow_ksm_rate=round(cow_rate, 3),
            oom_kills=[{"pid": k.pid, "name": k.name, "freed_pages": k.freed_pages * r}
                       for k in host.oom.kills[kills0:]],
            time_to=self._time_to(t0, cpu0, saved0, saved),
            ideal_now_pages=ideal_now(self.guests, bool(ksm.knobs.use_zero_pages)) * r,
            swapped_pages=int(host.swap.total_pages - host.swap.free_pages) * r,
            cpu_s_per_gib_saved=round(cpu_total / gib_saved, 6) if gib_saved > 0 else None,
            min_watermark_pages=sum(w.min for w in host.allocator.watermarks) * r,
            thp_collapse_alloc=(host.vmstat["thp_collapse_alloc"] - self._collapses0) * r,
        )

    def _keep_timeline(self, n: int) -> None:
        """The step's samples, thinned to at most TIMELINE_POINTS_PER_STEP, onto the timeline."""
        r = self.r
        pts = self.samples
        stride = max(1, -(-len(pts) // TIMELINE_POINTS_PER_STEP))
        keep = pts[::stride] + ([pts[-1]] if (len(pts) - 1) % stride else [])
        self.timeline.extend({"t_s": round(t / 1e9, 3), "guests": n, "saved_pages": s * r,
                              "ksmd_cpu_s": round(cpu * r / 1e9, 6)} for t, s, cpu, _raw in keep)

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
            i = next((i for i, (_t, s, _c, _raw) in enumerate(self.samples) if s >= want), None)
            if i is None:
                out[f"p{pct}_s"] = None
                continue
            # the CPU of the batches before the one that got there (the sample before it)
            # at full scale those batches take r x their CPU time, where the simulation took
            # the simulated CPU time
            _t, _s, cpu_before, raw_before = self.samples[max(i - 1, 0)]
            extra = self.r * (cpu_before - cpu0[0]) - (raw_before - cpu0[1])
            out[f"p{pct}_s"] = round((self.samples[i][0] - t0 + extra) / 1e9, 3)
        return out
