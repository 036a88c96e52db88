"""The oracle's comparison of an emulator run with kernel runs, on hand-made results (no kernel)."""

from vmhost.reality.density_oracle import compare


def _step(t90, scans=None, sharing=1000):
    s = {"guests": 1, "image": "x", "pages_sharing": sharing, "saved_pages": sharing, "used_pages": 5000,
         "ksmd_cpu_share": 0.5, "time_to": {"p50_s": 10.0, "p90_s": t90}}
    if scans is not None:
        s["kernel"] = {"scans": [{"t_s": t} for t in scans], "full_scan_s": 1.0}
    return s


def _doc(step):
    return {"config": "c.yaml", "resolution": 1, "steps": [step]}


def test_a_time_is_within_one_full_scan_of_the_scan_it_falls_in():
    # the kernel's savings pass 90% at 20 s, in a full scan from 12 s to 22 s (10 s long); the
    # window's passes are 1 s: an emulator at 29 s (+45%) is within that one scan, at 33 s not
    kernel = _doc(_step(20.0, scans=[0, 5, 12, 22, 23, 24]))
    near = compare(_doc(_step(29.0)), [kernel])["steps"][0]["p90_s"]
    far = compare(_doc(_step(33.0)), [kernel])["steps"][0]["p90_s"]
    assert near["full_scan_s"] == 10 and near["ok"] is True
    assert far["ok"] is False
    # 15% holds on its own, whatever the scans
    assert compare(_doc(_step(22.5)), [_doc(_step(20.0, scans=[0, 19.9, 20.1]))])["steps"][0]["p90_s"]["ok"]
    # the mean over the runs: scans of 10 s and 2 s around their times
    two = [kernel, _doc(_step(20.0, scans=[0, 19, 21]))]
    assert compare(_doc(_step(26.5)), two)["steps"][0]["p90_s"]["full_scan_s"] == 6
    assert compare(_doc(_step(26.5)), two)["steps"][0]["p90_s"]["ok"] is False
