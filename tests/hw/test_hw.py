"""Virtual hardware: topology, memory blocks and hot-add, swap devices."""

import pytest

from hw import BlockState, PhysicalMemory, SwapDevice, SwapIOError, Topology, Zone
from hw.topology import NumaNode

MIB = 1 << 20


def test_default_block_is_128_mib():
    mem = PhysicalMemory(Topology.uniform(1, 512 * MIB))
    assert mem.block_pages == 32768 and len(mem.blocks) == 4
    assert all(b.state is BlockState.ONLINE and b.zone is Zone.NORMAL for b in mem.blocks)


def test_blocks_belong_to_nodes():
    topo = Topology([NumaNode(0, 256 * MIB, (0, 1)), NumaNode(1, 128 * MIB, (2, 3))],
                    [[10, 21], [21, 10]])
    mem = PhysicalMemory(topo, block_pages=8192, movable_nodes=(1,))
    assert [b.node for b in mem.blocks] == [0] * 8 + [1] * 4
    assert mem.node_of([0, 8192 * 8]).tolist() == [0, 1]
    assert mem.blocks[-1].zone is Zone.MOVABLE
    assert topo.fallback_order(1) == [1, 0] and topo.node_of_cpu(3) == 1


def test_hot_add_dimm_and_virtio_mem():
    mem = PhysicalMemory(Topology.uniform(2, 128 * MIB), block_pages=8192)
    dimm = mem.hot_add_dimm("dimm0", 1, 64 * MIB)
    assert len(dimm) == 2 and all(b.state is BlockState.OFFLINE and b.node == 1 for b in dimm)
    vm = mem.hot_add_virtio_mem("virtio-mem0", 0, 3)
    vm += mem.hot_add_virtio_mem("virtio-mem0", 0, 1)       # virtio-mem grows block by block
    assert len(mem.blocks_of_device("virtio-mem0")) == 4
    with pytest.raises(ValueError):
        mem.hot_add_dimm("dimm0", 0, 32 * MIB)                # name taken
    with pytest.raises(ValueError):
        mem.hot_add_dimm("dimm1", 0, 10 * MIB)                # not a multiple of the block size
    with pytest.raises(ValueError):
        mem.hot_add_virtio_mem("dimm0", 0, 1)                 # not a virtio-mem device


@pytest.mark.parametrize("bad", [
    lambda: Topology([]),
    lambda: Topology([NumaNode(1, MIB)]),
    lambda: Topology([NumaNode(0, -1)]),
    lambda: Topology.uniform(2, MIB).__class__(Topology.uniform(2, MIB).nodes, [[10, 5], [5, 10]]),
])
def test_bad_topologies(bad):
    with pytest.raises(ValueError):
        bad()


def test_swap_device_slots_and_errors():
    dev = SwapDevice("sda", 4, priority=10, read_bytes_per_s=4096e3)
    slots = dev.allocate_slots(3)
    assert slots.tolist() == [0, 1, 2] and dev.free_pages == 1
    assert len(dev.allocate_slots(5)) == 1                   # full
    dev.free_slots([1])
    assert dev.allocate_slots(1).tolist() == [1]
    dev.inject_errors([2])
    dev.check_io(1)
    with pytest.raises(SwapIOError):
        dev.check_io(2)
    assert dev.read_seconds(1000) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        SwapDevice("bad", 0)


def test_swap_slots_are_taken_lowest_first_as_a_scan_of_the_map_would():
    """allocate_slots remembers where the lowest free slot may be (a reclaim takes one slot at
    a time: it must not scan the whole map each time) and gives what a full scan gives."""
    import numpy as np
    from hw.swap import SwapDevice
    rng = np.random.default_rng(5)
    dev, used = SwapDevice("x", 5000), np.zeros(5000, dtype=bool)
    for _ in range(5000):
        if rng.random() < 0.55:
            count = int(rng.integers(1, 50))
            want = np.flatnonzero(~used)[:count]
            used[want] = True
            assert dev.allocate_slots(count).tolist() == want.tolist()
        elif used.any():
            slots = rng.choice(np.flatnonzero(used), size=min(int(used.sum()), 20), replace=False)
            used[slots] = False
            dev.free_slots(slots)
        assert (dev.used == used).all()
    assert dev.free_pages == int((~used).sum())
