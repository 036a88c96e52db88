"""``vmhost hotremove``: memory hot-remove scenarios with merged pages, and the offline benchmark."""

from __future__ import annotations

import argparse
import sys

from guests.errors import InputError
from vmhost.commands.common import switches, whole_number
from vmhost.reports.files import dumps_json


def register(sub) -> None:
    p = sub.add_parser("hotremove", help="run a memory hot-remove scenario (or --bench)")
    p.add_argument("scenario", nargs="?", help="scenario YAML (see vmhost/hotremove.py)")
    switches(p, "json")
    p.add_argument("--report", metavar="DIR", help="also write report.html (plots, works offline), result.json, "
                                                   "report.txt and CSV tables to DIR (atomically)")
    switches(p, bench="benchmark: offline blocks full of merged pages, report pages/s")
    p.add_argument("--gib", type=whole_number, default=16, help="--bench: GiB to offline (default 16)")
    switches(p,
             oracle="also run the scenario on this machine's kernel (root; real memory blocks) and compare each offline with the emulator")
    p.add_argument("--repeat", type=whole_number, default=3,
                   help="--oracle: real runs to average (default 3)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.bench:
        if args.scenario:
            raise InputError("hotremove: give a scenario or --bench, not both")
        if args.gib <= 0:
            raise InputError("hotremove: --gib must be positive")
        from vmhost.benchmarks import offline
        result = offline.run(args.gib)
        if args.report:
            from pathlib import Path
            Path(args.report).mkdir(parents=True, exist_ok=True)
            (Path(args.report) / "bench.json").write_text(dumps_json(result))
        print(dumps_json(result, compact=True) if args.json else offline.format_result(result))
        return 0
    if not args.scenario:
        raise InputError("hotremove: a scenario file is required (or --bench)")
    from vmhost.hotremove import Runner, format_result, load_scenario, write_report
    scn = load_scenario(args.scenario)          # every input error is raised here, before any output
    if args.oracle:
        if args.repeat <= 0:
            raise InputError("hotremove: --repeat must be positive")
        from vmhost.reality.hotremove_oracle import OracleError, check_scenario, compare, format_comparison
        check_scenario(scn)
        try:
            cmp = compare(args.scenario, args.repeat)
        except OracleError as exc:
            print(f"hotremove oracle: {exc}", file=sys.stderr)
            return 1
        if args.report:
            from pathlib import Path
            Path(args.report).mkdir(parents=True, exist_ok=True)
            (Path(args.report) / "oracle.json").write_text(dumps_json(cmp))
        print(dumps_json(cmp, compact=True) if args.json else format_comparison(cmp))
        return 0 if cmp["agree"] else 1
    result = Runner(scn).run()
    if args.report:
        write_report(result, args.report)
    print(dumps_json(result, compact=True) if args.json else format_result(result))
    return 0 if result["content_unchanged"] else 1
