"""The virtual clock and its event loop.

Everything that happens over time (ksmd waking every sleep_millisecs, guests
writing memory, a scenario's timeline) is an event on one clock. Time is an
integer count of nanoseconds so that ordering is exact; events at the same
time run in the order they were scheduled. The loop is deliberately small
(in the style of SimPy's core): models live outside it and schedule callbacks.

A callback that would only schedule itself again (ksmd's next batch) may instead run that
occurrence at once, without the heap, if it falls before ``horizon()``: the time of the next
other event, bounded by the running loop's end. Such a run is the same as the event loop's
(nothing else would have run in between) as long as the loop checks no condition between
events that the callback's own occurrences could change: ``run_until`` checks none, and
``run_while`` allows it only when its caller says so (``fast_forward``). Outside a loop, or
under ``step()`` alone, there is no horizon.
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
        self._seq = itertools.count()
        self._bound: int | None = None      # the running loop's last allowed time, if fast-forward is allowed

    def at(self, when: int, callback: Callable[[], None]) -> Event:
        if when < self.now:
            raise ValueError(f"cannot schedule in the past ({when} < {self.now})")
        ev = Event(int(when), callback)
        heapq.heappush(self._heap, (ev.when, next(self._seq), ev))
        return ev

    def after(self, delay: int, callback: Callable[[], None]) -> Event:
        return self.at(self.now + int(delay), callback)

    def next_time(self) -> int | None:
        while self._heap and self._heap[0][2].cancelled:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def horizon(self) -> int:
        """Time before which nothing but the running callback would happen (see the module
        docstring); ``now`` when no run ahead is allowed."""
        if self._bound is None:
            return self.now
        nxt = self.next_time()
        return min(self._bound + 1, nxt) if nxt is not None else self._bound + 1

    def advance(self, when: int) -> None:
        """Move the clock to ``when`` for a callback running its own next occurrence at once."""
        if not self.now <= when < self.horizon():
            raise ValueError(f"cannot advance to {when} (now {self.now}, horizon {self.horizon()})")
        self.now = int(when)

    def step(self) -> bool:
        """Run the earliest pending event; False when there is none."""
        when = self.next_time()
        if when is None:
            return False
        _, _, ev = heapq.heappop(self._heap)
        self.now = when
        ev.callback()
        return True

    def run_until(self, when: int) -> None:
        """Run every event due up to and including ``when``; the clock ends at ``when``."""
        outer, self._bound = self._bound, int(when)
        try:
            while True:
                nxt = self.next_time()
                if nxt is None or nxt > when:
                    break
                self.step()
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
                nxt = self.next_time()
                if nxt is None or (limit is not None and nxt > limit):
                    return False
                self.step()
        finally:
            self._bound = outer
        return True
