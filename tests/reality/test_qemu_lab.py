"""The QEMU lab on real guests (TCG), and the host's real KSM merging three live guests.

Every project machine has QEMU, the Debian kernel package and root (docs/platform.md section 2), so
nothing here skips. Budget: one lab guest (about 6 s) and one three-guest KSM measurement
(about 30 s: boot, dumps, convergence).
"""

import fcntl
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT

from guests import dumps
from vmhost.reality import lab
from vmhost.reality import live_ksm
from vmhost.reality import ksm_oracle as oracle
from vmhost.reality.guard import alive

pytestmark = [pytest.mark.kernel, pytest.mark.qemu]

# docs/platform.md section 2, measured on this kind of machine
REF_PAGES_SHARED = 7167
REF_PAGES_SHARING = 36700
REF_IDEAL_SHARING = 36341


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """One real-KSM measurement of three identical 128 MiB guests, shared by the tests."""
    d = tmp_path_factory.mktemp("live")
    return live_ksm.measure(guests=3, mem_mib=128, dump_dir=d, timeout=90)


def test_real_ksm_on_three_guests_is_in_the_calibrated_band(live):
    assert live["converged"], live["samples"][-3:]
    assert abs(live["pages_sharing"] - REF_PAGES_SHARING) <= 0.2 * REF_PAGES_SHARING
    assert abs(live["pages_shared"] - REF_PAGES_SHARED) <= 0.2 * REF_PAGES_SHARED
    assert live["seconds_to_converge"] < 60
    # every merged page is accounted to the three guests
    merging = sum(p["ksm_merging_pages"] for p in live["processes"].values())
    assert merging == live["pages_shared"] + live["pages_sharing"]


def test_ksm_and_qemu_at_rest_after_measurement(live):
    assert not any(alive(pid) for pid in live["pids"].values())
    # other KSM users on this machine take the oracle's lock: hold it while looking
    fd = os.open(oracle.LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert oracle.read_knob("run") == "0"
        assert oracle.ksm_leftovers() == {}
        assert oracle.read_knob("pages_to_scan") == "100"
        assert oracle.read_knob("sleep_millisecs") == "20"
    finally:
        os.close(fd)


def test_dumps_of_live_guests_zero_fraction_and_ideal_sharing(live):
    assert len(live["zero_fraction"]) == 3
    for z in live["zero_fraction"]:
        assert 0.25 <= z <= 0.45
    ideal = live["ideal"]["total"]
    assert abs(ideal["ideal_sharing"] - REF_IDEAL_SHARING) <= 0.2 * REF_IDEAL_SHARING
    # a perfect merger of non-zero pages saves about what the kernel saved
    assert abs(ideal["ideal_sharing"] - live["pages_sharing"]) <= 0.1 * live["pages_sharing"]


def test_elf_and_raw_dump_of_the_same_paused_moment_agree(live):
    for elf, raw in live["dumps"]:
        a = dumps.fingerprint_dump(elf, "elf")
        b = dumps.fingerprint_dump(raw, "raw", jobs=2)
        assert a.pages == b.pages == (128 << 20) // 4096 - 96   # minus 0xa0000-0xfffff
        assert np.array_equal(a.pfn, b.pfn)
        assert np.array_equal(a.fingerprint, b.fingerprint)
        assert np.array_equal(a.zero, b.zero)
        skipped = {s["paddr"]: s for s in a.header["skipped"]}
        assert 0xFD000000 in skipped and skipped[0xFD000000]["bytes"] == 16 << 20
        assert 0xFFFC0000 in skipped


def test_cli_imports_a_real_elf_dump(live, tmp_path):
    elf = live["dumps"][0][0]
    r = subprocess.run([sys.executable, "-m", "vmhost.cli", "guests", "import", elf, "-o",
                        tmp_path / "g0.img", "--json"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    image = dumps.load_fingerprints(tmp_path / "g0.img")
    assert image.header["source"]["format"] == "elf"
    assert image.header["low_ram_end"] == 128 << 20


def test_lab_guest_without_mem_merge_dumps_and_is_cleaned_up(tmp_path):
    work = tmp_path / 'dir with space and "quote"'     # exercises HMP file name quoting
    with lab.Lab(workdir=work, mem_mib=128) as the_lab:
        g, = the_lab.boot(1)
        assert g.boot_seconds is not None and g.boot_seconds < 60
        stat = oracle.read_ksm_stat(g.pid)
        assert stat.get("ksm_mergeable", "no").split() != ["yes"]   # mem-merge=off
        raw = g.dump_raw(work / "g.raw")
        assert raw.stat().st_size == 128 << 20
        status = g.qmp.execute("query-status")
        assert status["running"] is True
        pid = g.pid
    assert not alive(pid)
    image = dumps.fingerprint_dump(raw)
    assert 0.1 < image.header["stats"]["zero_fraction"] < 0.9


def test_lab_kills_guests_when_the_block_fails(tmp_path):
    pids = []
    with pytest.raises(RuntimeError, match="boom"):
        with lab.Lab(workdir=tmp_path, mem_mib=128) as the_lab:
            g = the_lab.start()          # not even waited for
            pids.append(g.pid)
            raise RuntimeError("boom")
    assert pids and not any(alive(p) for p in pids)


def test_hmp_quote():
    assert lab.hmp_quote('/a b/"c"\\d') == '"/a b/\\"c\\"\\\\d"'
