"""What a guest is given: its memory, vCPUs, NUMA layout and memory backing.

This is the shared description of a VM that the libvirt importer produces,
the host config files carry (a ``guests:`` list) and the QEMU process model
consumes. It mirrors libvirt's domain XML, element for element:

=====================  ==============================================
field                  libvirt
=====================  ==============================================
memory_mib             ``<memory>`` (boot maximum)
current_memory_mib     ``<currentMemory>`` (balloon target)
max_memory_mib/slots   ``<maxMemory slots=N>`` (hotplug bound)
vcpus                  ``<vcpu>``
numa_cells             ``<cpu><numa><cell id= cpus= memory=/>``
numatune               ``<numatune><memory mode= nodeset=/>`` and
                       ``<memnode cellid= mode= nodeset=/>``
nosharepages           ``<memoryBacking><nosharepages/>`` (mem-merge=off)
hugepages              ``<memoryBacking><hugepages/>`` (never merged)
locked                 ``<memoryBacking><locked/>`` (never swapped)
memory_devices         ``<memory model='dimm'|'virtio-mem'>``
running                the domain's state
image                  which guest image's content fills its RAM
=====================  ==============================================
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GuestNumaCell:
    id: int
    cpus: str                  # libvirt cpuset syntax, e.g. "0-1"
    memory_mib: int


@dataclass
class NumaTune:
    mode: str = "strict"       # strict | interleave | preferred | restrictive
    nodeset: str = ""          # host nodes, cpuset syntax; "" = no restriction
    memnodes: dict[int, tuple[str, str]] = field(default_factory=dict)  # cell -> (mode, nodeset)


@dataclass
class MemoryDevice:
    model: str                 # "dimm" | "virtio-mem"
    size_mib: int
    node: int | None = None    # guest NUMA node
    requested_mib: int | None = None   # virtio-mem: plugged now
    block_mib: int | None = None       # virtio-mem block size


@dataclass
class GuestSpec:
    name: str
    memory_mib: int
    current_memory_mib: int | None = None
    max_memory_mib: int | None = None
    max_memory_slots: int | None = None
    vcpus: int = 1
    numa_cells: list[GuestNumaCell] = field(default_factory=list)
    numatune: NumaTune | None = None
    nosharepages: bool = False
    hugepages: bool = False
    locked: bool = False
    memory_devices: list[MemoryDevice] = field(default_factory=list)
    running: bool = True
    image: str | None = None

    def __post_init__(self) -> None:
        if self.memory_mib <= 0:
            raise ValueError(f"guest {self.name!r}: memory must be positive")
        if self.current_memory_mib is not None and not 0 < self.current_memory_mib <= self.memory_mib:
            raise ValueError(f"guest {self.name!r}: currentMemory must be in (0, memory]")
        if self.vcpus <= 0:
            raise ValueError(f"guest {self.name!r}: vcpus must be positive")
