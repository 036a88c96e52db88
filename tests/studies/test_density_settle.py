"""The settle rule (vmhost/density/settle.py): under smart scan the window covers a whole skip
cycle, on the emulator's side and on the kernel oracle's alike."""

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
    assert rule.max_scans == 30 + rule.window - 2          # the configured margin kept

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


@pytest.mark.parametrize("ksm, settle, profile, window", [
    ("{smart_scan: 0}", "{scans: 2}", "linux-6.18", 2),        # every page visited every pass
    ("{smart_scan: n}", "{scans: 2}", "linux-6.18", 2),        # the knob's words, as sysfs takes them
    ("{}", "{scans: 2}", "linux-2.6.33", 2),                   # a kernel without smart scan
    ("{}", "{scans: 12, max_scans: 20}", "linux-6.18", 12),    # already longer than the cycle
])
def test_the_window_is_the_configured_one_where_no_skip_cycle_is_shorter(tmp_path, ksm, settle, profile,
                                                                          window):
    rule = SettleRule.of(config(tmp_path, ksm, settle, profile))
    assert (rule.window, rule.raised_for_smart_scan, rule.note()) == (window, False, None)


def test_steady_only_when_the_whole_window_stood_still(tmp_path):
    rule = SettleRule.of(config(tmp_path, settle="{scans: 2, tolerance: 0.01}"))
    start, merged = (0, 0, 0), (100, 900, 0)
    hist = [start, merged] + [merged] * (rule.window - 1)
    assert not rule.steady(hist, 1000)                      # one scan short of the window
    assert rule.steady(hist + [merged], 1000)
    assert rule.window_start(hist + [merged]) == merged     # the CPU window starts there
    late = [start, merged] + [merged] * 5 + [(100, 911, 0)] + [merged] * 3
    assert len(late) - 1 > rule.window and not rule.steady(late, 1000)   # 11 > 1% of 1000
    assert rule.steady(late[:-4] + [(100, 910, 0)] * 9, 1000)


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
