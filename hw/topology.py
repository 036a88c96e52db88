"""NUMA topology: nodes with memory and CPUs, and the ACPI SLIT distance matrix.

Distances follow the firmware convention: 10 to itself, 20 (or more) to a
remote node. A node's fallback order for page allocation is derived from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class NumaNode:
    id: int
    mem_bytes: int
    cpus: tuple[int, ...] = ()


@dataclass
class Topology:
    nodes: list[NumaNode]
    distance: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ValueError("a topology needs at least one NUMA node")
        ids = [n.id for n in self.nodes]
        if ids != list(range(len(ids))):
            raise ValueError(f"NUMA node ids must be 0..{len(ids) - 1} in order, got {ids}")
        for n in self.nodes:
            if n.mem_bytes < 0:
                raise ValueError(f"node {n.id}: memory size must not be negative")
        count = len(self.nodes)
        if not self.distance:
            self.distance = [[10 if i == j else 20 for j in range(count)] for i in range(count)]
        if len(self.distance) != count or any(len(row) != count for row in self.distance):
            raise ValueError(f"distance matrix must be {count}x{count}")
        for i in range(count):
            if self.distance[i][i] != 10:
                raise ValueError(f"distance[{i}][{i}] must be 10 (local)")
            for j in range(count):
                if i != j and self.distance[i][j] <= 10:
                    raise ValueError(f"distance[{i}][{j}] must be above 10 (remote)")

    @classmethod
    def uniform(cls, nodes: int, mem_bytes_per_node: int, cpus_per_node: int = 1) -> "Topology":
        return cls([NumaNode(i, mem_bytes_per_node,
                             tuple(range(i * cpus_per_node, (i + 1) * cpus_per_node)))
                    for i in range(nodes)])

    @property
    def node_count(self) -> int:
        return len(self.nodes)

    def fallback_order(self, nid: int) -> list[int]:
        """Nodes to try for an allocation that prefers ``nid``: nearest first."""
        return sorted(range(self.node_count), key=lambda j: (self.distance[nid][j], j))

    def node_of_cpu(self, cpu: int) -> int:
        for n in self.nodes:
            if cpu in n.cpus:
                return n.id
        raise ValueError(f"no NUMA node has cpu {cpu}")
