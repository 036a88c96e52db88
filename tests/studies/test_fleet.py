"""``vmhost fleet``: placement computed by hand, the savings estimate against exact merging, real
Dask runs (a local cluster, an existing scheduler, a worker killed mid-run, an interrupted run
resumed), bad configs, and the examples in configs/."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from guests.images import catalog
from helpers import ROOT, UNIT_KERNEL_HALF, ctrl_c_reaches_it
from vmhost.cli import main
from vmhost.fleet.config import load_fleet, parse_fleet
from vmhost.fleet.estimate import HostEstimate, savings_profile
from vmhost.fleet.placement import place
from vmhost.fleet.runner import run_fleet
from vmhost.fleet.tasks import TASK_LOG_ENV, ResultStore

EXAMPLES = sorted((ROOT / "configs").glob("fleet-*.yaml"))

# 4 MiB = 1024 pages: 512 kernel pages, the same in every guest of a domain and written at
# boot; 512 zero pages never touched. Alone it saves nothing; next to one of its domain, 512.
UNIT_IMAGE = UNIT_KERNEL_HALF + """\
  zero: {boot: {touched: 0.0}}
"""
# The same, but it zeroes its other half at boot (as Windows does): 1024 pages written at boot,
# of which 512 zero pages merge; next to one of its domain it costs nothing at all.
ZEROING_IMAGE = UNIT_IMAGE.replace("name: unit", "name: zeroing").replace("touched: 0.0", "touched: 1.0")
HOST_16M = {"thp": "never", "block_size": "1MiB", "nodes": [{"memory": "16MiB", "cpus": 1}]}

# A small real fleet: 12 VMs of 1 GiB on 4 GiB hosts, simulated at 1/1024 (a VM is 256 pages).
SMALL = """\
hosts:
  - name: small
    host: {thp: never, block_size: 128MiB, nodes: [{memory: 4GiB, cpus: 4}]}
    ksm: {pages_to_scan: 1000, sleep_millisecs: 20, run: 1}
inventory:
  generate:
    count: 12
    seed: 3
    mix:
      - {image: linux-server, memory: 1GiB, domain: web, name: web}
      - {image: desktop-vdi, memory: 1GiB, domain: vdi, name: vdi}
placement: {policy: sharing-aware, reserve: 0}
simulation: {resolution: 1024, settle: {scans: 2, tolerance: 0.01, max_scans: 8}}
sweep: {key: placement.policy, values: [first-fit, sharing-aware]}
"""


def vmhost(*args):
    return subprocess.run([sys.executable, "-m", "vmhost.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT)


def fleet_of(tmp_path, vms, policy, boot="staggered", models=None):
    (tmp_path / "unit.yaml").write_text(UNIT_IMAGE)
    (tmp_path / "zeroing.yaml").write_text(ZEROING_IMAGE)
    doc = {"hosts": models or [{"name": "h", "host": HOST_16M}], "inventory": {"vms": vms},
           "placement": {"policy": policy, "reserve": 0}, "simulation": {"boot": boot}}
    return parse_fleet(doc, str(tmp_path / "fleet.yaml")).scenarios[0]


def hosts_of(scn, pl):
    return [[scn.vms[i].name for i in h.vms] for h in pl.hosts]


def without_timing(res):
    """A result without what differs between runs of the same tasks (times, how they ran)."""
    return {**{k: v for k, v in res.items() if k not in ("run", "hosts")},
            "hosts": [{k: v for k, v in h.items() if k != "wall_s"} for h in res["hosts"]]}


# ------------------------------------------------------------------------------------------
# placement, by hand

def test_room(tmp_path):
    scn = fleet_of(tmp_path, [{"image": "unit.yaml"}], "first-fit")
    # 16 MiB = 4096 pages; the kernel keeps its high watermark free: min_free_kbytes =
    # sqrt(16 x 16384) = 512 KiB = 128 pages, high = min + 2 x max(128 / 4, 4096 / 1000) = 192
    assert scn.room_pages == {0: 4096 - 192}


def test_first_fit_by_configured_memory(tmp_path):
    vms = [{"image": "unit.yaml", "memory": f"{m}MiB", "name": n}
           for n, m in (("a", 8), ("b", 4), ("c", 8), ("d", 3), ("e", 3))]
    scn = fleet_of(tmp_path, vms, "first-fit")
    # room 3904 pages: a + b = 3072; c (2048) opens host 1; d (768) fills host 0 to 3840;
    # e no longer fits there and joins c
    assert hosts_of(scn, place(scn)) == [["a-1", "b-1", "d-1"], ["c-1", "e-1"]]


def test_first_fit_ksm_credits_the_shared_kernel(tmp_path):
    scn = fleet_of(tmp_path, [{"image": "unit.yaml", "memory": "4MiB", "count": 10}], "first-fit-ksm")
    pl = place(scn)
    # the first guest costs 1024 pages, each next one 1024 - 512: 1024 + 5 x 512 <= 3904
    assert [len(h.vms) for h in pl.hosts] == [6, 4]
    assert pl.hosts[0].charged_pages == 3584 and pl.hosts[0].estimate.saved == 5 * 512
    ff = fleet_of(tmp_path, [{"image": "unit.yaml", "memory": "4MiB", "count": 10}], "first-fit")
    assert [len(h.vms) for h in place(ff).hosts] == [3, 3, 3, 1]


def test_boot_transient(tmp_path):
    vms = [{"image": "zeroing.yaml", "memory": "4MiB", "count": 10}]
    # staggered: the first guest costs 512 (its zero half merges), every next one nothing at
    # steady state; each boot needs 1024 pages on top of the merged guests: all ten fit
    assert [len(h.vms) for h in place(fleet_of(tmp_path, vms, "first-fit-ksm")).hosts] == [10]
    # booted together, nothing is merged yet: three guests' 3 x 1024 boot pages fill a host
    together = fleet_of(tmp_path, vms, "first-fit-ksm", boot="together")
    assert [len(h.vms) for h in place(together).hosts] == [3, 3, 3, 1]


def test_sharing_aware_groups_by_image_and_domain(tmp_path):
    vms = [{"image": "unit.yaml", "memory": "4MiB", "domain": d, "name": d} for _ in range(3) for d in "abc"]
    ff = fleet_of(tmp_path, vms, "first-fit-ksm")
    # interleaved a, b, c: host 0 takes a b c (3 x 1024) + a (512); b then opens host 1, and
    # the last c, sharing with both hosts, fits neither (3584 + 512 > 3904)
    assert hosts_of(ff, place(ff)) == [["a-1", "b-1", "c-1", "a-2"], ["b-2", "c-2", "a-3", "b-3"],
                                       ["c-3"]]
    sa = fleet_of(tmp_path, vms, "sharing-aware")
    # grouped: a a a (1024 + 2 x 512) + b b (1024 + 512) fill host 0; b c c c fit host 1
    assert hosts_of(sa, place(sa)) == [["a-1", "a-2", "a-3", "b-1", "b-2"], ["b-3", "c-1", "c-2", "c-3"]]


def test_host_models_in_order_and_unplaced(tmp_path):
    models = [{"name": "small", "count": 1, "host": {**HOST_16M, "nodes": [{"memory": "8MiB"}]}},
              {"name": "big", "count": 1, "host": HOST_16M}]
    vms = [{"image": "unit.yaml", "memory": "11MiB", "name": "large"},
           {"image": "unit.yaml", "memory": "4MiB", "count": 6, "name": "s"}]
    scn = fleet_of(tmp_path, vms, "first-fit", models=models)
    assert scn.room_pages == {0: 2048 - 134, 1: 4096 - 192}
    pl = place(scn)
    # the 11 MiB VM fits no small host: it opens the big one, which s-1 fills; s-2 opens the
    # small one ...
    assert [(scn.models[h.model].name, [scn.vms[i].name for i in h.vms]) for h in pl.hosts] == \
        [("big", ["large-1", "s-1"]), ("small", ["s-2"])]
    # ... and with no host left, the rest stays unplaced
    assert [scn.vms[i].name for i in pl.unplaced] == ["s-3", "s-4", "s-5", "s-6"]


@pytest.mark.parametrize("name", ["linux-server", "windows-server", "desktop-vdi", "jvm-appserver",
                                  "tiny-linux"])
def test_estimate_matches_exact_merging(name):
    """The estimate from class parameters against every identical page of the guests' actual
    contents merged (pages written at boot and not rewritten later); it errs low, by little."""
    img = catalog()[name]
    for domains in ("aa", "ab", "aaaa"):
        mems = [img.instantiate(f"g{i}", seed=i + 1, domain=d, memory_mib=1024) for i, d in enumerate(domains)]
        contents = []
        for m in mems:
            keep = m.touched.copy()
            for _cls, hot, _rate in m.steady:
                keep[hot] = False
            contents.append(m.content[keep])
        c = np.concatenate(contents)
        nz = c[c != 0]
        exact = len(nz) - len(np.unique(nz)) + int(np.count_nonzero(c == 0))
        est = HostEstimate()
        for d in domains:
            est.add(savings_profile(img, 1024, d, mergeable=True))
        assert 0.9 * exact <= est.saved <= 1.001 * exact + 1, (domains, exact, est.saved)


# ------------------------------------------------------------------------------------------
# Dask

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A real local Dask cluster (two worker processes) whose workers log every task they run."""
    from distributed import LocalCluster
    log = tmp_path_factory.mktemp("fleet") / "tasks.log"
    log.touch()
    old = os.environ.get(TASK_LOG_ENV)
    os.environ[TASK_LOG_ENV] = str(log)
    try:
        with LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                          dashboard_address=None) as c:
            yield c, log
    finally:
        if old is None:
            os.environ.pop(TASK_LOG_ENV, None)
        else:
            os.environ[TASK_LOG_ENV] = old


def connect(c):
    from distributed import Client
    return lambda: Client(c)


def runs_of(log: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in log.read_text().splitlines():
        counts[line.split()[0]] = counts.get(line.split()[0], 0) + 1
    return counts


@pytest.fixture
def small(tmp_path):
    p = tmp_path / "small.yaml"
    p.write_text(SMALL)
    return p


def test_existing_scheduler(cluster, small, tmp_path):
    c, log = cluster
    r = vmhost("fleet", small, "--scheduler", c.scheduler_address, "--state", tmp_path / "state",
               "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    res = json.loads(r.stdout)
    assert res["run"]["scheduler"] == c.scheduler_address and res["run"]["workers"] == 2
    assert res["run"]["computed"] == res["run"]["tasks"] == len(res["hosts"]) > 0
    ran = runs_of(log)
    assert all(ran.get(h["task"]) for h in res["hosts"])       # on the cluster's workers
    for s in res["scenarios"]:
        assert s["vms_placed"] == 12 and s["hosts_needed"] >= 3
        assert 0 < s["saved_pages"] < s["no_ksm_pages"] and not s["oom_kills"]
    # the same command again computes nothing
    again = json.loads(vmhost("fleet", small, "--scheduler", c.scheduler_address, "--state",
                              tmp_path / "state", "--json", "--quiet").stdout)
    assert again["run"]["resumed"] == again["run"]["tasks"] and again["run"]["computed"] == 0
    assert without_timing(again) == without_timing(res)


def test_killed_worker_keeps_finished_results(cluster, small, tmp_path):
    from distributed import Client
    c, log = cluster
    fleet = load_fleet(small)
    with Client(c) as client:
        pids = client.run(os.getpid)
    before = runs_of(log)
    finished: list[str] = []
    killed: list[int] = []
    saved_before_kill: list[str] = []

    def on_result(key, record):
        finished.append(key)
        if len(finished) == 2:
            pid = next(iter(pids.values()))
            os.kill(pid, signal.SIGKILL)      # a worker dies mid-run (the other one is busy too)
            killed.append(pid)
            saved_before_kill.extend(finished)

    res = run_fleet(fleet, ResultStore(tmp_path / "state"), connect(c), quiet=True, on_result=on_result)
    assert killed and res["run"]["computed"] == res["run"]["tasks"]
    ran = runs_of(log)
    runs = {k: ran.get(k, 0) - before.get(k, 0) for k in ran}
    assert all(runs[k] == 1 for k in saved_before_kill)        # never recomputed
    assert set(h["task"] for h in res["hosts"]) <= set(runs)     # every host was simulated
    assert all((tmp_path / "state" / f"{h['task']}.json").is_file() for h in res["hosts"])
    with Client(c) as client:
        assert killed[0] not in client.run(os.getpid).values()  # the nanny started a new worker


def test_interrupted_run_resumes(cluster, small, tmp_path):
    c, _log = cluster
    state = tmp_path / "state"
    # a run on its own local cluster (the default), interrupted after two finished hosts
    proc = subprocess.Popen([sys.executable, "-m", "vmhost.cli", "fleet", str(small), "--workers", "1",
                             "--state", str(state), "--quiet"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=ctrl_c_reaches_it)
    deadline = time.monotonic() + 60
    while len(list(state.glob("*.json"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert out == "" and "interrupted" in err and str(state) in err
    done = len(list(state.glob("*.json")))
    # run again: what was finished is resumed, the rest computed
    r = vmhost("fleet", small, "--scheduler", c.scheduler_address, "--state", state, "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["run"]["resumed"] == done and 2 <= done < res["run"]["tasks"]
    assert res["run"]["computed"] == res["run"]["tasks"] - done
    # and the result is the one an uninterrupted run gives
    fresh = run_fleet(load_fleet(small), ResultStore(tmp_path / "fresh"), connect(c), quiet=True)
    assert fresh["run"]["resumed"] == 0
    assert without_timing(res) == without_timing(fresh)


# ------------------------------------------------------------------------------------------
# bad input: one line naming the file, the key path and the reason; exit 2; nothing written

def _bad(tmp_path, capsys, edit, *extra):
    doc = yaml.safe_load(SMALL)
    edit(doc)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(doc))
    rc = main(["fleet", str(p), "--state", str(tmp_path / "state"), "--report", str(tmp_path / "out"), *extra])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"vmhost: {p}: ")
    assert not (tmp_path / "state").exists() and not (tmp_path / "out").exists()
    return err[len(f"vmhost: {p}: "):].strip()


def test_bad_configs(tmp_path, capsys):
    def unknown_key(d):
        d["hosts"][0]["host"]["nodez"] = []
    assert _bad(tmp_path, capsys, unknown_key).startswith("hosts[0].host.nodez: unknown key")

    def bad_value(d):
        d["placement"]["policy"] = "best-fit"
    assert _bad(tmp_path, capsys, bad_value).startswith("placement.policy: 'best-fit' is not one of")

    def bad_knob(d):
        d["hosts"][0]["ksm"]["pages_to_scan"] = -1
    assert _bad(tmp_path, capsys, bad_knob).startswith("hosts[0].ksm.pages_to_scan: ")

    def bad_sweep_key(d):
        d["sweep"]["key"] = "hosts[1].ksm.run"
    assert _bad(tmp_path, capsys, bad_sweep_key) == "sweep.key: hosts[1] does not exist (hosts has 1 entries)"

    def bad_sweep_value(d):
        d["sweep"]["values"] = ["first-fit", "worst-fit"]
    assert _bad(tmp_path, capsys, bad_sweep_value).startswith(
        "sweep.values[1]: placement.policy: 'worst-fit' is not one of")

    def missing_inventory_file(d):
        d["inventory"]["libvirt"] = [{"file": "nope.yaml", "image": "linux-server"}]
    assert _bad(tmp_path, capsys, missing_inventory_file) == "inventory.libvirt[0].file: no such file 'nope.yaml'"

    def too_big(d):
        d["inventory"]["generate"]["mix"][0]["memory"] = "8GiB"
    assert _bad(tmp_path, capsys, too_big).startswith("inventory.generate.mix[0]: VM web-")

    def same_model_name(d):
        d["hosts"].append(dict(d["hosts"][0]))
    assert _bad(tmp_path, capsys, same_model_name).startswith("hosts[1].name: two host models are named ")

    def resolution(d):
        d["simulation"]["resolution"] = 3
    assert _bad(tmp_path, capsys, resolution).startswith("simulation.resolution: 3 does not divide")


def test_bad_config_exit_status(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(SMALL.replace("reserve: 0", "reserve: 100%"))
    r = vmhost("fleet", p, "--state", tmp_path / "state")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"vmhost: {p}: placement.reserve: 100% is out of range [0%, 100%)\n"
    assert not (tmp_path / "state").exists()


@pytest.mark.libvirt
def test_inventory_from_libvirt_import(tmp_path):
    hv = tmp_path / "hv01.yaml"
    assert main(["import", "libvirt", "--uri", f"test://{ROOT}/tests/libvirt/node.xml", "-o", str(hv)]) == 0
    doc = yaml.safe_load(SMALL)
    doc["inventory"] = {"libvirt": [{"file": "hv01.yaml", "image": "linux-server", "state": "all"}]}
    doc["simulation"]["resolution"] = 1
    doc["hosts"][0]["host"]["nodes"][0]["memory"] = "8GiB"       # db has 6 GiB
    scn = parse_fleet(doc, str(tmp_path / "fleet.yaml")).scenarios[0]
    guests = {g["name"]: g for g in yaml.safe_load(hv.read_text())["guests"]}
    assert [vm.name for vm in scn.vms] == list(guests)
    for vm in scn.vms:
        g = guests[vm.name]
        assert vm.memory_mib == g["memory_mib"] and vm.image == "linux-server"
        assert vm.nosharepages == (g["nosharepages"] or g["hugepages"])
        assert vm.locked == (g["locked"] or g["hugepages"])
    assert sum(len(h.vms) for h in place(scn).hosts) == len(scn.vms)


# ------------------------------------------------------------------------------------------
# the examples

@pytest.fixture(scope="module")
def example_results(cluster, tmp_path_factory):
    c, _log = cluster
    out = {}
    for ex in EXAMPLES:
        d = tmp_path_factory.mktemp(ex.stem)
        r = vmhost("fleet", ex, "--scheduler", c.scheduler_address, "--state", d / "state",
                   "--report", d / "report", "--json", "--quiet")
        assert r.returncode == 0, r.stderr
        out[ex.name] = (json.loads(r.stdout), d / "report")
    return out


@pytest.mark.parametrize("example", [p.name for p in EXAMPLES])
def test_examples_run(example_results, example):
    res, report = example_results[example]
    assert sorted(p.name for p in report.iterdir()) == ["hosts.csv", "report.html", "report.txt",
                                                        "result.json", "scenarios.csv"]
    html = (report / "report.html").read_text()
    assert "<svg" in html and "Hosts needed per scenario" in html and "://" not in html   # offline
    assert json.loads((report / "result.json").read_text()) == res
    assert len(res["scenarios"]) > 1
    for s in res["scenarios"]:
        assert s["vms_placed"] == s["vms"] and not s["oom_kills"] and s["saved_pages"] > 0
        assert s["hosts_needed"] == len([h for h in res["hosts"] if h["scenario"] == s["name"]])


def test_sharing_aware_needs_fewer_hosts(example_results):
    """On the mixed inventory, placed and simulated: fewer hosts than first-fit, and no more
    than first-fit-ksm, none of them short of memory; and more saved than either."""
    res, _ = example_results["fleet-mixed.yaml"]
    by = {s["policy"]: s for s in res["scenarios"]}
    sa = by["sharing-aware"]
    assert sa["hosts_needed"] < by["first-fit"]["hosts_needed"]
    assert sa["hosts_needed"] <= by["first-fit-ksm"]["hosts_needed"]
    assert sa["vms_placed"] == sa["vms"] and not sa["oom_kills"]
    assert sa["swapin_pages"] == sa["swapout_pages"] == 0
    assert sa["saved_pages"] > max(by["first-fit"]["saved_pages"], by["first-fit-ksm"]["saved_pages"])


def test_bench_fleet_small():
    r = vmhost("bench", "fleet", "--hosts", 2, "--scenarios", 2, "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["hosts_per_scenario"] == [2, 2] and res["distinct_tasks"] == 4
    assert [x["workers"] for x in res["runs"]] == [1, 2] and res["identical_results"]
    assert all(x["tasks"] == 4 and x["tasks_per_s"] > 0 for x in res["runs"])


def test_staggered_boot_settles_after_every_vm():
    """More VMs than the density search's stride threshold: still one VM, then KSM, each."""
    from vmhost.hostsim import VmSpec, simulate_host
    doc = {"host": {"thp": "never", "block_size": "16MiB", "nodes": [{"memory": "4GiB", "cpus": 4}]},
           "ksm": {"pages_to_scan": 4000, "run": 1}}
    vms = [VmSpec(f"vm{i}", "tiny-linux", 128) for i in range(12)]
    step = simulate_host(doc, vms, resolution=8, boot="staggered")
    assert step["guests"] == 12 and step["not_booted"] == [] and step["booted"] == 1
    together = simulate_host(doc, vms, resolution=8, boot="together")
    assert step["no_ksm_pages"] == together["no_ksm_pages"]
