"""``vmhost hotremove --report``: the report directory (HTML, JSON, text, CSV) and a KSM tuning
policy in a scenario's host (built with the host, as in density and fleet)."""

import csv
import json
import subprocess
import sys

from vmhost.hotremove import Runner, load_scenario
from helpers import ROOT


def run_scenario(path):
    return Runner(load_scenario(path)).run()


def vmhost(*args):
    return subprocess.run([sys.executable, "-m", "vmhost.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT)


def test_report_directory(tmp_path):
    cfg = ROOT / "configs" / "hotremove-ksm.yaml"
    r = vmhost("hotremove", cfg, "--report", tmp_path / "rep")
    assert r.returncode == 0, r.stderr
    rep = tmp_path / "rep"
    assert sorted(p.name for p in rep.iterdir()) == ["blocks.csv", "report.html", "report.txt",
                                                      "result.json", "steps.csv"]
    res = json.loads((rep / "result.json").read_text())
    assert res == json.loads(json.dumps(run_scenario(cfg), default=int)) | {"steps": res["steps"]}
    assert (rep / "report.txt").read_text().strip() == r.stdout.strip()
    html = (rep / "report.html").read_text()
    assert "<svg" in html and "Pages migrated per block offlined" in html and "<script" not in html
    blocks = list(csv.DictReader((rep / "blocks.csv").open()))
    offl = [b for s in res["steps"] if s["kind"] == "offline" for b in s["blocks"]]
    assert len(blocks) == len(offl) > 0
    assert [int(b["ksm_pages_migrated"]) for b in blocks] == [b["ksm_pages_migrated"] for b in offl]
    steps = list(csv.DictReader((rep / "steps.csv").open()))
    assert [int(s["pages_sharing"]) for s in steps] == [s["ksm"]["pages_sharing"] for s in res["steps"]]


def test_a_bad_scenario_writes_no_report(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "configs" / "hotremove-ksm.yaml").read_text().replace("run: 1", "run: 9"))
    r = vmhost("hotremove", bad, "--report", tmp_path / "rep")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "ksm.run" in r.stderr
    assert not (tmp_path / "rep").exists()


def test_a_policy_drives_the_knobs_in_a_hotremove_scenario(tmp_path):
    """policy: is not dropped: a fixed policy that stops KSM keeps anything from merging, and
    ksmtuned wakes on the clock; without a policy the same scenario merges."""
    text = (ROOT / "configs" / "hotremove-ksm.yaml").read_text()
    tl = text.index("timeline:")
    timeline = text[tl:].replace("  - ksm_scans: 3", "  - run_for: 5s")
    p = tmp_path / "pol.yaml"
    p.write_text(text[:tl] + "policy: {name: fixed, knobs: {run: 0}}\n" + timeline)
    res = Runner(load_scenario(p)).run()
    assert res["policy"]["name"] == "fixed" and res["policy"]["changes"][-1]["run"] == 0
    assert res["steps"][0]["ksm"]["pages_sharing"] == 0 and res["content_unchanged"]
    p.write_text(text[:tl] + "policy: {name: ksmtuned, interval_s: 1}\n" + timeline)
    res = Runner(load_scenario(p)).run()
    assert res["policy"]["name"] == "ksmtuned" and res["policy"]["wakeups"] >= 5
    q = tmp_path / "nopol.yaml"
    q.write_text(text[:tl] + text[tl:].replace("  - ksm_scans: 3", "  - run_for: 5s"))
    plain = run_scenario(q)
    assert "policy" not in plain and plain["steps"][0]["ksm"]["pages_sharing"] > 0
