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


# -- replays: each tool's decisions for a recorded memory timeline ---------------------------
# The host's /proc/meminfo and ps readings (kB) are taken from a recorded timeline instead of
# the emulated host, and the knobs the policy writes are compared with what the tool's own
# rules (its script or policy file, cited in vmhost/policies.py) give for that timeline,
# worked out by hand below. MemTotal is 4 GiB = 4194304 kB throughout.

TOTAL_KB = 4194304


def replay(name, until_s, **readings):
    """Run policy ``name`` on a 4 GiB host whose readings are functions of the time (s);
    returns [(t_s, run, pages_to_scan, sleep_millisecs)] (knobs only while run=1)."""
    h, ksm, _ = host_with(used_mib=0)
    policy = make_policy(name)
    policy.mem_total_kb = lambda: TOTAL_KB
    for what, fn in readings.items():
        setattr(policy, what, lambda fn=fn: fn(h.clock.now / NS_PER_S))
    seen = []

    def record(reason, record=policy._record):
        record(reason)
        k = ksm.knobs
        d = policy.history[-1]
        seen.append((h.clock.now // NS_PER_S, k.run) + ((d.pages_to_scan, d.sleep_millisecs) if k.run else ()))
        assert k.run == d.run and (not k.run or (k.pages_to_scan, k.sleep_millisecs)
                                   == (d.pages_to_scan, d.sleep_millisecs))
    policy._record = record
    policy.attach(h, ksm)
    seen.clear()                                       # the configured-knobs record
    h.clock.run_until(until_s * NS_PER_S)
    return policy, seen


def test_ksmtuned_replay():
    # thres = 20% of 4194304 = 838860 kB (above KSM_THRES_CONST 2048); sleep = 10 x 16 GiB / 4 GiB
    # = 40 ms; the script sleeps 60 s before its first adjust(); npages starts at 0
    free = {60: 3_000_000, 120: 1_000_000, 180: 800_000, 240: 700_000, 300: 900_000, 360: 500_000,
            420: 500_000, 480: 500_000, 540: 3_500_000, 600: 100_000}
    rss = {60: 500_000, 120: 3_000_000, 180: 3_200_000, 240: 3_200_000, 300: 3_400_000,
           360: 3_400_000, 420: 3_400_000, 480: 3_400_000, 540: 600_000, 600: 4_000_000}
    policy, seen = replay("ksmtuned", 600, mem_free_kb=lambda t: free[t], qemu_rss_kb=lambda t: rss[t])
    assert (policy.thres, policy.sleep) == (838860, 40)
    assert seen == [
        (60, 0),                   # 500000 + 838860 < total and free > thres: stop
        (120, 0),                  # 3838860 < total and 1000000 > thres: still fits
        (180, 1, 300, 40),         # free < thres: start, boost 0 -> 300
        (240, 1, 600, 40),
        (300, 1, 550, 40),         # committed + thres > total, free > thres: decay
        (360, 1, 850, 40), (420, 1, 1150, 40), (480, 1, 1250, 40),     # boost, capped at 1250
        (540, 0),                  # fits again: stop (npages is kept)
        (600, 1, 1250, 40),        # 1250 + 300, capped
    ]


def test_ksmtuned_threshold_floor_is_2048_kb():
    """KSM_THRES_CONST is compared with kB values: on a 8 MiB host 20% is 1677 kB < 2048."""
    h = Host(Topology.uniform(1, 8 * MIB), block_pages=1024)
    policy = make_policy("ksmtuned")
    policy.attach(h, Ksm(h))
    assert policy.thres == 2048 and policy.sleep == 10 * 16 * 1024 * 1024 // 8192


def test_mom_replay():
    # threshold = 0.20 x MemTotal = 838860.8 kB (no floor); sleep = max(10, 10 x 16777216 / total)
    # = 40; free memory sampled every 5 s (0, 5, 10, ...), averaged over the last 10 samples
    # taken before each evaluation (every 10 s, the first at 10 s); pages_to_scan starts at the
    # kernel's 100 and moves from its current value
    def free(t):
        return 3_000_000 if t < 10 else 600_000 if t < 100 else 3_500_000

    def vsz(t):
        return 3_500_000 if t < 100 else 1_000_000     # committed + threshold > total until 100 s
    _, seen = replay("mom", 110, mem_free_kb=free, qemu_vsz_kb=vsz)
    assert seen == [
        (10, 1, 64, 40),           # avg 3.0M > threshold: decay 100 - 50, clamped to 64
        (20, 1, 64, 40), (30, 1, 64, 40), (40, 1, 64, 40),
        (50, 1, 64, 40),           # samples 0..45: avg 1080000 > threshold: still decay
        (60, 1, 364, 40),          # the last 10 samples (10..55) are all 600000: boost
        (70, 1, 664, 40), (80, 1, 964, 40), (90, 1, 1250, 40),        # capped
        (100, 1, 1250, 40),        # the sample at 100 s is taken after this evaluation
        (110, 0),                  # vsz 1M + threshold < total and avg 1.18M > threshold: stop
    ]


def test_mom_takes_the_virtual_size_as_shareable():
    h, ksm, qemu = host_with(used_mib=0)
    qemu.mm.mmap(1024 * 256, thp=False)                   # 1 GiB mapped, nothing resident
    policy = make_policy("mom")
    policy.attach(h, ksm)
    assert policy.qemu_vsz_kb() == 1 << 20 and policy.qemu_rss_kb() == 0


def test_kubevirt_replay():
    # a spin at start (twice: Start() and the loop's first spin), then every 180 s; pressure is
    # MemAvailable <= 20% of MemTotal; sleep = 100 x 16777216 / (MemTotal - MemAvailable), >= 10
    def avail(t):
        return 3_000_000 if t < 180 else 500_000 if t < 540 else 2_000_000
    _, seen = replay("kubevirt", 1800, mem_available_kb=avail)
    assert seen == [
        (0, 0), (0, 0),            # no pressure, KSM off: stays off
        (180, 1, 100, 454),        # pressure: start at 100 pages; 1677721600 // 3694304 = 454
        (360, 1, 400, 454),        # boost
        (540, 1, 350, 764),        # no pressure, running: decay; 1677721600 // 2194304 = 764
        (720, 1, 300, 764), (900, 1, 250, 764), (1080, 1, 200, 764), (1260, 1, 150, 764),
        (1440, 1, 100, 764),
        (1620, 0),                 # 100 - 50 < 64: stopped
        (1800, 0),
    ]


def test_mem_available_is_free_memory_less_the_reserve():
    h, ksm, _ = host_with(used_mib=1024)
    policy = make_policy("kubevirt")
    policy.attach(h, ksm)
    reserve = sum(wm.high for wm in h.allocator.watermarks)
    assert policy.mem_available_kb() == (h.allocator.free_pages() - reserve) * 4
    assert policy.mem_free_kb() == h.allocator.free_pages() * 4


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


def density_run(tmp_path, policy: str, guest_gib: int, guests: int, settle: str):
    """A density study of linux-server guests on a 32 GiB host at resolution 256."""
    from vmhost.density import DensityRunner, load_density
    cfg = tmp_path / "d.yaml"
    cfg.write_text(f"""
host: {{thp: never, nodes: [{{memory: 32GiB, cpus: 4}}]}}
{policy}
density:
  mix: [{{image: linux-server, memory: {guest_gib}GiB}}]
  order: as-listed
  max_guests: {guests}
  resolution: 256
  settle: {{time: {settle}}}
""")
    return DensityRunner(load_density(cfg))


def test_ksmtuned_in_a_density_run_decides_at_full_scale(tmp_path):
    """At resolution 256 a 32 GiB host with 12 GiB of guests: committed + 6.4 GiB threshold fits,
    so ksmtuned keeps KSM stopped, exactly as it would on the real host (and nothing merges)."""
    res = density_run(tmp_path, "policy: {name: ksmtuned, interval_s: 60}\nksm: {run: 1}", 4, 3, "120s").run()
    pol = res["policy"]
    assert pol["name"] == "ksmtuned" and pol["wakeups"] >= 6          # every 60 s over 3 x 120 s
    assert pol["changes"][-1]["run"] == 0
    assert pol["changes"][-1]["reason"].startswith("committed memory fits")
    assert res["steps"][-1]["saved_pages"] == 0


def test_ksmtuned_boosts_on_a_crowded_scaled_host(tmp_path):
    """Guests of 8 GiB filling the 32 GiB host: free memory under the threshold (6.4 GiB), so
    ksmtuned runs KSM and
    boosts pages_to_scan by 300 a minute; the simulated knobs are the full-scale ones / 256."""
    runner = density_run(tmp_path, "policy: {name: ksmtuned}", 8, 5, "240s")
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


def test_every_named_policy_is_found_by_its_name():
    """A policy is a dataclass below Policy with its own ``name`` default; nothing else lists it."""
    from vmhost.policies import POLICIES, Advisor, KsmTuned, KubeVirt, Mom, Policy
    assert POLICIES == {"fixed": Policy, "ksmtuned": KsmTuned, "mom": Mom, "kubevirt": KubeVirt,
                        "advisor": Advisor}
    assert all(make_policy(name).name == name for name in POLICIES)
