"""``vmhost bench ksm``: the same KSM workload in the real kernel and in the emulator.

The workload (``ksm_workload``): ``pages`` pages over ``procs`` processes, half unique, a
quarter in pairs, a quarter in groups of 8; smart_scan=0; ksmd stepped one full scan per wake-up
(pages_to_scan > pages, sleep_millisecs 50). Both engines run until steady state (the counters
pages_shared/sharing/unshared/volatile did not change over a pass) and then ``scans`` more passes.

Kernel side (inside :func:`vmhost.reality.ksm_oracle.exclusive_kernel_ksm`): one fresh interpreter per
process maps, fills and registers its share; the benchmark polls ``full_scans`` every
millisecond and, at each increment, reads ksmd's CPU time (``/proc/PID/schedstat``, ns) and the
counters. Per pass: CPU seconds of ksmd, and wall seconds between increments minus the sleep.

Emulator side: the same processes and contents on a :class:`vmhost.host.Host`, ``Ksm`` and
``Ksmd``; per pass: wall seconds of the pass (one ksmd batch = one ``do_scan``), the work
counters, and the CPU time ksmd's cost model (``COST_NS``) charges for it.

Memory: numpy bytes of frames, page tables, rmap_items and stable nodes (trees' links
included) per page ksmd scans, and the process's peak RSS.

Calibration (``--calibrate``): the kernel's CPU per pass for four kinds of pass (first pass,
merging pass, steady pass over unique pages, pass over merged pages) against the emulator's
work counters for the same passes; a least-squares fit of per-operation costs.
"""

from __future__ import annotations

import datetime
import json
import os
import resource
import select
import subprocess
import time
from pathlib import Path

import numpy as np

from guests.errors import InputError
from hw.topology import Topology
from hw.units import PAGE_SIZE
from vmhost.benchmarks.ksm_workload import Workload, child_argv

COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile")
SLEEP_MS = 50
BLOCK_PAGES = 32768                     # 128 MiB memory blocks
CALIBRATION_PATH = Path(__file__).resolve().parents[1] / "ksm" / "ksmd_calibration.json"
FIT_KEYS = ("pages", "checksums", "tree_compares", "merges")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _steady_from(passes: list[dict]) -> int | None:
    """Index of the first pass whose counters equal the previous pass's (None: not yet)."""
    for i in range(1, len(passes)):
        if all(passes[i][c] == passes[i - 1][c] for c in COUNTERS):
            return i
    return None


def _steady_pass_number(passes: list[dict]) -> int | None:
    s = _steady_from(passes)
    return None if s is None else passes[s]["pass"]


def _done(passes: list[dict], scans: int) -> bool:
    s = _steady_from(passes)
    return s is not None and len(passes) - s >= scans


def _summary(passes: list[dict], key: str) -> dict:
    s = _steady_from(passes)
    steady = [p[key] for p in passes[s:]] if s is not None else []
    return {"first_pass": passes[0][key] if passes else None,
            "merging_pass": passes[1][key] if len(passes) > 1 else None,
            "steady_pass": float(np.median(steady)) if steady else None,
            "steady_passes": len(steady)}


# ============================================================================================
# the emulator


def host_bytes_for(pages: int) -> int:
    """Physical memory of the emulated host: the workload + 1/16, whole 128 MiB blocks."""
    need = pages * PAGE_SIZE * 17 // 16
    block = BLOCK_PAGES * PAGE_SIZE
    return max(-(-need // block) * block, 2 * block)


def emulator_memory(host, ksm) -> dict:
    frames = host.frames.nbytes
    ptes = sum(v.pte.nbytes + v.ptef.nbytes for p in host.processes.values() for v in p.mm.vmas)
    items, nodes = ksm.items.nbytes, ksm.nodes.nbytes
    # the scan's tables: the hashed unstable tree and its log, the stable-tree key index, the
    # pages of each VMA it visits
    indexes = (ksm._uh.nbytes + ksm._ulog.nbytes + ksm.stable_index.slots.nbytes
               + sum(c[1].nbytes for c in ksm._cand_cache.values()))
    return {"frames": frames, "page_tables": ptes, "rmap_items": items, "stable_nodes": nodes,
            "indexes": indexes, "total": frames + ptes + items + nodes + indexes,
            "frame_count": len(host.frames),
            "rmap_item_count": ksm.items.count, "rmap_item_capacity": ksm.items.capacity,
            "stable_node_capacity": ksm.nodes.capacity,
            "stable_node_count": int(len(ksm.nodes.live()))}


def _engine_version(ksm) -> dict:
    """Which emulator engine was measured: the commit, local changes, the compiled scan."""
    root = Path(__file__).resolve().parents[2]
    out = {"fast": ksm.fast}
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                                       capture_output=True, timeout=10).stdout.strip()
        out["modified"] = subprocess.run(["git", "status", "--porcelain", "--", "vmhost/ksm", "vmhost/mm"],
                                         cwd=root, text=True, capture_output=True,
                                         timeout=10).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _work(ksm) -> dict[str, int]:
    """The engine's operation counters by name."""
    return ksm.work_counts()


_warmed = False


def _warm_up() -> float:
    """Run a tiny workload once so that a compiled (JIT) scan is not timed compiling."""
    global _warmed
    if _warmed:
        return 0.0
    _warmed = True
    t = time.perf_counter()
    run_emulator(Workload(2048, 2), scans=1, warm=False)
    return time.perf_counter() - t


def run_emulator(w: Workload, scans: int = 2, max_passes: int = 12, log=None,
                 warm: bool = True) -> dict:
    from vmhost.host import Host
    from vmhost.ksm.engine import Ksm
    from vmhost.ksm.ksmd import COST_NS, Ksmd

    warm_up = _warm_up() if warm else 0.0
    rss0 = _rss_bytes()
    t0 = time.perf_counter()
    host = Host(Topology.uniform(1, host_bytes_for(w.pages)), block_pages=BLOCK_PAGES)
    ksm = Ksm(host)
    ksmd = Ksmd(ksm, host.clock)
    contents = w.all_contents()
    for i in range(w.procs):
        lo, hi = w.bounds(i)
        mm = host.spawn(f"guest{i}").mm
        vma = mm.mmap(hi - lo, thp=False)
        mm.write(vma.start, contents[lo:hi])
        rc = mm.madvise(vma.start, hi - lo, "mergeable")
        if rc:
            raise RuntimeError(f"emulator madvise(MADV_MERGEABLE) failed: {rc}")
    del contents
    for name, value in (("smart_scan", 0), ("pages_to_scan", max(w.pages + 1, 1_000_000)),
                        ("sleep_millisecs", SLEEP_MS), ("run", 1)):
        rc = ksm.write_knob(name, str(value))
        if rc:
            raise RuntimeError(f"emulator knob {name}={value}: {rc}")
    setup = time.perf_counter() - t0

    passes = []
    while len(passes) < max_passes and not _done(passes, scans):
        work0, cpu0, scanned0 = _work(ksm), ksmd.cpu_ns, ksm.c.pages_scanned
        t, tc = time.perf_counter(), time.thread_time()
        if ksmd.run_full_scans(1) != 1:
            raise RuntimeError("emulated ksmd went idle")
        wall, own_cpu = time.perf_counter() - t, time.thread_time() - tc
        stats = ksm.stats()
        work1 = _work(ksm)
        work = {k: work1[k] - work0.get(k, 0) for k in sorted(work1)}
        work["pages"] = ksm.c.pages_scanned - scanned0
        rec = {"pass": len(passes) + 1, "wall_s": wall, "cpu_s": own_cpu,
               "model_cpu_s": (ksmd.cpu_ns - cpu0) / 1e9,
               "work": work, **{c: int(stats[c]) for c in COUNTERS}}
        passes.append(rec)
        if log:
            log(f"emulator pass {rec['pass']}: {wall:.2f} s  {[rec[c] for c in COUNTERS]}")
    mem = emulator_memory(host, ksm)
    total = time.perf_counter() - t0
    return {"engine": "emulator", "version": _engine_version(ksm), "warm_up_s": warm_up,
            "setup_s": setup, "total_s": total, "passes": passes,
            "steady_from_pass": _steady_pass_number(passes),
            "wall_s": _summary(passes, "wall_s"), "cpu_s": _summary(passes, "cpu_s"),
            "model_cpu_s": _summary(passes, "model_cpu_s"),
            "final": {c: passes[-1][c] for c in COUNTERS} if passes else {},
            "cost_ns": dict(COST_NS),
            "memory": {**mem, "bytes_per_page": mem["total"] / w.pages,
                       "rss_before_bytes": rss0, "rss_after_bytes": _rss_bytes(),
                       "peak_rss_bytes": _peak_rss_bytes()}}


# ============================================================================================
# the kernel


def _ksmd_pid() -> int:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as fh:
                    if fh.read().strip() == "ksmd":
                        return int(entry)
            except OSError:
                pass
    raise InputError("no ksmd thread found")


def _ksmd_cpu_ns(pid: int) -> int:
    with open(f"/proc/{pid}/schedstat") as fh:     # time on cpu (ns), wait, timeslices
        return int(fh.read().split()[0])


class _Children:
    """The workload's processes on the real kernel (started one by one: KSM sees them in order)."""

    def __init__(self, w: Workload):
        self.procs: list[subprocess.Popen] = []
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        try:
            for i in range(w.procs):
                p = subprocess.Popen(child_argv(w, i), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, cwd="/", text=True)
                self.procs.append(p)
                ready, _, _ = select.select([p.stdout], [], [], 120)
                line = p.stdout.readline() if ready else ""
                if not line.startswith("ready"):
                    raise RuntimeError(f"workload process {i} did not start ({line!r})")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for p in self.procs:
            if p.stdin and not p.stdin.closed:
                p.stdin.close()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
            if p.stdout:
                p.stdout.close()
        self.procs = []


def run_kernel(w: Workload, scans: int = 2, max_passes: int = 12, pass_timeout: float = 300.0,
               log=None) -> dict:
    from vmhost.reality.ksm_oracle import exclusive_kernel_ksm, read_knob, write_knob

    def knob(name, value):
        err = write_knob(name, value)
        if err:
            raise RuntimeError(f"cannot set KSM knob {name}={value}: {err}")

    def counters() -> dict:
        return {c: int(read_knob(c)) for c in COUNTERS + ("pages_scanned",)}

    if os.geteuid() != 0:
        raise InputError("bench ksm: the kernel side needs root (use --emulator-only)")
    pid = _ksmd_pid()
    t0 = time.perf_counter()
    with exclusive_kernel_ksm():
        knob("smart_scan", 0)
        knob("pages_to_scan", max(w.pages + 1, 1_000_000))
        knob("sleep_millisecs", SLEEP_MS)
        children = _Children(w)
        try:
            setup = time.perf_counter() - t0
            passes = []
            fs = int(read_knob("full_scans"))
            prev = counters()
            cpu_prev, wall_prev = _ksmd_cpu_ns(pid), time.perf_counter()
            knob("run", 1)
            try:
                while len(passes) < max_passes and not _done(passes, scans):
                    now_fs = int(read_knob("full_scans"))
                    now = time.perf_counter()
                    if now_fs == fs:
                        if now - wall_prev > pass_timeout:
                            raise RuntimeError(f"ksmd pass {len(passes) + 1} took over {pass_timeout} s")
                        time.sleep(0.001)
                        continue
                    cpu = _ksmd_cpu_ns(pid)
                    cur = counters()
                    if now_fs != fs + 1:
                        raise RuntimeError("ksmd ran two passes between polls; cannot separate them")
                    wall = now - wall_prev - (SLEEP_MS / 1000 if passes else 0)
                    rec = {"pass": len(passes) + 1, "cpu_s": (cpu - cpu_prev) / 1e9, "wall_s": wall,
                           "pages_scanned": cur["pages_scanned"] - prev["pages_scanned"],
                           **{c: cur[c] for c in COUNTERS}}
                    passes.append(rec)
                    if log:
                        log(f"kernel pass {rec['pass']}: cpu {rec['cpu_s']:.3f} s  "
                            f"{[rec[c] for c in COUNTERS]}")
                    fs, prev, cpu_prev, wall_prev = now_fs, cur, cpu, now
            finally:
                knob("run", 0)
        finally:
            children.close()
    return {"engine": "kernel", "ksmd_pid": pid, "setup_s": setup, "passes": passes,
            "steady_from_pass": _steady_pass_number(passes),
            "cpu_s": _summary(passes, "cpu_s"), "wall_s": _summary(passes, "wall_s"),
            "final": {c: passes[-1][c] for c in COUNTERS} if passes else {}}


# ============================================================================================
# the benchmark


def run(pages: int = 262144, procs: int = 4, scans: int = 2, kernel: bool = True,
        emulator: bool = True, mix: str = "default", log=None) -> dict:
    if pages <= 0 or procs <= 0 or procs > pages:
        raise InputError(f"need 0 < --procs <= --pages (got {procs}, {pages})")
    if scans <= 0:
        raise InputError("--scans must be positive")
    w = Workload(pages, procs, mix=mix)
    out = {"pages": pages, "procs": procs, "mix": mix, "scans": scans, "bytes": pages * PAGE_SIZE,
           "expected": w.expected(), "date": datetime.date.today().isoformat()}
    if kernel:
        out["kernel"] = run_kernel(w, scans, log=log)
    if emulator:
        out["emulator"] = run_emulator(w, scans, log=log)
    finals = [out[e]["final"] for e in ("kernel", "emulator") if e in out]
    want = {k: v for k, v in out["expected"].items()}
    out["agree"] = all({k: f.get(k) for k in want} == want for f in finals) and (
        len(finals) < 2 or finals[0] == finals[1])
    if kernel and emulator:
        k, e = out["kernel"], out["emulator"]
        ratio, ratio_cpu = {}, {}
        for key in ("first_pass", "merging_pass", "steady_pass"):
            kc, ew, ec = k["cpu_s"][key], e["wall_s"][key], e["cpu_s"][key]
            ratio[key] = (kc / ew) if kc and ew else None
            ratio_cpu[key] = (kc / ec) if kc and ec else None
        out["kernel_cpu_over_emulator_wall"] = ratio
        out["kernel_cpu_over_emulator_cpu"] = ratio_cpu
    return out


def run_host(host_gib: float, procs: int, scans: int = 1, log=None) -> dict:
    """Emulator only: a host of ``host_gib`` GiB whose processes fill it, to steady state."""
    from vmhost.footprint import Footprint, check_fits
    pages = int(host_gib * (1 << 30)) // PAGE_SIZE
    check_fits(Footprint(host_bytes_for(pages) // PAGE_SIZE, pages, pages),
               f"bench ksm --host-gib {host_gib:g}")
    t0, c0 = time.perf_counter(), time.process_time()
    r = run(pages, procs, scans, kernel=False, emulator=True, log=log)
    r["host_gib"] = host_gib
    r["wall_to_steady_s"] = time.perf_counter() - t0
    r["cpu_to_steady_s"] = time.process_time() - c0
    return r


# ============================================================================================
# ksmd CPU calibration

#: (name, mix, pages, which passes are the named kind of pass)
CALIBRATION_CASES = (
    ("default", "default", 65536),
    ("unique", "unique", 131072),        # first pass + steady passes over unique pages
    ("pairs", "pairs", 65536),           # 32 k pairs: the merging pass
    ("groups", "groups", 262144),        # passes over already merged pages
)


def _kind(case: str, n: int) -> str:
    """What a calibration pass measures: checksums only, merging, steady, or merged pages."""
    if n == 1:
        return "first"
    if case == "unique":
        return "steady_unique"          # pass 2 does the same work as every later pass
    if n == 2:
        return "merging"
    return {"groups": "merged", "pairs": "merged"}.get(case, "steady_mixed")


def calibrate(procs: int = 4, scans: int = 3, log=None) -> dict:
    from vmhost.ksm.ksmd import COST_NS
    rows = []
    runs = {}
    for case, mix, pages in CALIBRATION_CASES:
        r = run(pages, procs, scans, mix=mix, log=log)
        runs[case] = {"pages": pages, "agree": r["agree"], "final": r["kernel"]["final"]}
        for kp, ep in zip(r["kernel"]["passes"], r["emulator"]["passes"]):
            work = ep["work"]
            rows.append({"case": case, "pages_total": pages, "pass": kp["pass"],
                         "kind": _kind(case, kp["pass"]),
                         "kernel_cpu_ns": int(round(kp["cpu_s"] * 1e9)),
                         "kernel_pages_scanned": kp["pages_scanned"],
                         **{k: int(work.get(k, 0)) for k in FIT_KEYS},
                         "ptes_walked": int(work.get("ptes_walked", 0)),
                         "dups_walked": int(work.get("dups_walked", 0)),
                         "model_cpu_ns": int(round(ep["model_cpu_s"] * 1e9))})
    fit = fit_costs(rows)
    for row in rows:
        row["fitted_cpu_ns"] = int(round(sum(fit["cost_ns"][k] * row[k] for k in FIT_KEYS)))
    return {"date": datetime.date.today().isoformat(), "kernel": os.uname().release,
            "machine": {"cpus": os.cpu_count()}, "method": (
                "ksmd CPU per full pass from /proc/<ksmd>/schedstat (ns), ksmd stepped one full "
                "scan per wake-up (pages_to_scan > pages, sleep_millisecs 50, smart_scan 0); "
                "operation counts per pass from the emulator's Ksm.work on the same workload; "
                "fit: non-negative least squares on relative error (each pass weighted 1/cpu)"),
            "model_cost_ns": dict(COST_NS), "fitted_cost_ns": fit["cost_ns"],
            "fit_relative_rms_error": fit["rel_rms"], "model_relative_rms_error": fit["model_rel_rms"],
            "cases": runs, "passes": rows}


def fit_costs(rows: list[dict]) -> dict:
    from vmhost.ksm.ksmd import COST_NS
    a = np.array([[r[k] for k in FIT_KEYS] for r in rows], dtype=float)
    y = np.array([r["kernel_cpu_ns"] for r in rows], dtype=float)
    wgt = 1.0 / np.maximum(y, 1.0)
    aw, yw = a * wgt[:, None], y * wgt
    try:
        from scipy.optimize import nnls
        x, _ = nnls(aw, yw)
    except ImportError:                  # plain least squares, clipped
        x = np.clip(np.linalg.lstsq(aw, yw, rcond=None)[0], 0, None)
    pred = a @ x
    model = np.array([r["model_cpu_ns"] for r in rows], dtype=float)
    rel = lambda p: float(np.sqrt(np.mean(((p - y) / np.maximum(y, 1)) ** 2)))  # noqa: E731
    cost = {k: round(float(v), 1) for k, v in zip(FIT_KEYS, x)}
    cost["dups_walked"] = COST_NS.get("dups_walked", 0)
    return {"cost_ns": cost, "rel_rms": rel(pred), "model_rel_rms": rel(model)}


def write_calibration(result: dict, path: Path = CALIBRATION_PATH) -> Path:
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


# ============================================================================================
# output


def _f(x, fmt="{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def format_table(r: dict) -> str:
    lines = []
    if "host_gib" in r:
        lines.append(f"host {r['host_gib']} GiB, {r['pages']} pages in {r['procs']} processes, "
                     f"wall to steady state {r['wall_to_steady_s']:.1f} s "
                     f"(CPU {r['cpu_to_steady_s']:.1f} s)")
    else:
        lines.append(f"{r['pages']} pages ({r['bytes'] / 2**30:.2f} GiB) in {r['procs']} processes, "
                     f"mix {r['mix']}")
    exp = r["expected"]
    lines.append("expected steady state: " + ", ".join(f"{k} {v}" for k, v in exp.items()))
    for eng in ("kernel", "emulator"):
        if eng not in r:
            continue
        e = r[eng]
        lines.append("")
        lines.append(f"{eng}: setup {e['setup_s']:.2f} s, steady from pass {e['steady_from_pass']}")
        if eng == "kernel":
            lines.append(f"{'pass':>4} {'cpu_s':>8} {'wall_s':>8} {'Mpages/s':>9} "
                         + " ".join(f"{c[6:]:>9}" for c in COUNTERS))
            for p in e["passes"]:
                rate = p["pages_scanned"] / p["cpu_s"] / 1e6 if p["cpu_s"] else 0
                lines.append(f"{p['pass']:>4} {p['cpu_s']:>8.3f} {p['wall_s']:>8.3f} {rate:>9.3f} "
                             + " ".join(f"{p[c]:>9}" for c in COUNTERS))
        else:
            lines.append(f"{'pass':>4} {'wall_s':>8} {'cpu_s':>8} {'model_s':>8} {'checksums':>9} "
                         f"{'compares':>9} "
                         f"{'merges':>7} " + " ".join(f"{c[6:]:>9}" for c in COUNTERS))
            for p in e["passes"]:
                w = p["work"]
                lines.append(f"{p['pass']:>4} {p['wall_s']:>8.3f} {p['cpu_s']:>8.3f} "
                             f"{p['model_cpu_s']:>8.3f} "
                             f"{w.get('checksums', 0):>9} {w.get('tree_compares', 0):>9} "
                             f"{w.get('merges', 0):>7} " + " ".join(f"{p[c]:>9}" for c in COUNTERS))
            m, n = e["memory"], r["pages"]
            lines.append(f"memory: {m['bytes_per_page']:.1f} B per scanned page (frames "
                         f"{m['frames'] / n:.1f}, page tables {m['page_tables'] / n:.1f}, "
                         f"rmap_items {m['rmap_items'] / n:.1f}, stable nodes "
                         f"{m['stable_nodes'] / n:.1f}, scan tables {m['indexes'] / n:.1f}); "
                         f"peak RSS {m['peak_rss_bytes'] / 2**20:.0f} MiB")
    lines.append("")
    if "kernel_cpu_over_emulator_wall" in r:
        ra = r["kernel_cpu_over_emulator_wall"]
        lines.append("speed (kernel ksmd CPU s / emulator wall s; >1 = emulator faster): "
                     + ", ".join(f"{k} {_f(v, '{:.4f}')}" for k, v in ra.items()))
        rc = r["kernel_cpu_over_emulator_cpu"]
        lines.append("speed (kernel ksmd CPU s / emulator CPU s, robust to a loaded machine): "
                     + ", ".join(f"{k} {_f(v, '{:.4f}')}" for k, v in rc.items()))
    lines.append(f"final counters agree with each other and the expectation: {r['agree']}")
    return "\n".join(lines)


def format_calibration(c: dict) -> str:
    lines = [f"{'case':<10} {'pass':>4} {'kind':<14} {'kernel_ms':>10} {'model_ms':>9} {'fitted_ms':>9} "
             f"{'pages':>7} {'checksums':>9} {'compares':>9} {'merges':>7}"]
    for r in c["passes"]:
        lines.append(f"{r['case']:<10} {r['pass']:>4} {r['kind']:<14} {r['kernel_cpu_ns'] / 1e6:>10.2f} "
                     f"{r['model_cpu_ns'] / 1e6:>9.2f} {r['fitted_cpu_ns'] / 1e6:>9.2f} {r['pages']:>7} "
                     f"{r['checksums']:>9} {r['tree_compares']:>9} {r['merges']:>7}")
    lines.append("model  COST_NS: " + json.dumps(c["model_cost_ns"])
                 + f"  (relative RMS error {c['model_relative_rms_error']:.3f})")
    lines.append("fitted COST_NS: " + json.dumps(c["fitted_cost_ns"])
                 + f"  (relative RMS error {c['fit_relative_rms_error']:.3f})")
    return "\n".join(lines)
