"""``vmhost container build``: the vmhost image (Dockerfile), made with no registry and no index."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vmhost.commands.common import Parser
from vmhost.errors import InputError

NETWORK_MODES = ("auto", "none", "default", "host", "bridge")


def _image_name(text: str) -> str:
    if not text or any(c.isspace() for c in text) or text.startswith((":", "-")):
        raise argparse.ArgumentTypeError(f"{text!r} is not an image name (NAME[:TAG])")
    return text


def register(sub) -> None:
    from vmhost.container import DEFAULT_BASE, DEFAULT_TAG, SOURCE_ROOT
    c = sub.add_parser("container", help="build the vmhost container image")
    csub = c.add_subparsers(dest="container", required=True, parser_class=Parser)
    b = csub.add_parser(
        "build", help="base image (debootstrap, once), wheelhouse, then docker build",
        description="Make the base image if it is missing (the default one with debootstrap, "
                    "once per machine), build the wheelhouse for the base's Python, and build "
                    "the image with the legacy builder. Starts dockerd if no engine answers "
                    "(as root).")
    b.add_argument("--base", type=_image_name, default=DEFAULT_BASE, metavar="NAME:TAG",
                   help=f"base image (default {DEFAULT_BASE}, made locally if missing; any "
                        "other name must be on this machine or pullable)")
    b.add_argument("--tag", "-t", type=_image_name, default=DEFAULT_TAG, metavar="T",
                   help=f"name of the image to build (default {DEFAULT_TAG})")
    b.add_argument("--context", metavar="DIR", default=str(SOURCE_ROOT),
                   help="vmhost source checkout with the Dockerfile (default: this one)")
    b.add_argument("--network", choices=NETWORK_MODES, default="auto",
                   help="network of the build's RUN steps; auto: none when the base has "
                        "Python with venv, else default (apt needs it)")
    b.add_argument("--no-start", action="store_true",
                   help="fail rather than start dockerd when no engine answers")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    b.set_defaults(func=_build)


def _build(args: argparse.Namespace) -> int:
    import importlib.util
    if importlib.util.find_spec("docker") is None:
        raise InputError("container build: the docker Python package is not installed: "
                         "pip install 'vmhost[docker]'")
    from vmhost.container import ContainerError, build
    context = Path(args.context)
    if not (context / "Dockerfile").is_file():
        raise InputError(f"container build: {context}: no Dockerfile (--context must be a "
                         "vmhost source checkout)")

    def log(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    try:
        result = build(base=args.base, tag=args.tag, context=context,
                       network_mode=args.network, start_engine=not args.no_start, log=log)
    except ContainerError as exc:
        print(f"vmhost: container build: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        secs = ", ".join(f"{k} {v:.1f} s" for k, v in result["seconds"].items())
        size = result["size_bytes"] or 0
        print(f"{result['tag']}: {result['image'][:19]} from {result['base']}"
              f"{' (made now)' if result['base_made'] else ''}; cp{result['python']}"
              f" glibc {result['glibc']} {result['arch']}, {len(result['wheels'])} wheels, "
              f"network {result['network_mode']}, {size / 2**20:.0f} MiB ({secs})")
    return 0
