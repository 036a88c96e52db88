"""The oracle against the real kernel KSM: replays recorded traces and checks KSM is restored.

These tests drive /sys/kernel/mm/ksm for real (every project machine runs as root on a 6.18
kernel with KSM), so they never skip: a failure here means the oracle or the kernel changed.
"""

import json
import os
import subprocess
import sys
from contextlib import contextmanager

import pytest

from helpers import ROOT

from guests.errors import InputError
from vmhost.reality import ksm_oracle as oracle
from vmhost.ksm.trace import compare_results, load_trace
from helpers import pids_with_cmdline

pytestmark = pytest.mark.kernel

from helpers import CORPUS

# One of each family: merge latency, chains (N mod M == 1), zero pages, COW, fork + exit,
# knob EBUSY, idle scan after unmerge, smart-scan latency, the selftest F2 case.
SUBSET = [
    "merge_two_pages",
    "mps10_21_mod1",
    "zero_500_uzp1_then_writes",
    "cow_merged_100",
    "fork_with_ksm_pages",
    "knob_ebusy",
    "unmergeable_100_then_idle",
    "latency_smart_k3",
    "selftest_f2_unmerge_zero_pages",
]

KNOBS = list(oracle.DEFAULTS)


def knob_values():
    return {k: oracle.read_knob(k) for k in KNOBS + ["run"]}


def worker_pids():
    return pids_with_cmdline(b"vmhost.reality.ksm_oracle\x00--worker")


@contextmanager
def locked():
    """Hold the oracle lock: KSM is shared with every other oracle user on this machine, and a
    knob written (or run=2) outside the lock would disturb a run in progress."""
    fd = oracle._acquire_lock()
    try:
        yield
    finally:
        os.close(fd)


@pytest.fixture
def ksm_at_rest():
    """Every test starts and ends with KSM at its defaults and nothing merged."""
    yield
    with locked():
        oracle.write_knob("run", 2)
        oracle.write_knob("run", 0)
        for name, value in oracle.DEFAULTS.items():
            oracle.write_knob(name, value)
        assert oracle.ksm_leftovers() == {}
    assert worker_pids() == []


@pytest.mark.parametrize("name", SUBSET)
def test_recorded_trace_replays(name, ksm_at_rest):
    trace = load_trace(CORPUS / f"{name}.yaml")
    recorded = json.loads((CORPUS / f"{name}.kernel.json").read_text())
    assert compare_results(recorded, oracle.run_oracle(trace)) == []


def test_knobs_restored_after_trace(ksm_at_rest):
    # non-default starting values, so "restored" cannot be confused with "reset to defaults"
    with locked():
        oracle.write_knob("pages_to_scan", 123)
        oracle.write_knob("sleep_millisecs", 31)
        oracle.write_knob("smart_scan", 0)
        oracle.write_knob("stable_node_chains_prune_millisecs", 1500)
        before = knob_values()
    result = oracle.run_oracle(load_trace(CORPUS / "mps10_25_identical.yaml"))
    assert result["snapshots"][0]["pages_sharing"] == 22
    with locked():
        assert knob_values() == before
        assert oracle.ksm_leftovers() == {}
    assert worker_pids() == []


def test_knobs_restored_after_failing_trace(ksm_at_rest, monkeypatch):
    with locked():
        oracle.write_knob("sleep_millisecs", 33)
        before = knob_values()

    def boom(self, i):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(oracle._Run, "step_snapshot", boom)
    with pytest.raises(RuntimeError, match="injected failure"):
        # merged pages, a forked child and changed knobs exist when the failure hits
        oracle.run_oracle(load_trace(CORPUS / "fork_with_ksm_pages.yaml"))
    with locked():
        assert knob_values() == before
        assert oracle.ksm_leftovers() == {}
    assert worker_pids() == []


def test_refuses_when_another_process_uses_ksm(ksm_at_rest, tmp_path):
    code = ("import mmap, sys\n"
            "m = mmap.mmap(-1, 1 << 16, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)\n"
            "m.write(b'x' * (1 << 16)); m.madvise(mmap.MADV_MERGEABLE)\n"
            "print('ready', flush=True); sys.stdin.read()")
    other = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "ready"
        with locked():
            before = knob_values()
        with pytest.raises(InputError, match=rf"process\(es\) .*{other.pid}.* already use KSM"):
            oracle.run_oracle(load_trace(CORPUS / "merge_two_pages.yaml"))
        with locked():
            assert knob_values() == before
    finally:
        other.kill()
        other.wait()


def test_cli_entry_point(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nprocesses: {}\nsteps:\n  - scan: 0\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-m", "vmhost.reality.ksm_oracle", str(bad), "--json"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "step 0 (scan): field 'scan'" in run.stderr
    good = CORPUS / "selftest_t1_10_pages.yaml"
    run = subprocess.run([sys.executable, "-m", "vmhost.reality.ksm_oracle", str(good), "--json"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    recorded = json.loads(good.with_suffix(".kernel.json").read_text())
    assert compare_results(recorded, json.loads(run.stdout)) == []
