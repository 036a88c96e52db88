"""The host's real KSM on live QEMU guests: calibration data for the emulator's prediction.

``measure()`` boots N identical guests (same kernel and initramfs, ``vmhost.reality.lab``), dumps the
RAM of each (ELF core and raw, at the same paused moment), then lets the running kernel's KSM
merge the live guests until ``pages_shared`` and ``pages_sharing`` stop moving, and reports the
counters next to what the dumps say an ideal merger could reach (pages matched by content,
``guests.dumps.cross_sharing``).

Everything that touches the real KSM happens inside ``exclusive_kernel_ksm()`` (lock, refusal
when another process uses KSM, reset, restore): the guests are started inside the block and
stopped before it ends. ksmd is stepped as the oracle does (``pages_to_scan`` above the number
of mergeable pages, ``sleep_millisecs`` 50: every wake-up is one full scan), and the counters are
sampled right after each full scan, while ksmd sleeps.

Convergence rule: the values after the last ``stable_scans`` full scans equal (within
``tolerance`` pages, default 0) the value after the scan before them. An idle guest still
writes a few pages (timers, statistics), so a tolerance of a few pages may be needed on a busy
machine; the whole run is bounded by ``timeout`` and reports ``converged: false`` if it ran out.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

from guests import dumps
from vmhost.reality import lab
from vmhost.reality.ksm_oracle import KSM_DIR, exclusive_kernel_ksm, read_vmstat, write_knob

COUNTERS = ("full_scans", "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
            "ksm_zero_pages", "stable_node_chains", "stable_node_dups")
PAGES_TO_SCAN = 1_000_000
SLEEP_MS = 50
POLL_S = 0.005


def _counters() -> dict[str, int]:
    return {c: int((KSM_DIR / c).read_text()) for c in COUNTERS}


def proc_memory(pid: int) -> dict[str, int]:
    """AnonHugePages (KiB) of the process and its KSM view (/proc/PID/ksm_stat)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(("AnonHugePages:", "Rss:")):
                k, v, _ = line.split()
                out[k.rstrip(":").lower() + "_kib"] = int(v)
        for line in Path(f"/proc/{pid}/ksm_stat").read_text().splitlines():
            k, v = line.split(None, 1)
            k = k.rstrip(":")
            if k in ("ksm_rmap_items", "ksm_merging_pages", "ksm_zero_pages",
                     "ksm_process_profit"):
                out[k] = int(v)
    except OSError:
        pass
    return out


def _stable(samples: list[dict], scans: int, tolerance: int) -> bool:
    if len(samples) < scans + 1:
        return False
    last = samples[-(scans + 1):]
    for key in ("pages_shared", "pages_sharing"):
        vals = [s[key] for s in last]
        if max(vals) - min(vals) > tolerance:
            return False
    return last[-1]["pages_sharing"] > 0


def measure(guests: int = 3, mem_mib: int = 128, dump_dir: str | os.PathLike | None = None,
            timeout: float = 120.0, stable_scans: int = 2, tolerance: int = 0,
            settle_s: float = 2.0, fingerprint: bool = True) -> dict:
    """Boot ``guests`` identical guests, dump them, let the real KSM converge; see module doc.

    ``dump_dir`` keeps the dumps (``gN.elf`` and ``gN.raw``); otherwise they go to a
    temporary directory that is removed. ``settle_s`` is how long the booted guests idle
    before the dumps and before KSM starts.
    """
    files = lab.build_guest()            # may download: do it before taking the KSM lock
    dump_dir, remove_dumps = lab.dump_directory(dump_dir, "vmhost-livesm-")
    result: dict = {"guests": guests, "mem_mib": mem_mib, "kernel_package": files.kernel_package,
                    "pages_to_scan": PAGES_TO_SCAN, "sleep_millisecs": SLEEP_MS,
                    "stable_scans": stable_scans, "tolerance": tolerance}
    started = time.monotonic()
    try:
        knobs = {"pages_to_scan": PAGES_TO_SCAN, "sleep_millisecs": SLEEP_MS}
        with merging_guests(files, guests, mem_mib, dump_dir, knobs, result, settle_s) as running:
            paths = [g.dump_both(dump_dir / f"{g.name}.elf", dump_dir / f"{g.name}.raw")
                     for g in running]
            result["dumps"] = [[str(e), str(r)] for e, r in paths]
            result["before"] = {g.name: proc_memory(g.pid) for g in running}
            result.update(converge(timeout, stable_scans, tolerance))
            result["processes"] = {g.name: proc_memory(g.pid) for g in running}
        result["wall_seconds"] = round(time.monotonic() - started, 2)
        if fingerprint:
            images = [dumps.fingerprint_dump(elf) for elf, _ in paths]
            result["zero_fraction"] = [im.header["stats"]["zero_fraction"] for im in images]
            result["ideal"] = dumps.cross_sharing(images, max_page_sharing=256)
    finally:
        remove_dumps()
    return result


@contextmanager
def merging_guests(files, guests: int, mem_mib: int, workdir: Path, knobs: dict, record: dict,
                   settle_s: float):
    """Real KSM held for us, its knobs set, ``guests`` QEMU guests booted with mem-merge on
    and left to settle: yields the running guests (and records boot time and pids).
    ksmd is stopped on the way out; exclusive_kernel_ksm restores everything else."""
    with exclusive_kernel_ksm():
        for name, value in knobs.items():
            err = write_knob(name, value)
            if err:
                raise lab.LabError(f"cannot set KSM knob {name}={value}: {err}")
        with lab.Lab(files, workdir=workdir, mem_mib=mem_mib, merge=True) as the_lab:
            t = time.monotonic()
            running = the_lab.boot(guests)
            record["boot_seconds"] = round(time.monotonic() - t, 2)
            record["pids"] = {g.name: g.pid for g in running}
            time.sleep(settle_s)
            yield running
            write_knob("run", 0)


def converge(timeout: float, stable_scans: int, tolerance: int) -> dict:
    vm0 = read_vmstat("thp_split_page", "cow_ksm")
    base = _counters()["full_scans"]
    samples: list[dict] = []
    t0 = time.monotonic()
    err = write_knob("run", 1)
    if err:
        raise lab.LabError(f"cannot start ksmd (run=1): {err}")
    converged = False
    try:
        last_fs = base
        while time.monotonic() - t0 < timeout:
            time.sleep(POLL_S)
            c = _counters()
            if c["full_scans"] == last_fs:
                continue
            last_fs = c["full_scans"]
            c["full_scans"] -= base
            c["seconds"] = round(time.monotonic() - t0, 3)
            samples.append(c)
            if _stable(samples, stable_scans, tolerance):
                converged = True
                break
    finally:
        write_knob("run", 0)
    vm1 = read_vmstat("thp_split_page", "cow_ksm")
    final = samples[-1] if samples else dict(_counters(), seconds=round(time.monotonic() - t0, 3))
    first_stable = final
    if converged:
        first_stable = samples[-(stable_scans + 1)]
    return {
        "converged": converged,
        "pages_shared": final["pages_shared"],
        "pages_sharing": final["pages_sharing"],
        "pages_unshared": final["pages_unshared"],
        "pages_volatile": final["pages_volatile"],
        "full_scans": final["full_scans"],
        "seconds_to_converge": first_stable["seconds"],
        "full_scans_to_converge": first_stable["full_scans"],
        "seconds_run": final["seconds"],
        "thp_split_page": vm1.get("thp_split_page", 0) - vm0.get("thp_split_page", 0),
        "cow_ksm": vm1.get("cow_ksm", 0) - vm0.get("cow_ksm", 0),
        "samples": samples,
    }


def format_result(r: dict) -> str:
    lines = [f"{r['guests']} guests x {r['mem_mib']} MiB ({r['kernel_package']}), "
             f"boot {r.get('boot_seconds')} s",
             f"real KSM: pages_shared {r['pages_shared']}, pages_sharing {r['pages_sharing']}, "
             f"unshared {r['pages_unshared']}, volatile {r['pages_volatile']}",
             f"  {'converged' if r['converged'] else 'NOT converged'} after "
             f"{r['full_scans_to_converge']} full scans, {r['seconds_to_converge']} s "
             f"(ran {r['full_scans']} scans, {r['seconds_run']} s); thp_split_page "
             f"{r['thp_split_page']}; whole measurement {r.get('wall_seconds')} s"]
    if "ideal" in r:
        tot = r["ideal"]["total"]
        lines.append(f"dumps: zero fraction {', '.join(f'{z:.3f}' for z in r['zero_fraction'])}; "
                     f"ideal non-zero sharing {tot['ideal_sharing']} "
                     f"(shared {tot['ideal_shared']}; with max_page_sharing 256: sharing "
                     f"{tot['capped_sharing']}, shared {tot['capped_shared']}); self "
                     f"{r['ideal']['self_sharing']}, inter {r['ideal']['inter_sharing']}")
    return "\n".join(lines)
