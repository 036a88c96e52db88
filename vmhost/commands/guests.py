"""``vmhost guests ...``: guest memory dumps (import, statistics) and the QEMU lab."""

from __future__ import annotations

import argparse
import json
import sys

from guests.errors import InputError
from vmhost.commands.common import Parser, switches, whole_number


def _address(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an address (e.g. 0x80000000)") \
            from None


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def register(sub) -> None:
    g = sub.add_parser("guests", help="guest memory dumps and the QEMU lab")
    gs = g.add_subparsers(dest="guests", required=True, parser_class=Parser)

    imp = gs.add_parser("import", help="fingerprint a guest memory dump (ELF core or raw)")
    imp.add_argument("dump", help="QEMU dump-guest-memory ELF core or pmemsave raw file")
    imp.add_argument("-o", "--output", required=True, metavar="IMAGE",
                     help="image file to write (zip of .npy arrays + header.json)")
    imp.add_argument("--format", choices=("auto", "elf", "raw"), default="auto")
    imp.add_argument("--jobs", type=whole_number, default=1, help="worker processes")
    imp.add_argument("--layout", choices=("pc", "flat"), default="pc",
                     help="pc: keep only PC guest RAM ranges (default); flat: every page")
    imp.add_argument("--low-ram-end", type=_address, metavar="ADDR",
                     help="end of guest RAM below 4 GiB (default: from the dump)")
    switches(imp, "json")
    imp.set_defaults(func=_import)

    info = gs.add_parser("info", help="show an image's header and statistics")
    info.add_argument("image")
    switches(info, "json")
    info.set_defaults(func=_info)

    sh = gs.add_parser("sharing", help="ideal sharing across images, pages matched by content")
    sh.add_argument("images", nargs="+")
    sh.add_argument("--max-page-sharing", type=whole_number, default=256)
    switches(sh, "json")
    sh.set_defaults(func=_sharing)

    prof = gs.add_parser("profile", help="fit a catalog image (YAML) to dumps of one kind of VM")
    prof.add_argument("dumps", nargs="*", metavar="DUMP",
                      help="ELF or raw dumps, or images of `guests import`: one per VM, several "
                           "VMs of one kind")
    prof.add_argument("--later", nargs=2, action="append", default=[], metavar=("FIRST", "SECOND"),
                      help="two dumps of one VM, SECOND taken some seconds after FIRST: the VM's "
                           "write rate and hot set (FIRST may also be one of the DUMPs, or the "
                           "SECOND of another --later: a series); repeatable")
    prof.add_argument("-o", "--output", required=True, metavar="IMAGE.yaml")
    prof.add_argument("--name", help="the image's name (default: the output file's stem)")
    prof.add_argument("--interval", type=_fraction, metavar="SECONDS",
                      help="time between consecutive dumps of one VM (default: from the dump "
                           "files' modification times)")
    prof.add_argument("--against", nargs="+", metavar="DUMP", default=[],
                      help="more dumps of VMs of the same kind for the check only (not fitted): "
                           "the profile booted once per VM is held against all of them")
    prof.add_argument("--jobs", type=whole_number, default=1, help="hashing processes for dumps")
    switches(prof, "json")
    prof.set_defaults(func=_profile)

    bench = gs.add_parser("bench-import", help="dump import throughput on a synthetic dump")
    bench.add_argument("--size-mib", type=whole_number, default=1024)
    bench.add_argument("--jobs", type=whole_number, default=1)
    bench.add_argument("--zero-fraction", type=_fraction, default=0.33)
    switches(bench, "json")
    bench.set_defaults(func=_bench)

    build = gs.add_parser("build", help="build (or find in the cache) the lab's guest kernel "
                                        "and initramfs")
    build.set_defaults(func=_build)

    dump = gs.add_parser("dump", help="boot lab guests (mem-merge=off) and dump their RAM")
    dump.add_argument("-o", "--output", required=True, metavar="DIR")
    dump.add_argument("--guests", type=whole_number, default=1)
    dump.add_argument("--mem", type=whole_number, default=128, help="guest RAM in MiB")
    dump.add_argument("--write-kib-s", type=whole_number, default=0, metavar="R",
                      help="each guest rewrites a file of --hot-kib KiB at R KiB/s (a known "
                           "writer; default: idle guests)")
    dump.add_argument("--hot-kib", type=whole_number, default=16384, metavar="H",
                      help="the writer's file size in KiB (default 16384)")
    dump.add_argument("--again", type=_fraction, metavar="SECONDS",
                      help="dump every guest a second time SECONDS later (ELF only: "
                           "gN.elf, then gN-later.elf), for `guests profile` to time writes")
    dump.set_defaults(func=_dump)

    live = gs.add_parser("ksm-live", help="real host KSM on identical live guests (root)")
    live.add_argument("--guests", type=whole_number, default=3)
    live.add_argument("--mem", type=whole_number, default=128, help="guest RAM in MiB")
    live.add_argument("--dumps", metavar="DIR", help="keep the guests' dumps here")
    live.add_argument("--timeout", type=whole_number, default=120, help="seconds for KSM")
    live.add_argument("--tolerance", type=whole_number, default=0,
                      help="pages of jitter still counted as converged")
    switches(live, "json")
    live.set_defaults(func=_ksm_live)


def _dump_error(exc) -> InputError:
    return InputError(str(exc))


def _summary(header: dict) -> str:
    s = header["stats"]
    src = header["source"]
    return (f"{src['path']} ({src['format']}, {src['size']} bytes): {s['pages']} RAM pages, "
            f"{s['zero_pages']} zero ({100 * s['zero_fraction']:.1f}%), "
            f"{s['distinct_nonzero']} distinct non-zero, {s['pages_with_duplicate']} with a "
            f"duplicate, ideal sharing {s['ideal_sharing']} (shared {s['ideal_shared']})")


def _import(args: argparse.Namespace) -> int:
    from guests.dumps import DumpError, import_dump
    if args.jobs < 1:
        raise InputError(f"guests import: --jobs must be at least 1 (got {args.jobs})")
    if args.low_ram_end is not None and not 0x100000 <= args.low_ram_end <= 1 << 32:
        raise InputError(f"guests import: --low-ram-end {args.low_ram_end:#x} must be between "
                         "0x100000 and 0x100000000")
    try:
        image = import_dump(args.dump, args.output, args.format, args.jobs, args.layout,
                            args.low_ram_end)
    except DumpError as exc:
        raise _dump_error(exc) from None
    print(json.dumps(image.header, indent=1) if args.json else _summary(image.header))
    return 0


def _info(args: argparse.Namespace) -> int:
    from guests.dumps import DumpError, load_fingerprints
    try:
        image = load_fingerprints(args.image)
    except DumpError as exc:
        raise _dump_error(exc) from None
    print(json.dumps(image.header, indent=1) if args.json else _summary(image.header))
    return 0


def _sharing(args: argparse.Namespace) -> int:
    from guests.dumps import DumpError, cross_sharing, load_fingerprints
    if args.max_page_sharing < 2:
        raise InputError("guests sharing: --max-page-sharing must be at least 2")
    try:
        images = [load_fingerprints(p) for p in args.images]
    except DumpError as exc:
        raise _dump_error(exc) from None
    res = cross_sharing(images, args.max_page_sharing)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    t = res["total"]
    print(f"{res['guests']} images, {t['pages']} pages, {t['zero_pages']} zero "
          f"({100 * t['zero_fraction']:.1f}%): ideal sharing {t['ideal_sharing']} "
          f"(shared {t['ideal_shared']}); with max_page_sharing {args.max_page_sharing}: "
          f"sharing {t['capped_sharing']}, shared {t['capped_shared']}; self "
          f"{res['self_sharing']}, inter-guest {res['inter_sharing']}")
    return 0


def _profile(args: argparse.Namespace) -> int:
    from pathlib import Path

    from guests.dumps import DumpError, read_guest_image
    from guests.profile import ProfileError, fit_profile, prediction_error, write_profile
    if args.interval is not None and not args.interval > 0:
        raise InputError(f"guests profile: --interval {args.interval}: must be above 0 seconds")
    if args.jobs < 1:
        raise InputError(f"guests profile: --jobs must be at least 1 (got {args.jobs})")
    out = Path(args.output)
    if not out.name.endswith((".yaml", ".yml")):
        raise InputError(f"guests profile: {args.output}: the profile is an image YAML "
                         "(name it *.yaml)")
    if not out.resolve().parent.is_dir():
        raise InputError(f"guests profile: {args.output}: output directory "
                         f"{out.resolve().parent} does not exist")
    if not args.dumps and not args.later:
        raise InputError("guests profile: no dumps (give DUMP... and/or --later FIRST SECOND)")
    try:
        images = [read_guest_image(p, args.jobs) for p in args.dumps]
        by_path = dict(zip(args.dumps, images))
        later = [tuple(by_path.get(p) or read_guest_image(p, args.jobs) for p in pair)
                 for pair in args.later]
        doc = fit_profile(images, args.name or out.stem, args.interval, later=later)
        held = images + [read_guest_image(p, args.jobs) for p in args.against]
        check = prediction_error(doc, held, later=later)
        check["fitted_dumps"], check["checked_dumps"] = len(images), len(held)
        write_profile(doc, out)
    except (DumpError, ProfileError) as exc:
        raise InputError(f"guests profile: {exc}") from None
    if args.json:
        print(json.dumps({"profile": doc, "check": check}, indent=1))
        return 0
    m = doc["expect"]["measured"]
    print(f"{out}: {doc['name']}, {doc['memory_mib']} MiB, fitted to {m['dumps']} dump(s) of "
          f"{m['vms']} VM(s)")
    for cname, c in doc["classes"].items():
        if cname == "zero":
            continue
        extra = f", pool {c['pool']}" if "pool" in c else ""
        steady = c.get("steady")
        if steady:
            extra += f", writes {steady['rate']} pages/s over {100 * steady['hot']:.1f}% of it"
        print(f"  {cname:<10} {100 * c['fraction']:6.2f}% of pages, distinct {c['distinct']}{extra}")
    print(f"  zero       {100 * m['zero_fraction']:6.2f}% of pages (untouched at boot)")
    against = f" (out of sample: {len(args.against)} dump(s) not fitted)" if args.against else ""
    print(f"check{against}: {check['vms']} guests of the profile share {check['predicted_ideal_sharing']} "
          f"pages ideally, the dumps {check['real_ideal_sharing']} ({100 * check['ideal_error']:+.2f}%);"
          f" across guests {check['predicted_inter_sharing']} vs {check['real_inter_sharing']} "
          f"({100 * check['inter_error']:+.2f}%)")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from vmhost.benchmarks import dump_import
    r = dump_import.run(args.size_mib, args.jobs, args.zero_fraction)
    print(json.dumps(r) if args.json else dump_import.format_result(r))
    return 0


def _build(args: argparse.Namespace) -> int:
    from vmhost.reality.lab import LabError, build_guest
    try:
        files = build_guest()
    except LabError as exc:
        print(f"vmhost: guests build: {exc}", file=sys.stderr)
        return 1
    print(f"kernel {files.kernel} ({files.kernel_package})\ninitrd {files.initrd}")
    return 0


def _dump(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from vmhost.reality.lab import Lab, LabError
    if args.guests < 1 or args.mem < 16:
        raise InputError("guests dump: need --guests >= 1 and --mem >= 16")
    if args.write_kib_s and args.hot_kib < 256:
        raise InputError("guests dump: --hot-kib must be at least 256 with --write-kib-s")
    if args.again is not None and not 0 < args.again <= 3600:
        raise InputError(f"guests dump: --again {args.again}: seconds in (0, 3600]")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with Lab(workdir=out, mem_mib=args.mem, write_kib_s=args.write_kib_s,
                 hot_kib=args.hot_kib) as lab:
            guests = lab.boot(args.guests)
            if args.again is None:
                for g in guests:
                    elf, raw = g.dump_both(out / f"{g.name}.elf", out / f"{g.name}.raw")
                    print(f"{g.name}: {elf} {raw}")
                return 0
            first = []
            for g in guests:
                first.append(time.monotonic())
                print(f"{g.name}: {_paused_dump(g, out / f'{g.name}.elf')}")
            for g, t in zip(guests, first):
                time.sleep(max(0.0, t + args.again - time.monotonic()))
                print(f"{g.name}: {_paused_dump(g, out / f'{g.name}-later.elf')}")
    except LabError as exc:
        print(f"vmhost: guests dump: {exc}", file=sys.stderr)
        return 1
    return 0


def _paused_dump(guest, path):
    guest.stop()
    try:
        return guest.dump_elf(path)
    finally:
        guest.cont()


def _ksm_live(args: argparse.Namespace) -> int:
    from vmhost.reality.lab import LabError
    from vmhost.reality import live_ksm
    from vmhost.reality.ksm_oracle import OracleError
    if args.guests < 2 or args.mem < 16:
        raise InputError("guests ksm-live: need --guests >= 2 and --mem >= 16")
    try:
        r = live_ksm.measure(args.guests, args.mem, args.dumps, timeout=args.timeout,
                             tolerance=args.tolerance)
    except (LabError, OracleError) as exc:
        print(f"vmhost: guests ksm-live: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(r, indent=1) if args.json else live_ksm.format_result(r))
    return 0 if r["converged"] else 1
