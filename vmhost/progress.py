"""Progress on stderr for the long runs (density searches, fleets, benchmarks).

On a terminal the bar is redrawn in place (carriage return) and the last note is shown beside
it; when stderr is a file or a pipe (CI logs, scripts) it prints a plain line at every tenth of
the way instead, so logs stay short and readable. ``quiet`` turns it off entirely: scripts that
read stdout see nothing on stderr either. A bar with no total counts up without a percentage.
A ``start`` note is shown at once, before the first step (a first step can be slow: a cold compile, a first boot).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

BAR_WIDTH = 28


class Progress:
    """``with Progress(total, label) as p: ... p.advance(note=...)``."""

    def __init__(self, total: int | None, label: str, quiet: bool = False,
                 stream: TextIO | None = None, start: str = ""):
        self.total, self.label, self.quiet = total, label, quiet
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.note = start
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._t0 = time.monotonic()
        self._last_tenth = -1
        self._drawn = False

    def __enter__(self) -> "Progress":
        if self.note and not self.quiet:        # a start note: shown at once, before any work
            if self._tty:
                self._draw()
            else:
                self._last_tenth = 0
                print(self._line(), file=self.stream, flush=True)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def advance(self, n: int = 1, note: str = "") -> None:
        self.done += n
        if note:
            self.note = note
        if self.quiet:
            return
        if self._tty:
            self._draw()
            return
        tenth = int(10 * self.done / self.total) if self.total else self.done
        if tenth != self._last_tenth or (self.total and self.done >= self.total):
            self._last_tenth = tenth
            print(self._line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._drawn and not self.quiet:
            print(file=self.stream, flush=True)
            self._drawn = False

    def _line(self) -> str:
        elapsed = time.monotonic() - self._t0
        if self.total:
            frac = min(self.done / self.total, 1.0)
            fill = int(round(BAR_WIDTH * frac))
            bar = f"[{'#' * fill}{'.' * (BAR_WIDTH - fill)}] {self.done}/{self.total} {frac:4.0%}"
        else:
            bar = f"{self.done} done"
        note = f"  {self.note}" if self.note else ""
        return f"{self.label}: {bar} {elapsed:6.1f}s{note}"

    def _draw(self) -> None:
        self.stream.write("\r\x1b[2K" + self._line())
        self.stream.flush()
        self._drawn = True
