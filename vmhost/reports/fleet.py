"""The fleet report: ``vmhost fleet FLEET.yaml --report DIR``.

Built from the result dict alone (``vmhost.fleet.runner.run_fleet``), so that a saved
``result.json`` can be reported again. The page compares the scenarios the way one reads a
sweep: hosts needed per scenario (with the placement policy in each label), then what the
memory came to (configured, used without KSM, used with it, saved, and what the placement had
estimated), ksmd's CPU and the swap traffic per scenario, and each scenario's hosts one by one (used
and saved memory per host). When the swept values are numbers, hosts needed and savings are
also drawn against the value.

Plots are in GiB (full-scale pages / 262,144); the CSV tables keep the result's exact page
counts: ``scenarios.csv`` (one row per scenario) and ``hosts.csv`` (one row per host and
scenario, its VMs separated by spaces).
"""

from __future__ import annotations

from pathlib import Path

from hw.units import PAGES_PER_GIB
from vmhost.reports.model import BarPlot, LinePlot, Series, Table
from vmhost.reports.numbers import fmt
from vmhost.reports.report import Plots, Report

SCENARIO_COLUMNS = ["name", "policy", "hosts_needed", "vms", "vms_placed", "ram_pages",
                    "configured_pages", "no_ksm_pages", "used_pages", "saved_pages", "saved_fraction",
                    "estimated_saved_pages", "swapin_pages", "swapout_pages", "hosts_swapping",
                    "oom_kills", "hosts_with_oom", "not_booted", "ksmd_cpu_s", "ksmd_cpu_share_mean",
                    "ksmd_cpu_share_max", "hosts_not_steady", "unplaced"]
HOST_COLUMNS = ["scenario", "host", "model", "vms", "ram_pages", "configured_pages", "charged_pages",
                "estimated_saved_pages", "no_ksm_pages", "used_pages", "saved_pages", "free_pages",
                "swapin_pages", "swapout_pages", "oom_kills", "not_booted", "ksmd_cpu_s", "ksmd_cpu_share", "steady",
                "task"]


def _gib(pages):
    return None if pages is None else pages / PAGES_PER_GIB


def _label(s: dict) -> str:
    """The scenario's name, with its placement policy unless the name already says it."""
    return s["name"] if s["name"] == f"placement.policy={s['policy']}" else f"{s['name']} ({s['policy']})"


def tables(res: dict) -> list[Table]:
    def cell(row, c):
        v = row[c]
        return " ".join(v) if isinstance(v, list) else v
    return [Table("scenarios", SCENARIO_COLUMNS, [[cell(s, c) for c in SCENARIO_COLUMNS] for s in res["scenarios"]]),
            Table("hosts", HOST_COLUMNS, [[cell(h, c) for c in HOST_COLUMNS] for h in res["hosts"]])]


def headline(res: dict) -> list[str]:
    sc = res["scenarios"]
    out = []
    if res["sweep"]:
        out.append(f"{len(sc)} scenarios, one per value of {res['sweep']}.")
    for s in sc:
        out.append(f"{_label(s)}: {s['hosts_needed']} hosts for {s['vms_placed']} of {s['vms']} VMs "
                   f"({fmt(_gib(s['configured_pages']))} GiB configured); they use "
                   f"{fmt(_gib(s['used_pages']))} GiB, KSM saving {fmt(_gib(s['saved_pages']))} GiB "
                   f"({fmt(100 * s['saved_fraction'])}% of {fmt(_gib(s['no_ksm_pages']))} GiB; placement "
                   f"estimated {fmt(_gib(s['estimated_saved_pages']))}); ksmd {fmt(s['ksmd_cpu_s'])} CPU-s, "
                   f"at most {fmt(100 * s['ksmd_cpu_share_max'])}% of a CPU on one host; "
                   f"{s['hosts_swapping']} hosts swapping, {len(s['oom_kills'])} OOM kills"
                   + (f", {len(s['not_booted'])} VMs not booted after one" if s["not_booted"] else "") + ".")
    if len(sc) > 1:
        best = min(sc, key=lambda s: (s["hosts_needed"], -s["saved_pages"]))
        out.append(f"Fewest hosts: {_label(best)} ({best['hosts_needed']}).")
    run = res.get("run")
    if run:
        out.append(f"{run['tasks']} host simulations: {run['resumed']} resumed from earlier runs, "
                   f"{run['computed']} computed" + (f" on {run['workers']} Dask workers" if run["computed"] else "")
                   + f", {fmt(run['wall_s'])} s.")
    out.extend(f"Note: {n}" for n in res["notes"])
    return out


PLOTS = Plots()            # the report's plots, in this order


def _per_scenario(res: dict, title: str, unit: str, series: dict, note: str) -> BarPlot:
    """A bar plot with one group per scenario: ``series`` maps a name to the value of a scenario."""
    sc = res["scenarios"]
    return BarPlot(title, unit, [_label(s) for s in sc],
                   [Series(name, [value(s) for s in sc]) for name, value in series.items()], note=note)


@PLOTS.add
def _hosts_needed(res: dict) -> BarPlot:
    return _per_scenario(res, "Hosts needed per scenario", "hosts", {"hosts needed": lambda s: s["hosts_needed"]},
                         "Hosts opened by the placement policy; every one of them was then simulated.")


@PLOTS.add
def _memory(res: dict) -> BarPlot:
    return _per_scenario(
        res, "Memory per scenario", "GiB",
        {"configured": lambda s: _gib(s["configured_pages"]),
         "used without KSM": lambda s: _gib(s["no_ksm_pages"]),
         "used with KSM": lambda s: _gib(s["used_pages"]),
         "saved by KSM": lambda s: _gib(s["saved_pages"]),
         "saving estimated by placement": lambda s: _gib(s["estimated_saved_pages"])},
        "Summed over the scenario's hosts, as simulated (KSM at steady state after each boot).")


@PLOTS.add
def _swept(res: dict) -> list[LinePlot]:
    sc = res["scenarios"]
    if not res["sweep"] or not all(isinstance(s["value"], (int, float)) and not isinstance(s["value"], bool)
                                   for s in sc):
        return []
    xs = [s["value"] for s in sc]
    return [LinePlot(f"Hosts needed against {res['sweep']}", res["sweep"], "hosts",
                     [Series("hosts needed", xs, [s["hosts_needed"] for s in sc])]),
            LinePlot(f"Savings against {res['sweep']}", res["sweep"], "GiB",
                     [Series("saved by KSM", xs, [_gib(s["saved_pages"]) for s in sc]),
                      Series("estimated by placement", xs, [_gib(s["estimated_saved_pages"]) for s in sc])])]


@PLOTS.add
def _cpu(res: dict) -> BarPlot:
    return _per_scenario(
        res, "ksmd CPU per scenario", "% of one CPU",
        {"mean over the hosts": lambda s: 100 * s["ksmd_cpu_share_mean"],
         "the busiest host": lambda s: 100 * s["ksmd_cpu_share_max"]},
        "ksmd's CPU share at steady state on each host.")


@PLOTS.add
def _swap(res: dict) -> BarPlot:
    return _per_scenario(
        res, "Swap traffic per scenario", "GiB",
        {"swapped out": lambda s: _gib(s["swapout_pages"]), "swapped in": lambda s: _gib(s["swapin_pages"])},
        "Summed over the scenario's hosts, from the first boot to the last steady state. "
        "OOM kills are listed above.")


@PLOTS.add
def _per_host(res: dict) -> BarPlot:
    sc = res["scenarios"]
    n = max((s["hosts_needed"] for s in sc), default=0)
    by = {(h["scenario"], h["host"]): h for h in res["hosts"]}
    series = []
    for s in sc:
        hosts = [by.get((s["name"], i)) for i in range(n)]
        series.append(Series(f"{_label(s)} used", [_gib(h["used_pages"]) if h else None for h in hosts]))
        series.append(Series(f"{_label(s)} saved", [_gib(h["saved_pages"]) if h else None for h in hosts]))
    return BarPlot("Each host: memory used and saved", "GiB", [f"host {i}" for i in range(n)], series,
                   note="Hosts in the order the placement opened them.")


def build(res: dict) -> Report:
    return Report.of(f"Fleet: {res['config']}",
                     f"{len(res['scenarios'])} scenario(s)" + (f", sweep over {res['sweep']}" if res["sweep"] else ""),
                     headline(res),
                     PLOTS.of(res), tables(res))


def write_fleet_report(res: dict, directory: str | Path, text: str) -> None:
    """report.html, result.json, report.txt (``text``: the result as the terminal shows it,
    ``vmhost.fleet.result.format_result``) and the CSV tables, atomically."""
    build(res).write(directory, res, files={"report.txt": text + "\n"})
