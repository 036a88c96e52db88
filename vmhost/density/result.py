"""The result document of a density search, and its text form.

The headline (``vms_per_host``) has three columns: (a) no KSM, (b) KSM as simulated, (c)
ideal merging; ``curve`` has (a) and (c) for every guest count of the sequence and (b) where
a step was simulated; ``steps`` every simulated step; ``timeline`` the savings and ksmd CPU
over virtual time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vmhost.density.config import PAGE_SIZE
from vmhost.density.curves import GuestFacts, curve_pages
from vmhost.density.stepper import GIB_PAGES


EDGE = 0.01              # a limit broken by less than this: the count is at the edge
ACCOUNTING = ("all three columns count the guests' pages, in RAM or in swap, against one capacity: "
              "RAM managed by the kernel less the high watermarks and the free headroom (swap is "
              "not capacity); a KSM step also has to meet the service limits")


def build_result(search, steps: list[dict], facts: list[GuestFacts], failed_at: dict | None,
                 wall_s: float) -> dict:
    """The result document of a search: curves, steps, the headline, the search's notes."""
    cfg, r, st = search.cfg, search.r, search.stepper
    cap = search.capacity_pages()
    use_zero = bool(st.ksm.knobs.use_zero_pages)
    curve = []
    by_guests = {s["guests"]: s for s in steps}
    for n, noksm, ideal in curve_pages(facts, use_zero):
        noksm, ideal = noksm * r, ideal * r
        row = {"guests": n, "no_ksm_pages": noksm, "ideal_pages": ideal,
               "fits_no_ksm": noksm <= cap, "fits_ideal": ideal <= cap}
        s = by_guests.get(n)
        if s is not None:
            row.update(ksm_pages=s["held_pages"], ksm_ram_pages=s["used_pages"],
                       saved_pages=s["saved_pages"], fits_ksm=s["ok"])
        curve.append(row)

    def largest(key):
        best = 0
        for row in curve:
            if row.get(key):
                best = row["guests"]
            else:
                break
        return best

    ok_steps = [s for s in steps if s["ok"]]
    best = ok_steps[-1] if ok_steps else None
    vms_ksm = best["guests"] if best else 0
    res = {
        "config": cfg.path, "profile": st.host.profile.name,
        "resolution": r,
        "resolution_note": ("exact: every page simulated" if r == 1 else
                            f"every guest and the host simulated at 1/{r} of their pages; "
                            f"page counts, CPU and swap-in rates scaled back x{r}"),
        "notes": st.notes,
        "unfaithful": st.unfaithful,
        "host": {"ram_pages": sum(n.mem_bytes for n in cfg.host.topology.nodes) // PAGE_SIZE,
                 "capacity_pages": cap, "headroom_pages": search.headroom_pages(),
                 "thp": st.host.thp_mode, "knobs": dict(st.knobs)},
        "policy": st.policy_summary(),
        "order": cfg.order, "sequence_length": len(cfg.sequence),
        "limits": {"oom_kills": 0, "swapin_rate": cfg.swapin_rate, "ksmd_cpu": cfg.ksmd_cpu,
                   "free_headroom_pages": search.headroom_pages() if (
                       cfg.free_headroom_bytes is not None or cfg.free_headroom_fraction is not None) else None},
        "vms_per_host": {"no_ksm": largest("fits_no_ksm"), "ksm": vms_ksm, "ideal": largest("fits_ideal")},
        "search_capped": failed_at is None,
        "limited_by": failed_at["violations"] if failed_at else
                      [f"the boot sequence ended at {len(cfg.sequence)} guests (max_guests or counts)"],
        "accounting": ACCOUNTING,
        "curve": curve,
        "steps": steps,
        "timeline": st.timeline,
        "wall_s": round(wall_s, 3),
    }
    for k in ("no_ksm", "ideal"):
        if res["vms_per_host"][k] == len(curve) and curve:
            res.setdefault("capped_curves", []).append(k)
    if best:
        res["at_best"] = {
            "guests": best["guests"], "saved_pages": best["saved_pages"],
            "saved_gib": round(best["saved_pages"] / GIB_PAGES, 4),
            "cpu_s_per_gib_saved": best["cpu_s_per_gib_saved"],
            "ksmd_cpu_share": best["ksmd_cpu_share"],
            "time_to_first_guest": steps[0]["time_to"], "time_to_last_step": best["time_to"],
            "storm": best.get("storm"),
        }
        if cfg.storm_fraction is not None:
            surv = [s for s in ok_steps if s["storm"]["survives"]]
            res["vms_surviving_storm"] = surv[-1]["guests"] if surv else 0
    return res


def _gib(pages) -> str:
    return "-" if pages is None else f"{pages / GIB_PAGES:.2f}"


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"


def _t(v) -> str:
    return "-" if v is None else f"{v:g}s"


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
    margin = (cl or {}).get("limit_margin") if cl and cl.get("pages_to_scan") else res.get("limit_margin")
    out.append(f"KSM limited by: {'; '.join((cl or {}).get('limited_by') or res['limited_by'])}"
               + (f" (by {margin:.2%}: at the edge, a coarser or finer resolution may count one guest "
                  f"more or less)" if margin is not None and margin < EDGE else ""))
    if res.get("accounting"):
        out.append(f"accounting: {res['accounting']}")
    for u in res.get("unfaithful", ()):
        out.append(f"NOT FAITHFUL at this resolution: {u}")
    return out


def format_result(res: dict) -> str:
    h = res["host"]
    lines = [f"density {res['config']} ({res['profile']}): host {_gib(h['ram_pages'])} GiB, THP {h['thp']}, "
             f"order {res['order']}, {res['sequence_length']} guests in the boot sequence",
             f"resolution: 1/{res['resolution']} ({res['resolution_note']})"]
    for n in res["notes"]:
        lines.append(f"note: {n}")
    v = res["vms_per_host"]
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
        lines.append(f"at {b['guests']} guests: saved {b['saved_gib']} GiB; ksmd CPU {_pct(b['ksmd_cpu_share'])} "
                     f"(steady); {b['cpu_s_per_gib_saved'] if b['cpu_s_per_gib_saved'] is not None else '-'}"
                     f" ksmd CPU-s per GiB saved")
        swapped = next((s["swapped_pages"] for s in res["steps"] if s["guests"] == b["guests"]
                        and b is res.get("at_best")), 0)
        if swapped:
            lines.append(f"at {b['guests']} guests {_gib(swapped)} GiB of guest pages are in swap "
                         f"(counted in the KSM column, as pages held)")
        t1, tl = b["time_to_first_guest"], b["time_to_last_step"]
        lines.append(f"time to 50/90/99% of steady-state savings: first guest {_t(t1['p50_s'])}/"
                     f"{_t(t1['p90_s'])}/{_t(t1['p99_s'])}; guest {b['guests']} "
                     f"{_t(tl['p50_s'])}/{_t(tl['p90_s'])}/{_t(tl['p99_s'])}")
        if b.get("storm"):
            s = b["storm"]
            lines.append(f"unmerge storm at {b['guests']} guests: needs {_gib(s['headroom_pages'])} GiB "
                         f"({s['storm_pages']} storm + {s['churn_pages']} churn pages), "
                         f"{_gib(s['available_pages'])} GiB free above min watermark less swapped guest pages: "
                         f"{'survives' if s['survives'] else 'does NOT survive'}; "
                         f"largest N surviving: {res.get('vms_surviving_storm', cl.get('vms_surviving_storm'))}")
    lines.append(f"{'N':>4} {'image':<16} {'noKSM GiB':>9} {'KSM GiB':>8} {'ideal GiB':>9} {'saved GiB':>9} "
                 f"{'cpu':>7} {'swapin/s':>8} {'swap GiB':>8} {'free GiB':>8} {'t50':>8} {'t90':>8} {'t99':>8} "
                 f"{'scans':>5} verdict")
    steps = {s["guests"]: s for s in res["steps"]}
    for row in res["curve"]:
        s = steps.get(row["guests"])
        if s is None:
            if row["fits_no_ksm"] or row["fits_ideal"]:
                lines.append(f"{row['guests']:>4} {'':<16} {_gib(row['no_ksm_pages']):>9} {'':>8} "
                             f"{_gib(row['ideal_pages']):>9}")
            continue
        verdict = "ok" if s["ok"] else "FAIL: " + "; ".join(s["violations"])
        if not s["steady"]:
            verdict += f" (not steady: {s['settled_by']})"
        lines.append(f"{row['guests']:>4} {s['image'][:16]:<16} {_gib(row['no_ksm_pages']):>9} "
                     f"{_gib(s['held_pages']):>8} {_gib(row['ideal_pages']):>9} {_gib(s['saved_pages']):>9} "
                     f"{_pct(s['ksmd_cpu_share']):>7} {s['swapin_rate']:>8.1f} {_gib(s['swapped_pages']):>8} "
                     f"{_gib(s['free_pages']):>8} "
                     f"{_t(s['time_to']['p50_s']):>8} {_t(s['time_to']['p90_s']):>8} "
                     f"{_t(s['time_to']['p99_s']):>8} {s['full_scans']:>5} {verdict}")
    lines.append(f"wall time {res['wall_s']:.1f}s")
    return "\n".join(lines)


def write_report(res: dict, directory: str | Path) -> None:
    """The report directory (HTML, JSON, text, CSV): see vmhost.reports.density."""
    from vmhost.reports.density import write_density_report
    write_density_report(res, directory)


def _jsonable(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
