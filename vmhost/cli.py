"""The ``vmhost`` command line.

Every subcommand is a thin shell over a library call; the subcommands live in
``vmhost.commands``, one module per area. Bad input of any kind (arguments,
files) ends with a single line on stderr and exit status 2; nothing is
written before the input has been read and validated.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from guests.errors import InputError
from vmhost.commands import COMMAND_MODULES
from vmhost.commands.common import Parser


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="vmhost",
                    description="Page-level emulator of a QEMU/KVM host's memory and KSM.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"vmhost.commands.{name}").register(sub)
    return parser


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
