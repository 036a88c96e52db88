"""The result document of a density search, and its text form.

The headline (``vms_per_host``) has three columns: (a) no KSM, (b) KSM as simulated, (c)
ideal merging; ``curve`` has (a) and (c) for every guest count of the sequence and (b) where
a step was simulated; ``steps`` every simulated step; ``timeline`` the savings and ksmd CPU
over virtual time.
"""

from __future__ import annotations

from pathlib import Path

from hw.units import PAGE_SIZE, PAGES_PER_GIB
from vmhost.density.curves import GuestFacts, curve_pages


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
        "vms_per_host": {"no_ksm": largest_fitting(curve, "fits_no_ksm"), "ksm": vms_ksm,
                         "ideal": largest_fitting(curve, "fits_ideal")},
        "search_capped": failed_at is None,
        "limited_by": failed_at["violations"] if failed_at else
                      [f"the boot sequence ended at {len(cfg.sequence)} guests (max_guests or counts)"],
        "accounting": ACCOUNTING,
        "curve": curve,
        "steps": steps,
        "timeline": st.timeline,
        "wall_s": round(wall_s, 3),
    }
    return add_answer(res, cfg, steps, curve)


def largest_fitting(curve: list[dict], key: str) -> int:
    """The most guests for which every row of ``curve`` up to them has ``key`` (a fits_* column)."""
    best = 0
    for row in curve:
        if not row.get(key):
            break
        best = row["guests"]
    return best


def add_answer(res: dict, cfg, steps: list[dict], curve: list[dict]) -> dict:
    """Add to ``res`` what the headline says of the answer (the last step that met every limit):
    which curves the boot sequence capped, the savings and costs there, the storm-safe count.
    Shared by the emulator's search and the kernel oracle, so both results read alike."""
    ok_steps = [s for s in steps if s["ok"]]
    best = ok_steps[-1] if ok_steps else None
    for k in ("no_ksm", "ideal"):
        if res["vms_per_host"][k] == len(curve) and curve:
            res.setdefault("capped_curves", []).append(k)
    if best:
        res["at_best"] = {
            "guests": best["guests"], "saved_pages": best["saved_pages"],
            "saved_gib": round(best["saved_pages"] / PAGES_PER_GIB, 4),
            "cpu_s_per_gib_saved": best["cpu_s_per_gib_saved"],
            "ksmd_cpu_share": best["ksmd_cpu_share"],
            "time_to_first_guest": steps[0]["time_to"], "time_to_last_step": best["time_to"],
            "storm": best.get("storm"),
        }
        if cfg.storm_fraction is not None:
            surv = [s for s in ok_steps if s["storm"]["survives"]]
            res["vms_surviving_storm"] = surv[-1]["guests"] if surv else 0
    return res


def format_result(res: dict) -> str:
    """The text report (what ``vmhost density`` prints): ``vmhost.reports.density``."""
    from vmhost.reports.density import format_result as text
    return text(res)


def write_report(res: dict, directory: str | Path) -> None:
    """The report directory (HTML, JSON, text, CSV): see vmhost.reports.density."""
    from vmhost.reports.density import write_density_report
    write_density_report(res, directory)

