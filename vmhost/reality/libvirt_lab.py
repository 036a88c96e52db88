"""A real libvirtd running the QEMU lab's guests (TCG), for testing live libvirt sampling.

``LibvirtLab(guests=N)`` is a context manager. It starts a *keeper* process
(``python3 -m vmhost.reality.libvirt_lab keep ...``) that

1. takes the lock :data:`LOCK_PATH` (one libvirt lab on the machine at a time);
2. starts ``virtlogd`` and ``libvirtd`` in the foreground as its own children -- unless they
   already run, in which case it uses them and leaves them running. libvirtd runs in a
   private mount namespace where ``/dev/kvm`` is an unreadable empty file and qemu.conf adds
   ``namespaces = []`` (bind mounts seen by that libvirtd alone; nothing on the machine
   changes). Why: KVM does not work on these machines while ``/dev/kvm`` exists, readable by
   root only; libvirt probes QEMU as root (KVM "enabled") but checks KVM for the
   ``libvirt-qemu`` user (not usable), so it finds its capability cache stale and re-probes
   QEMU a dozen times at every domain start (about 45 s). With no usable ``/dev/kvm`` both
   checks agree and a domain starts in about a second. (QEMU's private ``/dev`` would try to
   carry the bind mount over, hence ``namespaces = []``.)
3. copies the lab guest's kernel and initramfs (``vmhost.reality.lab.build_guest``) under
   :data:`IMAGES_DIR` (QEMU runs as ``libvirt-qemu``, which cannot read root's cache), starts
   N transient ``<domain type='qemu'>`` guests (``qemu:///system``, direct kernel boot, 128 MiB,
   ``<nosharepages/>``: nothing is registered with the host's KSM, so no other KSM user is
   disturbed; ``<acpi/>``: without it the guest has no HPET or PM timer and keeps time by
   counting ticks, which runs slow when the host is short of CPU) and waits until each printed
   the lab's ready line on its serial log;
4. prints one JSON line (the URI and the domains) and waits for its standard input to close.

The test process holds the keeper's stdin: when it closes it -- on leaving the with-block, or
because the test process died -- the keeper destroys the domains, stops the daemons it
started (by their pids: SIGTERM, then SIGKILL) and removes the files it copied. So whatever
happens to the test, the machine is left as it was.

Host packages needed: ``libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients``
(the daemons), ``qemu-system-x86 busybox-static cpio`` (the lab guest), and libvirt-python.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vmhost.reality.guard import alive

URI = "qemu:///system"
LOCK_PATH = "/run/vmhost-libvirt-lab.lock"
IMAGES_DIR = Path("/var/lib/libvirt/images/vmhost-lab")
SERIAL_LOG_DIR = Path("/var/log/libvirt/qemu")
DOMAIN_PREFIX = "vmhost-lab-"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0

DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{mem}</memory>
  <vcpu>1</vcpu>
  <memoryBacking><nosharepages/></memoryBacking>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <on_reboot>destroy</on_reboot>
  <devices>
    <serial type='pty'>
      <log file='{log}' append='off'/>
      <target port='0'/>
    </serial>
    <console type='pty'><target type='serial' port='0'/></console>
  </devices>
</domain>
"""


class LibvirtLabError(RuntimeError):
    """The libvirt lab could not start (one line)."""


# --------------------------------------------------------------------------------------------
# the test side


class LibvirtLab:
    """Runs the keeper; ``uri`` and ``domains`` once entered."""

    def __init__(self, guests: int = 2, mem_mib: int = 128, write_kib_s: int = 0,
                 hot_kib: int = 0, timeout: float = 240.0):
        self.args = [sys.executable, "-m", "vmhost.reality.libvirt_lab", "keep",
                     "--guests", str(guests), "--mem", str(mem_mib),
                     "--write-kib-s", str(write_kib_s), "--hot-kib", str(hot_kib)]
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self.uri = URI
        self.domains: list[str] = []
        self.info: dict = {}

    def __enter__(self) -> "LibvirtLab":
        root = Path(__file__).resolve().parents[2]
        env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd=root)
        line = _readline(self.proc, self.timeout)
        if not line:
            err = self.proc.stderr.read() if self.proc.poll() is not None else ""
            self.close()
            last = (err.strip().splitlines() or ["no output"])[-1]
            raise LibvirtLabError(f"libvirt lab did not start: {last}")
        self.info = json.loads(line)
        self.uri, self.domains = self.info["uri"], self.info["domains"]
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(STOP_TIMEOUT_S * 4)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if sel.select(0.2):
            return proc.stdout.readline()
        if proc.poll() is not None:
            return proc.stdout.readline()
    return ""


# --------------------------------------------------------------------------------------------
# the keeper


def _running(pidfile: str) -> int | None:
    try:
        pid = int(Path(pidfile).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_socket(path: str, proc: subprocess.Popen, what: str) -> None:
    end = time.monotonic() + START_TIMEOUT_S
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise LibvirtLabError(f"{what} exited with status {proc.returncode}")
        if time.monotonic() > end:
            raise LibvirtLabError(f"{what}: no socket {path} after {START_TIMEOUT_S:.0f} s")
        time.sleep(0.05)


def keep(guests: int, mem_mib: int, write_kib_s: int, hot_kib: int) -> int:
    from vmhost.reality.lab import READY_LINE, build_guest, kernel_command_line
    lock = open(LOCK_PATH, "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    started: list[subprocess.Popen] = []
    scratch = Path(tempfile.mkdtemp(prefix="vmhost-libvirt-lab-"))
    names: list[str] = []
    conn = None
    try:
        logs = open(scratch / "daemons.log", "w")
        if _running("/run/virtlogd.pid") is None:
            p = subprocess.Popen(["virtlogd"], stdout=logs, stderr=logs, stdin=subprocess.DEVNULL)
            started.append(p)
            _wait_socket("/run/libvirt/virtlogd-sock", p, "virtlogd")
        if _running("/run/libvirtd.pid") is None:
            no_kvm = scratch / "no-kvm"
            no_kvm.touch()
            no_kvm.chmod(0)
            conf = scratch / "qemu.conf"
            conf.write_text(Path("/etc/libvirt/qemu.conf").read_text()
                            + "\n# vmhost libvirt lab: QEMU keeps this libvirtd's /dev\n"
                              "namespaces = [ ]\n")
            script = (f"mount --bind {no_kvm} /dev/kvm && "
                      f"mount --bind {conf} /etc/libvirt/qemu.conf && exec libvirtd")
            if not os.path.exists("/dev/kvm"):
                script = f"mount --bind {conf} /etc/libvirt/qemu.conf && exec libvirtd"
            p = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                  script], stdout=logs, stderr=logs, stdin=subprocess.DEVNULL)
            started.append(p)
            _wait_socket("/run/libvirt/libvirt-sock", p, "libvirtd")
        import libvirt
        libvirt.registerErrorHandler(lambda _c, _e: None, None)
        end = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                conn = libvirt.open(URI)
                break
            except libvirt.libvirtError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.1)
        files = build_guest()
        IMAGES_DIR.mkdir(parents=True, exist_ok=True)
        kernel, initrd = IMAGES_DIR / "vmlinuz", IMAGES_DIR / "initrd.gz"
        shutil.copyfile(files.kernel, kernel)
        shutil.copyfile(files.initrd, initrd)
        os.chmod(IMAGES_DIR, 0o755)
        for f in (kernel, initrd):
            os.chmod(f, 0o644)
        logs_of = {}
        for i in range(guests):
            name = f"{DOMAIN_PREFIX}{i}"
            log = SERIAL_LOG_DIR / f"{name}-serial.log"
            xml = DOMAIN_XML.format(name=name, mem=mem_mib, kernel=kernel, initrd=initrd,
                                    cmdline=kernel_command_line(write_kib_s, hot_kib), log=log)
            conn.createXML(xml, 0)
            names.append(name)
            logs_of[name] = log
        t0 = time.monotonic()
        for name, log in logs_of.items():
            while True:
                try:
                    if READY_LINE in log.read_text(errors="replace"):
                        break
                except OSError:
                    pass
                if time.monotonic() - t0 > START_TIMEOUT_S * 2:
                    raise LibvirtLabError(f"domain {name}: no ready line in {log}")
                time.sleep(0.1)
        print(json.dumps({"uri": URI, "domains": names,
                          "started": [p.pid for p in started],
                          "boot_seconds": round(time.monotonic() - t0, 2)}), flush=True)
        sys.stdin.read()          # until the test closes our stdin (or dies)
        return 0
    except Exception as exc:  # one line for the test, then the same teardown
        print(f"libvirt lab: {type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    finally:
        if conn is not None:
            for name in names:
                try:
                    conn.lookupByName(name).destroy()
                except Exception:
                    pass
            try:
                conn.close()
            except Exception:
                pass
        for p in reversed(started):
            _stop(p)
        for name in names:
            for log in (f"{name}-serial.log", f"{name}.log"):   # ours, and libvirt's for QEMU
                try:
                    (SERIAL_LOG_DIR / log).unlink()
                except OSError:
                    pass
        shutil.rmtree(IMAGES_DIR, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
        lock.close()


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python3 -m vmhost.reality.libvirt_lab")
    sub = ap.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("keep", help="start libvirt and lab domains; stop all when stdin closes")
    k.add_argument("--guests", type=int, default=2)
    k.add_argument("--mem", type=int, default=128)
    k.add_argument("--write-kib-s", type=int, default=0)
    k.add_argument("--hot-kib", type=int, default=0)
    a = ap.parse_args(argv)
    # the test may die with SIGINT/SIGTERM in our process group: finish the teardown anyway
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    return keep(a.guests, a.mem, a.write_kib_s, a.hot_kib)


if __name__ == "__main__":
    sys.exit(main())
