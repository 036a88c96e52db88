"""ksmd's cost model: one source of truth (the calibration file) and the fit that refits it."""

import json

import numpy as np

from vmhost.ksm import ksmd
from vmhost.reality import ksmd_fit


def test_costs_come_from_the_calibration_file():
    doc = json.loads(ksmd.CALIBRATION_PATH.read_text())
    assert ksmd.COST_NS == doc["cost_ns"]
    assert set(doc["cost_ns"]) == set(ksmd_fit.FEATURES)


def test_fit_recovers_the_costs_that_made_the_data():
    rng = np.random.default_rng(1)
    truth = {"ptes_walked": 210.0, "pages": 480.0, "checksums": 120.0, "tree_compares": 300.0,
             "merges": 900.0, "thp_splits": 50_000.0}
    fixed = {"batches": 20_000, "dups_walked": 100}     # not fitted: kept as given
    rows = []
    for i in range(40):
        r = {f: int(rng.integers(0, 1_000_000)) for f in ksmd_fit.FEATURES}
        r["thp_splits"] = int(rng.integers(0, 1000))
        r["batches"] = int(rng.integers(1, 300))
        ns = sum(r[f] * {**truth, **fixed}[f] for f in ksmd_fit.FEATURES)
        rows.append({**r, "kind": ksmd_fit.kind(r), "kernel_cpu_s": ns / 1e9})
    f = ksmd_fit.fit(rows, fixed)
    for k, v in truth.items():
        assert abs(f["cost_ns"][k] - v) <= 1e-3 * v + 0.1, (k, f["cost_ns"][k])
    assert f["cost_ns"]["batches"] == 20_000 and f["rel_rms"] < 1e-6
    # the error of other costs on the same passes is reported, per kind of pass
    worse = ksmd_fit.model_error(rows, {**truth, **fixed, "tree_compares": 600.0})
    assert worse["total_bias"] > 0.1 and set(worse["per_kind"]) <= {"checksum-only", "merging", "steady"}


def test_kind_of_pass():
    assert ksmd_fit.kind({"pages": 1000, "checksums": 1000, "tree_compares": 0, "merges": 0}) == "checksum-only"
    assert ksmd_fit.kind({"pages": 1000, "checksums": 900, "tree_compares": 9000, "merges": 300}) == "merging"
    assert ksmd_fit.kind({"pages": 1000, "checksums": 300, "tree_compares": 9000, "merges": 2}) == "steady"
