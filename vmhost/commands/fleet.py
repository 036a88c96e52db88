"""``vmhost fleet``: hosts needed by a VM inventory per placement policy and sweep value, on Dask."""

from __future__ import annotations

import argparse
import json
import os
import sys

from guests.errors import InputError
from vmhost.commands.common import switches, whole_number


def register(sub) -> None:
    p = sub.add_parser("fleet", help="place a VM inventory on host models and simulate every host "
                                     "(on Dask distributed)")
    p.add_argument("config", help="fleet YAML (hosts, inventory, placement, simulation, sweep; "
                                  "see vmhost/fleet/__init__.py)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="an existing Dask scheduler (e.g. tcp://10.0.0.5:8786); default: a local cluster")
    p.add_argument("--workers", type=whole_number, metavar="N",
                   help="worker processes of the local cluster (default: the CPU count)")
    p.add_argument("--report", metavar="DIR", help="also write report.html (offline), result.json, "
                                                   "report.txt and CSV tables to DIR (atomically)")
    p.add_argument("--state", metavar="DIR",
                   help="where finished host simulations are kept, so that a re-run resumes "
                        "(default: $XDG_CACHE_HOME/vmhost/fleet)")
    switches(p, "json", "quiet")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from vmhost.fleet.config import load_fleet
    from vmhost.fleet.result import format_result
    from vmhost.fleet.runner import dask_client, run_fleet
    from vmhost.fleet.tasks import ResultStore, default_state_dir
    from vmhost.reports.fleet import write_fleet_report
    if args.scheduler and args.workers is not None:
        raise InputError("fleet: --workers sizes the local cluster; an existing scheduler has its own workers")
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    if workers < 1:
        raise InputError(f"fleet: --workers must be at least 1 (got {workers})")
    fleet = load_fleet(args.config)        # every input error is raised here, before any output
    store = ResultStore(args.state or default_state_dir())
    try:
        result = run_fleet(fleet, store, lambda: dask_client(args.scheduler, workers, quiet=args.quiet),
                           quiet=args.quiet)
    except KeyboardInterrupt:
        print(f"vmhost: fleet: interrupted; the finished host simulations are kept in {store.dir}: "
              f"run the same command again to resume", file=sys.stderr)
        return 130
    if args.report:
        write_fleet_report(result, args.report, format_result(result))
    print(json.dumps(result) if args.json else format_result(result))
    return 0
