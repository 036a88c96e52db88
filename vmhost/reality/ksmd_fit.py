"""ksmd's CPU cost per operation, fitted on the real ksmd pass by pass in density runs.

The emulator charges ksmd CPU per operation (``vmhost.ksm.ksmd``: costs read from
``vmhost/ksm/ksmd_calibration.json``, key ``cost_ns``). This module refits those costs against
the kernel: the same density config runs in the emulator (recording its work counters at every
full-scan end) and on the kernel (``vmhost.reality.density_oracle``: ksmd's on-CPU time from
schedstat at every full-scan end). The emulator reproduces the kernel's counters, so pass j of
step n does the same work in both; the fit is a non-negative least squares of the kernel's CPU
per pass on the emulator's work per pass, on relative error (each pass weighted 1/cpu).

Passes are labelled by the kind of work they do, and the fit's error is reported per kind:

==================  =====================================================================
checksum-only       a new guest's first pass (checksums, no merge)
merging             a pass that merged pages (try_to_merge_one_page calls)
steady              anything else (revisits, smart-scan skips, volatile pages)
==================  =====================================================================

Features: ``ptes_walked`` (every PTE ksmd looks at, including zero-page and smart-scan-skipped
ones), ``pages`` (pages processed: pages_scanned), ``checksums``, ``tree_compares``,
``merges``, ``thp_splits`` (huge pages KSM split), ``dups_walked``.

``python -m vmhost.reality.ksmd_fit KERNEL.json [KERNEL.json ...] [--write] [--rows]
[--cache=DIR] [--with-stored]``: the kernel results of ``vmhost density CONFIG --oracle --json`` (one config or
several); runs the emulator on each config (``--cache``: keep its passes in DIR), prints the
fit, its error per kind of pass, and a cross-check on the stepped single-pass workloads of
``vmhost bench ksm --calibrate`` (4 KiB pages, no THP: there the density fit is ~30% low, the
first pass ~60% low); ``--with-stored`` adds the passes of the fit stored in the calibration file
(its other configs), so that one cost set is fitted on every workload; ``--write`` stores the
costs (``cost_ns``), the fit (``density_fit``, with its passes) and how much longer than
``sleep_millisecs`` the kernel's timed sleep lasted (``sleep_extra_ns``, measured on the same
runs when they share one pages_to_scan and sleep) in the calibration file.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import sys
from pathlib import Path

import numpy as np

from vmhost.reports.files import dumps_json

CALIBRATION = Path(__file__).resolve().parents[1] / "ksm" / "ksmd_calibration.json"
FEATURES = ("ptes_walked", "pages", "checksums", "tree_compares", "merges", "thp_splits", "dups_walked",
            "batches")
#: the costs fitted; dups_walked keeps its value (it moves with tree_compares in every density
#: pass). ptes_walked is told apart from pages by smart scan's passes, where most PTEs walked are
#: skipped pages (pages_scanned counts only the pages processed). batches (a wake-up's own cost)
#: keeps its value: the density passes hardly tell it apart from per-page work (every batch is
#: pages_to_scan pages), and a fit let free gave it 0.87 ms, a floor of 4% of a CPU at a 20 ms
#: sleep that the kernel does not show at small pages_to_scan
FITTED = ("ptes_walked", "pages", "checksums", "tree_compares", "merges", "thp_splits")


def emulator_passes(cfg) -> list[dict]:
    """Run the density study in the emulator and return its work per full pass, per step."""
    from vmhost.density import DensityRunner
    runner = DensityRunner(cfg)
    recs: list[dict] = []
    owner = getattr(runner, "stepper", runner)      # what builds the simulated host
    build = owner.build if hasattr(owner, "build") else owner._build

    def hooked_build():
        build()
        ksm, host = runner.ksm, runner.host
        prev = ksm.on_scan_end

        def at_end():
            w = ksm.work_counts()
            recs.append({"guests": len(runner.guests), "pages": int(ksm.c.pages_scanned),
                         "thp_splits": int(host.vmstat["thp_split_page"]), "cpu_ns": runner.ksmd.cpu_ns,
                         "batches": runner.ksmd.batches,
                         **{k: w[k] for k in ("ptes_walked", "checksums", "tree_compares", "merges",
                                              "dups_walked")}})
            if prev is not None:
                prev()
        ksm.on_scan_end = at_end
    if owner is runner:
        runner._build = hooked_build
    else:
        owner.build = hooked_build
    res = runner.run(suggest=False) if owner is not runner else runner.run()
    passes = []
    for a, b in zip(recs, recs[1:]):
        p = {"guests": b["guests"], **{k: b.get(k, 0) - a.get(k, 0) for k in FEATURES}}
        passes.append(p)
    # the first pass ever (from zero)
    if recs:
        passes.insert(0, {"guests": recs[0]["guests"], **{k: recs[0].get(k, 0) for k in FEATURES}})
    by_step: dict[int, list[dict]] = {}
    for p in passes:
        by_step.setdefault(p["guests"], []).append(p)
    return [{"guests": n, "passes": ps} for n, ps in sorted(by_step.items())], res


def kernel_passes(result: dict) -> dict[int, list[float]]:
    """ksmd's CPU seconds per full pass of every step of a kernel result."""
    out = {}
    for s in result["steps"]:
        scans = s["kernel"]["scans"]
        out[s["guests"]] = [b["cpu_s"] - a["cpu_s"] for a, b in zip(scans, scans[1:])]
    return out


def sleep_extra_ns(kernels: list[dict], sleep_ms: int, pages_to_scan: int) -> tuple[int, int] | None:
    """How much longer than ``sleep_ms`` ksmd's timed sleep lasted, on average per batch over the
    kernel runs' passes of at least 5 batches (wall time between two full-scan ticks less ksmd's
    CPU and its run-queue wait: the rest is sleeping), and the number of passes it is from."""
    slept, batches = 0.0, 0.0
    n = 0
    for k in kernels:
        for s in k["steps"]:
            scans = s["kernel"]["scans"]
            for a, b in zip(scans[1:], scans[2:]):      # from the first tick: whole passes only
                nb = (b["pages_scanned"] - a["pages_scanned"]) / pages_to_scan
                if nb < 5:
                    continue
                slept += (b["t_s"] - a["t_s"]) - (b["cpu_s"] - a["cpu_s"]) - (b.get("wait_s", 0) - a.get("wait_s", 0))
                batches += nb
                n += 1
    if not n:
        return None
    return round(slept / batches * 1e9 - sleep_ms * 1_000_000), n


def kind(p: dict) -> str:
    if p["merges"] > 0.01 * max(p["pages"], 1):
        return "merging"
    if p["checksums"] >= 0.5 * max(p["pages"], 1) and p["tree_compares"] == 0:
        return "checksum-only"
    return "steady"


def pairs(emu_steps: list[dict], kernels: list[dict]) -> list[dict]:
    """(emulator work, mean kernel CPU) per pass, aligned by step and pass index."""
    ks = [kernel_passes(k) for k in kernels]
    out = []
    for st in emu_steps:
        n = st["guests"]
        for j, p in enumerate(st["passes"]):
            vals = [k[n][j] for k in ks if n in k and j < len(k[n])]
            if not vals:
                continue
            out.append({**p, "pass": j + 1, "kind": kind(p), "kernel_cpu_s": float(np.mean(vals)),
                        "kernel_spread": float((max(vals) - min(vals)) / np.mean(vals)) if np.mean(vals) else 0.0})
    return out


def fit(rows: list[dict], fixed: dict, features=FITTED) -> dict:
    try:
        from scipy.optimize import nnls
    except ImportError:
        from guests.errors import InputError
        raise InputError("ksmd fit: scipy is not installed: pip install 'vmhost[fit]'") from None
    rows = [r for r in rows if r["kernel_cpu_s"] > 1e-4]
    a = np.array([[r.get(f, 0) for f in features] for r in rows], dtype=float)
    y = np.array([r["kernel_cpu_s"] * 1e9 for r in rows])
    y_fixed = np.array([sum(r.get(f, 0) * fixed.get(f, 0) for f in FEATURES if f not in features) for r in rows])
    w = 1.0 / y
    cost, _ = nnls(a * w[:, None], (y - y_fixed) * w)
    costs = {f: fixed.get(f, 0) for f in FEATURES}
    costs.update({f: round(float(c), 1) for f, c in zip(features, cost)})
    return {"cost_ns": costs, **_errors(rows, a @ cost + y_fixed, y), "passes": len(rows)}


def model_error(rows: list[dict], cost_ns: dict) -> dict:
    """The error of given costs (e.g. the ones in use) on the same passes."""
    rows = [r for r in rows if r["kernel_cpu_s"] > 1e-4]
    y = np.array([r["kernel_cpu_s"] * 1e9 for r in rows])
    pred = np.array([sum(r.get(f, 0) * cost_ns.get(f, 0) for f in FEATURES) for r in rows])
    return _errors(rows, pred, y)


def _errors(rows: list[dict], pred: np.ndarray, y: np.ndarray) -> dict:
    """Relative RMS error and bias of predicted against measured ns, overall and per kind of pass."""
    rel = (pred - y) / y
    per_kind = {}
    for k in ("checksum-only", "merging", "steady"):
        m = np.array([r["kind"] == k for r in rows])
        if m.any():
            per_kind[k] = {"passes": int(m.sum()), "rel_rms": float(np.sqrt(np.mean(rel[m] ** 2))),
                           "bias": float(np.sum(pred[m]) / np.sum(y[m]) - 1)}
    return {"rel_rms": float(np.sqrt(np.mean(rel ** 2))), "total_bias": float(pred.sum() / y.sum() - 1),
            "per_kind": per_kind}


def stepped_passes() -> list[dict]:
    """The passes ``vmhost bench ksm --calibrate`` measured (in the calibration file)."""
    doc = json.loads(CALIBRATION.read_text())
    out = []
    for p in doc.get("passes", []):
        r = {f: p.get(f, 0) for f in FEATURES}
        r["ptes_walked"] = p.get("ptes_walked", p.get("pages", 0))
        r["batches"] = 1
        out.append({**r, "kind": kind(r), "kernel_cpu_s": p["kernel_cpu_ns"] / 1e9})
    return out


def main(argv=None) -> int:
    from vmhost.density import load_density
    from vmhost.ksm.ksmd import COST_NS, SLEEP_EXTRA_NS
    args = list(sys.argv[1:] if argv is None else argv)
    write = "--write" in args
    files = [a for a in args if not a.startswith("--")]
    if not files:
        print("usage: python -m vmhost.reality.ksmd_fit KERNEL.json [...] [--write]", file=sys.stderr)
        return 2
    by_cfg: dict[str, list[dict]] = {}
    for f in files:
        doc = json.loads(Path(f).read_text())
        for k in (doc["kernel"] if "kernel" in doc else [doc]):
            by_cfg.setdefault(k["config"], []).append(k)
    cache = next((a.split("=", 1)[1] for a in args if a.startswith("--cache=")), None)
    rows = []
    for path, ks in by_cfg.items():
        cpath = Path(cache) / (Path(path).stem + ".passes.json") if cache else None
        if cpath is not None and cpath.is_file():
            emu_steps = json.loads(cpath.read_text())["passes"]
        else:
            # pass by pass against the kernel: every page simulated, whatever the config ships at
            emu_steps, res = emulator_passes(dataclasses.replace(load_density(path), resolution=1))
            if cpath is not None:
                cpath.parent.mkdir(parents=True, exist_ok=True)
                cpath.write_text(dumps_json({"passes": emu_steps, "result": res}, compact=True))
        rows += [dict(r, config=path) for r in pairs(emu_steps, ks)]
    if "--with-stored" in args:
        # the passes of the previous fit (other configs), kept in the calibration file
        stored = json.loads(CALIBRATION.read_text()).get("density_fit", {}).get("rows", [])
        rows += [r for r in stored if r.get("config") not in by_cfg]
        by_cfg.update({r["config"]: [] for r in stored if r.get("config") not in by_cfg})
    cur = {k: v for k, v in COST_NS.items()}
    if "pages" in cur and "ptes_walked" not in cur:
        cur["ptes_walked"] = 0
    before = model_error(rows, cur)
    f = fit(rows, cur)
    print(f"{len(rows)} passes from {len(by_cfg)} config(s)")
    print(f"costs in use: {cur}: rel RMS {before['rel_rms']:.3f}, total bias {before['total_bias']:+.3f}; "
          + "; ".join(f"{k}: rms {v['rel_rms']:.3f} bias {v['bias']:+.3f} ({v['passes']})"
                      for k, v in before["per_kind"].items()))
    print(f"fitted: {f['cost_ns']}: rel RMS {f['rel_rms']:.3f}, total bias {f['total_bias']:+.3f}; "
          + "; ".join(f"{k}: rms {v['rel_rms']:.3f} bias {v['bias']:+.3f} ({v['passes']})"
                      for k, v in f["per_kind"].items()))
    stepped = stepped_passes()
    if stepped:
        for label, costs in (("in use", cur), ("fitted", f["cost_ns"])):
            e = model_error(stepped, costs)
            print(f"cross-check on the stepped single-pass workloads (4 KiB pages, bench ksm --calibrate), "
                  f"{label}: rel RMS {e['rel_rms']:.3f}, total bias {e['total_bias']:+.3f}; "
                  + "; ".join(f"{k}: bias {v['bias']:+.3f} ({v['passes']})" for k, v in e["per_kind"].items()))
        f["stepped_check"] = model_error(stepped, f["cost_ns"])
    if "--rows" in args:
        cost = f["cost_ns"]
        for r in rows:
            pred = sum(r.get(k, 0) * cost[k] for k in FEATURES) / 1e9
            old = sum(r.get(k, 0) * cur.get(k, 0) for k in FEATURES) / 1e9
            print(f"  {Path(r['config']).stem:<22} N={r['guests']} pass {r['pass']:>2} {r['kind']:<13} "
                  + " ".join(f"{k}={r.get(k, 0)}" for k in FEATURES)
                  + f" kernel {r['kernel_cpu_s']:.3f}s (spread {r['kernel_spread']:.0%}) in use {old:.3f}s fit {pred:.3f}s")
    extra = None
    runs = [k for ks in by_cfg.values() for k in ks]
    knobs = {(int(k["host"]["knobs"]["pages_to_scan"]), int(k["host"]["knobs"]["sleep_millisecs"])) for k in runs}
    if len(knobs) == 1:
        (pts, sleep_ms), = knobs
        extra = sleep_extra_ns(runs, sleep_ms, pts)
        if extra is not None:
            print(f"timed sleep of {sleep_ms} ms: {extra[0] / 1e6:+.2f} ms on average over {extra[1]} passes "
                  f"(in use: {SLEEP_EXTRA_NS / 1e6:+.2f} ms)")
    if write:
        doc = json.loads(CALIBRATION.read_text())
        doc["cost_ns"] = f["cost_ns"]
        if extra is not None:
            doc["sleep_extra_ns"] = extra[0]
            doc["sleep_extra_method"] = (f"ksmd_fit {datetime.date.today().isoformat()}: wall time between two "
                                         f"full-scan ticks less ksmd's CPU and run-queue wait, per batch, less "
                                         f"sleep_millisecs {sleep_ms}; {extra[1]} passes of >= 5 batches")
        doc["density_fit"] = {"date": datetime.date.today().isoformat(), "configs": sorted(by_cfg),
                              "kernel_runs": sum(len(v) for v in by_cfg.values())
                              + (doc.get("density_fit", {}).get("kernel_runs", 0) if "--with-stored" in args else 0),
                              "passes": len(rows),
                              "rel_rms": f["rel_rms"], "total_bias": f["total_bias"], "per_kind": f["per_kind"],
                              "stepped_check": f.get("stepped_check"),
                              "previous_costs_error": before, "rows": rows}
        CALIBRATION.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
