"""NUMA memory policies (set_mempolicy/mbind): which node a new page comes from.

- local: the node of the CPU the task runs on (its home node), falling back
  to the nearest nodes;
- preferred: one given node first, then the nearest others;
- bind: only the given nodes (an allocation fails rather than leave them);
- interleave: pages spread round-robin over the nodes by their page index in
  the mapping, as the kernel does for VMA interleave.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODES = ("local", "preferred", "bind", "interleave")


@dataclass(frozen=True)
class MemPolicy:
    mode: str = "local"
    nodes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown NUMA policy {self.mode!r} (known: {', '.join(MODES)})")
        if self.mode != "local" and not self.nodes:
            raise ValueError(f"NUMA policy {self.mode!r} needs at least one node")
        if self.mode == "preferred" and len(self.nodes) != 1:
            raise ValueError("NUMA policy 'preferred' takes exactly one node")

    def preferred_nodes(self, home_node: int, indices: np.ndarray) -> np.ndarray:
        """The node each new page (by its linear index) should come from."""
        if self.mode == "local":
            return np.full(len(indices), home_node, dtype=np.int64)
        if self.mode == "interleave":
            return np.asarray(self.nodes, dtype=np.int64)[np.asarray(indices) % len(self.nodes)]
        if self.mode == "bind" and home_node in self.nodes:
            return np.full(len(indices), home_node, dtype=np.int64)
        return np.full(len(indices), self.nodes[0], dtype=np.int64)

    @property
    def allowed(self) -> tuple[int, ...] | None:
        """Nodes an allocation may use at all (None: any)."""
        return self.nodes if self.mode in ("bind", "interleave") else None


LOCAL = MemPolicy()
