"""``vmhost density``: a hand-computed case, every limit binding, the curves, bad configs, the examples."""

import json
import subprocess
import sys

import pytest

from guests.errors import InputError
from vmhost.density import DensityRunner, boot_sequence, format_result, load_density, run_density
from vmhost.density.search import DensitySearch

from helpers import ROOT, UNIT_KERNEL_HALF, refused_before_writing

EXAMPLES = sorted((ROOT / "configs").glob("density-*.yaml"))

# A guest of 4 MiB = 1024 pages: 512 kernel pages, 256 pages of its own, 256 zero pages it
# writes at boot.
UNIT_IMAGE = UNIT_KERNEL_HALF + """\
  unique: {fraction: 0.25, distinct: 1.0}
  zero: {boot: {touched: 1.0}}
"""
# Writes 400 pages/s over half of its 922 private pages; never touches its zero pages.
HOT_IMAGE = """\
name: hot
memory_mib: 4
classes:
  unique: {fraction: 0.9, distinct: 1.0, steady: {rate: 400, hot: 0.5}}
  zero: {boot: {touched: 0.0}}
"""
# 32 MiB host = 8192 pages; watermarks: min = isqrt(32768 KiB x 16) = 724 KiB = 181 pages,
# high = 181 + 2 x 45 = 271; so the analytic curves have 8192 - 271 = 7921 pages.
HAND = """\
host:
  thp: never
  block_size: 1MiB
  nodes: [{memory: 32MiB, cpus: 2}]
ksm: {pages_to_scan: 100000, sleep_millisecs: 20, run: 1}
density:
  mix: [{image: unit.yaml}]
  max_guests: 40
"""


def vmhost(*args):
    return subprocess.run([sys.executable, "-m", "vmhost.cli", *args], capture_output=True, text=True,
                          cwd=ROOT)


def write(tmp_path, text, name="density.yaml"):
    (tmp_path / "unit.yaml").write_text(UNIT_IMAGE)
    (tmp_path / "hot.yaml").write_text(HOT_IMAGE)
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.fixture(scope="module")
def hand(tmp_path_factory):
    return run_density(write(tmp_path_factory.mktemp("hand"), HAND))


def test_hand_computed_case(hand):
    res = hand
    assert res["resolution"] == 1 and res["host"]["capacity_pages"] == 7921
    # (a) 1024 pages a guest: 7 x 1024 = 7168 <= 7921 < 8192
    # (c) 512 kernel + 256 per guest + 1 zero page: 513 + 256 N <= 7921 -> N = 28
    assert res["vms_per_host"]["no_ksm"] == 7 and res["vms_per_host"]["ideal"] == 28
    for row in res["curve"]:
        n = row["guests"]
        assert row["no_ksm_pages"] == 1024 * n and row["ideal_pages"] == 513 + 256 * n
    # (b) KSM: the kernel pages are shared once; the zero page's 256 N mappings are spread
    # over N dups (max_page_sharing 256), each keeping one page: shared 512 + N (N >= 2),
    # sharing 512 (N - 1) + 256 N - N; the host holds 257 N + 512 pages
    for s in res["steps"][:-1]:
        n = s["guests"]
        assert s["ok"] and s["steady"] and not s["oom_kills"]
        assert s["pages_shared"] == (1 if n == 1 else 512 + n)
        assert s["pages_sharing"] == 512 * (n - 1) + 255 * n
        assert s["used_pages"] == (769 if n == 1 else 257 * n + 512)
        assert s["free_pages"] == 8192 - s["used_pages"]
        assert s["ideal_now_pages"] == 513 + 256 * n
        assert s["saved_pages"] == s["pages_sharing"]
    # booting guest N needs its 1024 pages before KSM merges them: with no swap, the guest
    # fits while 8192 - (257 (N-1) + 512) - 1024 >= 181 (min watermark): N <= 26
    assert res["vms_per_host"]["ksm"] == 26
    last = res["steps"][-1]
    assert last["guests"] == 27 and last["oom_kills"] and not last["ok"]
    assert res["limited_by"][0].startswith("OOM kill")


def test_curves_monotonic(hand):
    curve = hand["curve"]
    for a, b in zip(curve, curve[1:]):
        assert b["no_ksm_pages"] >= a["no_ksm_pages"] and b["ideal_pages"] >= a["ideal_pages"]
        assert not (b["fits_no_ksm"] and not a["fits_no_ksm"])
        assert not (b["fits_ideal"] and not a["fits_ideal"])
    ok = [s for s in hand["steps"] if s["ok"]]
    for a, b in zip(ok, ok[1:]):
        assert b["saved_pages"] > a["saved_pages"] and b["used_pages"] > a["used_pages"]
    v = hand["vms_per_host"]
    assert v["no_ksm"] <= v["ksm"] <= v["ideal"]
    for s in ok:
        assert s["used_pages"] >= s["ideal_now_pages"]


def _limit(tmp_path, text):
    return run_density(write(tmp_path, HAND.replace("  max_guests: 40\n", text)))


def test_ksmd_cpu_limit_binds(tmp_path):
    # one full scan per batch: its cost grows with the guests, the 20 ms sleep does not
    res = _limit(tmp_path, "  max_guests: 40\n  limits: {ksmd_cpu: 30%}\n")
    bad = res["steps"][-1]
    assert not bad["ok"] and bad["violations"][0].startswith("ksmd CPU") and bad["ksmd_cpu_share"] > 0.3
    assert all(s["ksmd_cpu_share"] <= 0.3 for s in res["steps"][:-1])
    assert res["vms_per_host"]["ksm"] == bad["guests"] - 1 < 26


def test_free_headroom_is_part_of_the_one_capacity(tmp_path):
    res = _limit(tmp_path, "  max_guests: 40\n  limits: {free_headroom: 16MiB}\n")
    # the analytic curves and KSM count against one capacity: 7921 - 4096 = 3825 pages;
    # KSM holds 257 N + 512 pages -> N <= 12; ideal 513 + 256 N -> N <= 12; no KSM 1024 N -> 3
    assert res["host"]["capacity_pages"] == 3825
    assert res["vms_per_host"] == {"no_ksm": 3, "ksm": 12, "ideal": 12}
    bad = res["steps"][-1]
    assert bad["guests"] == 13 and bad["violations"][0].startswith("guest pages")
    assert bad["held_pages"] == 257 * 13 + 512 > 3825
    assert "accounting" in res and "swap is not capacity" in res["accounting"]


def test_swapin_limit_binds(tmp_path):
    text = """\
host:
  thp: never
  block_size: 1MiB
  nodes: [{memory: 16MiB, cpus: 2}]
  swap: [{name: sda, size: 64MiB}]
ksm: {run: 0}
density:
  mix: [{image: hot.yaml, nosharepages: true}]
  max_guests: 10
  settle: {time: 5s}
  write_period: 100ms
  limits: {swapin_rate: 50}
"""
    res = run_density(write(tmp_path, text))
    bad = res["steps"][-1]
    assert bad["violations"] and bad["violations"][0].startswith("swap-in rate") and bad["swapin_rate"] > 50
    assert not bad["oom_kills"]
    assert all(s["swapin_rate"] == 0 for s in res["steps"][:-1])
    assert res["vms_per_host"]["ksm"] == len(res["steps"]) - 1 >= 3


def test_unmerge_storm_model(tmp_path):
    res = _limit(tmp_path, "  max_guests: 6\n  unmerge_storm: {fraction: 0.5, window: 10s}\n")
    for s in res["steps"]:
        st = s["storm"]
        assert st["storm_pages"] == -(-s["saved_pages"] // 2)
        assert st["churn_pages"] == 0            # no guest writes: nothing breaks merges
        assert st["survives"] == (st["available_pages"] >= st["headroom_pages"])
    assert res["vms_surviving_storm"] == 6


def test_boot_orders(tmp_path):
    base = HAND.replace("  mix: [{image: unit.yaml}]\n  max_guests: 40\n", "")
    mix = ("  mix:\n    - {image: unit.yaml, count: 2, weight: 1}\n    - {image: tiny-linux, memory: 16MiB, count: 1}\n"
           "    - {image: unit.yaml, weight: 3, domain: b}\n")
    seqs = {}
    for order in ("as-listed", "round-robin", "weighted"):
        p = write(tmp_path, base + mix + f"  order: {order}\n  max_guests: 7\n  seed: 3\n", f"{order}.yaml")
        seqs[order] = load_density(p).sequence
    assert seqs["as-listed"] == [0, 0, 1, 2, 2, 2, 2]
    assert seqs["round-robin"] == [0, 1, 2, 0, 2, 2, 2]
    w = seqs["weighted"]
    assert len(w) == 7 and w.count(0) <= 2 and w.count(1) <= 1 and w.count(2) >= 4
    again = load_density(tmp_path / "weighted.yaml")
    assert boot_sequence(again) == w                 # deterministic with the seed


def test_resolution_agrees_with_exact(tmp_path):
    text = HAND.replace("nodes: [{memory: 32MiB, cpus: 2}]", "nodes: [{memory: 64MiB, cpus: 2}]").replace(
        "  mix: [{image: unit.yaml}]\n  max_guests: 40\n",
        "  mix: [{image: tiny-linux, memory: 16MiB}]\n  max_guests: 3\n")
    exact = run_density(write(tmp_path, text, "exact.yaml"))
    half = run_density(write(tmp_path, text + "  resolution: 4\n", "half.yaml"))
    assert half["resolution"] == 4 and "1/4" in half["resolution_note"]
    for a, b in zip(exact["steps"], half["steps"]):
        assert abs(a["saved_pages"] - b["saved_pages"]) <= 0.05 * a["saved_pages"]


def test_cli_json_report_and_bench(tmp_path):
    cfg = write(tmp_path, HAND.replace("max_guests: 40", "max_guests: 3"))
    r = vmhost("density", str(cfg), "--json", "--report", str(tmp_path / "rep"), "--bench")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["vms_per_host"]["ksm"] == 3 and out["bench"]["resolution"] == 1 and out["bench"]["wall_s"] > 0
    assert json.loads((tmp_path / "rep" / "result.json").read_text())["config"] == str(cfg)
    text = (tmp_path / "rep" / "report.txt").read_text()
    assert "VMs per host" in text and "resolution: 1/1" in text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".rep")] == []
    r = vmhost("density", str(cfg), "--quiet", "--bench")
    assert r.returncode == 0 and "bench:" in r.stdout and "wall time" in r.stdout and r.stderr == ""


BAD = [
    ("{image: unit.yaml}", "{image: no-such-image}", "density.mix[0].image", "unknown image"),
    ("{image: unit.yaml}", "{image: unit.yaml, memory: -4MiB}", "density.mix[0].memory", "negative"),
    ("{image: unit.yaml}", "{image: unit.yaml, memory: -4}", "density.mix[0].memory", "not a positive size"),
    ("{image: unit.yaml}", "{image: unit.yaml, colour: red}", "density.mix[0].colour", "unknown key"),
    ("  max_guests: 40", "  max_guests: 40\n  speed: 11", "density.speed", "unknown key"),
    ("  max_guests: 40", "  max_guests: 40\n  order: random", "density.order", "not one of"),
    ("  max_guests: 40", "  max_guests: 40\n  limits: {ksmd_cpu: 150%}", "density.limits.ksmd_cpu", "out of range"),
    ("  max_guests: 40", "  max_guests: 40\n  resolution: 3", "density.resolution", "does not divide"),
    ("  max_guests: 40", "  max_guests: 40\n  settle: {time: 5s, scans: 2}", "density.settle", "either"),
    ("{image: unit.yaml}", "{image: unit.yaml, count: 0}", "density.mix[0].count", "out of range"),
    ("run: 1}", "run: 7}", "ksm.run", "EINVAL"),
    ("density:", "policy: {name: ksmtunned}\ndensity:", "policy.name", "unknown KSM policy"),
    ("density:", "policy: {name: ksmtuned, boost: fast}\ndensity:", "policy.boost", "whole number"),
    ("density:", "policy: {name: ksmtuned, speed: 3}\ndensity:", "policy.speed", "not an option"),
    ("density:", "policy: {name: fixed, knobs: {run: 9}}\ndensity:", "policy.knobs.run", "EINVAL"),
    ("density:", "policy: {name: kubevirt, interval_s: 0}\ndensity:", "policy.interval_s", "too short"),
    ("density:", "policy: advisor\ndensity:\n  resolution: 2", "policy.name", "only at resolution 1"),
    # duplicate and unknown keys anywhere in the density section are refused, not ignored
    ("{image: unit.yaml}", "{image: unit.yaml, image: tiny-linux}", "line 7", "duplicate key 'image'"),
    ("  max_guests: 40", "  max_guests: 40\n  max_guests: 4", "line 9", "duplicate key 'max_guests'"),
    ("  max_guests: 40", "  max_guests: 40\n  limits: {ksmd_cpu: 50%, ksmd_cpu: 60%}", "line 9",
     "duplicate key 'ksmd_cpu'"),
    ("  max_guests: 40", "  max_guests: 40\n  limits: {cpu: 50%}", "density.limits.cpu", "unknown key"),
    ("  max_guests: 40", "  max_guests: 40\n  unmerge_storm: {fraction: 0.2, window: 5s, size: 1}",
     "density.unmerge_storm.size", "unknown key"),
    ("{image: unit.yaml}", "{image: unit.yaml, memory: 1.5MiB}", "density.mix[0].memory", "whole number of MiB"),
    ("{image: unit.yaml}", "{image: unit.yaml, domain: ''}", "density.mix[0].domain", "sharing domain"),
    ("{image: unit.yaml}", "{image: unit.yaml, locked: 1}", "density.mix[0].locked", "true or false"),
    ("{image: unit.yaml}", "{image: unit.yaml, weight: 0}", "density.mix[0].weight", "out of range"),
]


@pytest.mark.parametrize("old, new, key, words", BAD, ids=[f"{b[2]}-{b[3]}" for b in BAD])
def test_bad_config_is_one_line_status_2_nothing_written(tmp_path, old, new, key, words):
    assert old in HAND
    bad = write(tmp_path, HAND.replace(old, new), "bad.yaml")
    refused_before_writing("density", bad, tmp_path / "rep", key, words)
    with pytest.raises(InputError):
        load_density(bad)


def test_missing_file_and_section(tmp_path):
    r = vmhost("density", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "cannot read" in r.stderr
    p = write(tmp_path, HAND.split("density:")[0])
    r = vmhost("density", str(p))
    assert r.returncode == 2 and "density: missing" in r.stderr


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_configs_run(path):
    cfg = load_density(path)
    if path.name == "density-256g.yaml":
        # the benchmark (run by hand with --bench): here only its first guests
        cfg.max_guests = 3
        cfg.sequence = boot_sequence(cfg)
    res = DensityRunner(cfg).run()
    assert res["steps"] and res["resolution"] == cfg.resolution
    v = res["vms_per_host"]
    # the KSM answer: at the configured knobs, or with the largest pages_to_scan that meets
    # the ksmd CPU limit when they break it (never a bare 0)
    ksm = res["cpu_limit"]["vms_ksm"] if "cpu_limit" in res else v["ksm"]
    assert v["no_ksm"] <= v["ideal"] and 1 <= ksm <= v["ideal"]
    assert res["steps"][0]["ok"] or res["limited_by"][0].startswith("ksmd CPU")
    assert all(s["saved_pages"] >= 0 for s in res["steps"])


def test_strided_search_gives_the_one_by_one_answer(tmp_path, hand):
    """stride auto (the hand case's default) against stride 1: the same VMs per host, and the
    same counters wherever both simulated the same number of guests."""
    exact = run_density(write(tmp_path, HAND.replace("  max_guests: 40", "  max_guests: 40\n  stride: 1")))
    assert [s["booted"] for s in exact["steps"]] == [1] * len(exact["steps"])
    assert any(s["booted"] > 1 for s in hand["steps"])           # the default did stride
    assert hand["vms_per_host"] == exact["vms_per_host"]
    one = {s["guests"]: s for s in exact["steps"]}
    for s in hand["steps"]:
        e = one[s["guests"]]
        assert (s["pages_shared"], s["pages_sharing"], s["used_pages"], s["ok"]) == \
               (e["pages_shared"], e["pages_sharing"], e["used_pages"], e["ok"])


def test_a_snapshot_restores_the_whole_simulation(tmp_path):
    """Two steps after a snapshot, restore, the same two steps again: the same numbers (the
    clock's callbacks, writers and ksmd included, act on the restored state)."""
    cfg = load_density(ROOT / "configs" / "density-tiny.yaml")
    search = DensityRunner(cfg)
    st = search.stepper
    st.build()
    search.boot_step(0, 1)
    snap = st.snapshot()

    def two_steps():
        a = search.boot_step(1, 1)
        b = search.boot_step(2, 1)
        return [(s["pages_shared"], s["pages_sharing"], s["used_pages"], s["ksmd_cpu_s_total"],
                 s["virtual_s"]) for s in (a, b)]

    first = two_steps()
    st.restore(snap)
    assert len(st.guests) == 1 and st.ksm.c.pages_sharing < first[0][1] // cfg.resolution
    assert two_steps() == first


def test_a_scaled_host_keeps_the_full_size_hosts_watermarks():
    """At resolution N the watermarks are the full-size host's / N (not those of a host N
    times smaller, which the square root would make relatively N^0.5 times larger)."""
    from vmhost.mm.page_alloc import watermarks
    full = watermarks([8 << 20, 8 << 20])                 # two 32 GiB nodes
    for r in (64, 512):
        scaled = watermarks([(8 << 20) // r] * 2, r)
        for (fmin, _, fhigh), (smin, _, shigh) in zip(full, scaled):
            assert abs(smin * r - fmin) <= r and abs(shigh * r - fhigh) <= 3 * r
        naive = watermarks([(8 << 20) // r] * 2)
        assert naive[0][0] * r > 5 * full[0][0]            # what it would be without the scale


def test_progress_counts_each_kept_guest_once(tmp_path):
    """A stride that breaks a limit is redone one by one: progress reports only what is kept."""
    seen = []
    cfg = load_density(write(tmp_path, HAND))
    res = DensityRunner(cfg, progress=seen.append).run()
    assert seen == res["steps"]
    assert sum(s["booted"] for s in seen) == seen[-1]["guests"] <= len(cfg.sequence)


def test_knobs_that_break_the_cpu_limit_get_the_largest_pages_to_scan_that_meets_it(tmp_path):
    """ksmd at one full scan a batch costs 10% of a CPU with the first guest (smart scan off:
    every pass visits every page): not 'KSM 0' but the largest pages_to_scan that meets 3%
    (within 10% of the smallest that breaks it, both found by searching) and the count with it."""
    res = run_density(write(tmp_path, HAND.replace("run: 1}", "run: 1, smart_scan: 0}").replace(
        "  max_guests: 40\n", "  max_guests: 6\n  limits: {ksmd_cpu: 3%}\n")))
    assert res["vms_per_host"]["ksm"] == 0 and res["limited_by"][0].startswith("ksmd CPU")
    cl = res["cpu_limit"]
    assert cl["configured_pages_to_scan"] == 100000 and cl["fails_at_guests"] == 1
    good, bad = cl["pages_to_scan"], cl["breaks_at_pages_to_scan"]
    assert 1 <= good < bad <= 1.1 * good + 1
    assert cl["vms_ksm"] == 6 and cl["at_best"]["ksmd_cpu_share"] <= 0.03
    tried = {t["pages_to_scan"]: t for t in cl["tries"]}
    assert tried[good]["vms_ksm"] == 6 and tried[bad]["limited_by"][0].startswith("ksmd CPU")
    head = next(line for line in format_result(res).splitlines() if line.startswith("VMs per host"))
    assert "KSM 0 at pages_to_scan 100000" in head and f"meets it: {good}" in head and "KSM 6" in head


def test_the_cpu_limits_searches_in_two_processes_give_the_same_answer(tmp_path):
    """With two workers the next bisection search runs ahead in another process: the same
    tries, the same suggested pages_to_scan and count as one search after the other."""
    cfg = load_density(write(tmp_path, HAND.replace("  max_guests: 40\n",
                                                    "  max_guests: 6\n  limits: {ksmd_cpu: 3%}\n")))
    two = DensitySearch(cfg, workers=2).run()
    one = DensitySearch(cfg, workers=1).run()
    assert two["cpu_limit"]["tries"] and two["cpu_limit"] == one["cpu_limit"]
    two.pop("wall_s"), one.pop("wall_s")
    assert two == one


def test_a_study_too_big_for_this_machine_is_refused_before_it_starts(tmp_path):
    """density-256g at resolution 1 (256 guests of 4 GiB may boot, and the strided search
    keeps a copy of the simulation: some 95 GiB of emulator state) is refused in one line with
    the estimate and a resolution that fits, before any output; the estimate falls with the
    resolution as the pages do."""
    from helpers import one_line_exit_2, vmhost
    from vmhost.density.search import DensitySearch
    from vmhost.footprint import GiB, available_bytes
    text = (ROOT / "configs" / "density-256g.yaml").read_text()
    cfg = tmp_path / "256g-full.yaml"
    cfg.write_text(text.replace("resolution: 512", "resolution: 1"))
    full = DensitySearch(load_density(cfg)).footprint()
    assert full.bytes() > available_bytes()
    r = vmhost("density", cfg, "--json", timeout=120)
    line = one_line_exit_2(r, str(cfg), "resolution 1 needs about", "would need")
    assert r.stdout == "" and f"{full.bytes() / GiB:.1f} GiB" in line
    shipped = DensitySearch(load_density(ROOT / "configs" / "density-256g.yaml")).footprint()
    assert shipped == full.scaled(512) and shipped.bytes() < 1 * GiB
