"""The QEMU process model: a VM as a host process whose guest RAM is anonymous memory.

What QEMU does with a guest's memory, and how this model does the same on a :class:`Host`:

=================================  ==========================================================
QEMU / libvirt                     here
=================================  ==========================================================
one RAM block per guest NUMA cell  one anonymous private VMA per cell (``ram<cell>``), 2 MiB
(memory-backend-ram)               aligned, separated by a guard gap (QEMU's guard page), laid
                                   out top-down like QEMU's mmaps
``<numatune>`` / ``<memnode>``     a :class:`MemPolicy` on the cell's VMA (strict/restrictive
                                   -> bind, interleave -> interleave, preferred -> preferred)
mem-merge=on (default)             MADV_MERGEABLE on every RAM VMA
``<nosharepages/>``                mem-merge=off: never registered with KSM
``<hugepages/>``                   hugetlbfs backing: ``mmap(hugetlb=True)`` (VM_HUGETLB, which
                                   KSM refuses even when madvised)
``<locked/>``                      VM_LOCKED (mlockall): the RAM is populated at start
                                   (zero-filled, as mlock's write faults do) and never swapped
THP                                QEMU madvises MADV_HUGEPAGE on guest RAM; with the host's
                                   ``thp_mode`` "madvise" (or "always") a first touch of a 2 MiB
                                   range maps a huge page; KSM splits it to merge subpages and
                                   the split maps zero-filled subpages to the shared zero page
lazy allocation                    nothing is allocated until the guest touches it
virtio-balloon                     inflate = MADV_DONTNEED of guest-physical pages; deflate
                                   hands them back to the guest (host memory comes back only
                                   when the guest touches the pages again)
``<memory model='dimm'>``          an extra RAM VMA; unplug is all-or-nothing (munmap)
``<memory model='virtio-mem'>``    an extra RAM VMA of the device's maximum size; plugged in
                                   blocks (``block_mib``, default 2 MiB); unplugging a block
                                   discards it (MADV_DONTNEED)
device RAM (VGA RAM, ROMs)         :meth:`QemuProcess.add_device_ram`: more mergeable
                                   anonymous VMAs, as QEMU registers every RAM block
vCPU writes                        :meth:`QemuProcess.write` / :meth:`start_workload`: the
                                   guest's workload model produces writes as events on
                                   ``host.clock`` (integer ns)
=================================  ==========================================================

Guest-physical layout: the cells' RAM is contiguous from guest frame 0 in cell order (the PCI
hole is not modelled); hotplugged memory (DIMMs, virtio-mem) starts at the first 1 GiB boundary
above the boot RAM, as QEMU's device-memory region does (it starts at 4 GiB there).

Everything is in 4 KiB pages unless a name says MiB.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

from guests.spec import GuestSpec, MemoryDevice
from hw.units import HPAGE_PAGES, PAGES_PER_MIB
from vmhost.clock import NS_PER_S
from vmhost.mm import fault
from vmhost.mm.mempolicy import MemPolicy
from vmhost.mm.mm import PROT_READ, PROT_WRITE
from vmhost.mm.vma import PTE_PRESENT, PTE_ZERO, VmFlags, Vma

if TYPE_CHECKING:
    from vmhost.host import Host
    from vmhost.process import Process

GUARD_PAGES = HPAGE_PAGES                      # gap left between RAM blocks (keeps VMAs apart)
HOTPLUG_ALIGN = 1 << 18                  # 1 GiB in pages
DEFAULT_VIRTIO_MEM_BLOCK_MIB = 2


class QemuError(ValueError):
    """An operation the QEMU device model refuses (one-line message)."""


# --------------------------------------------------------------------------------------------
# libvirt notation


def parse_nodeset(text: str) -> tuple[int, ...]:
    """libvirt/cpuset syntax ("0-2,^1,4") -> sorted node numbers."""
    nodes: set[int] = set()
    excluded: set[int] = set()
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        target = nodes
        if part.startswith("^"):
            target, part = excluded, part[1:]
        if "-" in part:
            lo, hi = part.split("-", 1)
            target.update(range(int(lo), int(hi) + 1))
        else:
            target.add(int(part))
    return tuple(sorted(nodes - excluded))


def numa_policy(mode: str, nodeset: str) -> MemPolicy | None:
    """numatune mode + nodeset -> the MemPolicy QEMU's memory backend applies (mbind)."""
    nodes = parse_nodeset(nodeset)
    if not nodes:
        return None
    if mode in ("strict", "restrictive"):
        return MemPolicy("bind", nodes)
    if mode == "interleave":
        return MemPolicy("interleave", nodes)
    if mode == "preferred":
        return MemPolicy("preferred", nodes[:1])
    raise QemuError(f"unknown numatune mode {mode!r}")


def cell_policy(spec: GuestSpec, cell: int) -> MemPolicy | None:
    tune = spec.numatune
    if tune is None:
        return None
    if cell in tune.memnodes:
        mode, nodeset = tune.memnodes[cell]
        return numa_policy(mode, nodeset)
    return numa_policy(tune.mode, tune.nodeset)


# --------------------------------------------------------------------------------------------
# Regions of guest memory


@dataclass
class Region:
    """One QEMU RAM block: a VMA of the process and the guest-physical range it backs."""

    name: str
    kind: str                    # "ram" | "dimm" | "virtio-mem" | "device"
    gpfn: int | None             # first guest frame (None: not guest RAM, e.g. VGA RAM)
    pages: int
    vpn: int                     # first virtual page of the VMA
    cell: int | None = None
    policy: MemPolicy | None = None
    block_pages: int = 0         # virtio-mem block size
    plugged: np.ndarray | None = None   # virtio-mem: per block, plugged?


@dataclass
class Workload:
    """A steady-state writer: every ``period_ns`` it is asked which pages to write."""

    step: Callable[[int, int], tuple[np.ndarray, np.ndarray]]   # (now_ns, dt_ns) -> (gpfns, ids)
    period_ns: int = NS_PER_S
    writes: int = 0
    event: object = None


class QemuProcess:
    """A running VM: its host process, its RAM blocks and its devices.

    >>> qp = QemuProcess(host, GuestSpec("vm1", 1024))        # doctest: +SKIP
    >>> qp.write(np.arange(256), ids)                          # the guest writes 1 MiB
    """

    def __init__(self, host: "Host", spec: GuestSpec, *, home_node: int = 0,
                 mem_merge: bool | None = None, name: str | None = None,
                 layout: dict[str, int] | None = None):
        """``layout`` optionally fixes the virtual page of RAM blocks by name (to mirror a
        real process's address space); others are placed top-down."""
        self.host = host
        self.layout = dict(layout or {})
        self.spec = spec
        self.mem_merge = (not spec.nosharepages) if mem_merge is None else mem_merge
        self.proc: "Process" = host.spawn(name or f"qemu-{spec.name}", home_node)
        self.mm = self.proc.mm
        self.regions: list[Region] = []
        self.ballooned = np.zeros(0, dtype=np.int64)      # guest frames given to the host
        self.workloads: list[Workload] = []
        self._next_top: int | None = None
        cells = spec.numa_cells or []
        if cells:
            # guest RAM is laid out per cell; where cells and <memory> disagree (libvirt
            # allows it when memory devices make up the rest), the cells rule
            gpfn = 0
            for c in sorted(cells, key=lambda c: c.id):
                pages = c.memory_mib * PAGES_PER_MIB
                self._add_region(f"ram{c.id}", "ram", gpfn, pages, cell=c.id,
                                 policy=cell_policy(spec, c.id))
                gpfn += pages
        else:
            self._add_region("ram0", "ram", 0, spec.memory_mib * PAGES_PER_MIB, cell=0,
                             policy=cell_policy(spec, 0))
        self.boot_pages = sum(r.pages for r in self.regions)
        self.hotplug_base = -(-self.boot_pages // HOTPLUG_ALIGN) * HOTPLUG_ALIGN
        self._hotplug_next = self.hotplug_base
        for i, dev in enumerate(spec.memory_devices):
            if dev.model == "dimm":
                self.plug_dimm(dev.size_mib, dev.node, name=f"dimm{i}")
            elif dev.model == "virtio-mem":
                self.add_virtio_mem(dev, name=f"virtio-mem{i}")
            else:
                raise QemuError(f"guest {spec.name!r}: unknown memory device model {dev.model!r}")
        if spec.current_memory_mib is not None and spec.current_memory_mib < spec.memory_mib:
            self.set_balloon(spec.current_memory_mib)

    def __repr__(self) -> str:
        return f"QemuProcess({self.spec.name!r}, pid {self.proc.pid}, {len(self.regions)} blocks)"

    # -- RAM blocks -----------------------------------------------------------------------
    def _place(self, pages: int) -> int:
        """A 2 MiB-aligned address for a new block, below the previous one with a gap."""
        span = -(-pages // HPAGE_PAGES) * HPAGE_PAGES
        if self._next_top is None:
            top = self.mm.get_unmapped_area(span + GUARD_PAGES, HPAGE_PAGES) + span + GUARD_PAGES
        else:
            top = self._next_top
        start = (top - span - GUARD_PAGES) // HPAGE_PAGES * HPAGE_PAGES
        while self.mm.vmas_overlapping(start, start + span + GUARD_PAGES):
            start -= HPAGE_PAGES
        self._next_top = start
        return start

    def _add_region(self, name: str, kind: str, gpfn: int | None, pages: int, *,
                    cell: int | None = None, policy: MemPolicy | None = None,
                    mergeable: bool | None = None, thp_backed: bool = True,
                    at: int | None = None) -> Region:
        if pages <= 0:
            raise QemuError(f"{self.spec.name}: RAM block {name} must have a positive size")
        spec = self.spec
        if at is None:
            at = self.layout.get(name)
        vpn = self._place(pages) if at is None else at
        hugetlb = spec.hugepages and kind != "device"
        self.mm.mmap(pages, prot=PROT_READ | PROT_WRITE, at=vpn, policy=policy,
                     thp=None if hugetlb else bool(thp_backed),
                     hugetlb=hugetlb, locked=spec.locked)
        region = Region(name, kind, gpfn, pages, vpn, cell, policy)
        self.regions.append(region)
        merge = self.mem_merge if mergeable is None else mergeable
        if merge:
            # qemu_madvise(QEMU_MADV_MERGEABLE): failures are only warnings in QEMU; KSM itself
            # refuses hugetlb VMAs (vma_ksm_compatible)
            self.mm.madvise(vpn, pages, "mergeable")
        if spec.locked:
            self._populate(region)
        return region

    def _populate(self, region: Region) -> None:
        """mlock: every page is write-faulted in (zero-filled) right away."""
        for vma, offs, _pos in self._by_vma(np.arange(region.vpn, region.vpn + region.pages)):
            missing = offs[(vma.ptef[offs] & PTE_PRESENT) == 0]
            if len(missing):
                fault.write_fault(self.host, vma, missing, np.zeros(len(missing), np.uint64))

    def add_device_ram(self, name: str, pages: int, mergeable: bool | None = None,
                       at: int | None = None) -> Region:
        """Device memory QEMU allocates as a RAM block (VGA RAM, option ROMs, ACPI tables)."""
        return self._add_region(name, "device", None, pages, mergeable=mergeable, at=at)

    def region(self, name: str) -> Region:
        for r in self.regions:
            if r.name == name:
                return r
        raise QemuError(f"{self.spec.name}: no RAM block {name!r}")

    def guest_regions(self) -> list[Region]:
        return [r for r in self.regions if r.gpfn is not None]

    def vmas(self, region: Region | None = None) -> list[Vma]:
        regs = [region] if region else self.regions
        return [v for r in regs for v in self.mm.vmas_overlapping(r.vpn, r.vpn + r.pages)]

    # -- guest-physical -> host-virtual ----------------------------------------------------
    def vpns(self, gpfns) -> np.ndarray:
        """Host virtual pages backing guest frames ``gpfns`` (QemuError for a hole)."""
        g = np.asarray(gpfns, dtype=np.int64)
        out = np.full(g.shape, -1, dtype=np.int64)
        for r in self.guest_regions():
            inside = (g >= r.gpfn) & (g < r.gpfn + r.pages)
            if r.plugged is not None:
                blk = (g[inside] - r.gpfn) // r.block_pages
                ok = r.plugged[blk]
                idx = np.flatnonzero(inside)
                inside[idx[~ok]] = False
            out[inside] = r.vpn + (g[inside] - r.gpfn)
        if (out < 0).any():
            bad = int(g[np.flatnonzero(out < 0)[0]])
            raise QemuError(f"{self.spec.name}: guest frame {bad:#x} is not plugged guest RAM")
        return out

    def _by_vma(self, vpns: np.ndarray):
        """Group virtual pages by the VMA holding them: yields (vma, offsets, positions)."""
        vpns = np.asarray(vpns, dtype=np.int64)
        if len(vpns) == 0:
            return
        order = np.argsort(vpns, kind="stable")
        sv = vpns[order]
        i = 0
        while i < len(sv):
            vma = self.mm.find_vma(int(sv[i]))
            if vma is None:
                raise QemuError(f"{self.spec.name}: page {int(sv[i]):#x} is not mapped")
            j = int(np.searchsorted(sv, vma.end, side="left"))
            yield vma, sv[i:j] - vma.start, order[i:j]
            i = j

    # -- the guest's memory accesses ----------------------------------------------------------
    def write(self, gpfns, contents) -> None:
        """vCPUs write whole pages: guest frame ``gpfns[i]`` gets content id ``contents[i]``.

        A frame written twice in one call keeps its last content."""
        g = np.asarray(gpfns, dtype=np.int64)
        c = np.asarray(contents, dtype=np.uint64)
        if g.shape != c.shape:
            raise ValueError("write needs one content id per guest frame")
        if len(g) == 0:
            return
        # last write wins: keep the last occurrence of each frame
        _, rev_idx = np.unique(g[::-1], return_index=True)
        keep = len(g) - 1 - rev_idx
        g, c = g[keep], c[keep]
        vp = self.vpns(g)
        for vma, offs, pos in self._by_vma(vp):
            fault.write_fault(self.host, vma, offs, c[pos])

    def read(self, gpfns) -> np.ndarray:
        """vCPUs read pages (untouched ones get the zero page); returns their content ids."""
        g = np.asarray(gpfns, dtype=np.int64)
        out = np.zeros(len(g), dtype=np.uint64)
        vp = self.vpns(g)
        for vma, offs, pos in self._by_vma(vp):
            fault.read_fault(self.host, vma, offs)
            for o, p in zip(offs.tolist(), pos.tolist()):
                out[p] = fault.peek(self.host, vma, o, o + 1)[0]
        return out

    def view(self, gpfns) -> np.ndarray:
        """Content ids the guest would read, touching nothing."""
        g = np.asarray(gpfns, dtype=np.int64)
        out = np.zeros(len(g), dtype=np.uint64)
        for vma, offs, pos in self._by_vma(self.vpns(g)):
            for o, p in zip(offs.tolist(), pos.tolist()):
                out[p] = fault.peek(self.host, vma, o, o + 1)[0]
        return out

    def resident_pages(self) -> int:
        """Pages of guest and device RAM with a frame of their own (RSS of the RAM blocks)."""
        return sum(int(np.count_nonzero(v.present_mask())) for v in self.vmas())

    def huge_pages(self) -> int:
        """THPs mapped in the RAM blocks (AnonHugePages / 2 MiB)."""
        from vmhost.mm.frames import PG_HEAD
        n = 0
        for v in self.vmas():
            m = v.present_mask()
            pf = v.pte[m]
            n += int(np.count_nonzero(self.host.frames.flags[pf] & PG_HEAD))
        return n

    # -- loading a snapshot of a real process -------------------------------------------------
    def load(self, region: Region, offsets, contents, huge_starts=(), zero_page=()) -> None:
        """Make the block look like a real QEMU's at one moment.

        ``huge_starts``: block offsets (multiples of 512, at 2 MiB-aligned addresses) of ranges
        backed by one THP; all 512 pages of each must be in ``offsets``. Other ``offsets`` are
        4 KiB pages (faulted in as after a THP allocation fallback), ``zero_page`` offsets map
        the shared zero page (read-faulted, never written).
        """
        offs = np.asarray(offsets, dtype=np.int64)
        ids = np.asarray(contents, dtype=np.uint64)
        if offs.shape != ids.shape:
            raise ValueError("load needs one content id per offset")
        huge = np.asarray(list(huge_starts), dtype=np.int64)
        in_huge = np.zeros(len(offs), dtype=bool)
        if len(huge):
            hs = set(huge.tolist())
            in_huge = np.isin((offs // HPAGE_PAGES) * HPAGE_PAGES, huge)
            if int(in_huge.sum()) != HPAGE_PAGES * len(hs):
                raise ValueError("every page of a huge range must be given")
        for vma, voffs, pos in self._by_vma(region.vpn + offs[in_huge]):
            starts = np.unique((voffs + vma.start) // HPAGE_PAGES * HPAGE_PAGES - vma.start)
            for s in starts.tolist():
                map_huge_range(self.host, vma, s)
            fault.write_fault(self.host, vma, voffs, ids[in_huge][pos])
        small = ~in_huge
        for vma, voffs, pos in self._by_vma(region.vpn + offs[small]):
            write_small_pages(self.host, vma, voffs, ids[small][pos])
        zp = np.asarray(list(zero_page), dtype=np.int64)
        for vma, voffs, _pos in self._by_vma(region.vpn + zp):
            fault.read_fault(self.host, vma, voffs)

    # -- balloon ------------------------------------------------------------------------------
    def balloon_inflate(self, gpfns) -> int:
        """The guest gives pages to the balloon: QEMU discards them (MADV_DONTNEED).

        Returns the number of newly ballooned frames. Locked or hugetlb RAM cannot be
        discarded (QEMU disables the balloon's discard then): QemuError."""
        g = np.unique(np.asarray(gpfns, dtype=np.int64))
        g = g[~np.isin(g, self.ballooned)]
        if len(g) == 0:
            return 0
        if self.spec.locked or self.spec.hugepages:
            raise QemuError(f"{self.spec.name}: balloon cannot discard locked or hugetlbfs RAM")
        vp = self.vpns(g)
        for start, count in _runs(vp):
            rc = self.mm.madvise(start, count, "dontneed")
            if rc:
                raise QemuError(f"{self.spec.name}: MADV_DONTNEED failed ({rc})")
        self.ballooned = np.union1d(self.ballooned, g)
        return len(g)

    def balloon_deflate(self, gpfns=None) -> int:
        """Pages go back to the guest (all of them by default); the host allocates them only
        when the guest touches them again."""
        if gpfns is None:
            n = len(self.ballooned)
            self.ballooned = np.zeros(0, dtype=np.int64)
            return n
        g = np.asarray(gpfns, dtype=np.int64)
        before = len(self.ballooned)
        self.ballooned = np.setdiff1d(self.ballooned, g)
        return before - len(self.ballooned)

    def set_balloon(self, target_mib: int) -> int:
        """Balloon to a ``currentMemory`` target: the guest hands back its highest boot RAM
        frames first (deterministic); returns the frames now in the balloon."""
        boot = np.concatenate([np.arange(r.gpfn, r.gpfn + r.pages, dtype=np.int64)
                               for r in self.regions if r.kind == "ram"])
        want = max(len(boot) - target_mib * PAGES_PER_MIB, 0)
        if want > len(self.ballooned):
            free = boot[~np.isin(boot, self.ballooned)][::-1]
            self.balloon_inflate(free[: want - len(self.ballooned)])
        elif want < len(self.ballooned):
            self.balloon_deflate(np.sort(self.ballooned)[: len(self.ballooned) - want])
        return len(self.ballooned)

    @property
    def balloon_mib(self) -> float:
        return len(self.ballooned) / PAGES_PER_MIB

    # -- memory hotplug ---------------------------------------------------------------------------
    def _check_hotplug(self, pages: int) -> None:
        spec = self.spec
        if spec.max_memory_mib is None:
            raise QemuError(f"{spec.name}: memory hotplug needs <maxMemory>")
        plugged = sum(r.pages for r in self.regions if r.kind in ("ram", "dimm", "virtio-mem"))
        if plugged + pages > spec.max_memory_mib * PAGES_PER_MIB:
            raise QemuError(f"{spec.name}: hotplug beyond maxMemory {spec.max_memory_mib} MiB")
        slots = sum(1 for r in self.regions if r.kind in ("dimm", "virtio-mem"))
        if spec.max_memory_slots is not None and slots >= spec.max_memory_slots:
            raise QemuError(f"{spec.name}: all {spec.max_memory_slots} memory slots are used")

    def _hotplug_gpfn(self, pages: int) -> int:
        at = self._hotplug_next
        self._hotplug_next += -(-pages // HPAGE_PAGES) * HPAGE_PAGES
        return at

    def plug_dimm(self, size_mib: int, node: int | None = None, name: str | None = None) -> Region:
        """device_add pc-dimm: a new RAM block; the guest onlines it, pages come on touch."""
        pages = size_mib * PAGES_PER_MIB
        self._check_hotplug(pages)
        name = name or f"dimm{sum(r.kind == 'dimm' for r in self.regions)}"
        cell = node if node is not None else 0
        return self._add_region(name, "dimm", self._hotplug_gpfn(pages), pages, cell=cell,
                                policy=cell_policy(self.spec, cell))

    def unplug_dimm(self, name: str) -> None:
        """device_del: all or nothing; the RAM block and its pages go (munmap)."""
        r = self.region(name)
        if r.kind != "dimm":
            raise QemuError(f"{self.spec.name}: {name} is not a DIMM")
        self._drop_region(r)

    def _drop_region(self, r: Region) -> None:
        self.mm.munmap(r.vpn, r.pages)
        self.regions.remove(r)
        if r.gpfn is not None and len(self.ballooned):
            self.ballooned = self.ballooned[(self.ballooned < r.gpfn)
                                            | (self.ballooned >= r.gpfn + r.pages)]

    def add_virtio_mem(self, dev: MemoryDevice, name: str | None = None) -> Region:
        """A virtio-mem device: a RAM block of ``size`` of which ``requested`` is plugged."""
        pages = dev.size_mib * PAGES_PER_MIB
        self._check_hotplug(pages)
        block = (dev.block_mib or DEFAULT_VIRTIO_MEM_BLOCK_MIB) * PAGES_PER_MIB
        if pages % block:
            raise QemuError(f"{self.spec.name}: virtio-mem size {dev.size_mib} MiB is not a "
                            f"multiple of its block size")
        cell = dev.node if dev.node is not None else 0
        name = name or f"virtio-mem{sum(r.kind == 'virtio-mem' for r in self.regions)}"
        r = self._add_region(name, "virtio-mem", self._hotplug_gpfn(pages), pages, cell=cell,
                             policy=cell_policy(self.spec, cell))
        r.block_pages = block
        r.plugged = np.zeros(pages // block, dtype=bool)
        self.virtio_mem_resize(name, dev.requested_mib or 0)
        return r

    def virtio_mem_resize(self, name: str, requested_mib: int) -> int:
        """Change ``<requested>``: blocks are plugged from the bottom and unplugged from the
        top; an unplugged block is discarded (MADV_DONTNEED). Returns plugged MiB."""
        r = self.region(name)
        if r.plugged is None:
            raise QemuError(f"{self.spec.name}: {name} is not a virtio-mem device")
        want = requested_mib * PAGES_PER_MIB
        if want % r.block_pages or not 0 <= want <= r.pages:
            raise QemuError(f"{self.spec.name}: {name}: requested {requested_mib} MiB is not a "
                            f"whole number of blocks within the device")
        nblocks = want // r.block_pages
        have = int(r.plugged.sum())
        if nblocks > have:
            r.plugged[np.flatnonzero(~r.plugged)[: nblocks - have]] = True
        elif nblocks < have:
            for b in np.flatnonzero(r.plugged)[::-1][: have - nblocks].tolist():
                self.mm.madvise(r.vpn + b * r.block_pages, r.block_pages, "dontneed")
                r.plugged[b] = False
        return int(r.plugged.sum()) * r.block_pages // PAGES_PER_MIB

    # -- workloads on the virtual clock ----------------------------------------------------------
    def start_workload(self, step: Callable[[int, int], tuple[np.ndarray, np.ndarray]],
                       period_ns: int = NS_PER_S, start_ns: int | None = None) -> Workload:
        """Every ``period_ns`` from ``start_ns`` (default: one period from now), ``step(now,
        dt)`` says which guest frames the vCPUs write with which content ids. Ballooned frames
        are skipped (the guest does not touch them)."""
        w = Workload(step, int(period_ns))
        clock = self.host.clock

        def tick() -> None:
            if not self.proc.alive or w not in self.workloads:
                return
            g, c = w.step(clock.now, w.period_ns)
            g = np.asarray(g, dtype=np.int64)
            c = np.asarray(c, dtype=np.uint64)
            if len(self.ballooned) and len(g):
                keep = ~np.isin(g, self.ballooned)
                g, c = g[keep], c[keep]
            if len(g):
                self.write(g, c)
                w.writes += len(g)
            w.event = clock.after(w.period_ns, tick)

        first = clock.now + w.period_ns if start_ns is None else start_ns
        w.event = clock.at(first, tick)
        self.workloads.append(w)
        return w

    def stop_workloads(self) -> None:
        for w in self.workloads:
            if w.event is not None:
                w.event.cancel()
        self.workloads = []

    def quit(self) -> None:
        """QEMU exits: its address space goes."""
        self.stop_workloads()
        self.host.exit(self.proc)

    # -- what the kernel sees --------------------------------------------------------------------
    def mergeable_pages(self) -> int:
        return sum(v.pages for v in self.vmas() if v.flags & VmFlags.MERGEABLE)


# --------------------------------------------------------------------------------------------
# Helpers on one VMA


def map_huge_range(host: "Host", vma: Vma, start: int) -> bool:
    """Fault a zero-filled THP in at VMA offset ``start`` (2 MiB-aligned address, range empty),
    as a first write to a MADV_HUGEPAGE range does. False if THP is not allowed there or no
    huge page could be allocated (the caller then gets 4 KiB pages)."""
    if (vma.start + start) % HPAGE_PAGES or start + HPAGE_PAGES > vma.pages:
        raise ValueError(f"offset {start} of {vma} is not a whole 2 MiB-aligned range")
    fault._fault_huge(host, vma, np.array([start], dtype=np.int64))
    f = vma.ptef[start]
    return bool(f & PTE_PRESENT) and not f & PTE_ZERO


def write_small_pages(host: "Host", vma: Vma, offsets: np.ndarray, contents: np.ndarray) -> None:
    """Write pages as 4 KiB pages even in a THP-enabled VMA (as after thp_fault_fallback)."""
    saved = vma.flags
    vma.flags = (vma.flags | VmFlags.NOHUGEPAGE) & ~VmFlags.HUGEPAGE
    try:
        fault.write_fault(host, vma, np.asarray(offsets, dtype=np.int64),
                          np.asarray(contents, dtype=np.uint64))
    finally:
        vma.flags = saved


def _runs(sorted_vpns: np.ndarray) -> Iterable[tuple[int, int]]:
    """(start, length) of the consecutive runs of a sorted array."""
    v = np.asarray(sorted_vpns, dtype=np.int64)
    if len(v) == 0:
        return []
    v = np.sort(v)
    cuts = np.flatnonzero(np.diff(v) != 1) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [len(v)]])
    return [(int(v[a]), int(b - a)) for a, b in zip(starts, ends)]


def spawn_guests(host: "Host", specs: Iterable[GuestSpec], **kw) -> list[QemuProcess]:
    """One QEMU process per running guest spec."""
    return [QemuProcess(host, s, **kw) for s in specs if s.running]
