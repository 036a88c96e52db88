"""``vmhost import ...``: host configs from what runs elsewhere (``import libvirt``)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from vmhost.commands.common import Parser
from vmhost.errors import InputError


def register(sub) -> None:
    imp = sub.add_parser("import", help="write a host config from a real host's description")
    isub = imp.add_subparsers(dest="importer", required=True, parser_class=Parser)
    lv = isub.add_parser("libvirt", help="a libvirt host's NUMA cells and domains -> host config "
                                         "YAML (needs libvirt-python)")
    lv.add_argument("--uri", required=True,
                    help="libvirt connection URI (qemu:///system, test:///default, "
                         "test:///ABS/PATH/node.xml, ...); opened read-only")
    lv.add_argument("-o", "--output", required=True, metavar="HOST.yaml",
                    help="host config to write (atomically; nothing is written on an error)")
    lv.set_defaults(func=_libvirt)


@contextlib.contextmanager
def _stderr_silenced():
    """libxml2 (inside libvirt) prints its own warnings on fd 2; keep stderr to our one line."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _libvirt(args: argparse.Namespace) -> int:
    from guests.libvirt_import import (LibvirtImportError, check_output_path,
                                       host_config_document, import_host, render_yaml,
                                       write_text_atomically)
    from vmhost.config import parse_host_config
    try:
        check_output_path(args.output)
        with _stderr_silenced():
            host = import_host(args.uri)
        doc = host_config_document(host)
    except LibvirtImportError as exc:
        raise InputError(f"import libvirt: {exc}") from None
    try:
        parse_host_config(doc, args.output, extra_keys=("guests",))
    except InputError as exc:
        raise InputError(f"import libvirt: {args.uri}: the imported host is not a valid host "
                         f"config: {exc}") from None
    try:
        write_text_atomically(args.output, render_yaml(host, doc))
    except LibvirtImportError as exc:
        raise InputError(f"import libvirt: {exc}") from None
    running = sum(g.running for g in host.guests)
    print(f"{args.output}: {len(host.cells)} node(s) from {host.cells_from}, "
          f"{len(host.guests)} guest(s) ({running} running) from {args.uri}")
    return 0
