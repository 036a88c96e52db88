"""``vmhost density``: how many guests of an image mix fit on a host, without KSM, with it, ideally."""

from __future__ import annotations

import argparse
import os
import time

from vmhost.commands.common import switches, whole_number


# shown at once on the progress line: an install built on this machine carries the compiled
# scan loop (setup.py); an editable install, or a wheel built on another CPU, compiles it here
START_NOTE = "booting guest 1 (without a compiled scan loop from the install, it is compiled first: 10-30 s)"


def register(sub) -> None:
    p = sub.add_parser("density", help="VMs-per-host search for an image mix, with and without KSM")
    p.add_argument("config", help="density YAML (host, ksm, density; see vmhost/density/config.py)")
    switches(p, "json")
    p.add_argument("--report", metavar="DIR", help="also write report.html (plots, works offline), result.json, "
                                                   "report.txt and CSV tables to DIR (atomically: a temporary "
                                                   "directory renamed)")
    switches(p, "quiet",
             bench="benchmark: run the search and print its wall time (and the resolution)",
             oracle="run the study on this machine's kernel instead (root; see vmhost/reality/density_oracle.py)",
             compare="with --oracle: the emulator beside the kernel, per step")
    p.add_argument("--runs", type=int, default=1, help="with --oracle: kernel runs (their mean and spread)")
    p.add_argument("--emulator-resolution", type=int, metavar="N", help="with --compare: the emulator at 1/N")
    p.add_argument("--resolutions", metavar="N,N,...",
                   help="resolution invariance: run the config at each 1/N and compare every headline "
                        "figure with the finest (see vmhost/density/invariance.py); exit 1 if one disagrees")
    p.add_argument("--workers", type=whole_number, metavar="N",
                   help="processes for the searches that can run side by side: the resolutions "
                        "of --resolutions, the searches for the largest pages_to_scan within the "
                        "ksmd CPU limit (default: the CPU count; 1: one after the other)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.oracle or args.compare:
        from vmhost.reality.density_oracle import run_cli
        return run_cli(args)
    from vmhost.density import DensityRunner, format_result, load_density, write_report
    from vmhost.progress import Progress
    from hw.units import PAGES_PER_GIB
    from vmhost.reports.files import dumps_json
    if args.workers is not None and args.workers < 1:
        from guests.errors import InputError
        raise InputError(f"density: --workers must be at least 1 (got {args.workers})")
    cfg = load_density(args.config)        # every input error is raised here, before any output
    if args.resolutions:
        return _invariance(args, cfg)
    from vmhost.density.search import DensitySearch
    DensitySearch(cfg).check_fits()        # a study too big for this machine: refused before any output
    wall0 = time.perf_counter()
    with Progress(len(cfg.sequence), "density", quiet=args.quiet or args.json,
                  start=START_NOTE) as bar:
        def progress(step: dict) -> None:
            verdict = "ok" if step["ok"] else "FAIL: " + "; ".join(step["violations"])
            bar.advance(step["booted"], f"{step['guests']} guests ({step['image']}): saved "
                                        f"{step['saved_pages']} pages, {step['full_scans']} scans, {verdict}")
        result = DensityRunner(cfg, progress=progress, workers=args.workers or os.cpu_count() or 1).run()
    wall = time.perf_counter() - wall0
    if args.bench:
        result["bench"] = {"wall_s": round(wall, 3), "resolution": cfg.resolution,
                           "guests_simulated": len(result["steps"]),
                           "host_gib": round(result["host"]["ram_pages"] / PAGES_PER_GIB, 3)}
    if args.report:
        write_report(result, args.report)
    if args.json:
        print(dumps_json(result, compact=True))
    else:
        print(format_result(result))
        if args.bench:
            b = result["bench"]
            print(f"bench: {b['host_gib']} GiB host, {b['guests_simulated']} guests simulated at resolution "
                  f"1/{b['resolution']}: wall time {b['wall_s']:.1f} s")
    return 0


def _invariance(args: argparse.Namespace, cfg) -> int:
    import sys

    from vmhost.density.invariance import at_resolution, check, format_check
    from vmhost.reports.files import dumps_json
    from guests.errors import InputError
    try:
        rs = [int(x) for x in args.resolutions.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"density: --resolutions: {args.resolutions!r} is not a list of whole numbers") from None
    if not rs or any(r < 1 for r in rs):
        raise InputError(f"density: --resolutions: {args.resolutions!r} is not a list of positive numbers")
    from vmhost.density.search import DensitySearch
    for r in rs:
        DensitySearch(at_resolution(cfg, r)).check_fits()     # refuse a resolution before running any

    def progress(r, run):
        if not (args.quiet or args.json):
            print(f"density: 1/{r} done ({run['wall_s']:.1f} s)", file=sys.stderr)
    out = check(cfg, rs, progress, workers=args.workers)
    print(dumps_json(out, compact=True) if args.json else format_check(out))
    return 0 if out["ok"] else 1
