"""Resolution invariance: every bundled density config's headline at its shipped resolution
agrees with a finer one within the stated tolerances (``vmhost.density.invariance``): the VMs
per host in all three columns and the storm-safe count exactly, at the edge too; and the
issue's example gives the same VMs per host at 1/512, 1/256 and 1/64.

The finer resolutions cost time: density-mix and density-ksmtuned are held at 1/512 and 1/256
against 1/64, density-tiny at 1/8 against 1/1 (exact), density-profile at 1/8 against 1/4,
and the 256 GiB benchmark on its first 3 guests at 1/512 against 1/256 (its whole search is a
benchmark; at 1/1024 its guests have 1,024 pages and the memory three of them save moves by 6%
with the draw of their pools; past its 3rd guest two linked VDI clones can merge or not depending on the phase of
smart scan's skip cycles, which moves with the resolution: see the README).
"""


import copy

import pytest

from vmhost.density import boot_sequence, load_density
from vmhost.density.invariance import at_resolution, check, format_check

from helpers import ROOT
CONFIGS = {p.name for p in (ROOT / "configs").glob("density-*.yaml")}

CASES = [("density-tiny.yaml", [8, 1], None),
         ("density-mix.yaml", [512, 256, 64], None),
         ("density-ksmtuned.yaml", [512, 256, 64], None),
         ("density-256g.yaml", [512, 256], 3),
         ("density-profile.yaml", [8, 4], None)]
# figures known not to hold yet, by config (README, "Resolution invariance"): the first
# linux-server guest of density-256g (THP) merges its pages in its 2nd full scan at 1/1024,
# 1/256, 1/64, 1/32, 1/16 and in its 3rd at 1/512 and 1/128 (with THP off: the 2nd at every
# resolution), so its time to 90% is one of two values about a full scan apart
KNOWN_OPEN = {"density-256g.yaml": {"t90_first_s"}}
# configs that only run exact (resolution 1): their guests are real memory dumps, whose pages
# are not a scale-free profile (at 1/2, density-lab-dumps saves 9% less than exact)
EXACT_ONLY = {"density-lab-dumps.yaml"}


def test_every_bundled_config_is_covered():
    assert CONFIGS == {c[0] for c in CASES} | EXACT_ONLY
    for name in EXACT_ONLY:
        assert load_density(ROOT / "configs" / name).resolution == 1, name


@pytest.mark.parametrize("name, resolutions, max_guests", CASES, ids=[c[0] for c in CASES])
def test_headline_is_resolution_invariant(name, resolutions, max_guests):
    cfg = load_density(ROOT / "configs" / name)
    if max_guests:
        cfg.max_guests = max_guests
        cfg.sequence = boot_sequence(cfg)
    out = check(cfg, resolutions)
    open_ = KNOWN_OPEN.get(name, set())
    assert all(v is not False for row in out["rows"] for k, v in row["agrees"].items()
               if k not in open_), format_check(out)
    counts = ("no_ksm", "ksm", "ideal", "ksm_suggested", "storm_safe")
    for row in out["rows"]:
        f = row["figures"]
        assert f["ideal"] >= f["ksm"] and (f["ksm_suggested"] is None or f["ideal"] >= f["ksm_suggested"])
        # exactly, whether or not an answer is at the edge (no allowance of one guest)
        assert [f[k] for k in counts] == [out["rows"][-1]["figures"][k] for k in counts], format_check(out)


def test_cli_resolutions_table_and_bad_input():
    import subprocess
    import sys

    def vmhost(*args):
        return subprocess.run([sys.executable, "-m", "vmhost.cli", *args], capture_output=True, text=True,
                              cwd=ROOT)
    r = vmhost("density", "configs/density-tiny.yaml", "--resolutions", "8,4", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "reference: 1/4" in r.stdout and "every figure agrees" in r.stdout
    for bad, words in (("3", "does not divide"), ("x", "not a list"), ("0", "positive")):
        r = vmhost("density", "configs/density-mix.yaml", "--resolutions", bad)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and r.stdout == "" and len(lines) == 1 and words in lines[0], r.stderr


def test_a_scaled_thp_host_keeps_huge_pages_and_says_what_it_cannot_show(tmp_path):
    """Blocks of a THP host never shrink below one huge page (guests keep THP at 1/N); a guest
    scaled below one huge page is reported as not faithful, in the result and the text."""
    from vmhost.density import DensityRunner, format_result
    from vmhost.density.stepper import HostStepper
    (tmp_path / "unit.yaml").write_text("name: unit\nmemory_mib: 4\nclasses:\n"
                                        "  kernel: {fraction: 0.5, distinct: 1.0, pool: 1}\n"
                                        "  unique: {fraction: 0.5, distinct: 1.0}\n")
    base = ("host: {thp: madvise, block_size: 1MiB, nodes: [{memory: 32MiB, cpus: 2}]}\n"
            "ksm: {pages_to_scan: 100000, sleep_millisecs: 20, run: 1}\n"
            "density:\n  mix: [{image: unit.yaml}]\n  max_guests: 2\n")
    for r, below in ((1, False), (2, False), (4, True)):
        p = tmp_path / f"r{r}.yaml"
        p.write_text(base + f"  resolution: {r}\n")
        cfg = load_density(p)
        st = HostStepper(cfg, cfg.mix)
        assert st.hcfg.block_pages == (256 if r == 1 else 512)
        thp = [u for u in st.unfaithful if u.startswith("THP")]
        assert bool(thp) == below
        if below:
            res = DensityRunner(cfg).run()
            assert "below one huge page" in res["unfaithful"][0] and "resolution 2 or finer" in res["unfaithful"][0]
            assert "not faithful at 1/4: THP: guests of 4 MiB" in format_result(res)


@pytest.mark.parametrize("ksm, settle, r, flagged", [
    ("{}", "{scans: 2}", 4, True),                     # 6.18's default smart scan
    ("{}", "{scans: 2}", 1, False),                    # full size shows it as it is
    ("{}", "{scans: 12, max_scans: 20}", 4, True),     # however long the settle window
    ("{}", "{time: 30s}", 4, False),                   # a fixed time per step ends at no pass
    ("{smart_scan: 0}", "{scans: 2}", 4, False),       # every page visited every pass
    ("{smart_scan: n}", "{scans: 2}", 4, False),       # the knob's words, as sysfs takes them
])
def test_smart_scan_at_a_resolution_is_flagged(tmp_path, ksm, settle, r, flagged):
    """Under smart scan a scaled host's times to X% can move by a full scan (a scaled pass
    merges whole scaled pages and the clock's grain is coarser; steps end on whole skip cycles
    at every resolution, so the older guests' cycles stand at the same phase), so the scaled
    answer says so; a fixed time per step, smart scan off or full size need no such line."""
    from vmhost.density.stepper import HostStepper
    p = tmp_path / "c.yaml"
    p.write_text(f"host: {{nodes: [{{memory: 1GiB, cpus: 2}}]}}\nksm: {ksm}\n"
                 f"density:\n  mix: [{{image: linux-server, memory: 256MiB}}]\n  max_guests: 2\n"
                 f"  resolution: {r}\n  settle: {settle}\n")
    cfg = load_density(p)
    lines = [u for u in HostStepper(cfg, cfg.mix).unfaithful if u.startswith("smart scan:")]
    assert bool(lines) == flagged
    if flagged:
        assert f"can move by a full scan at 1/{r}" in lines[0] and "resolution 1 shows them" in lines[0]


def test_resolutions_side_by_side_give_the_answers_of_one_after_the_other():
    """Two worker processes run the resolutions side by side: the same rows as in one
    process, and every resolution reported as it finishes."""
    cfg = load_density(ROOT / "configs" / "density-tiny.yaml")
    seen = []
    apart = check(cfg, [8, 4, 2], progress=lambda r, run: seen.append(r), workers=2)
    alone = check(cfg, [8, 4, 2], workers=1)
    assert sorted(seen) == [2, 4, 8]
    for rows in (apart["rows"], alone["rows"]):
        for row in rows:
            row.pop("wall_s")
    assert apart == alone and [row["resolution"] for row in apart["rows"]] == [8, 4, 2]


def test_no_workers_is_refused_in_one_line():
    from helpers import one_line_exit_2, vmhost
    cfg = str(ROOT / "configs" / "density-tiny.yaml")
    one_line_exit_2(vmhost("density", cfg, "--workers", "0"), "--workers")
    one_line_exit_2(vmhost("density", cfg, "--resolutions", "8,4", "--workers", "0"), "--workers")


def test_ksmd_cpu_share_of_smart_scan_passes_does_not_fall_with_a_coarser_grain():
    """density-mix's first guest: at 1/1024 ksmd's batches are grouped 103 full-size batches at a
    time, at 1/64 seven. Under smart scan a steady pass visits few pages, and its last batch is
    cut short by the pass's end: were it to sleep a whole grouped sleep, the share over the
    9-scan window would fall with the grain (42.4% at 1/1024 against 51.4% at 1/64)."""
    from vmhost.density import DensityRunner
    shares = {}
    for r in (1024, 64):
        cfg = at_resolution(load_density(ROOT / "configs" / "density-mix.yaml"), r)
        cfg.max_guests = 1
        cfg.sequence = boot_sequence(cfg)
        first = DensityRunner(cfg).run()["steps"][0]
        assert first["settled_by"] == "9 scans unchanged"
        shares[r] = first["ksmd_cpu_share"]
    # with the step ending on whole skip cycles (18 scans) the share still rises a little with
    # the grain: 40.7% at 1/1024, 41.4% at 1/512 and 1/256, 42.9% at 1/64, 43.6% at 1/16 (a
    # trend in ksmd's cost at a coarse grain, open); the fault this guards against was 18% apart
    assert abs(shares[1024] - shares[64]) <= 0.06 * shares[64], shares


def test_the_strided_search_gives_the_one_by_one_counts():
    """density-mix at 1/256: past 8 guests the search boots two guests a step. Booting guests
    13 and 14 together swapped 2.2 GiB out and left the host inside the capacity where one by
    one the 14th missed it, and the stride from 12 to 14 never judged 13's storm verdict; a
    step of several guests that swapped, or across which the storm verdict turned, is redone
    one guest at a time, so every count is the one-by-one count."""
    from vmhost.density.search import DensitySearch
    cfg = at_resolution(load_density(ROOT / "configs" / "density-mix.yaml"), 256)
    strided = DensitySearch(cfg).run()
    steps = strided["steps"]
    assert any(s["booted"] > 1 for s in steps)
    for prev, s in zip(steps, steps[1:]):
        if s["booted"] > 1 and s["ok"]:
            assert s["swapout_pages"] == 0 and s["storm"]["survives"] == prev["storm"]["survives"]
    one = copy.copy(cfg)
    one.stride = 1
    alone = DensitySearch(one).run()
    for res in (strided, alone):
        res["counts"] = (res["vms_per_host"], res["vms_surviving_storm"])
    assert strided["counts"] == alone["counts"], (strided["counts"], alone["counts"])
