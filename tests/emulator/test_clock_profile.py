import pytest

from guests.errors import InputError
from vmhost.clock import Clock
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


def test_horizon_is_the_next_other_event_within_the_running_loop():
    clock, seen = Clock(), []

    def selfish():
        # run own occurrences every 7 ns at once while nothing else is due
        while clock.now + 7 < clock.horizon():
            clock.advance(clock.now + 7)
            seen.append(("ahead", clock.now))
        seen.append(("event", clock.now))

    clock.at(0, selfish)
    clock.at(30, lambda: seen.append(("other", clock.now)))
    assert clock.horizon() == clock.now            # no loop running: no run ahead
    clock.run_until(25)
    # bounded by the loop's end (25), not only by the other event (30)
    assert seen == [("ahead", 7), ("ahead", 14), ("ahead", 21), ("event", 21)]
    with pytest.raises(ValueError):
        clock.advance(clock.now + 100)
    seen.clear()
    clock.at(40, selfish)
    clock.run_while(lambda: True, limit=60)        # a condition without fast_forward: none
    assert seen == [("other", 30), ("event", 40)]
    seen.clear()
    clock.at(45, selfish)
    clock.at(62, lambda: seen.append(("other", clock.now)))
    clock.run_while(lambda: True, limit=100, fast_forward=True)
    assert seen == [("ahead", 52), ("ahead", 59), ("event", 59), ("other", 62)]
