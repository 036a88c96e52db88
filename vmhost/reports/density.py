"""The density report: ``vmhost density CONFIG --report DIR``.

Built from the result dict alone (``vmhost.density.DensityRunner.run``), so that a saved
``result.json`` can be reported again. The page answers the density question in the order one
asks it: the headline numbers (how many VMs fit, what limited KSM, what it saved and cost),
then the plots: the three density curves against the capacity (where each crosses it is the
answer), the savings over virtual time (how fast KSM gets there after each boot), the memory
of each NUMA node after each step, ksmd's CPU share against its limit and the time to 50, 90
and 99% of each step's savings. Older results without a timeline or per-node memory still
report: those plots say they have no data, and why.

All plots are in GiB (full-scale pages / 262,144); the CSV tables keep the exact page counts
of the result: ``curve.csv`` (the three curves), ``steps.csv`` (one row per simulated step),
``timeline.csv`` (the savings samples) and ``nodes.csv`` (per step and NUMA node).
"""

from __future__ import annotations

from pathlib import Path

from hw.units import PAGES_PER_GIB
from vmhost.reports.model import BarPlot, LinePlot, Series, Table
from vmhost.reports.numbers import fmt
from vmhost.reports.report import Plots, Report

CURVE_COLUMNS = ["guests", "no_ksm_pages", "ksm_pages", "ideal_pages", "saved_pages",
                 "fits_no_ksm", "fits_ksm", "fits_ideal"]
STEP_COLUMNS = ["guests", "image", "guest", "domain", "ok", "steady", "settled_by", "full_scans",
                "virtual_s", "used_pages", "free_pages", "pages_shared", "pages_sharing",
                "ksm_zero_pages", "pages_unshared", "saved_pages", "ideal_now_pages", "swapped_pages",
                "ksmd_cpu_share", "ksmd_cpu_s_total", "cpu_s_per_gib_saved", "swapin_rate",
                "cow_ksm_rate", "p50_s", "p90_s", "p99_s", "storm_headroom_pages",
                "storm_available_pages", "storm_survives", "oom_kills", "violations"]
TIMELINE_COLUMNS = ["t_s", "guests", "saved_pages", "ksmd_cpu_s"]
NODE_COLUMNS = ["guests", "node", "total_pages", "free_pages", "used_pages"]


def _gib(pages):
    return None if pages is None else pages / PAGES_PER_GIB


def _step_row(s: dict) -> list:
    storm = s.get("storm") or {}
    t = s.get("time_to") or {}
    row = dict(s, p50_s=t.get("p50_s"), p90_s=t.get("p90_s"), p99_s=t.get("p99_s"),
               storm_headroom_pages=storm.get("headroom_pages"),
               storm_available_pages=storm.get("available_pages"), storm_survives=storm.get("survives"),
               oom_kills=len(s.get("oom_kills") or ()), violations="; ".join(s.get("violations") or ()))
    return [row.get(c) for c in STEP_COLUMNS]


def tables(res: dict) -> list[Table]:
    steps = res["steps"]
    nodes = [[s["guests"], n["node"], n["total_pages"], n["free_pages"], n["total_pages"] - n["free_pages"]]
             for s in steps for n in s.get("per_node", ())]
    return [Table("curve", CURVE_COLUMNS, [[row.get(c) for c in CURVE_COLUMNS] for row in res["curve"]]),
            Table("steps", STEP_COLUMNS, [_step_row(s) for s in steps]),
            Table("timeline", TIMELINE_COLUMNS, [[p[c] for c in TIMELINE_COLUMNS] for p in res.get("timeline", ())]),
            Table("nodes", NODE_COLUMNS, nodes)]


def headline(res: dict) -> list[str]:
    out = [line + "." for line in headline_lines(res)]
    b = res.get("at_best") or (res.get("cpu_limit") or {}).get("at_best")
    if b:
        if b is not res.get("at_best"):
            out.append(f"With pages_to_scan {res['cpu_limit']['pages_to_scan']}:")
        out.extend(best_lines(res, b, PROSE))
    h = res["host"]
    out.append(f"Capacity for guests: {fmt(_gib(h['capacity_pages']))} GiB of {fmt(_gib(h['ram_pages']))} GiB "
               f"RAM (less the high watermarks and the free headroom). Resolution 1/{res['resolution']}: "
               f"{res['resolution_note']}.")
    out.extend(f"Note: {n}" for n in res["notes"])
    return out


PLOTS = Plots()            # the report's plots, in this order


@PLOTS.add
def _density_curves(res: dict) -> LinePlot:
    curve = res["curve"]
    ksm = [row for row in curve if "ksm_pages" in row]
    return LinePlot(
        "Memory needed for N VMs", "VMs on the host", "GiB needed",
        [Series("no KSM", [r["guests"] for r in curve], [_gib(r["no_ksm_pages"]) for r in curve]),
         Series("KSM (simulated)", [r["guests"] for r in ksm], [_gib(r["ksm_pages"]) for r in ksm]),
         Series("ideal (every identical page merged)", [r["guests"] for r in curve],
                [_gib(r["ideal_pages"]) for r in curve])],
        hlines=[("capacity", _gib(res["host"]["capacity_pages"]))],
        note="A curve fits while it stays under the capacity (RAM less the high watermarks and the "
             "free headroom). KSM is simulated up to the first step that breaks a limit; the other "
             "two are computed for the whole boot sequence.")


@PLOTS.add
def _savings_over_time(res: dict) -> LinePlot:
    tl = res.get("timeline") or []
    return LinePlot(
        "KSM savings over time", "virtual time (s)", "GiB saved",
        [Series("saved (pages_sharing + ksm_zero_pages)", [p["t_s"] for p in tl],
                [_gib(p["saved_pages"]) for p in tl])],
        note=("Each step starts with a guest's boot; the savings then rise as KSM merges its pages "
              "over the following scans." if tl else "This result has no timeline of savings."))


@PLOTS.add
def _per_node(res: dict) -> BarPlot:
    steps = [s for s in res["steps"] if s.get("per_node")]
    nodes = sorted({n["node"] for s in steps for n in s["per_node"]})
    series = []
    for node in nodes:
        per = [{n["node"]: n for n in s["per_node"]}.get(node) for s in steps]
        series.append(Series(f"node {node} used", [_gib(n["total_pages"] - n["free_pages"]) if n else None
                                                   for n in per]))
        series.append(Series(f"node {node} free", [_gib(n["free_pages"]) if n else None for n in per]))
    return BarPlot(
        "Memory per NUMA node after each step", "GiB", [f"{s['guests']} guest{'s' if s['guests'] != 1 else ''}" for s in steps], series,
        note=("Used and free memory of each node at the step's steady state." if steps else
              "This result has no per-node memory."))


@PLOTS.add
def _ksmd_cpu(res: dict) -> LinePlot:
    steps = res["steps"]
    limit = res["limits"].get("ksmd_cpu")
    return LinePlot(
        "ksmd CPU at steady state", "VMs on the host", "% of one CPU",
        [Series("ksmd", [s["guests"] for s in steps], [100 * s["ksmd_cpu_share"] for s in steps])],
        hlines=[("limit", 100 * limit)] if limit is not None else [])


@PLOTS.add
def _time_to(res: dict) -> LinePlot:
    steps = res["steps"]
    return LinePlot(
        "Time to X% of each step's savings", "VMs on the host", "virtual seconds after the boot",
        [Series(f"{pct}%", [s["guests"] for s in steps], [(s.get("time_to") or {}).get(f"p{pct}_s") for s in steps])
         for pct in (50, 90, 99)],
        note="Virtual time from a guest's boot until the savings gained in its step reach X% of "
             "what the step gained at steady state.")


def build(res: dict) -> Report:
    h = res["host"]
    return Report.of(f"Density: {res['config']}",
                     f"{res['profile']}: host {fmt(_gib(h['ram_pages']))} GiB, THP {h['thp']}, order "
                     f"{res['order']}, {res['sequence_length']} guests in the boot sequence",
                     headline(res),
                     PLOTS.of(res), tables(res))


def write_density_report(res: dict, directory: str | Path) -> None:
    """report.html, result.json, report.txt and the CSV tables, atomically."""
    build(res).write(directory, res, files={"report.txt": format_result(res) + "\n"})


# ------------------------------------------------------------------------------------------
# the text report (report.txt, and what `vmhost density` prints)

def _gib_text(pages) -> str:
    """GiB with two decimals for the text report (``_gib`` is the number the plots take)."""
    return "-" if pages is None else f"{pages / PAGES_PER_GIB:.2f}"


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"


def _t(v) -> str:
    return "-" if v is None else f"{v:g}s"


def _percentiles(t: dict, f) -> str:
    """A step's time to 50/90/99% of its savings, each written by ``f``."""
    return "/".join(f(t[k]) for k in ("p50_s", "p90_s", "p99_s"))


def _surviving_storm(res: dict):
    """The most guests that survive an unmerge storm (with the suggested pages_to_scan where the
    CPU limit bound KSM)."""
    return res.get("vms_surviving_storm", (res.get("cpu_limit") or {}).get("vms_surviving_storm"))


# The facts at the answer (``at_best``) in two wordings, the HTML page's prose and the terminal's
# terse lines: a template per fact (None: not said in that wording) and how each wording writes
# a number, a share, GiB and seconds.
PROSE = {"num": fmt, "pct": lambda v: f"{fmt(100 * v)}%", "gib": lambda pages: fmt(_gib(pages)),
         "secs": fmt, "survives": ("survives", "does not survive"),
         "saved": "At {n} guests KSM saves {saved} GiB; ksmd uses {cpu} of one CPU at steady state, "
                  "{cps} CPU-seconds per GiB saved.",
         "swapped": None,
         "times": "Time to 50/90/99% of a step's steady-state savings: the first guest {first} s, "
                  "guest {n} {last} s (virtual).",
         "storm": "An unmerge storm at {n} guests needs {need} GiB; {free} GiB are free above the min "
                  "watermark (less the guest pages in swap): it {verdict}. The most guests that survive "
                  "one: {most}."}
TERSE = {"num": lambda v: "-" if v is None else v, "pct": _pct, "gib": _gib_text, "secs": _t,
         "survives": ("survives", "does NOT survive"),
         "saved": "at {n} guests: saved {saved} GiB; ksmd CPU {cpu} (steady); {cps} ksmd CPU-s per GiB saved",
         "swapped": "at {n} guests {swapped} GiB of guest pages are in swap (counted in the KSM column, "
                    "as pages held)",
         "times": "time to 50/90/99% of steady-state savings: first guest {first}; guest {n} {last}",
         "storm": "unmerge storm at {n} guests: needs {need} GiB ({storm_pages} storm + {churn_pages} churn "
                  "pages), {free} GiB free above min watermark less swapped guest pages: {verdict}; "
                  "largest N surviving: {most}"}


def best_lines(res: dict, b: dict, words: dict) -> list[str]:
    """What KSM saves and costs at the answer, how fast, and whether it survives an unmerge storm."""
    v = {"n": b["guests"], "saved": words["num"](b["saved_gib"]), "cpu": words["pct"](b["ksmd_cpu_share"]),
         "cps": words["num"](b["cpu_s_per_gib_saved"]),
         "first": _percentiles(b["time_to_first_guest"], words["secs"]),
         "last": _percentiles(b["time_to_last_step"], words["secs"])}
    out = [words["saved"].format(**v)]
    swapped = next((s["swapped_pages"] for s in res["steps"] if s["guests"] == b["guests"]
                    and b is res.get("at_best")), 0)
    if swapped and words["swapped"]:
        out.append(words["swapped"].format(swapped=words["gib"](swapped), **v))
    out.append(words["times"].format(**v))
    if b.get("storm"):
        s = b["storm"]
        out.append(words["storm"].format(need=words["gib"](s["headroom_pages"]), free=words["gib"](s["available_pages"]),
                                         storm_pages=s["storm_pages"], churn_pages=s["churn_pages"],
                                         verdict=words["survives"][0 if s["survives"] else 1],
                                         most=_surviving_storm(res), **v))
    return out


def headline_lines(res: dict) -> list[str]:
    """The answer a planner acts on: the three counts, the count that survives the storm, what
    bound KSM and, when the CPU limit did, the knob that meets it and the count with it."""
    v = res["vms_per_host"]
    cl = res.get("cpu_limit")
    ksm = f"KSM {v['ksm']}"
    if "vms_surviving_storm" in res:
        ksm += f" ({res['vms_surviving_storm']} survive the unmerge storm)"
    if cl:
        ksm = (f"KSM {v['ksm']} at pages_to_scan {cl['configured_pages_to_scan']} (ksmd CPU "
               f"{_pct(cl['ksmd_cpu_share'])} > {_pct(cl['limit'])} at {cl['fails_at_guests']} guest(s))")
        if cl.get("pages_to_scan"):
            ksm += (f"; the largest pages_to_scan found that meets it: {cl['pages_to_scan']} "
                    f"({cl['breaks_at_pages_to_scan']} breaks it), with it KSM {cl['vms_ksm']}"
                    + (f" ({cl['vms_surviving_storm']} survive the unmerge storm)"
                       if cl.get("vms_surviving_storm") is not None else ""))
        else:
            ksm += "; no lower pages_to_scan found that meets the limit"
    out = [f"VMs per host: no KSM {v['no_ksm']}, {ksm}, ideal {v['ideal']}"
           + (f"  (at least: {', '.join(res['capped_curves'])} reached the end of the sequence)"
              if res.get("capped_curves") else "")]
    decided = cl if cl and cl.get("pages_to_scan") else res
    margin = decided.get("limit_margin")
    out.append(f"KSM limited by: {'; '.join((cl or {}).get('limited_by') or res['limited_by'])}"
               + (f" (by {margin:.2%}: at the edge, a coarser or finer resolution may count one guest "
                  f"more or less)" if decided.get("at_edge") else ""))
    if res.get("accounting"):
        out.append(f"accounting: {res['accounting']}")
    for u in res.get("unfaithful", ()):
        out.append(f"not faithful at 1/{res['resolution']}: {u}")
    return out


def format_result(res: dict) -> str:
    h = res["host"]
    lines = [f"density {res['config']} ({res['profile']}): host {_gib_text(h['ram_pages'])} GiB, THP {h['thp']}, "
             f"order {res['order']}, {res['sequence_length']} guests in the boot sequence",
             f"resolution: 1/{res['resolution']} ({res['resolution_note']})"]
    for n in res["notes"]:
        lines.append(f"note: {n}")
    lines.extend(headline_lines(res))
    pol = res.get("policy")
    if pol and pol["name"] != "fixed":
        last = pol["changes"][-1] if pol["changes"] else None
        lines.append(f"KSM policy {pol['name']}: {pol['wakeups']} wake-ups, {len(pol['changes'])} "
                     f"changes" + (f"; last at {last['t_s']:g}s: run={last['run']} pages_to_scan="
                                   f"{last['pages_to_scan']} sleep_millisecs={last['sleep_millisecs']} "
                                   f"({last['reason']})" if last else ""))
    b = res.get("at_best")
    cl = res.get("cpu_limit") or {}
    if not b and cl.get("at_best"):
        b = cl["at_best"]
        lines.append(f"with pages_to_scan {cl['pages_to_scan']} (the steps below are at the configured "
                     f"{cl['configured_pages_to_scan']}):")
    if b:
        lines.extend(best_lines(res, b, TERSE))
    lines.append(f"{'N':>4} {'image':<16} {'noKSM GiB':>9} {'KSM GiB':>8} {'ideal GiB':>9} {'saved GiB':>9} "
                 f"{'cpu':>7} {'swapin/s':>8} {'swap GiB':>8} {'free GiB':>8} {'t50':>8} {'t90':>8} {'t99':>8} "
                 f"{'scans':>5} verdict")
    steps = {s["guests"]: s for s in res["steps"]}
    for row in res["curve"]:
        s = steps.get(row["guests"])
        if s is None:
            if row["fits_no_ksm"] or row["fits_ideal"]:
                lines.append(f"{row['guests']:>4} {'':<16} {_gib_text(row['no_ksm_pages']):>9} {'':>8} "
                             f"{_gib_text(row['ideal_pages']):>9}")
            continue
        verdict = "ok" if s["ok"] else "FAIL: " + "; ".join(s["violations"])
        if not s["steady"]:
            verdict += f" (not steady: {s['settled_by']})"
        lines.append(f"{row['guests']:>4} {s['image'][:16]:<16} {_gib_text(row['no_ksm_pages']):>9} "
                     f"{_gib_text(s['held_pages']):>8} {_gib_text(row['ideal_pages']):>9} {_gib_text(s['saved_pages']):>9} "
                     f"{_pct(s['ksmd_cpu_share']):>7} {s['swapin_rate']:>8.1f} {_gib_text(s['swapped_pages']):>8} "
                     f"{_gib_text(s['free_pages']):>8} "
                     f"{_t(s['time_to']['p50_s']):>8} {_t(s['time_to']['p90_s']):>8} "
                     f"{_t(s['time_to']['p99_s']):>8} {s['full_scans']:>5} {verdict}")
    lines.append(f"wall time {res['wall_s']:.1f}s")
    return "\n".join(lines)
