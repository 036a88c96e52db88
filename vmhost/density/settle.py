"""The settle rule: when a step's guests have reached KSM's steady state, and over which full
scans a step's steady figures (ksmd's CPU share, the COW-break rate) are measured.

The kernel has no such notion; this is the planner's definition, written once and applied by
both sides of a comparison: the emulator's host stepper (``vmhost.density.stepper``) and the
density oracle on the real kernel (``vmhost.reality.density_oracle``) feed it the counters
they read after each full scan (``ksm_scan.seqnr`` / ``full_scans``) and stop where it says.

A step is steady when ``pages_shared``, ``pages_sharing`` and ``ksm_zero_pages`` each stayed
within ``tolerance`` x the step's new pages of their value at the window's start over the last
``window`` full scans (no verdict before ``window + 1`` scans: a new guest needs a scan to be
checksummed before anything can merge).

**The window under smart scan** (6.18's default): a page that did not merge is skipped for up
to 8 passes (``fastscan.smart_skip``, mm/ksm.c ``should_skip_rmap_item``), so a window shorter
than a whole skip cycle stops wherever each page's cycle happens to stand, and two runs of the
same workload (emulator and kernel, or two resolutions) stop on different sides of a cycle. The
window is therefore at least :func:`smart_scan_cycle` full scans whenever the host's ksmd runs
smart scan: the configured ``settle.scans`` is a minimum, raised automatically, and
``max_scans`` is raised with it to leave the configured margin (``max_scans - scans``) beyond
the window. Such a window visits each rmap_item at least once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from vmhost.ksm import knobs as ksm_knobs

COUNTERS = ("pages_shared", "pages_sharing", "ksm_zero_pages")


@functools.cache
def smart_scan_cycle() -> int:
    """Full scans a settle window needs to see a whole smart-scan skip cycle: the longest run of
    passes that skip a page (from the rule itself, ``fastscan.smart_skip``), plus the visit."""
    from vmhost.ksm.fastscan import smart_skip
    return max(smart_skip.py_func(age, 0)[1] for age in range(256)) + 1


def smart_scan_on(h) -> bool:
    """Whether the host's ksmd runs smart scan: its profile has it and the config leaves it on."""
    from vmhost.profile import PROFILES
    knob = ksm_knobs.BY_NAME["smart_scan"]
    if not getattr(PROFILES[h.profile], knob.feature):
        return False
    written = dict(h.ksm).get(knob.name)         # the config's knobs were checked by the engine
    return bool(knob.default if written is None else ksm_knobs.Knobs().parse(knob.name, written)[1])


@dataclass(frozen=True)
class SettleRule:
    """The settle rule of one host run (``HostRun``'s ``settle_*`` fields, after the raise)."""
    window: int                    # full scans the counters must stand still
    max_scans: int                 # not steady after this many: the step ends anyway
    tolerance: float               # x the step's new pages
    configured: int                # settle.scans as written
    raised_for_smart_scan: bool

    @classmethod
    def of(cls, run) -> "SettleRule":
        k = run.settle_scans
        if run.settle_time_ns is None and smart_scan_on(run.host) and k < smart_scan_cycle():
            w = smart_scan_cycle()
            return cls(w, run.max_scans + (w - k), run.tolerance, k, True)
        return cls(k, run.max_scans, run.tolerance, k, False)

    def steady(self, hist: list, new_pages: int) -> bool:
        """Whether the counters after each full scan (``hist``: the step's start first, each a
        tuple in ``COUNTERS`` order) stood still over the last ``window`` scans."""
        k = self.window
        if len(hist) - 1 <= k:
            return False
        ref = hist[-1 - k]
        tol = self.tolerance * max(new_pages, 1)
        return all(abs(h[j] - ref[j]) <= tol for h in hist[-1 - k:] for j in range(len(COUNTERS)))

    def after_scan(self, out: dict, hist: list, new_pages: int, max_scans: int | None = None) -> bool:
        """Book one more full scan in a step's ``out`` (its ``scans``, ``steady`` and
        ``settled_by``; ``hist`` as :meth:`steady` reads it, this scan's entry last). True where
        the step ends: steady, or ``max_scans`` scans (default: the rule's) without it."""
        out["scans"] += 1
        if self.steady(hist, new_pages):
            out.update(steady=True, settled_by=self.settled_by())
            return True
        limit = self.max_scans if max_scans is None else max_scans
        if out["scans"] >= limit:
            out["settled_by"] = f"max_scans ({limit})"
            return True
        return False

    def window_start(self, hist: list):
        """The entry of ``hist`` the step's steady figures are measured from: the start of the
        last ``window`` scans (fewer if the step ended sooner)."""
        k = min(self.window, len(hist) - 1)
        return hist[-1 - k]

    def settled_by(self) -> str:
        return f"{self.window} scans unchanged"

    def note(self) -> str | None:
        """One sentence for a result's notes when the window was raised."""
        if not self.raised_for_smart_scan:
            return None
        return (f"settle window {self.window} full scans (settle.scans {self.configured} raised to smart "
                f"scan's longest skip cycle, {smart_scan_cycle()} scans, so that every page is visited "
                f"in the window; max_scans {self.max_scans}); ksmd's CPU share is measured over it")
