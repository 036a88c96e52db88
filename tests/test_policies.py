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


def test_scaled_scan_knobs_keep_the_scan_rate():
    from vmhost.policies import scaled_scan_knobs
    assert scaled_scan_knobs(300, 40, 1) == (300, 40)
    for pts, sleep, r in [(300, 40, 64), (1250, 10, 256), (64, 10, 512), (5120, 20, 512)]:
        spts, ssleep = scaled_scan_knobs(pts, sleep, r)
        assert spts >= 256 or spts * r >= pts                 # batches of at least 256 pages
        full_rate = pts / sleep
        assert abs(spts * r / ssleep - full_rate) <= 0.01 * full_rate + r / ssleep


def test_ksmtuned_in_a_density_run_decides_at_full_scale(tmp_path):
    """At resolution 256 a 32 GiB host with 12 GiB of guests: committed + 6.4 GiB threshold fits,
    so ksmtuned keeps KSM stopped, exactly as it would on the real host (and nothing merges)."""
    from vmhost.density import DensityRunner, load_density
    cfg = tmp_path / "d.yaml"
    cfg.write_text("""
host: {thp: never, nodes: [{memory: 32GiB, cpus: 4}]}
ksm: {run: 1}
policy: {name: ksmtuned, interval_s: 60}
density:
  mix: [{image: linux-server, memory: 4GiB}]
  order: as-listed
  max_guests: 3
  resolution: 256
  settle: {time: 120s}
""")
    res = DensityRunner(load_density(cfg)).run()
    pol = res["policy"]
    assert pol["name"] == "ksmtuned" and pol["wakeups"] >= 6          # every 60 s over 3 x 120 s
    assert pol["changes"][-1]["run"] == 0
    assert pol["changes"][-1]["reason"].startswith("committed memory fits")
    assert res["steps"][-1]["saved_pages"] == 0


def test_ksmtuned_boosts_on_a_crowded_scaled_host(tmp_path):
    """Guests of 8 GiB filling the 32 GiB host: free memory under the threshold (6.4 GiB), so
    ksmtuned runs KSM and
    boosts pages_to_scan by 300 a minute; the simulated knobs are the full-scale ones / 256."""
    from vmhost.density import DensityRunner, load_density
    cfg = tmp_path / "d.yaml"
    cfg.write_text("""
host: {thp: never, nodes: [{memory: 32GiB, cpus: 4}]}
policy: {name: ksmtuned}
density:
  mix: [{image: linux-server, memory: 8GiB}]
  order: as-listed
  max_guests: 5
  resolution: 256
  settle: {time: 240s}
""")
    runner = DensityRunner(load_density(cfg))
    res = runner.run()
    boosts = [c for c in res["policy"]["changes"] if c["reason"].endswith("boost")]
    assert boosts and boosts[0]["pages_to_scan"] == 300
    assert [c["pages_to_scan"] for c in boosts][:3] == [300, 600, 900][:len(boosts[:3])]
    k = runner.ksm.knobs
    last = res["policy"]["changes"][-1]
    # the simulation scans at the full-scale rate / 256 (batches of >= 256 pages, coarser grain)
    assert abs(k.pages_to_scan * 256 / k.sleep_millisecs - last["pages_to_scan"] / last["sleep_millisecs"]) \
        <= 0.01 * last["pages_to_scan"] / last["sleep_millisecs"] + 256 / k.sleep_millisecs
    assert res["steps"][-1]["saved_pages"] > 0
