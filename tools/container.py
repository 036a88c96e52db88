"""Build and run the vmhost container image (``Dockerfile`` at the repository root).

Tooling of the source checkout, not part of the vmhost package: ``python3 tools/container.py
build [--base NAME:TAG] [--tag T] [--json]`` (root; needs ``pip install '.[docker]'``, docker.io
and debootstrap). Three steps, each usable alone (the container test and the build use them):

1. :func:`make_base_image`: a Debian bookworm base image made locally, with no image registry
   (``debootstrap --variant=minbase`` with python3 and python3-venv, then ``docker import``).
   It is made once per machine and reused.
2. :func:`build_wheelhouse`: ``wheelhouse/`` in the build context, holding the vmhost wheel and
   binary wheels of its dependencies for the image's Python (version, glibc, architecture), so
   that the image build needs no package index.
3. :func:`build_image`: ``docker build`` with the legacy builder, ``BASE`` as a build argument,
   by default with ``network_mode="none"``: the build proves it needs no network.

The Docker engine is driven through the docker Python SDK; :func:`engine` starts ``dockerd``
in the background when no engine answers (it has to be root to do that).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

DEFAULT_BASE = "vmhost-base:bookworm"
DEFAULT_TAG = "vmhost:latest"
BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv")
# what apt installs on a Debian bookworm base that has no Python: the wheelhouse's target
BOOKWORM_PYTHON = {"python": "3.11", "glibc": "2.36"}
BUILD_STAGE_LABEL = "org.vmhost.stage"    # on the Dockerfile's throw-away install stage
IMAGE_LABEL = "org.vmhost.image"          # on the image itself
BASE_LABEL = "org.vmhost.base"
SOURCE_DATE_EPOCH = "315532800"     # 1980-01-01: a reproducible vmhost wheel keeps the layer cache
SOURCE_ROOT = Path(__file__).resolve().parents[1]
PIP_TIMEOUT = 900
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LOCK_DIR = Path(os.environ.get("VMHOST_CONTAINER_LOCK_DIR", "/var/tmp"))

Log = Callable[[str], None]


class ContainerError(Exception):
    """The engine, debootstrap, pip or the build failed; the message says which and why."""


def _quiet(_: str) -> None:
    pass


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    """Serialise concurrent makers of the same thing on this machine (tests run in parallel)."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    with open(LOCK_DIR / f"vmhost-{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _docker():
    try:
        import docker
    except ImportError:
        raise ContainerError("the docker Python package is not installed: "
                             "pip install 'vmhost[docker]'") from None
    return docker


# ---------------------------------------------------------------------------------------------
# the engine

def _answering_client(timeout: float = 10, call_timeout: int = 900):
    """A client if the engine answers a ping within ``timeout`` s; its calls then get
    ``call_timeout`` s each (a build's log is one long call)."""
    docker = _docker()
    try:
        probe = docker.from_env(timeout=int(max(timeout, 1)))
        probe.ping()
        probe.close()
        return docker.from_env(timeout=call_timeout)
    except Exception:                       # noqa: BLE001 - any failure means "not answering"
        return None


def engine(start: bool = True, timeout: float = 60, log: Log = _quiet,
           dockerd_log: str | os.PathLike = "/var/log/vmhost-dockerd.log"):
    """A docker SDK client of an engine that answers; start ``dockerd`` first if none does.

    ``dockerd`` is started in its own session (it outlives the caller, as a service does) with
    its output in ``dockerd_log``; waiting for it is bounded by ``timeout`` seconds.
    """
    client = _answering_client()
    if client is not None or not start:
        if client is None:
            raise ContainerError("no Docker engine answers (start dockerd, or allow starting it)")
        return client
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise ContainerError("no Docker engine answers and dockerd is not installed "
                             "(apt-get install docker.io)")
    if os.geteuid() != 0:
        raise ContainerError("no Docker engine answers, and only root can start dockerd")
    log(f"starting {dockerd} (log: {dockerd_log})")
    Path(dockerd_log).parent.mkdir(parents=True, exist_ok=True)
    with open(dockerd_log, "ab") as out:
        proc = subprocess.Popen([dockerd], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        client = _answering_client(timeout=5)
        if client is not None:
            return client
        if proc.poll() is not None:
            # another dockerd may have won a race for the socket: give it a moment
            client = _answering_client(timeout=5)
            if client is not None:
                return client
            raise ContainerError(f"dockerd exited with status {proc.returncode}: "
                                 f"{_tail(dockerd_log)}")
        time.sleep(0.25)
    raise ContainerError(f"dockerd did not answer within {timeout:g} s: {_tail(dockerd_log)}")


def _tail(path: str | os.PathLike, lines: int = 5) -> str:
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


def image_exists(client, name: str) -> bool:
    docker = _docker()
    try:
        client.images.get(name)
        return True
    except docker.errors.ImageNotFound:
        return False


# ---------------------------------------------------------------------------------------------
# 1. the base image

def _mounts_under(root: Path) -> list[str]:
    root_s = str(root.resolve())
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4].replace("\\040", " ")
            if mnt == root_s or mnt.startswith(root_s + "/"):
                found.append(mnt)
    return sorted(found, key=len, reverse=True)


def _remove_rootfs(root: Path) -> None:
    """rm -rf a debootstrap target, unmounting first what a failed debootstrap left mounted."""
    for mnt in _mounts_under(root):
        subprocess.run(["umount", "-l", mnt], check=False)
    if _mounts_under(root):
        raise ContainerError(f"{root}: still has mounts; not removing it")
    shutil.rmtree(root, ignore_errors=True)


def make_base_image(client, name: str = DEFAULT_BASE, *, suite: str = BASE_SUITE,
                    packages: Sequence[str] = BASE_PACKAGES, mirror: str | None = None,
                    rebuild: bool = False, workdir: str | os.PathLike | None = None,
                    debootstrap_timeout: float = 1200, log: Log = _quiet) -> tuple[object, bool]:
    """The image ``name``, made with debootstrap + docker import unless it is already there.

    Returns ``(image, made)``; ``made`` is False when an existing image was reused.
    """
    with _lock("base-image"):
        if image_exists(client, name) and not rebuild:
            return client.images.get(name), False
        if shutil.which("debootstrap") is None:
            raise ContainerError(f"{name}: not there, and debootstrap is not installed "
                                 "(apt-get install debootstrap)")
        if os.geteuid() != 0:
            raise ContainerError(f"{name}: not there, and only root can run debootstrap")
        if ":" in name.rsplit("/", 1)[-1]:
            repo, _, tag = name.rpartition(":")
        else:
            repo, tag = name, "latest"
        tmp = Path(tempfile.mkdtemp(prefix="vmhost-base-", dir=workdir or "/var/tmp"))
        root = tmp / "rootfs"
        try:
            cmd = ["debootstrap", "--variant=minbase"]
            if packages:
                cmd.append("--include=" + ",".join(packages))
            cmd += [suite, str(root)]
            if mirror:
                cmd.append(mirror)
            log(" ".join(cmd))
            try:
                res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, timeout=debootstrap_timeout)
            except subprocess.TimeoutExpired:
                raise ContainerError(f"debootstrap took more than {debootstrap_timeout:g} s") \
                    from None
            if res.returncode != 0:
                raise ContainerError(f"debootstrap failed (status {res.returncode}): "
                                     + " | ".join(res.stdout.strip().splitlines()[-5:]))
            # no package caches in the image: the Dockerfile runs apt-get update if it needs apt
            for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for p in (root / sub).glob("*"):
                    if p.is_file():
                        p.unlink()
            log(f"docker import {name}")
            tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(root), "-c", "."],
                                   stdout=subprocess.PIPE)
            try:
                client.api.import_image_from_stream(
                    tar.stdout, repository=repo, tag=tag,
                    changes=[f"LABEL {BASE_LABEL}=debootstrap-{suite}",
                             "ENV LANG=C.UTF-8",
                             f"ENV PATH={SYSTEM_PATH}",
                             'CMD ["/bin/bash"]'])
            finally:
                tar.stdout.close()
                if tar.wait() != 0:
                    raise ContainerError(f"tar of {root} failed (status {tar.returncode})")
        finally:
            _remove_rootfs(tmp)
        return client.images.get(name), True


def python_of_image(client, image: str) -> dict | None:
    """The Python (``{"python": "3.11", "glibc": "2.36", "venv": True}``) of ``image``, or None.

    Runs ``python3`` in a throw-away container with no network.
    """
    docker = _docker()
    probe = ("import sys, platform, json\n"
             "try:\n"
             "    import ensurepip, venv  # Debian has ensurepip only with python3-venv\n"
             "    venv = True\n"
             "except ImportError:\n"
             "    venv = False\n"
             "libc, ver = platform.libc_ver()\n"
             "print(json.dumps({'python': '%d.%d' % sys.version_info[:2],"
             " 'glibc': ver if libc == 'glibc' else None, 'venv': venv}))\n")
    # not containers.run(remove=True): a container whose start fails (no python3) stays behind
    box = client.containers.create(image, ["python3", "-c", probe], entrypoint=[],
                                   network_mode="none")
    try:
        box.start()
        if box.wait(timeout=120)["StatusCode"] != 0:
            return None
        out = box.logs(stdout=True, stderr=False).decode(errors="replace")
        return json.loads(out.strip().splitlines()[-1])
    except (docker.errors.APIError, ValueError, IndexError):
        return None
    finally:
        with contextlib.suppress(docker.errors.APIError):
            box.remove(force=True)


# ---------------------------------------------------------------------------------------------
# 2. the wheelhouse

_ANYWHERE = shutil.ignore_patterns("*.egg-info", "__pycache__", ".pytest_cache", "*.pyc")
# the checkout's own output folders, at its top only (vmhost/reports is a package, not output)
_TOP_ONLY = {".git", "build", "dist", "wheelhouse", "reports", ".benchmarks", ".venv"}


def _source_ignore(directory: str, names: list[str]) -> set[str]:
    """What the clean copy of the source tree leaves out (``shutil.copytree``'s ignore)."""
    ignored = set(_ANYWHERE(directory, names))
    if (Path(directory) / "pyproject.toml").is_file():
        ignored |= _TOP_ONLY & set(names)
    return ignored


def _pip(args: Sequence[str], log: Log, env: dict | None = None,
         note: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check"]
    log(note or "pip " + " ".join(args))
    try:
        return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env, timeout=PIP_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise ContainerError(f"pip {args[0]} took more than {PIP_TIMEOUT} s") from None


def _pip_failed(what: str, res: subprocess.CompletedProcess) -> ContainerError:
    return ContainerError(f"{what} failed (status {res.returncode}): "
                          + " | ".join(res.stdout.strip().splitlines()[-5:]))


def platform_tags(arch: str = "x86_64", glibc: str = BOOKWORM_PYTHON["glibc"]) -> list[str]:
    """pip --platform tags that run on glibc ``glibc``, newest first.

    pip (23.x) does not expand ``manylinux_2_36`` to the older manylinux tags by itself, so
    every one is listed, with the legacy aliases manylinux2014/2010/1.
    """
    major, minor = (int(x) for x in glibc.split(".")[:2])
    if major != 2 or minor < 5:
        raise ContainerError(f"glibc {glibc}: no manylinux tag fits")
    tags = [f"manylinux_2_{m}_{arch}" for m in range(minor, 4, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    tags += [f"{name}_{arch}" for m, name in legacy.items() if m <= minor]
    return tags + [f"linux_{arch}"]


def build_wheelhouse(dest: str | os.PathLike | None = None, *,
                     source: str | os.PathLike = SOURCE_ROOT,
                     python: str = BOOKWORM_PYTHON["python"], glibc: str = BOOKWORM_PYTHON["glibc"],
                     arch: str | None = None, offline_first: bool = True,
                     log: Log = _quiet) -> list[Path]:
    """Fill ``dest`` (default ``SOURCE/wheelhouse``) with vmhost's wheel and its dependencies'.

    The vmhost wheel is built from a clean copy of the source tree (no stale ``build/``) with a
    fixed SOURCE_DATE_EPOCH, so the same source gives the same bytes and Docker's layer cache
    holds.  Dependencies are binary wheels for CPython ``python`` on glibc ``glibc``/``arch``;
    with ``offline_first`` the wheels already in ``dest`` are tried first, and the package index
    is asked only when they do not satisfy the requirements.
    """
    source = Path(source)
    dest = Path(dest) if dest is not None else source / "wheelhouse"
    arch = arch or os.uname().machine
    if not (source / "pyproject.toml").is_file():
        raise ContainerError(f"{source}: not a vmhost source tree (no pyproject.toml)")
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("vmhost-*.whl"):
        old.unlink()
    env = dict(os.environ, SOURCE_DATE_EPOCH=SOURCE_DATE_EPOCH)
    with tempfile.TemporaryDirectory(prefix="vmhost-src-") as tmp:
        copy = Path(tmp) / "src"
        shutil.copytree(source, copy, ignore=_source_ignore, symlinks=True)
        res = _pip(["wheel", "--no-deps", "-q", "-w", str(dest), str(copy)], log, env)
        if res.returncode != 0:
            raise _pip_failed("pip wheel of vmhost", res)
    wheels = sorted(dest.glob("vmhost-*.whl"))
    if len(wheels) != 1:
        raise ContainerError(f"{dest}: expected one vmhost wheel, found {len(wheels)}")
    nodot = python.replace(".", "")
    target = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp",
              "--abi", f"cp{nodot}", "--abi", "abi3", "--abi", "none"]
    for tag in platform_tags(arch, glibc):
        target += ["--platform", tag]
    download = ["download", "-q", "-d", str(dest), *target, str(wheels[0])]
    what = f"dependencies of {wheels[0].name} for cp{nodot}, glibc {glibc}, {arch}"
    res = None
    if offline_first:
        res = _pip([*download, "--no-index", "--find-links", str(dest)], log,
                   note=f"pip download --no-index (wheels already in {dest}): {what}")
    if res is None or res.returncode != 0:
        res = _pip(download, log, note=f"pip download: {what}")
        if res.returncode != 0:
            raise _pip_failed(f"pip download of vmhost's dependencies for cp{nodot}", res)
    return sorted(dest.glob("*.whl"))


# ---------------------------------------------------------------------------------------------
# 3. the image

def context_files(context: str | os.PathLike = SOURCE_ROOT) -> list[str]:
    """The files of the build context that reach the engine (``.dockerignore`` applied)."""
    from docker.utils.build import exclude_paths
    context = Path(context)
    ignore = context / ".dockerignore"
    patterns = []
    if ignore.is_file():
        patterns = [ln.strip() for ln in ignore.read_text().splitlines()
                    if ln.strip() and not ln.strip().startswith("#")]
    return sorted(exclude_paths(str(context), patterns, dockerfile="Dockerfile"))


def _stage_tops(lines: Sequence[str]) -> list[str]:
    """The last image id of each stage, from a legacy-builder log."""
    tops: list[str] = []
    current = None
    for ln in lines:
        if ln.startswith("Step ") and " : " in ln \
                and ln.split(" : ", 1)[1].split(" ", 1)[0].upper() == "FROM":
            if current:
                tops.append(current)
            current = None
        elif ln.startswith(" ---> ") and not ln.startswith(" ---> Running in") \
                and not ln.startswith(" ---> Using cache"):
            current = ln.split()[-1]
    if current:
        tops.append(current)
    return tops


@contextlib.contextmanager
def build_lock(context: str | os.PathLike = SOURCE_ROOT) -> Iterator[None]:
    """Held while a build context's wheelhouse is rebuilt and sent: one build at a time."""
    import hashlib
    key = hashlib.sha1(str(Path(context).resolve()).encode()).hexdigest()[:12]
    with _lock(f"build-{key}"):
        yield


@dataclass
class BuildResult:
    image: object
    tag: str
    base: str
    network_mode: str
    log: list[str] = field(default_factory=list)


def build_image(client, *, context: str | os.PathLike = SOURCE_ROOT, base: str = DEFAULT_BASE,
                tag: str = DEFAULT_TAG, network_mode: str = "none", nocache: bool = False,
                log: Log = _quiet) -> BuildResult:
    """``docker build --build-arg BASE=base -t tag context`` with the legacy builder.

    Needs the wheelhouse (:func:`build_wheelhouse`).  ``network_mode="none"`` runs every RUN
    step with no network.  The image that ``tag`` named before is removed if nothing else uses
    it, and so are the throw-away install stages of earlier builds.
    """
    docker = _docker()
    context = Path(context)
    if not (context / "Dockerfile").is_file():
        raise ContainerError(f"{context}: no Dockerfile (a vmhost source checkout is needed)")
    if not list((context / "wheelhouse").glob("vmhost-*.whl")):
        raise ContainerError(f"{context / 'wheelhouse'}: no vmhost wheel (build the wheelhouse "
                             "first)")
    old_id = client.images.get(tag).id if image_exists(client, tag) else None
    api = client.api
    lines: list[str] = []
    image_id = None
    try:
        for chunk in api.build(path=str(context), tag=tag, buildargs={"BASE": base},
                               network_mode=network_mode, rm=True, forcerm=True, nocache=nocache,
                               pull=False, decode=True):
            if "error" in chunk:
                detail = chunk.get("errorDetail", {}).get("message") or chunk["error"]
                tail = " | ".join(ln for ln in lines[-4:] if ln)
                raise ContainerError(f"docker build of {tag} from {base} failed: "
                                     f"{detail.strip()}" + (f" (after: {tail})" if tail else ""))
            text = chunk.get("stream")
            if text:
                for ln in text.rstrip("\n").splitlines():
                    lines.append(ln)
                    log(ln)
            if "aux" in chunk and "ID" in chunk["aux"]:
                image_id = chunk["aux"]["ID"]
    except docker.errors.APIError as exc:
        raise ContainerError(f"docker build of {tag} from {base} failed: {exc}") from None
    image = client.images.get(image_id or tag)
    if old_id and old_id != image.id:
        with contextlib.suppress(docker.errors.APIError):
            client.images.remove(old_id, noprune=False)
    # the throw-away stage's top image (its untagged parents go with it); only this build's:
    # a prune could take the stage of a build running beside this one
    for stage_top in _stage_tops(lines)[:-1]:
        with contextlib.suppress(docker.errors.APIError):
            if BUILD_STAGE_LABEL in (client.images.get(stage_top).labels or {}):
                client.images.remove(stage_top, noprune=False)
    # and what earlier builds left (an old image still in use then, a build that died): only
    # untagged ones older than any build in progress
    for label in (BUILD_STAGE_LABEL, IMAGE_LABEL):
        with contextlib.suppress(docker.errors.APIError):
            client.images.prune(filters={"dangling": True, "label": label, "until": "15m"})
    return BuildResult(image=image, tag=tag, base=base, network_mode=network_mode, log=lines)


@dataclass
class RunResult:
    status: int
    stdout: str
    stderr: str
    seconds: float


def run(client, image: str, args: Sequence[str], *, network_mode: str = "none",
        timeout: float = 300, volumes: dict | None = None) -> RunResult:
    """Run the image's entrypoint (``vmhost``) with ``args``; the container is always removed."""
    docker = _docker()
    t0 = time.monotonic()
    container = client.containers.create(image, list(args), network_mode=network_mode,
                                         volumes=volumes or {})
    try:
        container.start()
        try:
            status = container.wait(timeout=timeout)["StatusCode"]
        except Exception as exc:           # noqa: BLE001 - requests' timeout, engine errors
            raise ContainerError(f"{image} {' '.join(args)}: no exit within {timeout:g} s "
                                 f"({exc.__class__.__name__})") from None
        out = container.logs(stdout=True, stderr=False).decode(errors="replace")
        err = container.logs(stdout=False, stderr=True).decode(errors="replace")
    finally:
        with contextlib.suppress(docker.errors.APIError):
            container.remove(force=True)
    return RunResult(status=status, stdout=out, stderr=err, seconds=time.monotonic() - t0)


# ---------------------------------------------------------------------------------------------
# all of it

def build(*, base: str = DEFAULT_BASE, tag: str = DEFAULT_TAG,
          context: str | os.PathLike = SOURCE_ROOT, network_mode: str = "auto",
          start_engine: bool = True, make_base: bool | None = None,
          log: Log = _quiet) -> dict:
    """Engine, base image, wheelhouse and image; returns what was done and how long each took.

    ``make_base`` (default: only for the default local base name) makes a missing base with
    debootstrap; otherwise a missing base is pulled.  ``network_mode="auto"`` builds with no
    network when the base already has Python with venv, and with the default network when the
    Dockerfile has to apt-get it.
    """
    docker = _docker()
    try:
        return _build(docker, base=base, tag=tag, context=Path(context),
                      network_mode=network_mode, start_engine=start_engine,
                      make_base=make_base, log=log)
    except docker.errors.DockerException as exc:
        raise ContainerError(f"Docker engine: {exc}") from None


def _build(docker, *, base, tag, context, network_mode, start_engine, make_base, log) -> dict:
    phases: dict[str, float] = {}
    t = time.monotonic()
    client = engine(start=start_engine, log=log)
    phases["engine"] = time.monotonic() - t

    t = time.monotonic()
    made = False
    if make_base is None:
        make_base = base == DEFAULT_BASE
    if make_base:
        _, made = make_base_image(client, base, log=log)
    elif not image_exists(client, base):
        log(f"pulling {base}")
        try:
            client.images.pull(base)
        except docker.errors.APIError as exc:
            raise ContainerError(f"base image {base}: not on this machine and not pullable "
                                 f"({exc.explanation or exc})") from None
    pyinfo = python_of_image(client, base)
    phases["base"] = time.monotonic() - t

    target = dict(BOOKWORM_PYTHON)
    if pyinfo and pyinfo.get("python"):
        target["python"] = pyinfo["python"]
        target["glibc"] = pyinfo.get("glibc") or target["glibc"]
    if network_mode == "auto":
        network_mode = "none" if pyinfo and pyinfo.get("venv") else "default"
    arch = client.info().get("Architecture") or os.uname().machine

    with build_lock(context):
        return _build_locked(client, base=base, tag=tag, context=context,
                             network_mode=network_mode, target=target, arch=arch,
                             made=made, phases=phases, log=log)


def _build_locked(client, *, base, tag, context, network_mode, target, arch, made, phases,
                  log) -> dict:
    t = time.monotonic()
    wheels = build_wheelhouse(context / "wheelhouse", source=context, python=target["python"],
                              glibc=target["glibc"], arch=arch, log=log)
    phases["wheelhouse"] = time.monotonic() - t

    t = time.monotonic()
    result = build_image(client, context=context, base=base, tag=tag, network_mode=network_mode,
                         log=log)
    phases["image"] = time.monotonic() - t
    return {"tag": tag, "image": result.image.id, "base": base, "base_made": made,
            "python": target["python"], "glibc": target["glibc"], "arch": arch,
            "network_mode": network_mode, "wheels": [w.name for w in wheels],
            "size_bytes": result.image.attrs.get("Size"),
            "seconds": {k: round(v, 1) for k, v in phases.items()}}


# -- command line ------------------------------------------------------------------------------
NETWORK_MODES = ("auto", "none", "default", "host", "bridge")


def _image_name(text: str) -> str:
    import argparse
    if not text or any(c.isspace() for c in text) or text.startswith((":", "-")):
        raise argparse.ArgumentTypeError(f"{text!r} is not an image name (NAME[:TAG])")
    return text


class _Parser:
    """argparse, with a usage error as one line and exit status 2."""

    @staticmethod
    def make():
        import argparse

        class P(argparse.ArgumentParser):
            def error(self, message):
                print(f"container: {message}", file=sys.stderr)
                raise SystemExit(2)
        p = P(prog="tools/container.py", description="the vmhost container image")
        sub = p.add_subparsers(dest="command", required=True, parser_class=P)
        b = sub.add_parser(
            "build", help="base image (debootstrap, once), wheelhouse, then docker build",
            description="Make the base image if it is missing (the default one with debootstrap, "
                        "once per machine), build the wheelhouse for the base's Python, and build "
                        "the image with the legacy builder. Starts dockerd if no engine answers "
                        "(as root).")
        b.add_argument("--base", type=_image_name, default=DEFAULT_BASE, metavar="NAME:TAG",
                       help=f"base image (default {DEFAULT_BASE}, made locally if missing)")
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
        return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _Parser.make().parse_args(argv)
    import importlib.util
    if importlib.util.find_spec("docker") is None:
        print("container build: the docker Python package is not installed: "
              "pip install '.[docker]'", file=sys.stderr)
        return 2
    context = Path(args.context)
    if not (context / "Dockerfile").is_file():
        print(f"container build: {context}: no Dockerfile (--context must be a vmhost source "
              "checkout)", file=sys.stderr)
        return 2

    def log(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    try:
        result = build(base=args.base, tag=args.tag, context=context,
                       network_mode=args.network, start_engine=not args.no_start, log=log)
    except ContainerError as exc:
        print(f"container build: {exc}", file=sys.stderr)
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


if __name__ == "__main__":
    sys.exit(main())
