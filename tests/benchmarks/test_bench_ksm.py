"""``vmhost bench ksm``: the workload, the emulator side, the real kernel side, the fit.

No timing is asserted anywhere: only outcomes (counters, structure of the results). The kernel
test drives /sys/kernel/mm/ksm for real (root, KSM present on every project machine), through
``exclusive_kernel_ksm`` so it is serialised with every other user of the real KSM.
"""

import json

import numpy as np
import pytest


from vmhost.benchmarks import ksm as bench
from vmhost.benchmarks.ksm_workload import Workload
from vmhost.reality import ksm_oracle as oracle
from vmhost.ksm.trace import page_bytes
from helpers import pids_with_cmdline, vmhost


# -- the workload -------------------------------------------------------------------------------
def test_workload_mix_and_expected_counters():
    w = Workload(262144, 4)
    sizes = w.group_sizes()
    assert sizes.sum() == 262144
    assert (sizes == 1).sum() == 131072 and (sizes == 2).sum() == 32768 and (sizes == 8).sum() == 8192
    assert w.expected() == {"pages_shared": 40960, "pages_sharing": 90112, "pages_unshared": 131072}


@pytest.mark.parametrize("pages, procs", [(1000, 3), (4099, 4), (17, 5)])
def test_workload_layout_is_deterministic_and_complete(pages, procs):
    w = Workload(pages, procs)
    allc = w.all_contents()
    assert len(allc) == pages and (allc != 0).all()
    assert np.array_equal(allc, Workload(pages, procs).all_contents())
    parts = [w.contents(i) for i in range(procs)]
    assert sum(len(p) for p in parts) == pages
    assert np.array_equal(np.concatenate(parts), allc)
    # the multiset of contents matches the group sizes
    _, counts = np.unique(allc, return_counts=True)
    assert sorted(counts.tolist()) == sorted(w.group_sizes().tolist())


def test_page_image_is_the_trace_format():
    """The child fills a page exactly as trace.page_bytes would."""
    ids = Workload(64, 1).contents(0)
    words = np.zeros((64, 512), dtype="<u8")
    words[:] = ids[:, None]
    assert words.tobytes() == page_bytes(ids)


def test_max_page_sharing_in_expected():
    w = Workload(1000, 2, mix="groups")          # 125 groups of 8
    assert w.expected(max_page_sharing=3) == {"pages_shared": 375, "pages_sharing": 625,
                                              "pages_unshared": 0}


# -- the emulator side --------------------------------------------------------------------------
def test_emulator_reaches_expected_steady_state():
    r = bench.run(4096, 4, scans=1, kernel=False)
    e = r["emulator"]
    assert r["agree"]
    assert e["final"] == {**r["expected"], "pages_volatile": 0}
    assert e["steady_from_pass"] == 3                 # pass 1 checksums, pass 2 merges
    first, merging = e["passes"][0]["work"], e["passes"][1]["work"]
    assert first["checksums"] == 4096 and first.get("tree_compares", 0) == 0
    assert merging["pages"] == 4096 and merging["merges"] > 0
    m = e["memory"]
    assert m["total"] == (m["frames"] + m["page_tables"] + m["rmap_items"] + m["stable_nodes"]
                          + m["indexes"])
    assert m["rmap_item_count"] == 4096
    assert m["bytes_per_page"] == m["total"] / 4096


def test_host_gib_mode_is_emulator_only():
    r = bench.run_host(1 / 256, 8, scans=1)           # 4 MiB: 1024 pages
    assert r["pages"] == 1024 and "kernel" not in r and r["agree"]


# -- the real kernel ----------------------------------------------------------------------------
def _workload_children():
    return pids_with_cmdline(b"vmhost.benchmarks.ksm_workload\x00child")


@pytest.mark.kernel
def test_kernel_and_emulator_agree_and_ksm_is_restored():
    def knobs():    # at rest: read under the oracle lock (other oracle users set them while they run)
        with oracle.holding_lock():
            return {k: oracle.read_knob(k) for k in list(oracle.DEFAULTS) + ["run"]}

    before = knobs()
    r = bench.run(4096, 4, scans=1)
    k, e = r["kernel"], r["emulator"]
    assert r["agree"], (k["final"], e["final"])
    assert k["final"] == e["final"] == {**r["expected"], "pages_volatile": 0}
    assert k["steady_from_pass"] == e["steady_from_pass"] == 3
    assert all(p["pages_scanned"] == 4096 for p in k["passes"])   # smart_scan=0: every page
    assert all(p["cpu_s"] > 0 for p in k["passes"])
    assert [p["pages_shared"] for p in k["passes"]] == [p["pages_shared"] for p in e["passes"]]
    # restored, nothing left behind
    assert knobs() == before
    assert oracle.ksm_leftovers() == {}
    assert _workload_children() == []


# -- the calibration fit ------------------------------------------------------------------------
def test_fit_recovers_known_costs():
    truth = {"pages": 300.0, "checksums": 900.0, "tree_compares": 150.0, "merges": 2500.0}
    rng = np.random.default_rng(1)
    rows = []
    for _ in range(12):
        row = {k: int(rng.integers(1000, 100000)) for k in truth}
        row["kernel_cpu_ns"] = int(sum(truth[k] * row[k] for k in truth))
        row["model_cpu_ns"] = row["kernel_cpu_ns"]
        rows.append(row)
    fit = bench.fit_costs(rows)
    for key, value in truth.items():
        assert fit["cost_ns"][key] == pytest.approx(value, rel=1e-3)
    assert fit["rel_rms"] < 1e-6


def test_calibration_file_is_shipped_and_well_formed():
    path = bench.CALIBRATION_PATH
    assert path.exists(), path
    c = json.loads(path.read_text())
    assert set(bench.FIT_KEYS) <= set(c["fitted_cost_ns"])
    assert c["passes"] and all("kernel_cpu_ns" in p for p in c["passes"])
    assert "date" in c


# -- the command line -----------------------------------------------------------------------------
def test_cli_emulator_only_json():
    r = vmhost("bench", "ksm", "--pages", "2048", "--procs", "2", "--scans", "1", "--emulator-only",
               "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["agree"] and "kernel" not in out
    assert out["emulator"]["final"]["pages_unshared"] == 1024


@pytest.mark.parametrize("args, words", [
    (["--pages", "0"], "--procs"),
    (["--pages", "4", "--procs", "5"], "--procs"),
    (["--scans", "0", "--emulator-only"], "--scans"),
    (["--host-gib", "-1"], "--host-gib"),
    (["--emulator-only", "--kernel-only"], "exclude"),
    (["--pages", "lots"], "lots"),
])
def test_cli_bad_input(args, words):
    r = vmhost("bench", "ksm", *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in r.stderr
