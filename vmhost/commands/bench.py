"""``vmhost bench ...``: benchmarks that report figures (they never pass or fail)."""

from __future__ import annotations

import argparse
import json

from vmhost.commands.common import Parser, switches, whole_number
from vmhost.profile import PROFILES


def register(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True, parser_class=Parser)
    rmap = bench_sub.add_parser("rmap", help="rmap walk cost of a forking server (anon_vma chains)")
    rmap.add_argument("--children", type=whole_number, default=1000)
    rmap.add_argument("--pages", type=whole_number, default=1000)
    rmap.add_argument("--profile", choices=sorted(PROFILES), default="linux-6.18")
    switches(rmap, "json")
    rmap.set_defaults(func=_rmap)
    ksm = bench_sub.add_parser("ksm", help="KSM scan speed and memory: real kernel vs emulator")
    ksm.add_argument("--pages", type=whole_number, default=262144, help="pages (default 1 GiB)")
    ksm.add_argument("--procs", type=whole_number, default=4)
    ksm.add_argument("--scans", type=whole_number, default=2, help="steady-state passes to time")
    ksm.add_argument("--host-gib", type=float, default=None,
                     help="emulator only: a host of this many GiB filled by the processes")
    switches(ksm, "emulator_only", "json",
             kernel_only="only the real ksmd side",
             calibrate="fit ksmd's per-operation CPU costs on the real kernel",
             write="with --calibrate: write vmhost/ksm/ksmd_calibration.json",
             verbose="progress on stderr")
    ksm.set_defaults(func=_ksm)
    fleet = bench_sub.add_parser("fleet", help="fleet host simulations per second on Dask: 1 worker against 2")
    fleet.add_argument("--hosts", type=whole_number, default=200, help="hosts per scenario (default 200)")
    fleet.add_argument("--scenarios", type=whole_number, default=3, help="scenarios (default 3)")
    fleet.add_argument("--workers", default="1,2", help="worker counts to compare, comma-separated (default 1,2)")
    switches(fleet, "quiet", "json")
    fleet.set_defaults(func=_fleet)


def _rmap(args: argparse.Namespace) -> int:
    from vmhost.benchmarks import rmap
    result = rmap.run(args.children, args.pages, args.profile)
    print(json.dumps(result) if args.json else rmap.format_table(result))
    return 0


def _ksm(args: argparse.Namespace) -> int:
    import sys

    from vmhost.benchmarks import ksm
    from guests.errors import InputError
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.verbose else None
    if args.emulator_only and args.kernel_only:
        raise InputError("bench ksm: --emulator-only and --kernel-only exclude each other")
    if args.calibrate:
        result = ksm.calibrate(args.procs, args.scans, log=log)
        if args.write:
            ksm.write_calibration(result)
        print(json.dumps(result) if args.json else ksm.format_calibration(result))
        return 0
    if args.host_gib is not None:
        if args.host_gib <= 0:
            raise InputError("bench ksm: --host-gib must be positive")
        result = ksm.run_host(args.host_gib, args.procs, args.scans, log=log)
    else:
        result = ksm.run(args.pages, args.procs, args.scans, kernel=not args.emulator_only,
                         emulator=not args.kernel_only, log=log)
    print(json.dumps(result) if args.json else ksm.format_table(result))
    return 0


def _fleet(args: argparse.Namespace) -> int:
    from vmhost.benchmarks import fleet
    from guests.errors import InputError
    try:
        workers = tuple(int(w) for w in args.workers.split(","))
    except ValueError:
        raise InputError(f"bench fleet: --workers {args.workers!r} is not a comma-separated list of counts") from None
    result = fleet.run(args.hosts, args.scenarios, workers, quiet=args.quiet)
    print(json.dumps(result) if args.json else fleet.format_table(result))
    return 0
