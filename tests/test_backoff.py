"""Reconnect backoff: exponential with full jitter, drain hints, rejection."""

from __future__ import annotations

import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.backoff import Backoff

bases = st.floats(min_value=0.001, max_value=10.0)
extra_cap = st.floats(min_value=0.0, max_value=100.0)


def make(seed: int = 0, **kwargs: float) -> Backoff:
    return Backoff(rng=random.Random(seed), **kwargs)  # type: ignore[arg-type]


@given(st.integers(0, 2**32), bases, extra_cap, st.integers(1, 80))
@settings(max_examples=300)
def test_delay_within_full_jitter_bounds(seed: int, base: float, extra: float, n: int) -> None:
    b = make(seed, base=base, cap=base + extra)
    for attempt in range(n):
        ceiling = min(b.cap, base * 2.0**attempt)
        assert b.ceiling() == pytest.approx(ceiling)
        d = b.next_delay()
        assert 0.0 <= d <= ceiling
    assert b.attempt == n


def test_defaults_match_the_design() -> None:
    b = Backoff()
    assert (b.base, b.cap, b.stable_after) == (1.0, 30.0, 30.0)
    assert b.ceiling() == 1.0


def test_growth_to_cap() -> None:
    b = make(base=1.0, cap=30.0)
    ceilings = []
    for _ in range(10):
        ceilings.append(b.ceiling())
        b.next_delay()
    assert ceilings == [1, 2, 4, 8, 16, 30, 30, 30, 30, 30]


def test_huge_attempt_counts_stay_at_cap() -> None:
    b = make(base=0.5, cap=7.0)
    b.attempt = 10_000
    assert b.ceiling() == 7.0
    assert 0 <= b.next_delay() <= 7.0


@pytest.mark.parametrize("kwargs", [{"base": 0}, {"base": -1}, {"base": 5, "cap": 1}])
def test_bad_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)  # type: ignore[arg-type]


def test_reset_only_after_stable_after() -> None:
    b = make(base=1, cap=30, stable_after=30)
    for _ in range(4):
        b.next_delay()
    assert b.ceiling() == 16
    b.connected_for(0.0)
    b.connected_for(29.999)
    assert b.attempt == 4 and b.ceiling() == 16
    b.connected_for(30.0)
    assert b.attempt == 0 and b.ceiling() == 1
    b.next_delay()
    b.connected_for(1e9)
    assert b.ceiling() == 1


def test_rejected_jumps_to_cap_for_one_attempt() -> None:
    b = make(3, base=1, cap=30)
    b.rejected()
    assert b.ceiling() == 30
    delays = [b.next_delay()]
    assert 0 <= delays[0] <= 30
    # afterwards the normal schedule resumes (attempt 1 -> ceiling 2)
    assert b.ceiling() == 2
    assert 0 <= b.next_delay() <= 2


def test_rejected_delays_are_spread_up_to_cap() -> None:
    delays = []
    for seed in range(500):
        b = make(seed, base=1, cap=30)
        b.rejected()
        delays.append(b.next_delay())
    assert max(delays) > 25 and min(delays) < 5  # the whole [0, cap] range is used


@pytest.mark.parametrize("window", [0.0, 0.5, 5.0, 120.0])
def test_drain_hint_bounds_the_next_delay(window: float) -> None:
    for seed in range(200):
        b = make(seed, base=1, cap=30)
        for _ in range(8):
            b.next_delay()
        b.drain_hint(window)
        assert b.ceiling() == window
        assert 0 <= b.next_delay() <= window
        # one attempt only: the schedule continues where it was
        assert b.ceiling() == 30


def test_negative_drain_hint_means_now() -> None:
    b = make(base=1, cap=30)
    b.drain_hint(-5)
    assert b.next_delay() == 0.0


def test_drain_hint_wins_over_rejection() -> None:
    b = make(base=1, cap=30)
    b.rejected()
    b.drain_hint(2.0)
    assert b.ceiling() == 2.0
    assert b.next_delay() <= 2.0
    assert b.ceiling() == 2.0  # attempt 1, both overrides consumed


def test_jitter_spreads_agents() -> None:
    """1000 agents that lose the broker at once must not come back at once."""
    master = random.Random(20240601)
    firsts, fourths = [], []
    for _ in range(1000):
        b = Backoff(base=1.0, cap=30.0, rng=random.Random(master.getrandbits(64)))
        firsts.append(b.next_delay())
        for _ in range(2):
            b.next_delay()
        fourths.append(b.next_delay())  # ceiling 8
    assert max(firsts) - min(firsts) > 0.5 * 1.0
    assert max(fourths) - min(fourths) > 0.5 * 8.0
    assert len({round(d, 6) for d in firsts}) > 990  # practically all distinct
    # roughly uniform: mean near ceiling/2, and no one-second bucket is crowded
    assert statistics.mean(fourths) == pytest.approx(4.0, abs=0.5)
    buckets = [0] * 8
    for d in fourths:
        buckets[min(int(d), 7)] += 1
    assert max(buckets) < 200  # 125 expected per bucket


def test_drain_hint_spreads_agents() -> None:
    master = random.Random(7)
    delays = []
    for _ in range(1000):
        b = Backoff(rng=random.Random(master.getrandbits(64)))
        b.drain_hint(60.0)
        delays.append(b.next_delay())
    assert max(delays) - min(delays) > 0.5 * 60.0
    assert max(sum(1 for d in delays if k <= d < k + 6) for k in range(0, 60, 6)) < 150
