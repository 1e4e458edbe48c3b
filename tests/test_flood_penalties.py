"""FloodPenalties: addresses whose connections keep ending in a flood are
closed at accept for a while (sans-IO, the clock passed in)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from protocol.flood import FloodPenalties


def test_free_strikes_then_doubling_penalties_up_to_the_cap() -> None:
    p = FloodPenalties(free=3, window=60, first=1, cap=8)
    now = 100.0
    assert [p.record_flood("a", now + i) for i in range(3)] == [0, 0, 0]
    assert not p.refused("a", now + 3)
    assert p.record_flood("a", now + 3) == 1
    assert p.refused("a", now + 3.5) and not p.refused("a", now + 4.1)
    assert not p.refused("b", now + 3.5)  # other addresses are untouched
    penalties = [p.record_flood("a", now + 5 + i * 10) for i in range(5)]
    assert penalties == [2, 4, 8, 8, 8]


def test_a_calm_window_starts_afresh() -> None:
    p = FloodPenalties(free=1, window=10, first=1, cap=60)
    assert p.record_flood("a", 0) == 0
    assert p.record_flood("a", 1) == 1
    assert p.record_flood("a", 2) == 2
    assert p.record_flood("a", 100) == 0  # calm for a window: forgiven again
    assert p.record_flood("a", 101) == 1


@given(st.lists(st.tuples(st.integers(0, 10_000), st.floats(0, 1e6)), max_size=300))
def test_memory_is_bounded(events: list[tuple[int, float]]) -> None:
    p = FloodPenalties(max_sources=50)
    for source, now in sorted(events, key=lambda e: e[1]):
        p.record_flood(f"10.0.{source >> 8}.{source & 255}", now)
        assert len(p) <= 50


def test_zero_free_floods_turns_the_penalty_off() -> None:
    p = FloodPenalties(free=0)
    assert all(p.record_flood("a", float(t)) == 0 for t in range(100))
    assert not p.refused("a", 50.0) and len(p) == 0
