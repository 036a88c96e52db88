"""Resolution invariance: a density config's headline at several resolutions, side by side.

A host simulated at 1/N of its pages stands for the full-size host only if its headline does
not depend on N. :func:`check` runs one config at each resolution asked for and compares every
headline figure with the finest of them (the reference), within these tolerances:

==========================  =====================================================
figure                      agrees when
==========================  =====================================================
VMs per host (3 columns)    equal (KSM: at the configured knobs, and with the
                            suggested pages_to_scan when the CPU limit binds),
                            at the edge too (its deciding step broke a limit by
                            < 1%: the row says so)
VMs surviving the storm     equal
binding limit               a kind of limit in common
suggested pages_to_scan     within 10%
memory saved                within 5% (at the KSM answer, when both answers
                            have the same guest count)
ksmd CPU share              the first guest's: within 5% relative or 1.5
                            points; at the KSM answer: within 35% relative (a
                            2-scan settle window sees part of smart scan's 2-9
                            scan skip cycle: it moves +-30% from step to step)
time to 90% (first guest)   within 15% or one full scan (of the full-size host:
                            the virtual time and ksmd's CPU time, as the times
                            to X% count them)
storm verdict               equal (at the KSM answer, when both answers have
                            the same guest count)
==========================  =====================================================

``vmhost density CONFIG --resolutions 256,128,64`` prints the table; the test suite holds it
on every bundled config. The resolutions are independent runs: they run side by side, one
per core (``concurrent.futures``' process pool), each answer the one it gives alone.
"""

from __future__ import annotations

import copy
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

from vmhost.density.config import DensityConfig, check_resolution
from vmhost.density.search import DensitySearch

LIMIT_KINDS = ("OOM kill", "swap-in rate", "ksmd CPU", "free memory", "guest pages", "the boot sequence")


@dataclass
class Tolerance:
    rel: float = 0.0
    abs: float = 0.0

    def ok(self, ref, v) -> bool:
        if ref is None or v is None:
            return ref is v
        if isinstance(ref, str) and "+" in ref + v:
            return bool(set(ref.split("+")) & set(v.split("+")))
        if isinstance(ref, (str, bool)) or self.rel == self.abs == 0:
            return ref == v
        return abs(v - ref) <= max(self.rel * abs(ref), self.abs)


def limit_kind(limited_by: list[str]) -> str:
    """The kinds of limit a step broke, joined by '+' (the same kinds agree if they share one)."""
    kinds = [next((k for k in LIMIT_KINDS if v.startswith(k)), v) for v in limited_by]
    return "+".join(dict.fromkeys(kinds))


def figures(res: dict) -> dict:
    """The headline figures of one result (the KSM answer's: with the suggested pages_to_scan
    when the configured knobs break the CPU limit)."""
    cl = res.get("cpu_limit")
    ans = (cl or {}).get("at_best") if cl else res.get("at_best")
    v = res["vms_per_host"]
    steps = res["steps"]
    first = steps[0] if steps else {}
    scan_s = None
    if first:
        # a full scan as long as it lasts on the full-size host: the virtual time plus the CPU
        # time ksmd's batches take there beyond the simulated ones (as the times to X% count it)
        r = res["resolution"]
        scan_s = (first["virtual_s"] + first["ksmd_cpu_s_total"] * (1 - 1 / r)) / max(first["full_scans"], 1)
    return {
        "no_ksm": v["no_ksm"], "ksm": v["ksm"], "ideal": v["ideal"],
        "ksm_suggested": cl.get("vms_ksm") if cl else None,
        "suggested_pages_to_scan": cl.get("pages_to_scan") if cl else None,
        "storm_safe": (cl.get("vms_surviving_storm") if cl else res.get("vms_surviving_storm")),
        "limit": limit_kind(res["limited_by"]),
        "saved_gib": ans["saved_gib"] if ans else None,
        "cpu_first": first.get("ksmd_cpu_share"),
        "cpu_at_answer": ans["ksmd_cpu_share"] if ans else None,
        "t90_first_s": (first.get("time_to") or {}).get("p90_s"),
        "storm_survives": ((ans or {}).get("storm") or {}).get("survives"),
        "_scan_s": scan_s,
        "_edge": bool((cl or {}).get("at_edge") if cl else res.get("at_edge")),
        "_margin": (cl or {}).get("limit_margin") if cl else res.get("limit_margin"),
    }


TOLERANCES = {
    "no_ksm": Tolerance(), "ksm": Tolerance(), "ideal": Tolerance(), "ksm_suggested": Tolerance(),
    "storm_safe": Tolerance(), "limit": Tolerance(), "storm_survives": Tolerance(),
    "suggested_pages_to_scan": Tolerance(rel=0.10),
    "saved_gib": Tolerance(rel=0.05),
    "cpu_first": Tolerance(rel=0.05, abs=0.015), "cpu_at_answer": Tolerance(rel=0.35),
    "t90_first_s": Tolerance(rel=0.15),
}


def at_resolution(cfg: DensityConfig, r: int) -> DensityConfig:
    """The same config at resolution ``r`` (refused as the file would be: InputError)."""
    c = copy.copy(cfg)
    c.resolution = r
    check_resolution(c)
    return c


def run_at(cfg: DensityConfig, r: int) -> dict:
    """The search at resolution ``r``: its figures, wall time and what is not faithful."""
    res = DensitySearch(at_resolution(cfg, r)).run()
    return {"figures": figures(res), "wall_s": res["wall_s"], "unfaithful": res["unfaithful"]}


def check(cfg: DensityConfig, resolutions: list[int], progress=None,
          workers: int | None = None) -> dict:
    """Run ``cfg`` at every resolution; compare each figure with the finest resolution's.
    ``workers`` processes run resolutions side by side (default: one per core; 1: in this
    process, one after the other); ``progress(r, run)`` as each finishes."""
    rs = sorted(set(resolutions), reverse=True)
    runs = {}
    workers = min(workers or os.cpu_count() or 1, len(rs))
    if workers <= 1:
        for r in rs:
            runs[r] = run_at(cfg, r)
            if progress:
                progress(r, runs[r])
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            # the finest (longest) first, so the coarse ones fill the other cores meanwhile
            pending = {pool.submit(run_at, cfg, r): r for r in sorted(rs)}
            for fut in as_completed(pending):
                r = pending[fut]
                runs[r] = fut.result()
                if progress:
                    progress(r, runs[r])
    ref_r = min(rs)
    ref = runs[ref_r]["figures"]
    rows, ok = [], True
    for r in rs:
        f = runs[r]["figures"]
        verdicts = {}
        answer = "ksm_suggested" if ref["ksm_suggested"] is not None else "ksm"
        same_n = ref[answer] == f[answer]
        for k, tol in TOLERANCES.items():
            good = tol.ok(ref[k], f[k])
            if not good and k == "t90_first_s" and None not in (ref[k], f[k], ref["_scan_s"]):
                good = abs(f[k] - ref[k]) <= ref["_scan_s"]          # or one full scan
            if not same_n and k in ("saved_gib", "cpu_at_answer", "storm_survives"):
                good = None                                         # not comparable
            verdicts[k] = good
        ok = ok and all(v is not False for v in verdicts.values())
        rows.append({"resolution": r, "figures": {k: v for k, v in f.items() if not k.startswith("_")},
                     "at_edge": f["_edge"], "limit_margin": f["_margin"],
                     "agrees": verdicts, "wall_s": runs[r]["wall_s"], "unfaithful": runs[r]["unfaithful"]})
    return {"config": cfg.path, "reference_resolution": ref_r, "rows": rows, "ok": ok,
            "tolerances": {k: {"rel": t.rel, "abs": t.abs} for k, t in TOLERANCES.items()}}


def format_check(out: dict) -> str:
    keys = list(TOLERANCES)
    head = f"{'1/N':>6} " + " ".join(f"{k:>14}" for k in keys) + f" {'wall s':>7}"
    lines = [f"resolution invariance of {out['config']} (reference: 1/{out['reference_resolution']}; "
             f"* = outside the tolerance, ~ = at another guest count: not compared)", head]
    for row in out["rows"]:
        cells = []
        for k in keys:
            v = row["figures"][k]
            s = "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
            a = row["agrees"][k]
            cells.append(f"{(s if a else s + ('*' if a is False else '~')):>14}")
        lines.append(f"{row['resolution']:>6} " + " ".join(cells) + f" {row['wall_s']:>7.1f}")
        if row["at_edge"]:
            lines.append(f"       at the edge at 1/{row['resolution']}: the step after the answer broke its limit "
                         f"by {row['limit_margin']:.2%}")
        for u in row["unfaithful"]:
            lines.append(f"       not faithful at 1/{row['resolution']}: {u}")
    lines.append("every figure agrees" if out["ok"] else "SOME FIGURES DISAGREE")
    return "\n".join(lines)
