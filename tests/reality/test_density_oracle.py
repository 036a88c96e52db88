"""The density oracle on the real kernel: refusals, clean-up on interrupt and crash, and the
small emulator-vs-kernel comparison (configs/oracle/density-small.yaml, 2 GiB of guests).

These drive /sys/kernel/mm/ksm for real (every project machine runs as root on a 6.18 kernel
with KSM), so they never skip.
"""

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, ctrl_c_reaches_it

from vmhost.reality import ksm_oracle
from vmhost.reality.density_oracle import compare, ksmd_pid
from vmhost.reality.guard import alive

pytestmark = pytest.mark.kernel        # every test drives the real KSM (or waits for its lock)

SMALL = ROOT / "configs" / "oracle" / "density-small.yaml"
KNOBS = list(ksm_oracle.DEFAULTS) + ["run"]

TINY = """\
host:
  profile: linux-6.18
  thp: madvise
  nodes:
    - {memory: 4GiB, cpus: 2}
ksm:
  pages_to_scan: 5000
  sleep_millisecs: 20
  run: 1
density:
  mix:
    - {image: desktop-vdi, memory: %(mib)dMiB, count: %(count)d, domain: vdi}
  order: as-listed
  seed: 3
  settle: {scans: 2, tolerance: 0.001, max_scans: 12}
"""


def knobs():
    """The knobs at rest: read under the oracle lock (other oracle users set them while they run)."""
    fd = ksm_oracle._acquire_lock()
    try:
        out = {k: ksm_oracle.read_knob(k) for k in KNOBS}
        out["ksmd nice"] = os.getpriority(os.PRIO_PROCESS, ksmd_pid())   # -20 during a run only
        return out
    finally:
        os.close(fd)


def vmhost(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "vmhost.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def descendants(pid: int) -> set[int]:
    kids: dict[int, list[int]] = {}
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                ppid = int(Path(f"/proc/{e}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(e))
    out, todo = set(), [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.add(k)
            todo.append(k)
    return out


def at_rest(pids=()):
    """KSM stopped with nothing merged, and none of ``pids`` (the oracle's processes) still
    registered (other helpers' QEMU guests may use KSM outside the oracle lock: not ours)."""
    fd = ksm_oracle._acquire_lock()
    try:
        assert ksm_oracle.read_knob("run") == "0"
        assert set(ksm_oracle.ksm_leftovers()) <= {"full_scans"}
        assert not set(ksm_oracle.mergeable_pids()) & set(pids)
    finally:
        os.close(fd)


@pytest.fixture
def tiny(tmp_path):
    def make(mib=256, count=2):
        p = tmp_path / "tiny.yaml"
        p.write_text(TINY % {"mib": mib, "count": count})
        return p
    return make


def test_refuses_a_config_too_big_for_this_machine(tiny):
    before = knobs()
    r = vmhost("density", str(tiny(mib=8192, count=32)), "--oracle")
    assert r.returncode == 2
    line = r.stderr.strip()
    assert "\n" not in line and "density.mix" in line and "GiB" in line and "fit" in line
    assert "tiny.yaml" in line
    assert knobs() == before


def test_refuses_a_tuning_policy(tiny):
    p = tiny()
    p.write_text(p.read_text() + "policy: {name: ksmtuned}\n")
    r = vmhost("density", str(p), "--oracle")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "policy.name" in r.stderr


def test_refuses_while_another_process_uses_ksm(tiny):
    """A process with mergeable memory: the oracle must not touch KSM at all."""
    code = ("import mmap, ctypes, sys, time\n"
            "m = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)\n"
            "m.write(b'x' * (1 << 20))\n"
            "m.madvise(mmap.MADV_MERGEABLE)\n"
            "print('ready', flush=True)\n"
            "sys.stdin.read()\n")
    hold = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert hold.stdout.readline().strip() == "ready"
        before = knobs()
        r = vmhost("density", str(tiny()), "--oracle")
        assert r.returncode == 2
        assert r.stderr.count("\n") == 1 and "already use KSM" in r.stderr
        assert knobs() == before
    finally:
        hold.stdin.close()
        hold.wait(timeout=10)


def _interrupted(config, sig_target, sig):
    before = knobs()
    proc = subprocess.Popen([sys.executable, "-m", "vmhost.cli", "density", str(config), "--oracle"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ctrl_c_reaches_it)
    # wait until the first step is done and the second guest is being merged
    end = time.monotonic() + 400
    first = ""
    while time.monotonic() < end and not first.startswith("oracle: 1 guests"):
        ready, _, _ = select.select([proc.stderr], [], [], 1.0)
        if ready:
            first = proc.stderr.readline()
            if not first:
                break
    assert proc.poll() is None and first.startswith("oracle: 1 guests"), "the oracle did not start"
    time.sleep(1.0)
    pids = descendants(proc.pid)
    assert len(pids) >= 3           # the driver and two guests
    if sig_target == "cli":
        proc.send_signal(sig)
    else:   # the driver: the CLI process's child in its own session
        driver = next(p for p in pids if Path(f"/proc/{p}/cmdline").read_bytes().find(b"--driver") > 0)
        os.kill(driver, sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert not [p for p in pids if alive(p)], "an oracle process survived"
    at_rest(pids)
    assert knobs() == before
    return err


def test_ctrl_c_leaves_no_process_and_ksm_at_rest(tiny):
    _interrupted(tiny(count=6), "cli", signal.SIGINT)


def test_a_killed_driver_leaves_no_process_and_ksm_at_rest(tiny):
    err = _interrupted(tiny(count=6), "driver", signal.SIGKILL)
    assert err.strip().splitlines()[-1].startswith("vmhost: density oracle: the oracle's driver died")


def test_small_comparison_emulator_against_kernel(tmp_path):
    """The CI check: 2 x 1 GiB VDI clones on the kernel and in the emulator at resolution 1.

    Held here: the result has the emulator's schema and renders as its report; pages_sharing
    (2%) and used memory (1%) agree at every step's steady state (smart_scan 0: every pass
    visits every page, so the kernel is repeatable there). Time to X% and ksmd's CPU share are
    compared and reported, not held here: the full-scale table measures them on repeated runs.
    """
    before = knobs()
    report = tmp_path / "report"
    r = vmhost("density", str(SMALL), "--oracle", "--compare", "--json", "--quiet", "--report", str(report))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    emu, (ker,) = doc["emulator"], doc["kernel"]
    assert knobs() == before
    at_rest()
    # the same schema as an emulator run, and its report
    assert set(emu) - {"wall_s"} <= set(ker)
    for es, ks in zip(emu["steps"], ker["steps"]):
        assert set(es) <= set(ks)
    assert (report / "report.html").is_file() and (report / "result.json").is_file()
    assert "kernel" in ker["covers"] and "swap" in ker["covers"]
    assert [s["guests"] for s in ker["steps"]] == [1, 2]
    assert all(s["steady"] for s in ker["steps"])
    # both sides stop by the one settle rule (vmhost/density/settle.py), over the same window
    from vmhost.density import load_density
    from vmhost.density.settle import SettleRule
    rule = SettleRule.of(load_density(SMALL))
    for s in ker["steps"] + emu["steps"]:
        assert s["settled_by"] == rule.settled_by() and s["full_scans"] > rule.window
    for s in ker["steps"]:             # the kernel's every full scan seen, none missed between polls
        seen = [h["full_scans"] for h in s["kernel"]["scans"]]
        assert seen and seen == list(range(seen[0], seen[0] + s["full_scans"] + 1))
    # the kernel merged: the second clone shares most of its pages with the first
    assert ker["steps"][1]["pages_sharing"] > 0.5 * 262144 * 0.5
    cmp = compare(emu, [ker])
    s1, s2 = cmp["steps"]
    for s in (s1, s2):
        assert abs(s["pages_sharing"]["err"]) <= 0.02
        assert abs(s["used_pages"]["err"]) <= 0.01
    # ksm_stat of each guest was read: their merging pages add up to the global counter
    procs = ker["steps"][1]["kernel"]["procs"]
    assert len(procs) == 2
    merged = ker["steps"][1]["pages_sharing"] + ker["steps"][1]["pages_shared"]
    assert abs(sum(p["ksm_merging_pages"] for p in procs.values()) - merged) <= 0.005 * merged
