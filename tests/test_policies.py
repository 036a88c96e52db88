"""KSM tuning policies: each writes the knobs its tool would, at the times it would."""

import numpy as np
import pytest

from hw.topology import Topology
from vmhost.clock import NS_PER_S
from vmhost.host import Host
from vmhost.ksm.engine import Ksm
from vmhost.policies import make_policy

MIB = 1 << 20


def host_with(used_mib: int, total_mib: int = 4096):
    h = Host(Topology.uniform(1, total_mib * MIB))
    ksm = Ksm(h)
    qemu = h.spawn("qemu-vm1")
    if used_mib:
        vma = qemu.mm.mmap(used_mib * 256, thp=False)
        qemu.mm.write(vma.start, np.arange(1, used_mib * 256 + 1, dtype=np.uint64))
    return h, ksm, qemu


def test_ksmtuned_stops_ksm_while_committed_memory_fits():
    h, ksm, _ = host_with(used_mib=512)               # 512 MiB + 2048 MiB threshold < 4 GiB
    policy = make_policy("ksmtuned")
    policy.attach(h, ksm)
    h.clock.run_until(0)
    assert ksm.knobs.run == 0 and policy.history[-1].reason.startswith("committed memory fits")


def test_ksmtuned_boosts_under_pressure_and_decays_after():
    h, ksm, qemu = host_with(used_mib=3000)           # free ~1 GiB < threshold 2048 MiB
    policy = make_policy("ksmtuned")
    policy.attach(h, ksm)
    h.clock.run_until(0)
    # 16 GiB / 4 GiB host: sleep 40 ms; first boost from 0 to 300
    assert (ksm.knobs.run, ksm.knobs.pages_to_scan, ksm.knobs.sleep_millisecs) == (1, 300, 40)
    h.clock.run_until(60 * NS_PER_S)
    assert ksm.knobs.pages_to_scan == 600
    for _ in range(5):
        h.clock.run_until(h.clock.now + 60 * NS_PER_S)
    assert ksm.knobs.pages_to_scan == 1250                # capped
    vma = qemu.mm.vmas[0]
    qemu.mm.munmap(vma.start, 2600 * 256)                 # memory is back; RSS small
    h.clock.run_until(h.clock.now + 60 * NS_PER_S)
    assert ksm.knobs.run == 0                             # committed + threshold fits again


def test_mom_uses_the_same_rule_every_10_seconds():
    h, ksm, _ = host_with(used_mib=3000)
    policy = make_policy("mom")
    policy.attach(h, ksm)
    h.clock.run_until(30 * NS_PER_S)
    assert [d.pages_to_scan for d in policy.history[1:]] == [300, 600, 900, 1200]


def test_kubevirt_runs_ksm_only_under_pressure():
    h, ksm, qemu = host_with(used_mib=3400)           # available ~ 15% < 20%
    policy = make_policy("kubevirt", pages_to_scan=500)
    policy.attach(h, ksm)
    h.clock.run_until(0)
    assert (ksm.knobs.run, ksm.knobs.pages_to_scan) == (1, 500)
    qemu.mm.munmap(qemu.mm.vmas[0].start, 1000 * 256)    # available ~ 40%
    h.clock.run_until(10 * NS_PER_S)
    assert ksm.knobs.run == 0


def test_fixed_and_advisor():
    h, ksm, _ = host_with(used_mib=0)
    make_policy("fixed", knobs={"run": 1, "pages_to_scan": 1000}).attach(h, ksm)
    assert (ksm.knobs.run, ksm.knobs.pages_to_scan) == (1, 1000)
    h2, ksm2, _ = host_with(used_mib=0)
    make_policy("advisor", target_scan_time_s=60).attach(h2, ksm2)
    assert ksm2.knobs.advisor_mode == "scan-time" and ksm2.knobs.pages_to_scan == 500
    assert ksm2.knobs.advisor_target_scan_time == 60 and ksm2.knobs.run == 1


def test_unknown_policy_or_option():
    with pytest.raises(ValueError, match="unknown KSM policy"):
        make_policy("magic")
    with pytest.raises(ValueError, match="unknown option"):
        make_policy("ksmtuned", boots=3)
