"""``vmhost import ...``: host configs from what runs elsewhere (``import libvirt``)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from guests.errors import InputError
from vmhost.commands.common import Parser, switches


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
    lv.add_argument("--sample", metavar="DIR",
                    help="also dump the memory of every running domain through libvirt "
                         "(memory-only ELF core; needs a read-write connection) and import it "
                         "as DIR/DOMAIN.vmimg, the guest's image in the host config")
    switches(lv, keep_dumps="with --sample: keep the ELF cores as DIR/DOMAIN.elf")
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
    import shutil

    from guests.libvirt_import import (LibvirtImportError, check_output_path, commit_samples,
                                       host_config_document, import_host, render_yaml,
                                       sample_domains, write_text_atomically)
    from vmhost.config import parse_host_config
    if args.keep_dumps and not args.sample:
        raise InputError("import libvirt: --keep-dumps needs --sample DIR")
    stage = None
    try:
        check_output_path(args.output)
        with _stderr_silenced():
            host = import_host(args.uri)
            if args.sample:
                running = [g.name for g in host.guests if g.running]
                samples, stage = sample_domains(args.uri, args.sample, running, args.keep_dumps)
                out_dir = os.path.dirname(os.path.abspath(args.output))
                for g in host.guests:
                    if g.name in samples:
                        final = os.path.join(os.path.abspath(args.sample), samples[g.name].name)
                        g.image = os.path.relpath(final, out_dir)
                host.notes.append(f"running guests' memory sampled into {args.sample} "
                                  "(virDomainCoreDumpWithFormat, memory-only ELF, imported)")
        doc = host_config_document(host)
        try:
            parse_host_config(doc, args.output, extra_keys=("guests",))
        except InputError as exc:
            raise InputError(f"import libvirt: {args.uri}: the imported host is not a valid "
                             f"host config: {exc}") from None
        write_text_atomically(args.output, render_yaml(host, doc))
        if stage is not None:
            commit_samples(samples, stage)
            stage = None
    except LibvirtImportError as exc:
        raise InputError(f"import libvirt: {exc}") from None
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
    running = sum(g.running for g in host.guests)
    sampled = f"; {len(samples)} sampled into {args.sample}" if args.sample else ""
    print(f"{args.output}: {len(host.cells)} node(s) from {host.cells_from}, "
          f"{len(host.guests)} guest(s) ({running} running) from {args.uri}{sampled}")
    return 0
