"""``vmhost hotremove``: the example scenarios run clean; bad scenarios are one line, status 2."""

import json
import subprocess
import sys

import pytest

from vmhost.hotremove import Runner, load_scenario

from helpers import refused_before_writing

from helpers import ROOT
CONFIGS = sorted((ROOT / "configs").glob("hotremove-*.yaml"))


def vmhost(*args):
    return subprocess.run([sys.executable, "-m", "vmhost.cli", *args], capture_output=True, text=True,
                          cwd=ROOT)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_scenarios_run_and_lose_nothing(path):
    res = Runner(load_scenario(path)).run()
    assert res["content_unchanged"], res["problems"]
    assert all(s["check"]["ok"] for s in res["steps"])
    offl = [b for s in res["steps"] if s["kind"] in ("offline", "unplug") for b in s["blocks"]]
    assert offl
    for b in offl:
        assert b["ksm_before"]["pages_shared"] == b["ksm_after"]["pages_shared"]
        assert b["ksm_before"]["pages_sharing"] == b["ksm_after"]["pages_sharing"]


def test_ksm_scenario_migrates_ksm_pages():
    res = Runner(load_scenario(ROOT / "configs/hotremove-ksm.yaml")).run()
    blocks = res["steps"][1]["blocks"]
    assert all(b["ok"] for b in blocks)
    assert sum(b["ksm_pages_migrated"] for b in blocks) == 2048
    assert res["ksm"]["pages_shared"] == 2048 and res["ksm"]["pages_sharing"] == 2048


def test_pinned_scenario_reports_both_failure_causes():
    res = Runner(load_scenario(ROOT / "configs/hotremove-pinned.yaml")).run()
    reasons = sorted((b["ok"], b["reason"] or "") for b in res["steps"][1]["blocks"])
    assert reasons == [(False, "failure to isolate range"), (False, "signal backoff"), (True, "")]
    failed = [b for b in res["steps"][1]["blocks"] if b["reason"] == "signal backoff"][0]
    assert failed["events"] == ["GOING_OFFLINE", "CANCEL_OFFLINE"] and failed["errno"] == "EINTR"
    assert 2000 < failed["time_ms"] < 2200 and failed["run_during"] == 5


def test_cli_json_and_report(tmp_path):
    r = vmhost("hotremove", "configs/hotremove-ksm.yaml", "--json", "--report", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["content_unchanged"] and out["steps"][1]["kind"] == "offline"
    assert json.loads((tmp_path / "rep" / "result.json").read_text())["scenario"] == out["scenario"]
    assert "content check" in (tmp_path / "rep" / "report.txt").read_text()


BAD = [
    ("  - offline: {node: 1}", "  - offline: {node: 7}", "timeline[1].offline.node", "out of range"),
    ("  - ksm_scans: 3 ", "  - explode: 3 ", "timeline[0].explode", "unknown step"),
    ("size: 8MiB, content: {seq: 1000}, mergeable: true}\n      - {name: private, pages: 256, content: {unique: 1}",
     "size: 8MiB, content: {seq: 1000}, mergeable: yes-please}\n      - {name: private, pages: 256, content: {unique: 1}",
     "processes.guest-a.regions[0].mergeable", "true or false"),
    ("content: {unique: 2}", "content: {rainbow: 2}", "processes.guest-b.regions[1]", "unknown content kind"),
    ("    - {memory: 32MiB, cpus: 2}", "    - {memory: 32MB, cpus: 2}", "host.nodes[1].memory", "not a size"),
    ("  pages_to_scan: 100000 ", "  pages_to_scan: lots ", "ksm.pages_to_scan", "EINVAL"),
]


@pytest.mark.parametrize("old, new, key, words", BAD, ids=[b[2] for b in BAD])
def test_bad_scenario_is_one_line_status_2_nothing_written(tmp_path, old, new, key, words):
    text = (ROOT / "configs/hotremove-ksm.yaml").read_text()
    assert old in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace(old, new))
    refused_before_writing("hotremove", bad, tmp_path / "rep", key, words)


def test_missing_scenario_and_bench_flags():
    r = vmhost("hotremove")
    assert r.returncode == 2 and "scenario" in r.stderr
    r = vmhost("hotremove", "configs/hotremove-ksm.yaml", "--bench")
    assert r.returncode == 2


def test_bench_report_format():
    """The benchmark itself (minutes: KSM must merge GiBs first) is run by hand; its report here."""
    from vmhost.benchmarks import offline
    fake = {"gib_offlined": 1, "blocks": 8, "block_mib": 128, "failures": [], "pages_migrated": 1,
            "ksm_pages_migrated": 1, "wall_s": 1.0, "pages_per_wall_s": 1, "virtual_s": 1.0,
            "pages_per_virtual_s": 1, "ksm_before": {}, "ksm_after": {}, "counters_unchanged": True,
            "invariants": "ok", "setup_s": 0, "merge_s": 0}
    assert "pages migrated: 1" in offline.format_result(fake)


ORACLE_BAD = [
    ("  - offline: {pages_of: vm}", "  - offline: {pages_of: ghost}", "timeline[2].offline.pages_of", "no process"),
    ("  - offline: {pages_of: vm}", "  - offline: {pages_of: vm, blocks: [1]}", "timeline[2].offline",
     "give one of"),
    ("  - offline: {pages_of: vm}", "  - offline: {pages_of: vm, signal_after: soon}",
     "timeline[2].offline.signal_after", "not a duration"),
    ("  - offline: {pages_of: vm}", "  - offline: {empty: 1}", "timeline[2].offline.empty", "expected true"),
    ("  - ksm: {run: 0}", "  - ksm: []", "timeline[1].ksm", "knob writes"),
]


@pytest.mark.parametrize("old, new, key, words", ORACLE_BAD, ids=[b[2] + ":" + b[3] for b in ORACLE_BAD])
def test_bad_oracle_scenario_is_one_line(tmp_path, old, new, key, words):
    text = (ROOT / "configs/hotremove-oracle-ksm.yaml").read_text()
    assert old in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace(old, new))
    r = vmhost("hotremove", str(bad))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and key in lines[0] and words in lines[0], r.stderr


def test_offline_targets_pages_of_and_empty_and_ksm_knob_step(tmp_path):
    res = Runner(load_scenario(ROOT / "configs/hotremove-oracle-mixed.yaml")).run()
    assert res["steps"][1]["writes"] == [{"knob": "run", "value": "0", "rc": "ok"}]
    (b,) = res["steps"][2]["blocks"]
    assert b["ok"] and b["ksm_pages_migrated"] == 5 and b["ordinary_pages_migrated"] == 300
    assert b["run_during"] == 4 and b["ksm_before"] == b["ksm_after"]
    res = Runner(load_scenario(ROOT / "configs/hotremove-oracle-empty.yaml")).run()
    (b,) = res["steps"][0]["blocks"]
    assert b["ok"] and b["pages_migrated"] == 0 and b["blocks"] == [7]


def test_pinned_page_retried_until_signal_and_run_writer_waits():
    res = Runner(load_scenario(ROOT / "configs/hotremove-oracle-pinned.yaml")).run()
    (b,) = res["steps"][2]["blocks"]
    assert (b["ok"], b["errno"], b["reason"]) == (False, "EINTR", "signal backoff")
    assert b["ordinary_pages_migrated"] == 299 and b["ksm_pages_migrated"] == 5   # all but the pin
    assert b["run_during"] == 4
    assert b["run_write_wait_ms"] == pytest.approx(b["time_ms"] - 200)
    assert b["ksm_before"] == b["ksm_after"] and res["content_unchanged"]


def test_oracle_refuses_what_it_cannot_do_in_one_line(tmp_path):
    text = (ROOT / "configs/hotremove-ksm.yaml").read_text()     # two processes, node offline
    bad = tmp_path / "two.yaml"
    bad.write_text(text.replace("block_size: 4MiB", "block_size: 128MiB")
                   .replace("{memory: 64MiB", "{memory: 256MiB").replace("{memory: 32MiB", "{memory: 256MiB"))
    r = vmhost("hotremove", str(bad), "--oracle")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "one process" in lines[0], r.stderr
    r = vmhost("hotremove", "configs/hotremove-pinned.yaml", "--oracle")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "block size" in lines[0], r.stderr


def test_emulated_swap_of_ksm_pages():
    """The swap experiment of vmhost.reality.swap_oracle, emulator side."""
    from vmhost.reality.swap_oracle import run_emulator
    ph = {p["phase"]: p for p in run_emulator(contents=3, mappings=10, private=4)["phases"]}
    merged = {"pages_shared": 3, "pages_sharing": 27, "pages_unshared": 0, "pages_volatile": 0}
    assert ph["merged"]["ksm"] == merged
    assert ph["swap_out"]["ksm"] == merged and ph["swap_out"]["swapped_ptes"] == 34
    assert ph["swap_out"]["pswpout"] == 3 + 4                     # one write per KSM page
    assert ph["scan_after"]["ksm"]["pages_sharing"] == 0          # counters fall one pass later
    assert ph["swap_in"]["ksm_swpin_copy"] == 3 * 9               # every PTE but the first copies
    assert ph["remerged"]["ksm"] == merged and ph["remerged"]["content_mismatches"] == 0
