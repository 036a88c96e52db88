"""The hot-remove report: ``vmhost hotremove SCENARIO.yaml --report DIR``.

Built from the result dict alone (``vmhost.hotremove.Runner.run``), so that a saved
``result.json`` can be reported again. The page gives the verdict (did every page of every
process read the same before and after each step), each block the offline attempted (pages
migrated, KSM pages among them, the virtual time it took, why it failed when it did) and the
KSM counters after every step of the timeline. The CSV tables keep the exact numbers:
``steps.csv`` (one row per timeline step) and ``blocks.csv`` (one row per block offlined).
"""

from __future__ import annotations

from pathlib import Path

from vmhost.reports.model import BarPlot, LinePlot, Series, Table
from vmhost.reports.numbers import fmt
from vmhost.reports.report import Plots, Report

STEP_COLUMNS = ["step", "kind", "time_ms", "pages_shared", "pages_sharing", "pages_unshared",
                "ksm_zero_pages", "content_unchanged"]
BLOCK_COLUMNS = ["step", "kind", "blocks", "ok", "errno", "reason", "passes", "pages_migrated",
                 "ksm_pages_migrated", "ordinary_pages_migrated", "thp_migrated_whole", "thp_split",
                 "mappings_moved", "stable_nodes_pruned", "time_ms"]


def _attempts(res: dict) -> list[tuple[dict, dict]]:
    """(step, block result) for every block an offline or unplug step tried to take down."""
    return [(s, b) for s in res["steps"] if s["kind"] in ("offline", "unplug") for b in s.get("blocks", [])]


def tables(res: dict) -> list[Table]:
    steps = [[s["step"], s["kind"], s["time_ms"], s["ksm"]["pages_shared"], s["ksm"]["pages_sharing"],
              s["ksm"]["pages_unshared"], s["ksm"].get("ksm_zero_pages", 0), s["check"]["ok"]]
             for s in res["steps"]]
    blocks = [[s["step"], s["kind"], " ".join(map(str, b["blocks"]))]
              + [b.get(c) for c in BLOCK_COLUMNS[3:]] for s, b in _attempts(res)]
    return [Table("steps", STEP_COLUMNS, steps), Table("blocks", BLOCK_COLUMNS, blocks)]


def headline(res: dict) -> list[str]:
    h = res["host"]
    att = _attempts(res)
    ok = [b for _s, b in att if b["ok"]]
    failed = [b for _s, b in att if not b["ok"]]
    out = [f"{res['profile']} host of {h['nodes']} node(s), {h['blocks']} memory blocks of "
           f"{fmt(h['block_pages'] * 4 / 1024)} MiB; {h['online_blocks']} online at the end."]
    out.append("Every page of every process read the same before and after every step."
               if res["content_unchanged"] else
               f"CONTENT CHECK FAILED: {len(res['problems'])} problem(s), first: {res['problems'][:1]}.")
    if att:
        migrated = sum(b["pages_migrated"] for b in ok + failed)
        ksm = sum(b["ksm_pages_migrated"] for b in ok + failed)
        t = sum(b["time_ms"] for b in ok + failed)
        out.append(f"{len(ok)} of {len(att)} block offlines succeeded; {migrated} pages migrated "
                   f"({ksm} of them KSM pages), {fmt(t)} ms of virtual time in all.")
        for b in failed:
            out.append(f"Block(s) {', '.join(map(str, b['blocks']))} stayed online: {b['errno']} "
                       f"({b['reason'] or 'no reason given'}).")
    if res["oom_kills"]:
        out.append(f"OOM kills: {', '.join(k['name'] for k in res['oom_kills'])}.")
    pol = res.get("policy")
    if pol:
        out.append(f"KSM tuning policy {pol['name']}: {pol['wakeups']} wake-ups, "
                   f"{len(pol['changes'])} knob changes.")
    return out


PLOTS = Plots()            # the report's plots, in this order


@PLOTS.add
def _ksm_over_steps(res: dict) -> LinePlot:
    xs = [s["step"] for s in res["steps"]]
    return LinePlot("KSM after each step", "step", "pages",
                    [Series(k, xs, [s["ksm"].get(k, 0) for s in res["steps"]])
                     for k in ("pages_shared", "pages_sharing", "pages_unshared", "ksm_zero_pages")],
                    step=True, note="The KSM counters at the end of every step of the timeline.")


def _per_block(res: dict, title: str, unit: str, series: dict[str, str], note: str) -> BarPlot | None:
    """A bar plot with one group per block offlined (None without any): ``series`` maps a
    name to the field of the block's result it shows."""
    att = _attempts(res)
    if not att:
        return None
    cats = [f"{','.join(map(str, b['blocks']))} (step {s['step']})" for s, b in att]
    return BarPlot(title, unit, cats, [Series(name, [b[k] for _s, b in att]) for name, k in series.items()],
                   note=note)


@PLOTS.add
def _migrated(res: dict) -> BarPlot | None:
    return _per_block(res, "Pages migrated per block offlined", "pages",
                      {"KSM pages": "ksm_pages_migrated", "ordinary pages": "ordinary_pages_migrated"},
                      "Pages moved off each block before it went offline (also for a block that "
                      "failed, up to the failure).")


@PLOTS.add
def _times(res: dict) -> BarPlot | None:
    return _per_block(res, "Offline time per block", "ms (virtual)", {"time": "time_ms"},
                      "The cost model of vmhost.mm.migrate and vmhost.mm.hotplug.")


def build(res: dict) -> Report:
    return Report.of(f"Hot-remove: {res['scenario']}", f"{len(res['steps'])} timeline step(s)",
                     headline(res), PLOTS.of(res), tables(res))


def write_hotremove_report(res: dict, directory: str | Path, text: str) -> None:
    """report.html, result.json, report.txt (``text``, the study's own summary) and the CSV
    tables, atomically. The study hands its text over: a report never imports its study."""
    build(res).write(directory, res, files={"report.txt": text + "\n"})
