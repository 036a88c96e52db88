"""The ``vmhost`` command line.

Every subcommand is a thin shell over a library call. Bad input of any kind
(arguments, files) ends with a single line on stderr and exit status 2;
nothing is written before the input has been read and validated.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from vmhost.errors import InputError
from vmhost.profile import PROFILES


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        where = self.prog.removeprefix("vmhost").strip()
        raise InputError(f"{where}: {message}" if where else message)


def _int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vmhost", description="Page-level emulator of a QEMU/KVM host's memory and KSM.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    rmap = bench_sub.add_parser("rmap", help="rmap walk cost of a forking server (anon_vma chains)")
    rmap.add_argument("--children", type=_int, default=1000)
    rmap.add_argument("--pages", type=_int, default=1000)
    rmap.add_argument("--profile", choices=sorted(PROFILES), default="linux-6.18")
    rmap.add_argument("--json", action="store_true", help="print JSON")
    rmap.set_defaults(func=_bench_rmap)
    return parser


def _bench_rmap(args: argparse.Namespace) -> int:
    from vmhost.benchmarks import rmap
    result = rmap.run(args.children, args.pages, args.profile)
    print(json.dumps(result) if args.json else rmap.format_table(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except InputError as exc:
        print(f"vmhost: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
