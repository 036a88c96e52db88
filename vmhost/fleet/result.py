"""A fleet run's result: per scenario and per host, as JSON-able dicts, and as text.

Per scenario: hosts needed (and of which model), VMs placed and left unplaced, memory
configured vs used, KSM savings (simulated, and what placement estimated), swap-in/out,
OOM kills (and, with staggered boots, the VMs an OOM kill kept from booting), ksmd CPU. Page counts are full-scale 4 KiB pages (the simulation scales them back
from its resolution); ``saved_fraction`` is saved pages over the pages the same VMs would use
without KSM.
"""

from __future__ import annotations

from hw.units import PAGES_PER_GIB
from vmhost.fleet.config import Fleet
from vmhost.fleet.placement import Placement



def scenario_hosts(fleet: Fleet, placements: list[Placement], keys: list[list[str]],
                   records: dict[str, dict]) -> list[list[dict]]:
    """Per scenario, one row per host: its placement and its simulation."""
    out = []
    for scn, pl, ks in zip(fleet.scenarios, placements, keys):
        rows = []
        for h, k in zip(pl.hosts, ks):
            r = records[k]["result"]
            rows.append({
                "scenario": scn.name, "host": h.index, "model": scn.models[h.model].name,
                "vms": [scn.vms[i].name for i in h.vms],
                "ram_pages": r["ram_pages"], "configured_pages": h.configured_pages,
                "charged_pages": round(h.charged_pages),
                "estimated_saved_pages": round(h.estimate.saved),
                "no_ksm_pages": r["no_ksm_pages"], "used_pages": r["used_pages"],
                "saved_pages": r["saved_pages"], "free_pages": r["free_pages"],
                "swapin_pages": r["swapin_pages"], "swapout_pages": r["swapout_pages"],
                "oom_kills": r["oom_kills"], "not_booted": r.get("not_booted", []),
                "ksmd_cpu_s": r["ksmd_cpu_s"],
                "ksmd_cpu_share": r["ksmd_cpu_share"], "steady": r["steady"],
                "task": k, "wall_s": records[k]["wall_s"],
            })
        out.append(rows)
    return out


def summarize(fleet: Fleet, placements: list[Placement], keys: list[list[str]],
              records: dict[str, dict]) -> dict:
    per_host = scenario_hosts(fleet, placements, keys, records)
    scenarios = []
    for scn, pl, rows in zip(fleet.scenarios, placements, per_host):
        def total(k):
            return sum(row[k] for row in rows)
        no_ksm = total("no_ksm_pages")
        by_model: dict[str, int] = {}
        for row in rows:
            by_model[row["model"]] = by_model.get(row["model"], 0) + 1
        shares = [row["ksmd_cpu_share"] for row in rows]
        kills = [name for row in rows for name in row["oom_kills"]]
        scenarios.append({
            "name": scn.name, "value": scn.value, "policy": pl.policy,
            "resolution": scn.sim.resolution, "notes": scn.notes,
            "room_pages": {m.name: scn.room_pages[m.index] for m in scn.models},
            "hosts_needed": len(pl.hosts), "hosts_by_model": by_model,
            "vms": len(scn.vms), "vms_placed": len(scn.vms) - len(pl.unplaced),
            "unplaced": [scn.vms[i].name for i in pl.unplaced],
            "ram_pages": total("ram_pages"), "configured_pages": total("configured_pages"),
            "no_ksm_pages": no_ksm, "used_pages": total("used_pages"),
            "saved_pages": total("saved_pages"),
            "saved_fraction": round(total("saved_pages") / no_ksm, 4) if no_ksm else 0.0,
            "estimated_saved_pages": total("estimated_saved_pages"),
            "swapin_pages": total("swapin_pages"), "swapout_pages": total("swapout_pages"),
            "hosts_swapping": sum(1 for row in rows if row["swapin_pages"] or row["swapout_pages"]),
            "oom_kills": kills, "hosts_with_oom": sum(1 for row in rows if row["oom_kills"]),
            "not_booted": [name for row in rows for name in row["not_booted"]],
            "ksmd_cpu_s": round(total("ksmd_cpu_s"), 6),
            "ksmd_cpu_share_mean": round(sum(shares) / len(shares), 6) if shares else 0.0,
            "ksmd_cpu_share_max": max(shares, default=0.0),
            "hosts_not_steady": sum(1 for row in rows if not row["steady"]),
        })
    notes = list(dict.fromkeys([n for s in fleet.scenarios for n in s.notes]
                               + [f"not faithful at 1/{records[k]['result']['resolution']}: {u}" for ks in keys for k in ks
                                  for u in records[k]["result"].get("unfaithful", ())]))
    return {"config": fleet.path, "sweep": fleet.sweep_key, "notes": notes, "scenarios": scenarios,
            "hosts": [row for rows in per_host for row in rows]}


def _gib(pages: float) -> str:
    return f"{pages / PAGES_PER_GIB:.1f}"


def format_result(res: dict) -> str:
    run = res.get("run", {})
    lines = [f"fleet {res['config']}: {len(res['scenarios'])} scenario(s)"
             + (f", sweep over {res['sweep']}" if res["sweep"] else "")]
    lines.extend(f"note: {n}" for n in res["notes"])
    if run:
        where = f" on {run['workers']} worker(s) at {run['scheduler']}" if run["computed"] else ""
        lines.append(f"host simulations: {run['tasks']} ({run['resumed']} resumed, {run['computed']} "
                     f"computed){where} in {run['wall_s']:.1f}s")
    w = max([8] + [len(s["name"]) for s in res["scenarios"]])
    lines.append(f"{'scenario':<{w}} {'hosts':>5} {'VMs':>7} {'conf GiB':>9} {'used GiB':>9} "
                 f"{'saved GiB':>9} {'saved':>6} {'est GiB':>8} {'swapin':>8} {'swapout':>8} "
                 f"{'OOM':>4} {'ksmd CPU-s':>10} {'cpu max':>7}")
    for s in res["scenarios"]:
        vms = f"{s['vms_placed']}/{s['vms']}"
        lines.append(f"{s['name']:<{w}} {s['hosts_needed']:>5} {vms:>7} {_gib(s['configured_pages']):>9} "
                     f"{_gib(s['used_pages']):>9} {_gib(s['saved_pages']):>9} {s['saved_fraction']:>6.1%} "
                     f"{_gib(s['estimated_saved_pages']):>8} {s['swapin_pages']:>8} {s['swapout_pages']:>8} "
                     f"{len(s['oom_kills']):>4} {s['ksmd_cpu_s']:>10.1f} {s['ksmd_cpu_share_max']:>7.1%}")
        if s["unplaced"]:
            lines.append(f"  unplaced (no host left): {', '.join(s['unplaced'])}")
        if s["oom_kills"]:
            lines.append(f"  OOM kills: {', '.join(s['oom_kills'])}")
        if s["not_booted"]:
            lines.append(f"  not booted (an OOM kill ended the host's boots): {', '.join(s['not_booted'])}")
        if s["hosts_not_steady"]:
            lines.append(f"  {s['hosts_not_steady']} host(s) did not reach KSM steady state")
    return "\n".join(lines)
