"""``vmhost bench ...``: benchmarks that report figures (they never pass or fail)."""

from __future__ import annotations

import argparse
import json

from vmhost.commands.common import Parser, whole_number
from vmhost.profile import PROFILES


def register(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True, parser_class=Parser)
    rmap = bench_sub.add_parser("rmap", help="rmap walk cost of a forking server (anon_vma chains)")
    rmap.add_argument("--children", type=whole_number, default=1000)
    rmap.add_argument("--pages", type=whole_number, default=1000)
    rmap.add_argument("--profile", choices=sorted(PROFILES), default="linux-6.18")
    rmap.add_argument("--json", action="store_true", help="print JSON")
    rmap.set_defaults(func=_rmap)


def _rmap(args: argparse.Namespace) -> int:
    from vmhost.benchmarks import rmap
    result = rmap.run(args.children, args.pages, args.profile)
    print(json.dumps(result) if args.json else rmap.format_table(result))
    return 0
