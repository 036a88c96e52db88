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

    ksm = sub.add_parser("ksm", help="KSM traces: replay in the emulator, run in the kernel")
    ksm_sub = ksm.add_subparsers(dest="ksm", required=True, parser_class=_Parser)
    replay = ksm_sub.add_parser("replay", help="replay a KSM trace in the emulator")
    replay.add_argument("trace")
    replay.add_argument("--json", action="store_true", help="print the result as JSON")
    replay.add_argument("--check", action="store_true",
                        help="run the invariant checker after every step")
    replay.add_argument("--sysfs", metavar="DIR", help="also write the final state as a KSM sysfs directory")
    replay.set_defaults(func=_ksm_replay)
    oracle = ksm_sub.add_parser("oracle", help="run a KSM trace in this machine's kernel (root)")
    oracle.add_argument("trace")
    oracle.add_argument("--json", action="store_true", help="print the result as JSON")
    oracle.set_defaults(func=_ksm_oracle)
    sysfs = ksm_sub.add_parser("sysfs", help="write the state after a trace as /sys/kernel/mm/ksm files")
    sysfs.add_argument("directory")
    sysfs.add_argument("--trace", required=True, help="the trace whose final state is written")
    sysfs.set_defaults(func=_ksm_sysfs)
    return parser


def _bench_rmap(args: argparse.Namespace) -> int:
    from vmhost.benchmarks import rmap
    result = rmap.run(args.children, args.pages, args.profile)
    print(json.dumps(result) if args.json else rmap.format_table(result))
    return 0


def _print_result(result: dict, as_json: bool) -> None:
    from vmhost.ksm.trace import dumps_result, format_result
    print(dumps_result(result) if as_json else format_result(result), end="" if as_json else "\n")


def _ksm_replay(args: argparse.Namespace) -> int:
    from vmhost.ksm import sysfs
    from vmhost.ksm.replay import Replay
    from vmhost.ksm.trace import load_trace
    run = Replay(load_trace(args.trace), check_invariants=args.check)
    result = run.run()
    if args.sysfs:
        sysfs.write(run.ksm, args.sysfs)
    _print_result(result, args.json)
    return 0


def _ksm_oracle(args: argparse.Namespace) -> int:
    from vmhost.ksm.oracle import OracleError, run_oracle
    from vmhost.ksm.trace import load_trace
    trace = load_trace(args.trace)
    try:
        result = run_oracle(trace)
    except OracleError as exc:
        print(f"vmhost: ksm oracle: {exc}", file=sys.stderr)
        return 1
    _print_result(result, args.json)
    return 0


def _ksm_sysfs(args: argparse.Namespace) -> int:
    from vmhost.ksm import sysfs
    from vmhost.ksm.replay import Replay
    from vmhost.ksm.trace import load_trace
    run = Replay(load_trace(args.trace))
    run.run()
    print(sysfs.write(run.ksm, args.directory))
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
