"""End to end: a libvirt inventory becomes a host config, guests and KSM merging them."""

import libvirt
import pytest

from guests.images import GuestMemory, get_image
from guests.libvirt_import import import_host, write_host_config
from vmhost.config import load_config
from vmhost.ksm.engine import Ksm
from vmhost.ksm.ksmd import Ksmd
from vmhost.mm import invariants
from vmhost.qemu import spawn_guests

pytestmark = pytest.mark.libvirt

DOMAIN = """<domain type='test'><name>{name}</name><memory unit='MiB'>64</memory>
<vcpu>1</vcpu><os><type>hvm</type></os>{backing}</domain>"""


@pytest.fixture
def inventory():
    conn = libvirt.open("test:///default")
    doms = []
    for name, backing in (("web1", ""), ("web2", ""),
                          ("private", "<memoryBacking><nosharepages/></memoryBacking>")):
        dom = conn.defineXML(DOMAIN.format(name=name, backing=backing))
        dom.create()
        doms.append(dom)
    yield
    for dom in doms:
        dom.destroy()
        dom.undefine()
    conn.close()


def test_imported_guests_merge_on_the_emulated_host(inventory, tmp_path):
    out = tmp_path / "host.yaml"
    # the test driver's state lives in this process, so import here rather than via the CLI
    write_host_config(import_host("test:///default"), out)
    cfg = load_config(out)
    guests = {g.name: g for g in cfg.guests}
    assert guests["private"].nosharepages and not guests["web1"].nosharepages
    host = cfg.build()
    ksm = Ksm(host)
    ksmd = Ksmd(ksm, host.clock)
    ksm.write_knob("pages_to_scan", "1000000")
    specs = [guests[n] for n in ("web1", "web2", "private")]
    vms = spawn_guests(host, specs)
    image = get_image("tiny-linux")
    for vm in vms:
        mem = GuestMemory.build(image, vm.spec.name, seed=1, domain="tenant", memory_mib=64)
        vm.write(*mem.boot_writes())
    before = invariants.views(host)
    ksm.write_knob("run", "1")
    ksmd.run_full_scans(3)
    stats = {vm.spec.name: ksm.ksm_stat(vm.mm) for vm in vms}
    assert stats["web1"]["ksm_merging_pages"] > 0 and stats["web2"]["ksm_merging_pages"] > 0
    assert stats["private"]["ksm_rmap_items"] == 0 and not stats["private"]["ksm_mergeable"]
    assert ksm.stats()["pages_sharing"] > 0
    invariants.check(host, before)
