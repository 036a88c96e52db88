"""The virtual clock and its event loop.

Everything that happens over time (ksmd waking every sleep_millisecs, guests
writing memory, a scenario's timeline) is an event on one clock. Time is an
integer count of nanoseconds so that ordering is exact; events at the same
time run in the order they were scheduled. The loop is deliberately small
(in the style of SimPy's core): models live outside it and schedule callbacks.

A *daemon* event (``at(..., daemon=True)``) is the timer of a kernel thread that wakes
periodically whatever happens, such as khugepaged: it runs in its turn while other
events are pending or time is run to a given instant (``run_until``), but it alone does
not keep the loop going (``next_time`` is None when only daemon events are left), so
"run until nothing is left to do" still ends.

A callback that would only schedule itself again (ksmd's next batch) may instead run that
occurrence at once, without the heap, if it falls before ``horizon()``: the time of the next
other event (daemon events included), bounded by the running loop's end. Such a run is the
same as the event loop's (nothing else would have run in between) as long as the loop checks
no condition between events that the callback's own occurrences could change: ``run_until``
checks none, and ``run_while`` allows it only when its caller says so (``fast_forward``).
Outside a loop, or under ``step()`` alone, there is no horizon.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Callable

NS_PER_MS = 1_000_000
NS_PER_S = 1_000_000_000


class Event:
    """A scheduled callback; cancel() keeps it in the heap but makes it a no-op."""

    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: int, callback: Callable[[], None]):
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Clock:
    def __init__(self) -> None:
        self.now = 0
        self._heap: list[tuple[int, int, Event]] = []
        self._daemons: list[tuple[int, int, Event]] = []
        self._seq = itertools.count()
        self._bound: int | None = None      # the running loop's last allowed time, if fast-forward is allowed

    def at(self, when: int, callback: Callable[[], None], daemon: bool = False) -> Event:
        if when < self.now:
            raise ValueError(f"cannot schedule in the past ({when} < {self.now})")
        ev = Event(int(when), callback)
        heapq.heappush(self._daemons if daemon else self._heap, (ev.when, next(self._seq), ev))
        return ev

    def after(self, delay: int, callback: Callable[[], None], daemon: bool = False) -> Event:
        return self.at(self.now + int(delay), callback, daemon)

    @staticmethod
    def _head(heap: list) -> tuple | None:
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
        return heap[0] if heap else None

    def _earliest(self, daemons_alone: bool) -> list | None:
        """The heap holding the earliest pending event (daemon events only count beside
        others, unless ``daemons_alone``)."""
        m, d = self._head(self._heap), self._head(self._daemons)
        if m is None:
            return self._daemons if daemons_alone and d is not None else None
        return self._daemons if d is not None and d[:2] < m[:2] else self._heap

    def next_time(self) -> int | None:
        heap = self._earliest(False)
        return heap[0][0] if heap else None

    def horizon(self) -> int:
        """Time before which nothing but the running callback would happen (see the module
        docstring); ``now`` when no run ahead is allowed."""
        if self._bound is None:
            return self.now
        heads = [h[0] for h in (self._head(self._heap), self._head(self._daemons)) if h is not None]
        return min([self._bound + 1] + heads)

    def advance(self, when: int) -> None:
        """Move the clock to ``when`` for a callback running its own next occurrence at once."""
        if not self.now <= when < self.horizon():
            raise ValueError(f"cannot advance to {when} (now {self.now}, horizon {self.horizon()})")
        self.now = int(when)

    def _run(self, heap: list) -> None:
        when, _, ev = heapq.heappop(heap)
        self.now = when
        ev.callback()

    def step(self) -> bool:
        """Run the earliest pending event; False when there is none (or only daemons)."""
        heap = self._earliest(False)
        if heap is None:
            return False
        self._run(heap)
        return True

    def run_until(self, when: int) -> None:
        """Run every event due up to and including ``when`` (daemon events too); the clock
        ends at ``when``."""
        outer, self._bound = self._bound, int(when)
        try:
            while True:
                heap = self._earliest(True)
                if heap is None or heap[0][0] > when:
                    break
                self._run(heap)
        finally:
            self._bound = outer
        self.now = max(self.now, int(when))

    def run_while(self, condition: Callable[[], bool], limit: int | None = None,
                  fast_forward: bool = False) -> bool:
        """Run events while ``condition()`` holds; False if events or the time limit ran out.
        ``fast_forward``: the condition cannot change while a callback runs its own next
        occurrences at once (see the module docstring), so they may."""
        outer = self._bound
        self._bound = (limit if limit is not None else 1 << 62) if fast_forward else None
        try:
            while condition():
                heap = self._earliest(False)
                if heap is None or (limit is not None and heap[0][0] > limit):
                    return False
                self._run(heap)
        finally:
            self._bound = outer
        return True
