"""Swap devices: capacity, priority, throughput, and injected I/O errors.

A device is a numbered array of page slots. The host kernel decides what goes
in a slot; the device only keeps the slot map, how long I/O takes, and which
slots fail when read or written (the error-injection hook, like dm-flakey or
a failing disk would).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hw.units import PAGE_SIZE



class SwapIOError(IOError):
    """A read or write of a swap slot failed (injected)."""


@dataclass
class SwapDevice:
    name: str
    capacity_pages: int
    priority: int = -2                  # the kernel numbers swapon without -p from -2 downwards
    read_bytes_per_s: float = 500e6
    write_bytes_per_s: float = 400e6
    failing_slots: set[int] = field(default_factory=set)
    fail_all: bool = False

    def __post_init__(self) -> None:
        if self.capacity_pages <= 0:
            raise ValueError(f"swap device {self.name!r}: capacity must be positive")
        if self.read_bytes_per_s <= 0 or self.write_bytes_per_s <= 0:
            raise ValueError(f"swap device {self.name!r}: throughput must be positive")
        self.used = np.zeros(self.capacity_pages, dtype=bool)
        self.data = np.zeros(self.capacity_pages, dtype=np.uint64)   # what each slot holds
        self._low = 0                   # every slot below this one is in use
        self.pages_read = 0
        self.pages_written = 0

    @property
    def free_pages(self) -> int:
        return int(self.capacity_pages - np.count_nonzero(self.used))

    def allocate_slots(self, count: int) -> np.ndarray:
        """Take ``count`` free slots (lowest first), or fewer if the device is full."""
        found, at, chunk = [], self._low, max(4 * count, 4096)
        while count > 0 and at < self.capacity_pages:     # from the lowest slot that may be free
            free = np.flatnonzero(~self.used[at:at + chunk])[:count] + at
            found.append(free)
            count -= len(free)
            at += chunk
        free = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
        self.used[free] = True
        self._low = int(free[-1]) + 1 if len(free) and count == 0 else min(at, self.capacity_pages)
        return free

    def free_slots(self, slots) -> None:
        slots = np.asarray(slots)
        self.used[slots] = False
        if slots.size:
            self._low = min(self._low, int(slots.min()))

    def inject_errors(self, slots=None, *, all_slots: bool = False) -> None:
        """Make reads and writes of these slots (or of every slot) fail."""
        if all_slots:
            self.fail_all = True
        if slots is not None:
            self.failing_slots.update(int(s) for s in np.atleast_1d(slots))

    def clear_errors(self) -> None:
        self.failing_slots.clear()
        self.fail_all = False

    def check_io(self, slot: int) -> None:
        if self.fail_all or slot in self.failing_slots:
            raise SwapIOError(f"swap device {self.name!r}: I/O error at slot {slot}")

    def write_slot(self, slot: int, content: int) -> None:
        """Write one page (its content id) to a slot; raises SwapIOError if the slot fails."""
        self.check_io(slot)
        self.data[slot] = content
        self.pages_written += 1

    def read_slot(self, slot: int) -> int:
        """Read one page back; raises SwapIOError if the slot fails."""
        self.check_io(slot)
        self.pages_read += 1
        return int(self.data[slot])

    def read_seconds(self, pages: int) -> float:
        return pages * PAGE_SIZE / self.read_bytes_per_s

    def write_seconds(self, pages: int) -> float:
        return pages * PAGE_SIZE / self.write_bytes_per_s
