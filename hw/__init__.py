"""Virtual hardware of a KVM host: NUMA topology, memory blocks, swap devices.

Nothing here knows about the host kernel; ``vmhost`` builds its memory
management on top of these descriptions, and ``guests`` may use them to
describe what a guest is given.
"""

from hw.memory import BlockState, MemoryBlock, PhysicalMemory, Zone
from hw.swap import SwapDevice, SwapIOError
from hw.topology import NumaNode, Topology
from hw.units import PAGE_SIZE


__all__ = [
    "PAGE_SIZE", "BlockState", "MemoryBlock", "PhysicalMemory", "Zone",
    "SwapDevice", "SwapIOError", "NumaNode", "Topology",
]
