"""Density: how many guests of an image mix fit on one host, with and without KSM.

The package: ``config`` (the density file), ``scale`` (a host and guests at 1/N),
``stepper`` (one host: boot, writers, settle, measure -> ``StepResult``), ``search`` (the
search over the boot sequence, the limits, the storm check), ``curves`` (no KSM and ideal),
``result`` (the result document and its text).

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
                                           # (at least 9, smart scan's skip cycle, when it is on)
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
same ideal over the guests' contents at that moment (frames written so far).

**One accounting.** The three columns count the same thing against the same capacity: the
guests' pages, in RAM or in swap, against RAM managed by the allocator minus the high
watermarks minus ``free_headroom`` (swap is not capacity). A KSM step fits when the pages it
holds (``held_pages``: used RAM + swapped pages) are within the capacity and it meets every
service limit; (a) and (c) fit when their pages are. Since no merging holds fewer pages than
(c), ideal is an upper bound on KSM (up to the one KSM zero page (c) counts).

**The headline.** VMs per host without KSM, with KSM and ideally; how many of the KSM count
survive the unmerge storm; what limited KSM and by how much (an answer decided within 1% of a
limit is at the edge, and says so). When the ksmd CPU limit is what limited KSM (and the knobs
are the configured ones, not a tuning policy's), the result also gives the largest
pages_to_scan that meets the limit, found by searching again (``cpu_limit``), and the count
with it: a knob setting that breaks the limit does not answer "KSM 0".

**Steady state and smart scan.** A step is steady when the counters stood still for a window
of full scans (``vmhost.density.settle``, the same rule the kernel oracle applies to the real
counters): ``settle.scans``, raised under smart scan (6.18's default) to the longest skip cycle,
9 scans (``max_scans`` raised by as much), and a step ends only after a whole number of
skip cycles (a multiple of 9 full scans; ``max_scans`` rounded up to one). With smart scan a page that has not merged for a
while is visited only every 2 to 9 scans, and two identical pages merge only in a pass that
visits both, so pages of a guest booted next to an old one can merge many scans after the
counters first stand still: a shorter window stops wherever the skip cycles happen to stand,
which moves with the run and the resolution; and where the previous step ended sets the phase
of the older guests' cycles that the next guest meets, so steps end on whole cycles. A result's
notes say so.

**Savings** are pages_sharing + ksm_zero_pages (pages_shared are the copies kept).
**Time to X%** of a step's steady-state savings is virtual time from the guest's boot until the
savings gained in the step reach X% of what the step gained at steady state (sampled
``samples_per_scan`` times per full scan). **CPU-seconds per GiB saved** is ksmd's modelled
CPU (``Ksmd.cpu_ns``, plus the tree levels a scaled host lacks: see Resolution) from the
first boot up to the step's steady state, over the GiB saved then.

**Unmerge storm.** A fraction f of the merged mappings is written apart within a window W. Each
write to a mapping that shares a KSM page (or maps the KSM zero page) makes the guest fault a
private copy: one new page; the stable page's own first mapper keeps it. So the storm needs
``f x (pages_sharing + ksm_zero_pages)`` pages, and during the window the ordinary churn keeps
breaking merges at the rate measured at steady state (vmstat cow_ksm over the settle window)
with ksmd assumed unable to re-merge in time: ``W x cow_ksm rate`` pages more. A step survives
the storm when its free memory above the min watermark, less the guest pages in swap (the one
accounting: they would need RAM too), covers both.

**Resolution.** At resolution N every guest is simulated with 1/N of its RAM (image class
fractions, self-sharing, pools and per-page write frequencies are scale-free: absolute ``mib``
class sizes and write rates are divided by N), on a host with 1/N of its RAM, block size (never below one
huge page when THP is on, so that guests keep their huge pages at every resolution) and swap
(size and bandwidth), and with ksmd's ``pages_to_scan`` divided by N so that a full scan
takes the same virtual time; when that leaves fewer than 256 pages a batch, pages_to_scan and
sleep_millisecs are both multiplied by the same factor (the same scan rate and CPU share, a
coarser time grain; said in the output). Page counts, CPU time and swap-in rates are reported
scaled back (x N); virtual times get back the (N - 1) x ksmd CPU time per batch that the
smaller batches did not take (time to X%); the settle windows themselves are shorter. The
watermarks are the full-size host's / N (the kernel's grow with the square root of RAM).
ksmd's CPU does not scale by N alone: every stable- and unstable-tree search walks a tree N
times smaller, log2(N) levels shallower, so ksmd's CPU is reported with those levels added
(``scale.depth_extra_ns``: one page comparison a level, searches estimated from the pages
checksummed); without it the first guest of density-mix costs 47% of a CPU at 1/512 and 54% at
1/64, with it 60% at both. Effects that do not scale: THP (2 MiB stays 512 pages: a guest scaled
below one huge page cannot show the zero-page remapping of split huge pages, and the output says
so), small classes rounding to whole pages, and pages_to_scan rounding.
``vmhost density CONFIG --resolutions 512,256,64`` runs a config at several resolutions and
compares every headline figure with the finest (``invariance``).
"""

from __future__ import annotations

from pathlib import Path

from vmhost.density.config import (DensityConfig, HostRun, MixEntry, boot_sequence, check_resolution,
                                   load_density, parse_density, parse_settle)
from vmhost.density.result import format_result, write_report
from vmhost.density.search import DensitySearch
from vmhost.density.stepper import HostStepper, StepResult

DensityRunner = DensitySearch          # the name the CLI and older callers use

__all__ = ["DensityConfig", "HostRun", "MixEntry", "DensitySearch", "DensityRunner", "HostStepper",
           "StepResult", "boot_sequence", "load_density", "parse_density", "parse_settle",
           "format_result", "write_report", "run_density", "check_resolution"]


def run_density(path: str | Path, progress=None) -> dict:
    return DensitySearch(load_density(path), progress=progress).run()
