"""Fleet throughput on Dask: the same host simulations on 1 worker and on 2, side by side.

The fleet: ``hosts`` 16 GiB hosts, each holding three 4 GiB VMs (Linux servers, Windows servers
and VDI desktops, in separate sharing domains, drawn at random) placed first-fit, swept over
ksmd's ``sleep_millisecs`` (20, 50, 100 ms, ...) so that every scenario's tasks differ: ``hosts x
scenarios`` distinct tasks, each one real host simulation (three staggered boots, KSM to steady
state) at 1/4096 of its pages. Every worker count runs every task, from an empty result store,
on a fresh local cluster whose workers have each run one simulation first (imports and the
compiled scan loaded: what a long run pays once per worker is not what it is measured for).
Reported per worker count: wall time, tasks per second, the mean task time; then the speed-up
and whether both runs computed identical results (the simulation is deterministic), and the
machine's load before the runs (a speed-up needs CPUs nobody else is using).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time

from guests.errors import InputError
from vmhost.fleet.config import parse_fleet
from vmhost.fleet.runner import dask_client, plan, run_tasks
from vmhost.fleet.tasks import ResultStore, run_host_task

SLEEPS_MS = (20, 50, 100, 200, 500, 1000)
HOST = {"name": "std",
        "host": {"thp": "never", "block_size": "128MiB", "nodes": [{"memory": "16GiB", "cpus": 16}]},
        "ksm": {"pages_to_scan": 1000, "sleep_millisecs": 20, "run": 1}}
MIX = [{"image": "linux-server", "memory": "4GiB", "domain": "web", "name": "web"},
       {"image": "windows-server", "memory": "4GiB", "domain": "corp", "name": "win"},
       {"image": "desktop-vdi", "memory": "4GiB", "domain": "vdi", "name": "vdi"}]
VMS_PER_HOST = 3


def fleet_document(hosts: int, scenarios: int) -> dict:
    return {"hosts": [HOST],
            "inventory": {"generate": {"count": hosts * VMS_PER_HOST, "seed": 1, "mix": MIX}},
            "placement": {"policy": "first-fit", "reserve": "5%"},
            "simulation": {"resolution": 4096, "settle": {"scans": 2, "tolerance": 0.01, "max_scans": 10}},
            "sweep": {"key": "hosts[0].ksm.sleep_millisecs", "values": list(SLEEPS_MS[:scenarios])}}


def run(hosts: int = 200, scenarios: int = 3, workers: tuple[int, ...] = (1, 2), quiet: bool = False) -> dict:
    if hosts < 1:
        raise InputError(f"bench fleet: --hosts must be at least 1 (got {hosts})")
    if not 1 <= scenarios <= len(SLEEPS_MS):
        raise InputError(f"bench fleet: --scenarios must be 1..{len(SLEEPS_MS)} (got {scenarios})")
    if not workers or min(workers) < 1:
        raise InputError(f"bench fleet: --workers must be positive counts (got {workers})")
    fleet = parse_fleet(fleet_document(hosts, scenarios), "<bench fleet>")
    placements, _keys, tasks = plan(fleet)
    per_scenario = [len(p.hosts) for p in placements]
    runs, results = [], {}
    load_before = os.getloadavg()
    for n in workers:
        with tempfile.TemporaryDirectory(prefix="vmhost-bench-fleet-") as state:
            t0 = time.perf_counter()
            with dask_client(None, n, quiet=True) as client:
                warm = next(iter(tasks.items()))
                client.gather([client.submit(run_host_task, *warm, key=f"warm-{n}-{i}", workers=[w])
                               for i, w in enumerate(client.scheduler_info()["workers"])])
                start_s = time.perf_counter() - t0
                records, stats = run_tasks(tasks, ResultStore(state), lambda: contextlib.nullcontext(client), quiet=quiet)
        wall = stats.wall_s
        runs.append({"workers": n, "tasks": stats.computed, "wall_s": wall,
                     "tasks_per_s": round(stats.computed / wall, 3),
                     "mean_task_s": round(sum(r["wall_s"] for r in records.values()) / len(records), 4),
                     "cluster_start_and_warm_s": round(start_s, 3)})
        # what the simulation computed (not how long it took)
        results[n] = {k: {f: v for f, v in r["result"].items() if f != "wall_s"} for k, r in records.items()}
    base = runs[0]
    for r in runs:
        r["speedup"] = round(r["tasks_per_s"] / base["tasks_per_s"], 3)
        r["efficiency"] = round(r["speedup"] * base["workers"] / r["workers"], 3)
    first = results[workers[0]]
    return {"hosts_per_scenario": per_scenario, "scenarios": len(fleet.scenarios),
            "distinct_tasks": len(tasks), "vms_per_host": VMS_PER_HOST,
            "resolution": fleet.scenarios[0].sim.resolution, "runs": runs,
            "cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in load_before],
            "identical_results": all(results[n] == first for n in workers)}


def format_table(r: dict) -> str:
    lines = [f"fleet on Dask: {r['scenarios']} scenarios x {r['hosts_per_scenario'][0]} hosts "
             f"= {r['distinct_tasks']} host simulations ({r['vms_per_host']} VMs each, staggered boots, "
             f"KSM to steady state, resolution 1/{r['resolution']})",
             f"{'workers':>7} {'wall s':>8} {'tasks/s':>8} {'mean task s':>11} {'speed-up':>8} "
             f"{'efficiency':>10} {'start+warm s':>12}"]
    for x in r["runs"]:
        lines.append(f"{x['workers']:>7} {x['wall_s']:>8.1f} {x['tasks_per_s']:>8.2f} {x['mean_task_s']:>11.3f} "
                     f"{x['speedup']:>8.2f} {x['efficiency']:>10.2f} {x['cluster_start_and_warm_s']:>12.1f}")
    lines.append(f"results identical across worker counts: {'yes' if r['identical_results'] else 'NO'}")
    lines.append(f"machine: {r['cpus']} CPUs, load average before the runs {r['load_average_before'][0]:.2f} "
                 f"(1 min) {r['load_average_before'][1]:.2f} (5 min): other processes share these CPUs")
    return "\n".join(lines)
