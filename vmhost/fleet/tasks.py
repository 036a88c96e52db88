"""The unit of work: one host simulation as a Dask task, and the store of finished results.

A task is a plain mapping (host document, VMs, simulation settings) and
:func:`run_host_task` a plain top-level function, so both pickle to any worker, local or
remote. Workers must see the same files the task names (image YAML paths are absolute).

Every task is named by the SHA-256 of what determines its result: the task itself (not the
fleet file's path, which only labels errors), the contents of image files it names, and the
source of the simulator (so that a changed model never reuses an old result). Identical
hosts in different scenarios are therefore one task, and :class:`ResultStore` -- one JSON
file per finished task, written atomically -- is a cache any later run can reuse: a run that
was interrupted or lost a worker resumes with what was already finished.

``VMHOST_FLEET_TASK_LOG=FILE`` makes every task execution append a line (task key, worker pid,
seconds) to FILE: how to see which tasks ran where, and that none ran twice.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from vmhost.fleet.config import Scenario
from vmhost.fleet.placement import PlacedHost
from vmhost.reports.files import dumps_json

# parts of the packages that do not change what a host simulation computes
_NOT_THE_MODEL = ("vmhost/commands", "vmhost/fleet", "vmhost/benchmarks", "vmhost/reports",
                  "vmhost/cli.py", "vmhost/progress.py")
TASK_LOG_ENV = "VMHOST_FLEET_TASK_LOG"


def host_task(scn: Scenario, h: PlacedHost, fleet_path: str) -> dict:
    model = scn.models[h.model]
    vms = [scn.vms[i] for i in h.vms]
    return {
        "host": model.doc,
        "vms": [{"name": v.name, "image": v.image, "memory_mib": v.memory_mib, "domain": v.domain,
                 "nosharepages": v.nosharepages, "locked": v.locked} for v in vms],
        "resolution": scn.sim.resolution, "seed": scn.sim.seed, "settle": scn.sim.settle,
        "write_period": scn.sim.write_period, "boot": scn.sim.boot,
        "path": f"{fleet_path}: hosts[{model.index}]",
    }


def task_key(task: dict) -> str:
    ident = {k: v for k, v in task.items() if k != "path"}
    images = sorted({v["image"] for v in task["vms"] if os.path.isabs(v["image"])})
    blob = json.dumps({"task": ident, "images": [_file_digest(p) for p in images],
                       "model": model_digest()}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


@functools.lru_cache(maxsize=None)
def _file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@functools.lru_cache(maxsize=1)
def model_digest() -> str:
    """SHA-256 of the simulator's source and data (hw, guests, vmhost minus the UI layers)."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for pkg in ("hw", "guests", "vmhost"):
        for p in sorted((root / pkg).rglob("*")):
            rel = p.relative_to(root).as_posix()
            if p.suffix not in (".py", ".yaml", ".json") or not p.is_file() \
                    or any(rel.startswith(x) for x in _NOT_THE_MODEL):
                continue
            h.update(rel.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def run_host_task(key: str, task: dict) -> dict:
    """Simulate one host (on a Dask worker); returns the record the store keeps."""
    from vmhost.hostsim import VmSpec, simulate_host
    t0 = time.perf_counter()
    result = simulate_host(task["host"], [VmSpec(**v) for v in task["vms"]],
                           resolution=task["resolution"], seed=task["seed"], settle=task["settle"],
                           write_period=task["write_period"], boot=task["boot"], path=task["path"])
    wall = time.perf_counter() - t0
    log = os.environ.get(TASK_LOG_ENV)
    if log:
        with open(log, "a") as fh:
            fh.write(f"{key} {os.getpid()} {wall:.3f}\n")
    # through JSON here, so that a fresh result and one read back from the store are equal
    return json.loads(dumps_json({"key": key, "result": result, "wall_s": round(wall, 4)}))


class ResultStore:
    """One ``<key>.json`` per finished task in a directory; written atomically, so a file
    that exists is whole (an interrupted write leaves only a temporary file)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    def load(self, key: str) -> dict | None:
        try:
            record = json.loads((self.dir / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and record.get("key") == key else None

    def save(self, record: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{record['key']}.", suffix=".tmp", dir=self.dir)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(record, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.dir / f"{record['key']}.json")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def default_state_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vmhost" / "fleet"
