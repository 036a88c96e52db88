"""Physical memory as hot-pluggable memory blocks.

Linux (SPARSEMEM) manages RAM in memory blocks, the unit of online and offline:
128 MiB (32,768 pages of 4 KiB) on most x86_64 machines, larger on big hosts.
Block ``i`` covers page frames ``[i * block_pages, (i + 1) * block_pages)``.
Every block sits on one NUMA node and, once online, in one zone: ZONE_NORMAL
takes kernel allocations, ZONE_MOVABLE only movable (user) pages, which is
what makes a movable block reliably removable.

Blocks come from boot memory or are hot-added later as a DIMM (all of its
blocks are removed together) or by a virtio-mem device (block by block).
Frames are numbered densely in the order blocks were added, so node and block
of a frame are array look-ups (:meth:`PhysicalMemory.block_of`,
:meth:`PhysicalMemory.node_of`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from hw.topology import Topology
from hw.units import PAGE_SIZE

DEFAULT_BLOCK_PAGES = 32768  # 128 MiB of 4 KiB pages


class BlockState(enum.Enum):
    ONLINE = "online"
    OFFLINE = "offline"
    GOING_OFFLINE = "going-offline"


class Zone(enum.Enum):
    NORMAL = "normal"
    MOVABLE = "movable"


@dataclass
class MemoryBlock:
    index: int
    node: int
    zone: Zone
    state: BlockState
    device: str            # "boot", or the name of the DIMM / virtio-mem device that added it
    first_pfn: int
    pages: int
    hole_pages: int = 0    # firmware holes at the end of the block (make it unofflinable)


class PhysicalMemory:
    """The host's RAM: a growing list of equally sized memory blocks."""

    def __init__(self, topology: Topology, block_pages: int = DEFAULT_BLOCK_PAGES,
                 movable_nodes: tuple[int, ...] = ()):
        if block_pages <= 0:
            raise ValueError("block size must be a positive number of pages")
        self.topology = topology
        self.block_pages = block_pages
        self.blocks: list[MemoryBlock] = []
        self.devices: dict[str, str] = {"boot": "boot"}   # device name -> "dimm" | "virtio-mem"
        self._block_node = np.zeros(0, dtype=np.int16)
        for node in topology.nodes:
            nblocks = -(-node.mem_bytes // (PAGE_SIZE * block_pages))
            zone = Zone.MOVABLE if node.id in movable_nodes else Zone.NORMAL
            self._add_blocks(node.id, nblocks, zone, "boot", BlockState.ONLINE)

    # -- layout ---------------------------------------------------------------------
    def _add_blocks(self, node: int, count: int, zone: Zone, device: str,
                    state: BlockState) -> list[MemoryBlock]:
        if not 0 <= node < self.topology.node_count:
            raise ValueError(f"no NUMA node {node}")
        if count < 0:
            raise ValueError("block count must not be negative")
        added = []
        for _ in range(count):
            idx = len(self.blocks)
            blk = MemoryBlock(idx, node, zone, state, device, idx * self.block_pages, self.block_pages)
            self.blocks.append(blk)
            added.append(blk)
        self._block_node = np.concatenate(
            [self._block_node, np.full(count, node, dtype=np.int16)])
        return added

    @property
    def total_pages(self) -> int:
        return len(self.blocks) * self.block_pages

    def block_of(self, pfn):
        return np.asarray(pfn) // self.block_pages

    @property
    def block_node_array(self) -> np.ndarray:
        """NUMA node of each block, indexed by block number."""
        return self._block_node

    def node_of(self, pfn):
        """NUMA node of one frame or of an array of frames."""
        return self._block_node[np.asarray(pfn) // self.block_pages]

    def blocks_of_device(self, device: str) -> list[MemoryBlock]:
        return [b for b in self.blocks if b.device == device]

    def online_blocks(self, node: int | None = None) -> list[MemoryBlock]:
        return [b for b in self.blocks if b.state is BlockState.ONLINE
                and (node is None or b.node == node)]

    # -- hot-add --------------------------------------------------------------------
    def hot_add_dimm(self, name: str, node: int, size_bytes: int,
                     zone: Zone = Zone.MOVABLE) -> list[MemoryBlock]:
        """Add a pc-dimm: its blocks arrive offline and leave together."""
        self._check_new_device(name, size_bytes)
        count = size_bytes // (PAGE_SIZE * self.block_pages)
        self.devices[name] = "dimm"
        return self._add_blocks(node, count, zone, name, BlockState.OFFLINE)

    def hot_add_virtio_mem(self, name: str, node: int, blocks: int,
                           zone: Zone = Zone.MOVABLE) -> list[MemoryBlock]:
        """Plug ``blocks`` more blocks of a virtio-mem device (may be called again)."""
        if blocks <= 0:
            raise ValueError("virtio-mem must plug at least one block")
        if self.devices.setdefault(name, "virtio-mem") != "virtio-mem":
            raise ValueError(f"device {name!r} exists and is not a virtio-mem device")
        return self._add_blocks(node, blocks, zone, name, BlockState.OFFLINE)

    def _check_new_device(self, name: str, size_bytes: int) -> None:
        if name in self.devices:
            raise ValueError(f"a memory device named {name!r} already exists")
        block_bytes = PAGE_SIZE * self.block_pages
        if size_bytes <= 0 or size_bytes % block_bytes:
            raise ValueError(f"DIMM size must be a positive multiple of the block size ({block_bytes} bytes)")
