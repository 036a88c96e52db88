"""``vmhost ksm ...``: KSM traces in the emulator and in the kernel, and the sysfs view."""

from __future__ import annotations

import argparse
import sys

from vmhost.commands.common import Parser, print_trace_result, switches, whole_number


def register(sub) -> None:
    ksm = sub.add_parser("ksm", help="KSM traces: replay in the emulator, run in the kernel")
    ksm_sub = ksm.add_subparsers(dest="ksm", required=True, parser_class=Parser)
    replay = ksm_sub.add_parser("replay", help="replay a KSM trace in the emulator")
    replay.add_argument("trace")
    switches(replay, "json", check="run the invariant checker after every step")
    replay.add_argument("--sysfs", metavar="DIR",
                        help="also write the final state as a KSM sysfs directory")
    replay.set_defaults(func=_replay)
    oracle = ksm_sub.add_parser("oracle", help="run a KSM trace in this machine's kernel (root)")
    oracle.add_argument("trace")
    switches(oracle, "json")
    oracle.set_defaults(func=_oracle)
    fuzz = ksm_sub.add_parser("fuzz", help="random traces in the emulator and the kernel (root): "
                              "differences shrunk and written as corpus traces")
    fuzz.add_argument("--seed", type=whole_number, required=True)
    fuzz.add_argument("--count", type=whole_number, required=True)
    fuzz.add_argument("--start", type=whole_number, default=0,
                      help="index of the first trace (to resume or split a campaign)")
    fuzz.add_argument("--out", metavar="DIR", help="write differing traces and summary.json here")
    switches(fuzz, "emulator_only", "json",
             no_shrink="keep differing traces whole",
             no_thp="plain regions instead of THP ones (the kernel's THP is not repeatable)")
    fuzz.set_defaults(func=_fuzz)
    sysfs = ksm_sub.add_parser("sysfs", help="write the state after a trace as /sys/kernel/mm/ksm files")
    sysfs.add_argument("directory")
    sysfs.add_argument("--trace", required=True, help="the trace whose final state is written")
    sysfs.set_defaults(func=_sysfs)


def _replay(args: argparse.Namespace) -> int:
    from vmhost.ksm import sysfs
    from vmhost.ksm.replay import Replay
    from vmhost.ksm.trace import load_trace
    run = Replay(load_trace(args.trace), check_invariants=args.check)
    result = run.run()
    if args.sysfs:
        sysfs.write(run.ksm, args.sysfs)
    print_trace_result(result, args.json)
    return 0


def _oracle(args: argparse.Namespace) -> int:
    from vmhost.reality.ksm_oracle import OracleError, run_oracle
    from vmhost.ksm.trace import load_trace
    trace = load_trace(args.trace)
    try:
        result = run_oracle(trace)
    except OracleError as exc:
        print(f"vmhost: ksm oracle: {exc}", file=sys.stderr)
        return 1
    print_trace_result(result, args.json)
    return 0


def _fuzz(args: argparse.Namespace) -> int:
    import json

    from guests.errors import InputError
    from vmhost.reality.ksm_fuzz import run_campaign
    if args.count < 1:
        raise InputError(f"ksm fuzz: --count must be positive, got {args.count}")
    if args.seed < 0 or args.start < 0:
        bad = "--seed" if args.seed < 0 else "--start"
        raise InputError(f"ksm fuzz: {bad} must be >= 0, got {getattr(args, bad[2:])}")
    s = run_campaign(args.seed, args.count, args.out, not args.no_shrink, args.emulator_only,
                     args.start, not args.no_thp)
    if args.json:
        print(json.dumps(s, indent=1))
    else:
        print(f"{s['run']} traces, {s['agreed']} agree with the "
              f"{'invariants' if s['emulator_only'] else 'kernel'}, "
              f"{len(s['mismatches'])} differ, {len(s['emulator_errors'])} emulator errors, "
              f"{len(s['kernel_unstable'])} kernel not repeatable, "
              f"{len(s['oracle_errors'])} oracle errors ({s['seconds']:.0f} s)")
        for m in s["mismatches"]:
            print(f"  trace {m['trace']} (seed {m['seed']}, {m['shrunk_steps']} steps): "
                  f"{m['diffs'][0]}")
        for m in s["emulator_errors"]:
            print(f"  trace {m['trace']} (seed {m['seed']}): emulator error {m['error']}")
    return 1 if s["mismatches"] or s["emulator_errors"] else 0


def _sysfs(args: argparse.Namespace) -> int:
    from vmhost.ksm import sysfs
    from vmhost.ksm.replay import Replay
    from vmhost.ksm.trace import load_trace
    run = Replay(load_trace(args.trace))
    run.run()
    print(sysfs.write(run.ksm, args.directory))
    return 0
