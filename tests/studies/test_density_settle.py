"""The settle rule (vmhost/density/settle.py): under smart scan the window covers a whole skip
cycle and a step ends after a whole number of cycles, on the emulator's side and on the kernel
oracle's alike."""

import pytest

from vmhost.density import load_density
from vmhost.density.settle import SettleRule, smart_scan_cycle
from vmhost.ksm.fastscan import smart_skip

from helpers import ROOT


def config(tmp_path, ksm="{}", settle="{scans: 2, max_scans: 30}", profile="linux-6.18", r=4):
    p = tmp_path / "c.yaml"
    p.write_text(f"host: {{profile: {profile}, nodes: [{{memory: 1GiB, cpus: 2}}]}}\nksm: {ksm}\n"
                 f"density:\n  mix: [{{image: linux-server, memory: 256MiB}}]\n  max_guests: 2\n"
                 f"  resolution: {r}\n  settle: {settle}\n")
    return load_density(p)


def reachable_states():
    """Every (age, remaining_skips) an rmap_item that never merges goes through."""
    state, seen = (0, 0), set()
    while state not in seen:
        seen.add(state)
        age, skips, _ = smart_skip.py_func(*state)
        state = (age, skips)
    return seen


def test_the_default_window_visits_every_page_under_smart_scan(tmp_path):
    """settle.scans 2 (the default) under smart scan: the window is raised so that, whatever
    point of its skip cycle a page stands at, some pass of the window visits it; one scan
    fewer would miss a page at the worst point (the window is the cycle, not more)."""
    rule = SettleRule.of(config(tmp_path))
    assert rule.raised_for_smart_scan and rule.window == smart_scan_cycle()
    assert rule.align == rule.window
    assert rule.max_scans == 45 >= 30 + rule.window - 2    # the configured margin kept, whole cycles

    def first_visit(state):
        for n in range(1, 64):
            age, skips, skipped = smart_skip.py_func(*state)
            if not skipped:
                return n
            state = (age, skips)
        return None

    worst = max(first_visit(s) for s in reachable_states())
    assert worst == rule.window
    assert "settle window 9 full scans" in rule.note()


@pytest.mark.parametrize("ksm, settle, profile", [
    ("{smart_scan: 0}", "{scans: 2}", "linux-6.18"),        # every page visited every pass
    ("{smart_scan: n}", "{scans: 2}", "linux-6.18"),        # the knob's words, as sysfs takes them
    ("{}", "{scans: 2}", "linux-2.6.33"),                   # a kernel without smart scan
])
def test_without_smart_scan_the_rule_is_the_configured_one(tmp_path, ksm, settle, profile):
    rule = SettleRule.of(config(tmp_path, ksm, settle, profile))
    assert (rule.window, rule.max_scans, rule.align, rule.raised_for_smart_scan, rule.note()) == \
        (2, 30, 1, False, None)
    hist = [(0, 0, 0), (5, 50, 0), (5, 50, 0), (5, 50, 0)]
    assert rule.steady(hist, 1000)                          # any scan count: no cycle to align to


def test_a_window_longer_than_the_cycle_is_kept_and_still_aligned(tmp_path):
    rule = SettleRule.of(config(tmp_path, settle="{scans: 12, max_scans: 20}"))
    assert (rule.window, rule.raised_for_smart_scan, rule.align) == (12, False, smart_scan_cycle())
    assert rule.max_scans == 27                             # 20 rounded up to whole cycles
    assert "a multiple of 9 full scans" in rule.note() and "raised" not in rule.note()


def test_steady_only_when_the_whole_window_stood_still_at_a_whole_cycle(tmp_path):
    rule = SettleRule.of(config(tmp_path, settle="{scans: 2, tolerance: 0.01}"))
    c = rule.align
    start, merged = (0, 0, 0), (100, 900, 0)
    hist = [start, merged] + [merged] * (rule.window - 1)
    assert not rule.steady(hist + [merged], 1000)           # still for the window, but 10 scans
    for n in range(len(hist), 2 * c):
        assert not rule.steady(start_and(merged, n), 1000)
    assert rule.steady(start_and(merged, 2 * c), 1000)      # the first whole cycle after the window
    assert rule.window_start(start_and(merged, 2 * c)) == merged   # the CPU window starts there
    late = start_and(merged, 2 * c - 1) + [(100, 911, 0)]
    assert not rule.steady(late, 1000)                      # 11 > 1% of 1000
    assert not rule.steady(late + [merged] * c, 1000)       # moved within the window
    assert rule.steady(start_and(merged, 2 * c - 1) + [(100, 910, 0)], 1000)


def start_and(counters, scans):
    """A step's history: its start, then ``scans`` full scans that all read ``counters``."""
    return [(0, 0, 0)] + [counters] * scans


def test_a_step_ends_on_a_whole_cycle_by_steadiness_or_by_max_scans(tmp_path):
    """``after_scan``: a step that stands still from the start ends at the first whole cycle
    after the window; one that never does ends at max_scans, itself a whole number of cycles."""
    rule = SettleRule.of(config(tmp_path, settle="{scans: 9, tolerance: 0.001, max_scans: 19}"))
    assert (rule.window, rule.max_scans, rule.align) == (9, 27, 9)

    def run(counters_at):
        out, hist = {"scans": 0}, [(0, 0, 0)]
        while True:
            hist.append(counters_at(len(hist)))
            if rule.after_scan(out, hist, 1000):
                return out

    still = run(lambda n: (10, 100, 0))
    assert (still["scans"], still.get("steady"), still["settled_by"]) == (18, True, "9 scans unchanged")
    moving = run(lambda n: (10, 100 * n, 0))
    assert (moving["scans"], moving.get("steady"), moving["settled_by"]) == (27, None, "max_scans (27)")
    late = run(lambda n: (10, 100 * min(n, 12), 0))        # still from scan 12: the window ends at 21
    assert late["scans"] == 27 and late["steady"]


def test_a_step_under_smart_scan_settles_over_the_whole_cycle_and_says_so(tmp_path):
    """An emulator run at the default settle: every steady step ran at least a window + 1
    scans, settled by the raised window, and the result's notes say why."""
    from vmhost.density import DensityRunner
    cfg = load_density(ROOT / "configs" / "density-tiny.yaml")
    cfg.max_guests = 2
    res = DensityRunner(cfg).run()
    rule = SettleRule.of(cfg)
    assert rule.window == smart_scan_cycle() and cfg.settle_scans == 2
    assert any("settle window 9 full scans" in n for n in res["notes"])
    for s in res["steps"]:
        assert s["steady"] and s["settled_by"] == "9 scans unchanged" and s["full_scans"] > 9
        assert s["full_scans"] % rule.align == 0
