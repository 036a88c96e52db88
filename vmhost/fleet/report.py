"""The fleet report directory: result.json and CSV tables (scenarios, hosts), written atomically."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

SCENARIO_COLUMNS = ("name", "policy", "hosts_needed", "vms", "vms_placed", "configured_pages",
                    "no_ksm_pages", "used_pages", "saved_pages", "saved_fraction",
                    "estimated_saved_pages", "swapin_pages", "swapout_pages", "hosts_swapping",
                    "hosts_with_oom", "ksmd_cpu_s", "ksmd_cpu_share_mean", "ksmd_cpu_share_max",
                    "hosts_not_steady")
HOST_COLUMNS = ("scenario", "host", "model", "vm_count", "ram_pages", "configured_pages",
                "charged_pages", "estimated_saved_pages", "no_ksm_pages", "used_pages",
                "saved_pages", "free_pages", "swapin_pages", "swapout_pages", "oom_kill_count",
                "ksmd_cpu_s", "ksmd_cpu_share", "steady")


def tables(res: dict) -> dict[str, tuple[tuple[str, ...], list[list]]]:
    hosts = [{**h, "vm_count": len(h["vms"]), "oom_kill_count": len(h["oom_kills"])} for h in res["hosts"]]
    return {"scenarios": (SCENARIO_COLUMNS, [[s[c] for c in SCENARIO_COLUMNS] for s in res["scenarios"]]),
            "hosts": (HOST_COLUMNS, [[h[c] for c in HOST_COLUMNS] for h in hosts])}


def write_report(res: dict, directory: str | Path) -> None:
    d = Path(directory)
    parent = d.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.", dir=parent))
    try:
        (tmp / "result.json").write_text(json.dumps(res, indent=2) + "\n")
        for name, (cols, rows) in tables(res).items():
            buf = io.StringIO()
            w = csv.writer(buf)
            w.writerow(cols)
            w.writerows(rows)
            (tmp / f"{name}.csv").write_text(buf.getvalue())
        if d.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{d.name}.old.", dir=parent))
            os.rename(d, old / "x")
            os.rename(tmp, d)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, d)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
