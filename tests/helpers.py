"""Helpers several test modules share: the CLI as a user runs it, its one-line errors, and the
processes a test left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent      # tests/: one folder per package of the tree
ROOT = TESTS.parent                          # the checkout
CORPUS = TESTS / "ksm_traces"                # the KSM trace corpus, recorded on the kernel
DATA = TESTS / "data"                        # test tables kept as data

# A 4 MiB guest image (1024 pages) whose first half is kernel pages, the same in every guest of
# a domain and all distinct inside one; a test adds the classes of the other half.
UNIT_KERNEL_HALF = """\
name: unit
memory_mib: 4
kernel: unit-kernel
classes:
  kernel: {fraction: 0.5, distinct: 1.0, pool: 1}
"""


def ctrl_c_reaches_it() -> None:
    """A ``preexec_fn`` for a child a test interrupts with SIGINT: the default action back, as
    in a terminal. A shell's background job (CI started with ``&``) inherits SIGINT ignored, and
    Python then installs no KeyboardInterrupt handler, so Ctrl-C would never reach it."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def vmhost(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python3 -m vmhost.cli ARGS`` from the repository root (this checkout's code)."""
    return subprocess.run([sys.executable, "-m", "vmhost.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def one_line_exit_2(r: subprocess.CompletedProcess, *words: str) -> str:
    """Bad input: exit status 2, one line on stderr (no traceback) holding every word."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def start_ksm(h, **knobs: str):
    """KSM and ksmd on host ``h``, running, 100,000 pages every 20 ms (``knobs`` written
    before ``run``): (ksm, ksmd)."""
    from vmhost.ksm.engine import Ksm
    from vmhost.ksm.ksmd import Ksmd
    ksm = Ksm(h)
    ksmd = Ksmd(ksm, h.clock)
    for k, v in {"pages_to_scan": "100000", "sleep_millisecs": "20", **knobs, "run": "1"}.items():
        assert ksm.write_knob(k, v) == 0
    return ksm, ksmd


def process_with(h, values, name: str = "p"):
    """A new process of host ``h`` with one plain (no THP) VMA holding ``values``, one a page:
    (process, vma)."""
    import numpy as np
    p = h.spawn(name)
    v = p.mm.mmap(len(values), thp=False)
    p.mm.write(v.start, np.asarray(values, dtype=np.uint64))
    return p, v


def pids_with_cmdline(needle: bytes) -> list[int]:
    """The processes whose command line (NUL-separated, as /proc has it) contains ``needle``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if needle in cmd:
                out.append(int(entry))
    return out


def refused_before_writing(command: str, bad: Path, report: Path, *words: str) -> None:
    """``vmhost COMMAND BAD --report REPORT`` on bad input: one line naming the file and every
    word, exit status 2, nothing on stdout and no report directory."""
    r = vmhost(command, bad, "--report", report)
    one_line_exit_2(r, str(bad), *words)
    assert r.stdout == ""
    assert not report.exists()
