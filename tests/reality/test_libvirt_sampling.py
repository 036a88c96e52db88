"""`vmhost import libvirt --sample DIR` against a real libvirtd running real QEMU (TCG) guests.

The fixture (vmhost.reality.libvirt_lab) starts virtlogd and libvirtd by hand (there is no
systemd), boots two of the QEMU lab's guests as qemu:///system domains (QEMU runs as
libvirt-qemu), and on the way out destroys them and stops the daemons it started, by pid.
Both guests run the lab's known writer (4 MiB/s over a 40 MiB file), so that two samplings
some seconds apart measure it. Budget: about 15 s to start, 5 s a sampling, 5 s to stop.
"""

import subprocess
from pathlib import Path

import pytest
import yaml

from guests import dumps
from helpers import one_line_exit_2, vmhost
from vmhost.fleet.config import parse_fleet
from vmhost.reality.guard import alive
from vmhost.reality.lab import writer_rate
from vmhost.reality.libvirt_lab import LibvirtLab

pytestmark = [pytest.mark.libvirt, pytest.mark.qemu]
WRITE_KIB_S, HOT_KIB = 4096, 40960


@pytest.fixture(scope="module")
def lab():
    with LibvirtLab(guests=2, write_kib_s=WRITE_KIB_S, hot_kib=HOT_KIB) as lab:
        yield lab
    # the daemons this fixture started and the guests' QEMU processes are gone
    assert not any(alive(p) for p in lab.info["started"]), lab.info
    assert not any(alive(p) for p in lab.info.get("qemu_pids", []))


@pytest.fixture(scope="module")
def sampled(lab, tmp_path_factory):
    d = tmp_path_factory.mktemp("sampled")
    pids = {}
    for name in lab.domains:
        pid = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text())
        pids[name] = pid
    lab.info["qemu_pids"] = list(pids.values())
    r = vmhost("import", "libvirt", "--uri", lab.uri, "-o", d / "host.yaml", "--sample", d / "samples")
    return d, r, pids


def test_guests_run_as_libvirt_qemu_under_tcg(lab, sampled):
    _d, _r, pids = sampled
    for name, pid in pids.items():
        status = Path(f"/proc/{pid}/status").read_text()
        uid = int(next(l for l in status.splitlines() if l.startswith("Uid:")).split()[1])
        assert uid == int(subprocess.check_output(["id", "-u", "libvirt-qemu"]))
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"tcg" in b" ".join(cmdline), cmdline


def test_import_libvirt_samples_every_running_domain(lab, sampled):
    d, r, _pids = sampled
    assert r.returncode == 0, r.stderr
    assert f"{len(lab.domains)} sampled into" in r.stdout
    doc = yaml.safe_load((d / "host.yaml").read_text())
    guests = {g["name"]: g for g in doc["guests"]}
    assert set(lab.domains) <= set(guests)
    images = []
    for name in lab.domains:
        assert guests[name]["image"] == f"samples/{name}.vmimg"
        im = dumps.load_fingerprints(d / "samples" / f"{name}.vmimg")
        # a memory-only ELF core of a 128 MiB PC guest: its RAM pages, a third of them zero
        assert im.header["source"]["format"] == "elf" and im.pages == 32768 - 96
        assert 0.1 < im.stats()["zero_fraction"] < 0.45     # the writer's file fills a third
        images.append(im)
    # no dump left behind, only the images
    assert sorted(p.name for p in (d / "samples").iterdir()) == sorted(f"{n}.vmimg" for n in lab.domains)
    # two guests of one kernel and initramfs: thousands of pages in common, by content
    assert dumps.cross_sharing(images)["inter_sharing"] > 5000


def test_a_fleet_reads_the_sampled_host_with_its_images(lab, sampled, tmp_path):
    d, r, _pids = sampled
    assert r.returncode == 0, r.stderr
    doc = {"hosts": [{"name": "h", "host": {"thp": "never", "block_size": "4MiB",
                                            "nodes": [{"memory": "1GiB", "cpus": 2}]}}],
           "inventory": {"libvirt": [{"file": str(d / "host.yaml")}]},
           "placement": {"policy": "first-fit", "reserve": 0}}
    scn = parse_fleet(doc, str(tmp_path / "fleet.yaml")).scenarios[0]
    refs = {vm.name: vm.image for vm in scn.vms}
    for name in lab.domains:
        assert refs[name] == str(d / "samples" / f"{name}.vmimg")
        assert scn.vms[[v.name for v in scn.vms].index(name)].nosharepages   # <nosharepages/>


def test_two_samplings_give_a_profile_with_the_guests_write_rate(lab, sampled, tmp_path):
    import json
    import time
    d, r, _pids = sampled
    assert r.returncode == 0, r.stderr
    first = max(p.stat().st_mtime for p in (d / "samples").iterdir())
    time.sleep(max(0.0, first + 6 - time.time()))
    again = vmhost("import", "libvirt", "--uri", lab.uri, "-o", tmp_path / "later.yaml",
                   "--sample", tmp_path / "later")
    assert again.returncode == 0, again.stderr
    pairs = []
    for name in lab.domains:
        pairs += ["--later", d / "samples" / f"{name}.vmimg", tmp_path / "later" / f"{name}.vmimg"]
    r = vmhost("guests", "profile", *pairs, "-o", tmp_path / "p.yaml", "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)["profile"]["expect"]["measured"]
    # each domain's two samples are one VM, and its writer is measured: what the writers say
    # on their consoles they wrote (they fall behind WRITE_KIB_S when the host is short of CPU)
    assert m["vms"] == 2 and m["dumps"] == 4
    wrote = [writer_rate(Path(f"/var/log/libvirt/qemu/{n}-serial.log").read_text(errors="replace"),
                         6.0) for n in lab.domains]
    mean = sum(wrote) / len(wrote)
    assert 0.3 * WRITE_KIB_S <= mean <= 1.1 * WRITE_KIB_S, wrote
    assert abs(m["write_rate_pages_s"] - mean / 4) <= 0.2 * mean / 4, (m, wrote)


def test_bad_uris_and_sample_dirs_end_with_one_line(lab, tmp_path):
    out = tmp_path / "h.yaml"
    one_line_exit_2(vmhost("import", "libvirt", "--uri", "qemu+unix:///system?socket=/nonexistent",
                           "-o", out, "--sample", tmp_path / "s"), "qemu+unix:///system", "cannot connect")
    one_line_exit_2(vmhost("import", "libvirt", "--uri", "nosuchdriver:///x", "-o", out,
                           "--sample", tmp_path / "s"), "nosuchdriver:///x")
    # the test driver cannot dump memory: one line naming the domain, and nothing written
    one_line_exit_2(vmhost("import", "libvirt", "--uri", "test:///default", "-o", out,
                           "--sample", tmp_path / "s"), "test:///default", "domain 'test'",
                    "coreDumpWithFormat")
    assert not out.exists() and not (tmp_path / "s").exists()
    afile = tmp_path / "file"
    afile.write_text("x")
    one_line_exit_2(vmhost("import", "libvirt", "--uri", lab.uri, "-o", out, "--sample", afile),
                    str(afile), "not a directory")
    one_line_exit_2(vmhost("import", "libvirt", "--uri", lab.uri, "-o", out, "--sample",
                           tmp_path / "no" / "s"), "does not exist")
    one_line_exit_2(vmhost("import", "libvirt", "--uri", lab.uri, "-o", out, "--keep-dumps"),
                    "--keep-dumps needs --sample")
    assert not out.exists()
