"""ksmd's two waits, as ksm_scan_thread has them (ksm-behaviour.md §13).

Waiting for work, ksmd is woken by a run=1 write or the first mm registering; in the timed
sleep between batches only a write of a different sleep_millisecs wakes it. The corpus trace
chain_prune_across_scan_steps shows the consequence on the kernel; these tests pin the
clock-level rule.
"""


import numpy as np
import pytest

from hw.topology import Topology
from vmhost.clock import NS_PER_MS
from vmhost.host import Host
from vmhost.ksm.engine import Ksm
from vmhost.ksm.ksmd import Ksmd

from helpers import ROOT

def setup():
    host = Host(Topology.uniform(1, 64 << 20), block_pages=1024)
    ksm = Ksm(host)
    ksmd = Ksmd(ksm, host.clock)
    ksm.write_knob("pages_to_scan", "100000")
    ksm.write_knob("sleep_millisecs", "50")
    proc = host.spawn("a")
    vma = proc.mm.mmap(64, thp=False)
    proc.mm.write(vma.start, np.full(64, 5, dtype=np.uint64))
    assert proc.mm.madvise(vma.start, 64, "mergeable") == 0
    return host, ksm, ksmd


def one_pass(host, ksm):
    """run=1 until full_scans grows by one, then run=0 (a trace's ``scan: 1``)."""
    target = ksm.seqnr + 1
    ksm.write_knob("run", "1")
    host.clock.run_while(lambda: ksm.seqnr < target)
    ksm.write_knob("run", "0")
    return host.clock.now


def test_run_1_does_not_cut_the_timed_sleep_short():
    host, ksm, ksmd = setup()
    t1 = one_pass(host, ksm)
    assert t1 == 0                      # waiting for work: run=1 woke ksmd at once
    t2 = one_pass(host, ksm)            # still in the sleep begun after the first pass
    assert t2 >= t1 + 50 * NS_PER_MS
    t3 = one_pass(host, ksm)
    assert t3 >= t2 + 50 * NS_PER_MS    # every pass: the batch's cost plus the full sleep


def test_run_1_wakes_at_once_after_the_sleep_ran_out():
    host, ksm, ksmd = setup()
    one_pass(host, ksm)
    host.clock.run_until(host.clock.now + 200 * NS_PER_MS)   # sleep over, run=0: waits for work
    before = host.clock.now
    assert one_pass(host, ksm) == before


def test_only_a_changed_sleep_millisecs_ends_the_sleep():
    host, ksm, ksmd = setup()
    t1 = one_pass(host, ksm)
    ksm.write_knob("run", "1")
    ksm.write_knob("sleep_millisecs", "50")          # same value: ksmd sleeps on
    assert host.clock.next_time() > t1
    ksm.write_knob("sleep_millisecs", "60")          # a new value: ksmd wakes now
    assert host.clock.next_time() == t1
    target = ksm.seqnr + 1
    host.clock.run_while(lambda: ksm.seqnr < target)
    assert host.clock.now == t1


@pytest.mark.parametrize("config, resolution", [("oracle/density-small.yaml", 8),
                                                ("density-ksmtuned.yaml", None)])
def test_batches_run_ahead_give_the_results_of_one_event_per_batch(monkeypatch, config, resolution):
    """ksmd runs batches at once between other events (guest writes, samples, a policy's
    wake-ups), the compiled scan several in one call: the same steps, timeline, counters, CPU
    time and KSM state as with one clock event per batch."""
    from vmhost.density import load_density
    from vmhost.density.invariance import at_resolution
    from vmhost.density.search import DensitySearch
    from test_fastscan import full_state

    def run(ahead: bool):
        monkeypatch.setattr(Ksmd, "run_ahead", ahead)
        cfg = load_density(str(ROOT / "configs" / config))
        if resolution:
            cfg = at_resolution(cfg, resolution)
        search = DensitySearch(cfg)
        res = search.run()
        res.pop("wall_s")
        ksm, ksmd = search.ksm, search.ksmd
        state = (ksm.c.a.tolist(), ksm.work.tolist(), ksmd.cpu_ns, ksmd.batches,
                 search.host.clock.now, full_state(ksm))
        return res, state, ksmd.batches_ahead

    ahead, ahead_state, n_ahead = run(True)
    one, one_state, n_one = run(False)
    assert n_one == 0 and n_ahead > 0.5 * ahead_state[3]     # most batches ran ahead
    assert ahead_state == one_state
    assert ahead == one
