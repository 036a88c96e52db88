"""A QEMU lab: tiny Linux guests under software emulation (TCG), driven through QMP.

The guest is built from Debian packages, never from source:

* the kernel is Debian's ``linux-image-6.1.0-N-cloud-amd64`` (the N that apt's
  ``linux-image-cloud-amd64`` metapackage currently depends on), fetched with
  ``apt-get download`` and unpacked with ``dpkg-deb -x`` -- nothing is installed on the host;
* the initramfs holds the static busybox of ``busybox-static`` and an ``/init`` script that
  mounts proc, sys and dev, prints :data:`READY_LINE` on the serial console and then sleeps.

Both are cached (``$VMHOST_GUEST_CACHE``, else ``~/.cache/vmhost/guest``); a lock file makes
concurrent builders wait for each other instead of racing.

Host packages needed: ``qemu-system-x86 busybox-static cpio`` (and apt/dpkg, present on Debian).

:class:`Lab` is a context manager that owns every QEMU process it starts: on the way out --
normal exit, exception or Ctrl-C -- each guest is asked to ``quit`` over QMP and killed if it
does not go within a few seconds. Every wait (boot, QMP replies, process exit) is bounded.

This module knows nothing about the host kernel or vmhost; it only starts guests and dumps
their memory. Measuring the host's KSM on live guests lives in ``vmhost.reality.live_ksm``.
"""

from __future__ import annotations

import fcntl
import hashlib
import glob
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

READY_LINE = "vmhost-guest: ready"
WRITER_LINE = "vmhost-writer:"
KERNEL_META = "linux-image-cloud-amd64"
KERNEL_GLOB = "linux-image-6.1.0-*-cloud-amd64"
BOOT_TIMEOUT_S = 90.0
QMP_TIMEOUT_S = 60.0
QUIT_TIMEOUT_S = 5.0
BUILD_TIMEOUT_S = 300.0

INIT_SCRIPT = f"""#!/bin/busybox sh
# vmhost lab guest: mount the pseudo filesystems, say we are up, then idle forever -- or, with
# vmhost.write_kib_s=R vmhost.hot_kib=H on the kernel command line, fill an H KiB file in the
# initramfs with random bytes, say we are up, and rewrite it in place at R KiB/s (256 KiB at a
# time, round the file, paced by /proc/uptime): a known writer for measuring write rates. About
# once a second it says how far it is: "vmhost-writer: UPTIME_CENTISECONDS KIB_WRITTEN".
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
rate=0; hot=0
for a in $(/bin/busybox cat /proc/cmdline); do
  case "$a" in vmhost.write_kib_s=*) rate=${{a#*=}};; vmhost.hot_kib=*) hot=${{a#*=}};; esac
done
blocks=$((hot / 256))
if [ "$rate" -gt 0 ] && [ "$blocks" -gt 0 ]; then
  /bin/busybox dd if=/dev/urandom of=/tmp/hot bs=256k count=$blocks 2>/dev/null
  echo "{READY_LINE}"
  read up rest < /proc/uptime; t0=$(( ${{up%.*}} * 100 + 1${{up#*.}} - 100 ))
  done_kib=0; off=0; said=$t0
  while true; do
    read up rest < /proc/uptime; now=$(( ${{up%.*}} * 100 + 1${{up#*.}} - 100 ))
    if [ $done_kib -lt $(( (now - t0) * rate / 100 )) ]; then
      /bin/busybox dd if=/dev/urandom of=/tmp/hot bs=256k count=1 seek=$off conv=notrunc 2>/dev/null
      off=$(( (off + 1) % blocks )); done_kib=$((done_kib + 256))
      if [ $((now - said)) -ge 100 ]; then echo "{WRITER_LINE} $now $done_kib"; said=$now; fi
    else
      /bin/busybox sleep 0.05
    fi
  done
fi
echo "{READY_LINE}"
while true; do /bin/busybox sleep 3600; done
"""
#: the initramfs is cached under a name that changes with its /init
INITRD_NAME = f"initrd-{hashlib.sha256(INIT_SCRIPT.encode()).hexdigest()[:12]}.gz"


class LabError(RuntimeError):
    """The lab could not build, boot, or talk to a guest (one-line message)."""


# --------------------------------------------------------------------------------------------
# Building the guest (kernel + initramfs), cached


@dataclass(frozen=True)
class GuestFiles:
    kernel: Path
    initrd: Path
    kernel_package: str


def cache_dir() -> Path:
    env = os.environ.get("VMHOST_GUEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vmhost" / "guest"


def _run(cmd: list[str], cwd=None, timeout=BUILD_TIMEOUT_S, **kw) -> str:
    try:
        res = subprocess.run(cmd, cwd=cwd, timeout=timeout, capture_output=True, text=True,
                             **kw)
    except FileNotFoundError:
        raise LabError(f"{cmd[0]}: not found (host packages needed: qemu-system-x86 "
                       "busybox-static cpio)") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"{shlex.join(cmd)}: no result after {timeout:.0f} s") from None
    if res.returncode:
        last = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise LabError(f"{shlex.join(cmd)}: exit {res.returncode}: {last}")
    return res.stdout


def kernel_package() -> str:
    """The versioned kernel package apt offers now (what the cloud metapackage depends on)."""
    out = _run(["apt-cache", "depends", KERNEL_META])
    m = re.search(r"Depends:\s*(linux-image-6\.1\.0-\d+-cloud-amd64)\b", out)
    if m:
        return m.group(1)
    # no metapackage: the highest ABI number among the versioned packages apt knows
    out = _run(["apt-cache", "search", "--names-only", "^linux-image-6.1.0-[0-9]+-cloud-amd64$"])
    names = re.findall(r"^(linux-image-6\.1\.0-(\d+)-cloud-amd64)\s", out, re.M)
    if not names:
        raise LabError(f"apt offers no {KERNEL_GLOB} package (run apt-get update?)")
    return max(names, key=lambda n: int(n[1]))[0]


def dump_directory(dump_dir, prefix: str):
    """Where a run writes its guests' dumps: ``dump_dir`` (made if missing) or, when it is
    None, a new temporary directory named ``prefix...``; returns (the path, a function that
    removes the temporary directory, or does nothing)."""
    if dump_dir is not None:
        path = Path(dump_dir)
        path.mkdir(parents=True, exist_ok=True)
        return path, lambda: None
    tmp = tempfile.TemporaryDirectory(prefix=prefix)
    return Path(tmp.name), tmp.cleanup


def build_guest(cache: str | os.PathLike | None = None) -> GuestFiles:
    """The guest's kernel and initramfs, built once into the cache and reused afterwards."""
    cache = Path(cache) if cache else cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        kernel = _cached_kernel(cache)
        initrd = cache / INITRD_NAME
        if not initrd.exists():
            _build_initrd(initrd)
        return GuestFiles(kernel[0], initrd, kernel[1])


def _cached_kernel(cache: Path) -> tuple[Path, str]:
    record = cache / "kernel.json"
    if record.exists():
        info = json.loads(record.read_text())
        if Path(info["kernel"]).exists():
            return Path(info["kernel"]), info["package"]
    package = kernel_package()
    with tempfile.TemporaryDirectory(prefix="vmhost-kernel-") as tmp:
        _run(["apt-get", "download", package], cwd=tmp)
        debs = glob.glob(os.path.join(tmp, "*.deb"))
        if len(debs) != 1:
            raise LabError(f"apt-get download {package}: expected one .deb, got {debs}")
        root = os.path.join(tmp, "root")
        _run(["dpkg-deb", "-x", debs[0], root])
        found = glob.glob(os.path.join(root, "boot", "vmlinuz-*"))
        if len(found) != 1:
            raise LabError(f"{debs[0]}: expected one boot/vmlinuz-*, got {found}")
        kernel = cache / os.path.basename(found[0])
        shutil.copyfile(found[0], kernel)
    record.write_text(json.dumps({"package": package, "kernel": str(kernel)}) + "\n")
    return kernel, package


def _build_initrd(target: Path) -> None:
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not os.path.exists(busybox):
        raise LabError("busybox not found (host package needed: busybox-static)")
    with tempfile.TemporaryDirectory(prefix="vmhost-initrd-") as tmp:
        root = Path(tmp) / "root"
        for d in ("bin", "dev", "proc", "sys", "tmp"):
            (root / d).mkdir(parents=True)
        shutil.copyfile(busybox, root / "bin" / "busybox")
        os.chmod(root / "bin" / "busybox", 0o755)
        os.symlink("busybox", root / "bin" / "sh")
        (root / "init").write_text(INIT_SCRIPT)
        os.chmod(root / "init", 0o755)
        try:  # the kernel's built-in initramfs has /dev/console too; this is belt and braces
            os.mknod(root / "dev" / "console", 0o600 | 0o020000, os.makedev(5, 1))
        except OSError:
            pass
        cpio = Path(tmp) / "initrd.gz"
        script = "find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet | gzip -9n"
        with open(cpio, "wb") as out:
            try:
                subprocess.run(["bash", "-c", "set -o pipefail; " + script],
                               cwd=root, stdout=out, check=True, timeout=BUILD_TIMEOUT_S)
            except subprocess.CalledProcessError as exc:
                raise LabError(f"packing the initramfs failed (exit {exc.returncode}; "
                               "is cpio installed?)") from None
        if cpio.stat().st_size < 1000:
            raise LabError("packing the initramfs produced an empty archive (is cpio installed?)")
        shutil.move(str(cpio), target)


# --------------------------------------------------------------------------------------------
# QMP


class QMPError(LabError):
    pass


class QMP:
    """A minimal QMP client: JSON objects, one per line, over a Unix socket."""

    def __init__(self, path: str, timeout: float = QMP_TIMEOUT_S, proc=None):
        self.path, self.timeout = path, timeout
        end = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if proc is not None and proc.poll() is not None:
                    raise QMPError(f"QEMU exited (status {proc.returncode}) before its QMP "
                                   f"socket {path} was ready") from None
                if time.monotonic() > end:
                    raise QMPError(f"QMP socket {path}: not ready after {timeout:.0f} s") \
                        from None
                time.sleep(0.05)
        self.reader = self.sock.makefile("rb")
        greeting = self._read()
        if "QMP" not in greeting:
            raise QMPError(f"QMP socket {path}: unexpected greeting {greeting}")
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        try:
            line = self.reader.readline()
        except socket.timeout:
            raise QMPError(f"QMP socket {self.path}: no reply within {self.timeout:.0f} s") \
                from None
        if not line:
            raise QMPError(f"QMP socket {self.path}: connection closed")
        return json.loads(line)

    def execute(self, command: str, arguments: dict | None = None, timeout=None):
        """Run one command and return its ``return`` value; events in between are dropped."""
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.settimeout(timeout or self.timeout)
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                err = reply["error"]
                raise QMPError(f"QMP {command}: {err.get('class')}: {err.get('desc')}")
            # {"event": ...}: asynchronous, not ours

    def hmp(self, command_line: str) -> str:
        """Run an HMP command; HMP reports errors as text, so any output is an error here."""
        out = self.execute("human-monitor-command", {"command-line": command_line})
        return out

    def close(self):
        try:
            self.reader.close()
        finally:
            self.sock.close()


def hmp_quote(text: str) -> str:
    """A string argument for HMP, in double quotes with backslash escapes."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --------------------------------------------------------------------------------------------
# Guests


class Guest:
    """One running QEMU process: its serial console log and its QMP connection."""

    def __init__(self, name: str, proc: subprocess.Popen, qmp_path: str, log_path: str,
                 mem_mib: int):
        self.name, self.proc, self.qmp_path, self.log_path = name, proc, qmp_path, log_path
        self.mem_mib = mem_mib
        self.qmp: QMP | None = None
        self.ready = threading.Event()
        self.boot_seconds: float | None = None
        self._started = time.monotonic()
        self._reader = threading.Thread(target=self._drain, name=f"serial-{name}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _drain(self):
        """Copy the serial console to the log file and watch for the ready line."""
        with open(self.log_path, "wb") as log:
            for line in iter(self.proc.stdout.readline, b""):
                log.write(line)
                log.flush()
                if not self.ready.is_set() and READY_LINE.encode() in line:
                    self.boot_seconds = time.monotonic() - self._started
                    self.ready.set()

    def console(self, tail: int = 5) -> str:
        try:
            lines = Path(self.log_path).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(l.strip() for l in lines[-tail:])

    def wait_ready(self, timeout: float = BOOT_TIMEOUT_S) -> None:
        end = time.monotonic() + timeout
        while not self.ready.wait(0.1):
            if self.proc.poll() is not None:
                raise LabError(f"guest {self.name} (pid {self.pid}) exited with status "
                               f"{self.proc.returncode} before the ready line; console: "
                               f"{self.console()}")
            if time.monotonic() > end:
                raise LabError(f"guest {self.name} (pid {self.pid}): no ready line after "
                               f"{timeout:.0f} s; console: {self.console()}")
        if self.qmp is None:
            self.qmp = QMP(self.qmp_path, proc=self.proc)

    # -- memory dumps ---------------------------------------------------------------------
    def stop(self):
        self.qmp.execute("stop")

    def cont(self):
        self.qmp.execute("cont")

    def dump_elf(self, path: str | os.PathLike) -> Path:
        """``dump-guest-memory`` (ELF64 core, paging off), synchronous."""
        path = Path(path).resolve()
        self.qmp.execute("dump-guest-memory", {"paging": False, "protocol": f"file:{path}"})
        return path

    def dump_raw(self, path: str | os.PathLike, size: int | None = None) -> Path:
        """HMP ``pmemsave 0 SIZE "FILE"``: guest-physical memory from address 0."""
        path = Path(path).resolve()
        size = self.mem_mib << 20 if size is None else size
        out = self.qmp.hmp(f"pmemsave 0 {size:#x} {hmp_quote(str(path))}")
        if out.strip():
            raise QMPError(f"pmemsave into {path}: {out.strip()}")
        if not path.exists() or path.stat().st_size != size:
            raise QMPError(f"pmemsave into {path}: file missing or not {size} bytes")
        return path

    def dump_both(self, elf_path, raw_path) -> tuple[Path, Path]:
        """An ELF and a raw dump of the same moment: the guest is paused around both."""
        self.stop()
        try:
            return self.dump_elf(elf_path), self.dump_raw(raw_path)
        finally:
            self.cont()

    # -- shutdown -------------------------------------------------------------------------
    def shutdown(self, timeout: float = QUIT_TIMEOUT_S) -> None:
        """QMP quit, then SIGKILL if the process is still there; always reaps it."""
        if self.proc.poll() is None and self.qmp is not None:
            try:
                self.qmp.sock.settimeout(timeout)
                self.qmp.sock.sendall(b'{"execute": "quit"}\n')
            except OSError:
                pass
        try:
            self.proc.wait(timeout if self.qmp is not None else 0.01)
        except subprocess.TimeoutExpired:
            pass
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        if self.qmp is not None:
            try:
                self.qmp.close()
            except OSError:
                pass
            self.qmp = None
        self._reader.join(2)
        if self.proc.stdout:
            self.proc.stdout.close()


class Lab:
    """Owns a working directory and every guest booted in it.

    >>> with Lab() as lab:                      # doctest: +SKIP
    ...     a, b = lab.boot(2)
    ...     a.dump_both("a.elf", "a.raw")

    ``merge=False`` starts guests with ``-machine mem-merge=off`` so that they never register
    memory with the host's KSM (use it whenever the host KSM is not being measured: a
    mergeable process disturbs other KSM users). ``workdir`` (kept) or a temporary directory
    (removed) holds the QMP sockets and console logs.
    """

    def __init__(self, files: GuestFiles | None = None, workdir: str | os.PathLike | None = None,
                 mem_mib: int = 128, merge: bool = False, extra_args: list[str] | None = None,
                 write_kib_s: int = 0, hot_kib: int = 0):
        self.files = files
        self.mem_mib, self.merge = mem_mib, merge
        # the guest's known writer (INIT_SCRIPT): R KiB/s rewritten round a file of H KiB
        self.write_kib_s, self.hot_kib = write_kib_s, hot_kib
        self.extra_args = list(extra_args or [])
        self._own_dir = workdir is None
        self.workdir = Path(workdir) if workdir else None
        self.guests: list[Guest] = []
        self._sockdir: str | None = None

    def __enter__(self) -> "Lab":
        if self.files is None:
            self.files = build_guest()
        if self._own_dir:
            self.workdir = Path(tempfile.mkdtemp(prefix="vmhost-lab-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._sockdir = tempfile.mkdtemp(prefix="vmq-", dir="/tmp")  # sun_path is short
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        errors = []
        for g in self.guests:
            try:
                g.shutdown()
            except Exception as e:  # keep going: every guest must be stopped
                errors.append(f"{g.name}: {e}")
        alive = [g.pid for g in self.guests if g.proc.poll() is None]
        self.guests = []
        if self._sockdir:
            shutil.rmtree(self._sockdir, ignore_errors=True)
            self._sockdir = None
        if self._own_dir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if alive:
            raise LabError(f"QEMU process(es) {alive} did not die")

    def command(self, name: str) -> list[str]:
        qmp = os.path.join(self._sockdir, f"{name}.qmp")
        cmd = ["qemu-system-x86_64", "-accel", "tcg", "-m", str(self.mem_mib),
               "-nographic", "-no-reboot",
               "-kernel", str(self.files.kernel), "-initrd", str(self.files.initrd),
               "-append", kernel_command_line(self.write_kib_s, self.hot_kib),
               "-qmp", f"unix:{qmp},server,nowait"]
        if not self.merge:
            cmd += ["-machine", "mem-merge=off"]
        return cmd + self.extra_args

    def start(self, name: str | None = None) -> Guest:
        """Start one guest (does not wait for it)."""
        if self._sockdir is None:
            raise LabError("Lab used outside its with-block")
        name = name or f"g{len(self.guests)}"
        cmd = self.command(name)
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        except FileNotFoundError:
            raise LabError("qemu-system-x86_64 not found (host package: qemu-system-x86)") \
                from None
        guest = Guest(name, proc, os.path.join(self._sockdir, f"{name}.qmp"),
                      str(self.workdir / f"{name}.console.log"), self.mem_mib)
        self.guests.append(guest)
        return guest

    def boot(self, n: int = 1, timeout: float = BOOT_TIMEOUT_S) -> list[Guest]:
        """Start ``n`` guests at once and wait (bounded) until each printed the ready line."""
        new = [self.start() for _ in range(n)]
        end = time.monotonic() + timeout
        for g in new:
            g.wait_ready(max(end - time.monotonic(), 0.1))
        return new


def writer_rate(console: str, window_s: float = 6.0) -> float | None:
    """KiB/s the guest's writer really wrote over the last ``window_s`` seconds of guest time
    it reported on its console (it falls behind its target when the host is short of CPU),
    or None before two reports."""
    points = []
    for line in console.splitlines():
        if WRITER_LINE in line:
            try:
                cs, kib = line.split(WRITER_LINE, 1)[1].split()[:2]
                points.append((int(cs) / 100.0, int(kib)))
            except ValueError:
                continue
    if len(points) < 2:
        return None
    t_end, k_end = points[-1]
    start = next((p for p in points if p[0] >= t_end - window_s), points[0])
    if start[0] >= t_end:
        start = points[-2]
    return (k_end - start[1]) / (t_end - start[0])


def kernel_command_line(write_kib_s: int = 0, hot_kib: int = 0) -> str:
    """The lab guest's kernel command line (serial console; the writer's knobs if any)."""
    if write_kib_s < 0 or hot_kib < 0:
        raise LabError("the guest writer's rate and file size must be >= 0")
    line = "console=ttyS0"
    if write_kib_s:
        if hot_kib < 256:
            raise LabError("a writing guest needs a file of at least 256 KiB (hot_kib)")
        # the writer paces itself by the guest's clock: keep that clock off the TSC, whose
        # frequency the guest calibrates at boot and gets wrong when the host is short of
        # CPU (seen: a guest clock 1.5 x fast); the HPET ticks at a fixed rate of QEMU's clock
        line += f" clocksource=hpet vmhost.write_kib_s={write_kib_s} vmhost.hot_kib={hot_kib}"
    return line


def qemu_pids() -> list[int]:
    """PIDs of every qemu-system-x86_64 process on the machine (for leak checks)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                exe = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0", 1)[0]
            except OSError:
                continue
            if os.path.basename(exe) == b"qemu-system-x86_64":
                pids.append(int(entry))
    return pids
