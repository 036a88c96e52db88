"""The QEMU process model: memory backing, THP, balloon, hotplug, workloads, GuestSpec."""

import numpy as np
import pytest

from guests import images
from guests.spec import GuestNumaCell, GuestSpec, MemoryDevice, NumaTune
from hw.topology import Topology
from vmhost.clock import NS_PER_S
from vmhost.host import Host
from vmhost.ksm.engine import Ksm
from vmhost.ksm.ksmd import Ksmd
from vmhost.mm.mempolicy import MemPolicy
from vmhost.mm.vma import PTE_PRESENT, PTE_ZERO, VmFlags
from vmhost.qemu import QemuError, QemuProcess, parse_nodeset

GIB = 1 << 30


def make_host(nodes=1, gib=1, thp="madvise"):
    host = Host(Topology.uniform(nodes, gib * GIB), block_pages=32768, thp=thp)
    ksm = Ksm(host)
    ksmd = Ksmd(ksm, host.clock)
    ksm.write_knob("pages_to_scan", "1000000")
    ksm.write_knob("sleep_millisecs", "50")
    return host, ksm, ksmd


def scan(ksm, ksmd, n=4):
    ksm.write_knob("run", "1")
    ksmd.run_full_scans(n)
    ksm.write_knob("run", "0")
    return ksm.stats()


def ram_vma(qp):
    return qp.vmas(qp.region("ram0"))[0]


# -- memory backing -> registration -------------------------------------------------------------

@pytest.mark.parametrize("kw,mergeable,hugetlb,locked", [
    ({}, True, False, False),
    ({"nosharepages": True}, False, False, False),
    ({"hugepages": True}, False, True, False),
    ({"locked": True}, True, False, True),
])
def test_memory_backing_decides_registration(kw, mergeable, hugetlb, locked):
    host, ksm, ksmd = make_host()
    qp = QemuProcess(host, GuestSpec("g", 8, **kw))
    v = ram_vma(qp)
    assert bool(v.flags & VmFlags.MERGEABLE) is mergeable
    assert bool(v.flags & VmFlags.HUGETLB) is hugetlb
    assert bool(v.flags & VmFlags.LOCKED) is locked
    assert qp.mm.ksm_mergeable is mergeable
    if not hugetlb:
        assert v.flags & VmFlags.HUGEPAGE          # QEMU madvises MADV_HUGEPAGE
    # locked RAM is populated at start; other RAM only when touched
    assert qp.resident_pages() == (8 * 256 if locked else 0)


def test_unregistered_guests_merge_nothing():
    host, ksm, ksmd = make_host()
    ids = np.arange(1, 1 + 2048, dtype=np.uint64)
    for kw in ({"nosharepages": True}, {"hugepages": True}):
        for i in range(2):
            QemuProcess(host, GuestSpec(f"g{i}", 8, **kw)).write(np.arange(2048), ids)
    st = scan(ksm, ksmd)
    assert st["pages_shared"] == st["pages_sharing"] == 0


def test_identical_guests_merge_and_thp_split_remaps_zero_subpages():
    host, ksm, ksmd = make_host()
    qs = [QemuProcess(host, GuestSpec(f"g{i}", 8)) for i in range(3)]
    ids = np.zeros(2048, dtype=np.uint64)
    ids[:300] = np.arange(1, 301)                 # 300 non-zero pages, the rest zero
    for q in qs:
        q.write(np.arange(2048), ids)
        assert q.huge_pages() == 4                # THP-backed: four 2 MiB folios
    st = scan(ksm, ksmd)
    assert st["pages_shared"] == 300 and st["pages_sharing"] == 600
    assert host.vmstat["thp_split_page"] >= 3
    for q in qs:
        v = ram_vma(q)
        # the split huge page's zero subpages now map the shared zero page
        first = v.ptef[300:512]
        assert ((first & (PTE_PRESENT | PTE_ZERO)) == (PTE_PRESENT | PTE_ZERO)).all()
        assert (q.view(np.arange(2048)) == ids).all()


def test_small_pages_with_zero_content_merge_as_ordinary_pages():
    host, ksm, ksmd = make_host(thp="never")
    qs = [QemuProcess(host, GuestSpec(f"g{i}", 2)) for i in range(2)]
    for q in qs:
        q.write(np.arange(100), np.zeros(100, np.uint64))
    st = scan(ksm, ksmd)
    assert st["pages_shared"] == 1 and st["pages_sharing"] == 199


def test_load_maps_huge_and_small_pages_as_given():
    host, ksm, ksmd = make_host()
    qp = QemuProcess(host, GuestSpec("g", 8))
    r = qp.region("ram0")
    offs = np.concatenate([np.arange(512), np.arange(1024, 1030)])
    qp.load(r, offs, np.arange(1, len(offs) + 1, dtype=np.uint64), huge_starts=[0],
            zero_page=[1500])
    assert qp.huge_pages() == 1
    assert qp.resident_pages() == 518
    v = ram_vma(qp)
    assert (v.ptef[1500] & PTE_ZERO) and v.ptef[1100] == 0


# -- balloon -------------------------------------------------------------------------------------

def test_balloon_inflate_discards_and_deflate_returns_on_touch():
    host, ksm, ksmd = make_host(thp="never")
    qp = QemuProcess(host, GuestSpec("g", 8))
    qp.write(np.arange(2048), np.arange(1, 2049, dtype=np.uint64))
    used = host.used_pages()
    assert qp.balloon_inflate(np.arange(1024, 2048)) == 1024
    assert qp.resident_pages() == 1024 and host.used_pages() == used - 1024
    assert (qp.view(np.arange(1024, 2048)) == 0).all()
    assert qp.balloon_mib == 4
    qp.balloon_deflate()
    assert qp.resident_pages() == 1024            # nothing comes back until touched
    qp.write(np.arange(1024, 1100), np.ones(76, np.uint64))
    assert qp.resident_pages() == 1100


def test_current_memory_sets_the_balloon_and_locked_ram_refuses_it():
    host, ksm, ksmd = make_host()
    qp = QemuProcess(host, GuestSpec("g", 8, current_memory_mib=6))
    assert qp.balloon_mib == 2
    assert qp.set_balloon(7) == 256 and qp.set_balloon(8) == 0
    lk = QemuProcess(host, GuestSpec("l", 8, locked=True))
    with pytest.raises(QemuError):
        lk.balloon_inflate([5])


# -- GuestSpec: NUMA cells, numatune, memory devices ---------------------------------------------

def test_numa_cells_are_separate_vmas_with_numatune_policies():
    host, ksm, ksmd = make_host(nodes=2)
    spec = GuestSpec("n", 16, numa_cells=[GuestNumaCell(0, "0", 8), GuestNumaCell(1, "1", 8)],
                     numatune=NumaTune("strict", "0-1", {1: ("preferred", "1")}))
    qp = QemuProcess(host, spec)
    r0, r1 = qp.region("ram0"), qp.region("ram1")
    assert (r0.gpfn, r1.gpfn, r0.pages) == (0, 2048, 2048)
    assert r0.policy == MemPolicy("bind", (0, 1)) and r1.policy == MemPolicy("preferred", (1,))
    v0, v1 = qp.vmas(r0)[0], qp.vmas(r1)[0]
    assert v0 is not v1 and v0.end <= v1.start or v1.end <= v0.start
    qp.write(np.arange(2048, 4096), np.arange(1, 2049, dtype=np.uint64))
    pf = v1.pte[v1.present_mask()]
    assert (host.phys.block_node_array[pf // host.phys.block_pages] == 1).all()
    assert parse_nodeset("0-3,^2") == (0, 1, 3)


def test_dimm_and_virtio_mem_hotplug():
    host, ksm, ksmd = make_host()
    spec = GuestSpec("h", 64, max_memory_mib=256, max_memory_slots=4,
                     memory_devices=[MemoryDevice("virtio-mem", 64, requested_mib=16, block_mib=2)])
    qp = QemuProcess(host, spec)
    vm = qp.region("virtio-mem0")
    assert vm.gpfn == 1 << 18 and int(vm.plugged.sum()) == 8
    qp.write(vm.gpfn + np.arange(16 * 256), np.arange(1, 4097, dtype=np.uint64))
    with pytest.raises(QemuError):
        qp.write([vm.gpfn + 16 * 256], [1])           # beyond the plugged blocks
    assert qp.virtio_mem_resize("virtio-mem0", 8) == 8
    assert qp.resident_pages() == 8 * 256             # unplugged blocks were discarded
    d = qp.plug_dimm(32)
    assert qp.vmas(d)[0].flags & VmFlags.MERGEABLE
    qp.write(d.gpfn + np.arange(10), np.arange(1, 11, dtype=np.uint64))
    qp.unplug_dimm(d.name)
    assert qp.resident_pages() == 8 * 256 and d not in qp.regions
    with pytest.raises(QemuError):
        qp.plug_dimm(512)                              # beyond maxMemory
    with pytest.raises(QemuError):
        QemuProcess(host, GuestSpec("x", 64)).plug_dimm(8)   # no maxMemory


# -- workloads on the virtual clock ----------------------------------------------------------------

def test_image_boot_and_steady_writes_on_the_clock():
    host, ksm, ksmd = make_host(gib=2)
    img = images.get_image("linux-server")
    qs = []
    for i in range(2):
        qp = QemuProcess(host, GuestSpec(f"s{i}", 64, image="linux-server"))
        mem = img.instantiate(qp.spec.name, seed=i, domain="t", memory_mib=64)
        qp.write(*mem.boot_writes())
        assert qp.resident_pages() >= int(mem.touched.sum()) - 512   # THP adds zero fill
        qp.start_workload(mem.steady_step, period_ns=NS_PER_S // 10)
        qs.append((qp, mem))
    host.clock.run_until(2 * NS_PER_S)
    for qp, mem in qs:
        w = qp.workloads[0]
        assert w.writes > 0
        g = np.flatnonzero(mem.touched)
        assert (qp.view(g) == mem.content[g]).all()
    st = scan(ksm, ksmd, 4)
    assert st["pages_sharing"] > 0
    for qp, _ in qs:
        qp.quit()
    assert not host.processes
