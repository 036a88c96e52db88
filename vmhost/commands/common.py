"""Helpers shared by the subcommand modules."""

from __future__ import annotations

import argparse

from guests.errors import InputError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        where = self.prog.removeprefix("vmhost").strip()
        raise InputError(f"{where}: {message}" if where else message)


#: On/off options several commands share: one name, one meaning, one help text.
SHARED_SWITCHES = {
    "json": "print the result as JSON",
    "quiet": "no progress on stderr: only the result",
    "emulator_only": "only the emulator side (no root, no real KSM)",
}


def switches(parser, *shared: str, **own: str) -> None:
    """On/off options, off unless given: ``shared``, names of :data:`SHARED_SWITCHES`; ``own``,
    a command's own, one keyword and its help each (``no_thp="..."`` is ``--no-thp``)."""
    for name, text in [(name, SHARED_SWITCHES[name]) for name in shared] + list(own.items()):
        parser.add_argument("--" + name.replace("_", "-"), action="store_true", help=text)


def whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def print_trace_result(result: dict, as_json: bool) -> None:
    from vmhost.ksm.trace import dumps_result, format_result
    print(dumps_result(result) if as_json else format_result(result), end="" if as_json else "\n")
