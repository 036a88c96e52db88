"""Running host tasks on Dask distributed, keeping every finished result at once.

By default a local cluster of ``workers`` processes with one thread each (a host simulation
holds the GIL); with ``scheduler`` an existing Dask scheduler. Tasks already in the
:class:`~vmhost.fleet.tasks.ResultStore` are not submitted (they are *resumed*); the others
are submitted one future each and collected with ``as_completed``, each result saved the
moment it arrives and then released (the scheduler would otherwise recompute a result it
lost with a worker, although it is on disk). If a worker dies, the scheduler resubmits its
running tasks elsewhere; what had already arrived is never recomputed, and an interrupted run
leaves the store with every task that had finished.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass
from typing import Callable, ContextManager, Iterator

from guests.errors import InputError
from vmhost.fleet.config import Fleet
from vmhost.fleet.placement import Placement, place
from vmhost.fleet.result import summarize
from vmhost.fleet.tasks import ResultStore, host_task, run_host_task, task_key
from vmhost.progress import Progress


@dataclass
class RunStats:
    tasks: int
    resumed: int
    computed: int
    workers: int
    scheduler: str | None                # None: nothing was left to compute
    wall_s: float

    @property
    def tasks_per_s(self) -> float | None:
        return round(self.computed / self.wall_s, 3) if self.computed and self.wall_s > 0 else None


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, workers: int = 2, quiet: bool = False) -> Iterator:
    """A Client on a fresh LocalCluster (processes), or on the scheduler at ``scheduler``."""
    from distributed import Client, LocalCluster
    level = logging.CRITICAL if quiet else logging.ERROR
    logging.getLogger("distributed").setLevel(level)
    if scheduler:
        try:
            client = Client(scheduler, timeout="10s")
        except (OSError, TimeoutError, ValueError) as exc:
            raise InputError(f"--scheduler {scheduler}: cannot connect ({exc})") from None
        with client:
            try:
                client.wait_for_workers(1, timeout=60)
            except TimeoutError:
                raise InputError(f"--scheduler {scheduler}: no worker joined within 60 s") from None
            yield client
        return
    with LocalCluster(n_workers=workers, processes=True, threads_per_worker=1,
                      dashboard_address=None, silence_logs=level) as cluster, Client(cluster) as client:
        yield client


def run_tasks(tasks: dict[str, dict], store: ResultStore, connect: Callable[[], ContextManager], *,
              quiet: bool = False, on_result: Callable[[str, dict], None] | None = None,
              ) -> tuple[dict[str, dict], RunStats]:
    """Every task's record (key -> record): from the store, or computed on the Dask client
    that ``connect()`` yields (entered only if something is left to compute)."""
    from distributed import as_completed
    t0 = time.perf_counter()
    records = {k: r for k in tasks if (r := store.load(k)) is not None}
    resumed = len(records)
    todo = [k for k in tasks if k not in records]
    workers, address = 0, None
    with Progress(len(tasks), "fleet", quiet=quiet) as prog:
        if resumed:
            prog.advance(resumed, note=f"{resumed} resumed from {store.dir}")
        if todo:
            with connect() as client:
                workers = len(client.scheduler_info().get("workers", {}))
                address = client.scheduler.address
                futures = [client.submit(run_host_task, k, tasks[k], key=f"vmhost-fleet-{k}")
                           for k in todo]
                try:
                    for fut in as_completed(futures):
                        record = fut.result()
                        store.save(record)
                        # kept on disk now: let the scheduler forget it, or a worker's death
                        # would have the result it holds recomputed
                        fut.release()
                        records[record["key"]] = record
                        prog.advance(1, note=f"host of {len(tasks[record['key']]['vms'])} VMs "
                                             f"in {record['wall_s']:.2f}s")
                        if on_result is not None:
                            on_result(record["key"], record)
                finally:
                    client.cancel([f for f in futures if not f.done()])
    stats = RunStats(len(tasks), resumed, len(todo), workers, address,
                     round(time.perf_counter() - t0, 3))
    return records, stats


def plan(fleet: Fleet) -> tuple[list[Placement], list[list[str]], dict[str, dict]]:
    """Every scenario placed; per scenario its hosts' task keys; the distinct tasks."""
    placements = [place(s) for s in fleet.scenarios]
    keys, tasks = [], {}
    for scn, pl in zip(fleet.scenarios, placements):
        ks = []
        for h in pl.hosts:
            t = host_task(scn, h, fleet.path)
            k = task_key(t)
            tasks.setdefault(k, t)
            ks.append(k)
        keys.append(ks)
    return placements, keys, tasks


def run_fleet(fleet: Fleet, store: ResultStore, connect: Callable[[], ContextManager], *,
              quiet: bool = False, on_result: Callable[[str, dict], None] | None = None) -> dict:
    """Place, simulate every host on Dask, and sum up (see :mod:`vmhost.fleet.result`)."""
    placements, keys, tasks = plan(fleet)
    records, stats = run_tasks(tasks, store, connect, quiet=quiet, on_result=on_result)
    res = summarize(fleet, placements, keys, records)
    res["run"] = {**asdict(stats), "tasks_per_s": stats.tasks_per_s, "state": str(store.dir)}
    return res
