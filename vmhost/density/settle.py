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

**The aligned step end under smart scan.** A step also ends only after a whole number of skip
cycles (its full-scan count a multiple of :func:`smart_scan_cycle`, the *alignment*), and
``max_scans`` is rounded up to such a multiple. The reason is the skip cycle's phase: a page
that never merged is visited at passes 1, 2, 3, 4, 6, 9, 14 after its guest registered and then
every 9, so the next guest's pages meet an older guest's unmerged pages only in the passes
where both cycles visit, and where the older cycle stands is set by the pass at which the
previous step ended (the next guest registers right after it). A step that ends one pass later
(the counters moved a little more, or a scaled host's counters move by whole scaled pages)
shifts every older cycle by a pass, and the next guest then merges with other pages: the
kernel itself did not repeat (two runs 67% apart on a step) until its steps ended on a cycle
boundary. With the aligned end every guest registers at a whole cycle after the first, so each
older page meets the newer ones at the same pass of their cycles whatever step length the
counters chose. Without smart scan every page is visited every pass and the alignment is 1.
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
    align: int = 1                 # a step ends at a multiple of this many full scans

    @property
    def raised_for_smart_scan(self) -> bool:
        """Whether the window is longer than settle.scans as written (raised for smart scan)."""
        return self.window > self.configured

    @classmethod
    def of(cls, run) -> "SettleRule":
        k, m = run.settle_scans, run.max_scans
        if run.settle_time_ns is None and smart_scan_on(run.host):
            c = smart_scan_cycle()
            w = max(k, c)
            m += w - k                                   # the configured margin beyond the window
            return cls(w, -(-m // c) * c, run.tolerance, k, c)
        return cls(k, m, run.tolerance, k)

    def steady(self, hist: list, new_pages: int) -> bool:
        """Whether the counters after each full scan (``hist``: the step's start first, each a
        tuple in ``COUNTERS`` order) stood still over the last ``window`` scans, the step's scan
        count being a multiple of ``align``."""
        k = self.window
        if len(hist) - 1 <= k or (len(hist) - 1) % self.align:
            return False
        ref = hist[-1 - k]
        tol = self.tolerance * max(new_pages, 1)
        return all(abs(h[j] - ref[j]) <= tol for h in hist[-1 - k:] for j in range(len(COUNTERS)))

    def after_scan(self, out: dict, hist: list, new_pages: int) -> bool:
        """Book one more full scan in a step's ``out`` (its ``scans``, ``steady`` and
        ``settled_by``; ``hist`` as :meth:`steady` reads it, this scan's entry last). True where
        the step ends: steady, or ``max_scans`` scans without it."""
        out["scans"] += 1
        if self.steady(hist, new_pages):
            out.update(steady=True, settled_by=self.settled_by())
            return True
        if out["scans"] >= self.max_scans:
            out["settled_by"] = f"max_scans ({self.max_scans})"
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
        """One sentence for a result's notes when smart scan shaped the rule."""
        if self.align == 1:
            return None
        raised = (f" (settle.scans {self.configured} raised to smart scan's longest skip cycle, so that "
                  f"every page is visited in the window)" if self.raised_for_smart_scan else "")
        return (f"settle window {self.window} full scans{raised}; a step ends after a multiple of "
                f"{self.align} full scans (whole skip cycles: the next guest meets the older guests' "
                f"skip cycles at the same phase whatever the step's length), at most {self.max_scans}; "
                f"ksmd's CPU share is measured over the window")
