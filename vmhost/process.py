"""Processes of the host (the kernel's task_struct): a pid, a name, an address space, OOM settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from vmhost.mm.mm import MM


@dataclass(eq=False)
class Process:
    pid: int
    name: str
    mm: MM
    parent: "Process | None" = None
    oom_score_adj: int = 0
    alive: bool = True
    signals: list[str] = field(default_factory=list)   # e.g. "SIGBUS", "SIGKILL" received

    def __repr__(self) -> str:
        return f"Process({self.pid}, {self.name!r}{'' if self.alive else ', dead'})"
