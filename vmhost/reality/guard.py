"""Changes to the real machine that are undone even when the process making them dies.

An oracle that offlines memory blocks, turns on a swap file or makes a memory cgroup
does that work in a *child* process. Before each change the child writes a line to its
journal (a pipe to the parent) saying how to undo it; the parent, which outlives the
child, reads the journal and, whatever way the child ended (normal exit, exception,
SIGKILL, timeout), undoes every entry in reverse order:

- ``block``: memory block N back ``online`` in its original zone (an online block in
  another zone, e.g. ZONE_MOVABLE, is offlined and onlined again);
- ``swapfile``: ``swapoff`` (retried) and the file removed;
- ``cgroup``: its tasks moved to the parent cgroup, then the directory removed;
- ``sysctl``: a ``/proc/sys`` (or sysfs) file written back to the value it had.

The parent holds the real-KSM lock (``ksm_oracle.exclusive_kernel_ksm``) across the
child's whole life, so KSM's knobs are restored as well and nothing else offlines blocks
or enables swap meanwhile.

Memory-block helpers (sysfs ``/sys/devices/system/memory``) live here too.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MEM_DIR = Path("/sys/devices/system/memory")
KPF_BUDDY = 1 << 10
KPF_LRU = 1 << 5
KPF_KSM = 1 << 21
KPF_MMAP = 1 << 11
KPF_ANON = 1 << 12
KPF_HUGE = 1 << 17
PFN_MASK = (1 << 55) - 1
PM_PRESENT = 1 << 63

_libc = ctypes.CDLL(None, use_errno=True)
_libc.write.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t)
_libc.write.restype = ctypes.c_ssize_t
_libc.swapon.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.swapoff.argtypes = (ctypes.c_char_p,)


# --------------------------------------------------------------------------------------------
# memory blocks

def block_pages() -> int:
    return int((MEM_DIR / "block_size_bytes").read_text().strip(), 16) // 4096


def block_ids() -> list[int]:
    """Memory block numbers (phys_index: not contiguous where the physical map has holes)."""
    return sorted(int(p.name[6:]) for p in MEM_DIR.glob("memory[0-9]*"))


def block_state(b: int) -> str:
    return (MEM_DIR / f"memory{b}" / "state").read_text().strip()


def block_zones(b: int) -> str:
    return (MEM_DIR / f"memory{b}" / "valid_zones").read_text().strip()


def write_state(b: int, value: str) -> tuple[str | None, float]:
    """One write(2) of ``value`` to memoryN/state: (errno name or None, seconds it took).

    The raw libc write is used so that an EINTR is seen as such (Python would retry it)."""
    fd = os.open(MEM_DIR / f"memory{b}" / "state", os.O_WRONLY)
    try:
        data = value.encode()
        t = time.perf_counter()
        rc = _libc.write(fd, data, len(data))
        dt = time.perf_counter() - t
        err = ctypes.get_errno() if rc < 0 else 0
    finally:
        os.close(fd)
    return (errno.errorcode.get(err, str(err)) if rc < 0 else None), dt


def kpageflags(first_pfn: int, count: int) -> np.ndarray:
    with open("/proc/kpageflags", "rb") as fh:
        fh.seek(first_pfn * 8)
        return np.frombuffer(fh.read(count * 8), dtype=np.uint64)


def pagemap(pid: int, addr: int, pages: int) -> np.ndarray:
    """PFN of each page of [addr, addr + pages*4096) in process ``pid`` (-1: not present)."""
    with open(f"/proc/{pid}/pagemap", "rb") as fh:
        fh.seek(addr // 4096 * 8)
        ent = np.frombuffer(fh.read(pages * 8), dtype=np.uint64)
    pfn = (ent & np.uint64(PFN_MASK)).astype(np.int64)
    pfn[(ent & np.uint64(PM_PRESENT)) == 0] = -1
    return pfn


def free_blocks(zones=("DMA32", "Normal"), limit: int = 8) -> list[int]:
    """Online blocks (not block 0) in one of ``zones`` whose every page is free (buddy)."""
    bp = block_pages()
    out = []
    for b in block_ids():
        if b == 0:
            continue
        try:
            if block_state(b) != "online" or block_zones(b) not in zones:
                continue
        except OSError:
            continue
        if ((kpageflags(b * bp, bp) & np.uint64(KPF_BUDDY)) != 0).all():
            out.append(b)
            if len(out) >= limit:
                break
    return out


def restore_block(b: int, zone: str, attempts: int = 20) -> str | None:
    """Put block ``b`` back online in ``zone``; None when done, else what is wrong."""
    for _ in range(attempts):
        st = block_state(b)
        if st == "online" and block_zones(b) == zone:
            return None
        if st == "online":
            err, _ = write_state(b, "offline")
        elif st == "offline":
            err, _ = write_state(b, "online_movable" if zone == "Movable" else "online_kernel")
            if err is None and block_zones(b) != zone:
                continue
        else:
            err = st
        if err:
            time.sleep(0.1)
    return f"memory block {b}: state {block_state(b)}, zones {block_zones(b)} (wanted online {zone})"


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# --------------------------------------------------------------------------------------------
# swap files and cgroups

def swapoff(path: str) -> str | None:
    if not swap_active(path):
        return None
    for _ in range(5):
        if _libc.swapoff(path.encode()) == 0:
            return None
        e = ctypes.get_errno()
        if e == errno.EINVAL:          # not (or no longer) a swap area
            return None
        time.sleep(0.2)
    return f"swapoff {path}: {errno.errorcode.get(e, e)}"


def swap_active(path: str) -> bool:
    with open("/proc/swaps") as fh:
        return any(line.split()[0] == path for line in fh.readlines()[1:])


def remove_cgroup(path: str) -> str | None:
    p = Path(path)
    if not p.exists():
        return None
    parent = p.parent / "cgroup.procs"
    for _ in range(20):
        try:
            pids = [x for x in (p / "cgroup.procs").read_text().split()]
            for pid in pids:
                try:
                    parent.write_text(pid)
                except OSError:
                    pass
            p.rmdir()
            return None
        except OSError:
            time.sleep(0.1)
    return f"cgroup {path}: could not be removed"


# --------------------------------------------------------------------------------------------
# the journal (child side) and the guardian (parent side)

class Journal:
    """The child's journal: record an undo entry *before* making the change."""

    def __init__(self, fd: int):
        self.fd = fd

    def record(self, kind: str, **data) -> None:
        os.write(self.fd, (json.dumps({"kind": kind, **data}) + "\n").encode())


def undo(entries: list[dict]) -> list[str]:
    """Undo journal entries, newest first; returns what could not be undone."""
    problems = []
    for e in reversed(entries):
        try:
            if e["kind"] == "block":
                p = restore_block(e["block"], e["zone"])
            elif e["kind"] == "swapfile":
                p = swapoff(e["path"])
                if p is None and not swap_active(e["path"]):
                    Path(e["path"]).unlink(missing_ok=True)
            elif e["kind"] == "cgroup":
                p = remove_cgroup(e["path"])
            elif e["kind"] == "sysctl":
                Path(e["path"]).write_text(e["value"])
                p = None if Path(e["path"]).read_text().strip() == e["value"].strip() else \
                    f"{e['path']}: could not write back {e['value']!r}"
            else:
                p = f"unknown journal entry {e}"
        except OSError as exc:
            p = f"{e}: {exc}"
        if p:
            problems.append(p)
    return problems


def run_guarded(module: str, request: dict, timeout: float) -> tuple[dict | None, list[dict], list[str], int]:
    """Run ``python -m MODULE --child JFD RFD`` with ``request`` on stdin; undo its journal.

    Returns (the child's result or None, the journal, undo problems, the child's exit status
    (negative: killed by that signal)). The child is killed at ``timeout``."""
    jr, jw = os.pipe()
    rr, rw = os.pipe()
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    entries: list[dict] = []
    buf, result_bytes = b"", b""
    child = None
    try:
        child = subprocess.Popen([sys.executable, "-m", module, "--child", str(jw), str(rw)],
                                 pass_fds=[jw, rw], stdin=subprocess.PIPE, env=env, cwd="/")
        os.close(jw)
        os.close(rw)
        jw = rw = -1
        child.stdin.write(json.dumps(request).encode())
        child.stdin.close()
        end = time.monotonic() + timeout
        open_fds = {jr, rr}
        while open_fds:
            left = end - time.monotonic()
            if left <= 0:
                child.kill()
                break
            ready, _, _ = select.select(list(open_fds), [], [], min(left, 1.0))
            for fd in ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    open_fds.discard(fd)
                elif fd == jr:
                    buf += chunk
                else:
                    result_bytes += chunk
        child.wait(timeout=30)
    except BaseException:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        raise
    finally:
        for fd in (jr, rr, jw, rw):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            entries.append(json.loads(line))
        problems = undo(entries)
    result = json.loads(result_bytes) if result_bytes else None
    return result, entries, problems, child.returncode


def child_fds(argv: list[str]) -> tuple[Journal, int]:
    """In the child: the journal and the result fd from ``--child JFD RFD``."""
    return Journal(int(argv[1])), int(argv[2])


def send_result(fd: int, result: dict) -> None:
    data = json.dumps(result).encode()
    while data:
        n = os.write(fd, data)
        data = data[n:]
    os.close(fd)


def child_main(argv: list[str], work) -> int:
    """The child's whole life (``--child JFD RFD``, request on stdin): SIGINT ignored (the
    parent handles Ctrl-C), ``work(journal, request)`` run, and its result dict, its refusal
    (an ``InputError``) or its failure sent to the parent."""
    from guests.errors import InputError
    journal, rfd = child_fds(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    req = json.loads(sys.stdin.read())
    try:
        send_result(rfd, {"ok": True, **work(journal, req)})
    except InputError as exc:
        send_result(rfd, {"ok": False, "refused": str(exc)})
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        send_result(rfd, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    return 0


def guarded_result(module: str, request: dict, timeout: float, what: str) -> dict:
    """:func:`run_guarded`, then its outcome as the oracles report it: the child's result with
    the journal it left (restored), an ``InputError`` for a refusal, an ``OracleError`` for a
    failure, a child that died, or a change that could not be undone."""
    from guests.errors import InputError
    from vmhost.reality.ksm_oracle import OracleError
    result, journal, problems, status = run_guarded(module, request, timeout)
    if problems:
        raise OracleError("could not restore: " + "; ".join(problems))
    if result is None:
        raise OracleError(f"{what}'s child ended without a result (status {status}); "
                          f"restored {len(journal)} journalled change(s)")
    if result.get("refused"):
        raise InputError(result["refused"])
    if not result["ok"]:
        raise OracleError(result["error"])
    result["journal"] = journal
    return result
