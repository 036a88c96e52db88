"""Helpers shared by the subcommand modules."""

from __future__ import annotations

import argparse

from guests.errors import InputError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        where = self.prog.removeprefix("vmhost").strip()
        raise InputError(f"{where}: {message}" if where else message)


def switches(parser, **helps: str) -> None:
    """On/off options, one keyword and its help each (``no_thp="..."`` is ``--no-thp``), off unless given."""
    for name, text in helps.items():
        parser.add_argument("--" + name.replace("_", "-"), action="store_true", help=text)


def whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def print_trace_result(result: dict, as_json: bool) -> None:
    from vmhost.ksm.trace import dumps_result, format_result
    print(dumps_result(result) if as_json else format_result(result), end="" if as_json else "\n")
