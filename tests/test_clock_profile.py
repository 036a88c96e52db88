import pytest

from vmhost.clock import Clock
from vmhost.errors import InputError
from vmhost.profile import get_profile


def test_events_run_in_time_then_schedule_order():
    clock, seen = Clock(), []
    clock.at(50, lambda: seen.append("b"))
    clock.at(10, lambda: seen.append("a"))
    clock.at(50, lambda: seen.append("c"))
    cancelled = clock.after(20, lambda: seen.append("never"))
    cancelled.cancel()
    clock.run_until(40)
    assert seen == ["a"] and clock.now == 40
    clock.run_until(100)
    assert seen == ["a", "b", "c"] and clock.now == 100
    with pytest.raises(ValueError):
        clock.at(5, lambda: None)


def test_run_while_stops_on_condition_or_limit():
    clock, ticks = Clock(), []

    def tick():
        ticks.append(clock.now)
        clock.after(10, tick)

    clock.at(0, tick)
    assert clock.run_while(lambda: len(ticks) < 5)
    assert ticks == [0, 10, 20, 30, 40]
    assert not clock.run_while(lambda: True, limit=75)
    assert ticks[-1] == 70


def test_profiles():
    assert get_profile("linux-6.18").anon_vma_chains
    old = get_profile("linux-2.6.33")
    assert not old.anon_vma_chains and not old.ksm_stable_node_chains and old.ksm_checksum == "jhash2"
    with pytest.raises(InputError, match="unknown profile"):
        get_profile("linux-5.0")
