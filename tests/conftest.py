import numpy as np
import pytest

from hw.topology import Topology
from vmhost.host import Host
from vmhost.mm import invariants

MIB = 1 << 20


@pytest.fixture
def host():
    """A small one-node host (64 MiB in 4 MiB blocks) on the default profile."""
    return Host(Topology.uniform(1, 64 * MIB), block_pages=1024)


@pytest.fixture
def old_host():
    return Host(Topology.uniform(1, 64 * MIB), block_pages=1024, profile="linux-2.6.33")


def ids(*values):
    return np.array(values, dtype=np.uint64)


@pytest.fixture
def checked():
    """Call checked(host) at the end of a test: the invariant checker must pass."""
    def run(h, before=None):
        invariants.check(h, before)
    return run
