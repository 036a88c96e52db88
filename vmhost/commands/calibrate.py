"""``vmhost calibrate ...``: the emulator against the real kernel on live QEMU guests."""

from __future__ import annotations

import argparse
import json
import sys

from vmhost.commands.common import Parser, switches, whole_number


def register(sub) -> None:
    cal = sub.add_parser("calibrate", help="check the emulator against the real kernel")
    cal_sub = cal.add_subparsers(dest="calibrate", required=True, parser_class=Parser)
    q = cal_sub.add_parser("qemu", help="boot small QEMU guests, let the real KSM merge them and "
                                        "compare with the emulator's prediction from their dumps")
    q.add_argument("--guests", type=whole_number, default=3, help="number of guests (3)")
    q.add_argument("--mem", type=whole_number, default=128, help="guest RAM in MiB (128)")
    q.add_argument("--dumps", metavar="DIR", help="keep the dumps in DIR")
    q.add_argument("--timeout", type=float, default=90.0,
                   help="bound on the real KSM's convergence, seconds (90)")
    switches(q, "json", running="let the guests run while KSM merges (default: paused after the dump)")
    q.set_defaults(func=_qemu)


def _qemu(args: argparse.Namespace) -> int:
    from vmhost.reality.lab import LabError
    from vmhost.reality import calibrate
    from guests.errors import InputError
    from vmhost.reality.ksm_oracle import OracleError
    if args.guests < 2:
        raise InputError("calibrate qemu: --guests must be at least 2")
    if args.mem < 64:
        raise InputError("calibrate qemu: --mem must be at least 64 (MiB)")
    try:
        r = calibrate.run(args.guests, args.mem, args.dumps, timeout=args.timeout,
                          paused=not args.running)
    except (LabError, OracleError) as exc:
        print(f"vmhost: calibrate qemu: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(r, indent=1, default=str) if args.json else calibrate.format_result(r))
    return 0 if r["within_target"] else 3
