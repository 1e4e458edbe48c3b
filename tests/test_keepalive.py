"""protocol/keepalive.py: the timer heap, one link's keepalive with an
injected clock, and the announced interval's bounds; and the trio timer
task over the heap (tether/netio/keepalive.py) coalescing wake-ups."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import keepalive
from protocol.keepalive import (
    DEAD_AFTER_INTERVALS,
    HEADER,
    MAX_INTERVAL_MS,
    MIN_INTERVAL_MS,
    TIMER_SLACK,
    Action,
    Announcement,
    LinkKeepalive,
    Mode,
    TimerHeap,
    Verdict,
)
from tether.netio.keepalive import KeepaliveTimers

# ------------------------------------------------------------ timer heap

ops = st.lists(
    st.one_of(
        st.tuples(st.just("schedule"), st.integers(0, 20), st.floats(0, 100)),
        st.tuples(st.just("discard"), st.integers(0, 20), st.just(0.0)),
        st.tuples(st.just("advance"), st.just(0), st.floats(0, 30)),
    ),
    max_size=300,
)


@given(ops)
@settings(max_examples=300)
def test_timer_heap_fires_each_key_at_its_earliest_deadline(
    steps: list[tuple[str, int, float]],
) -> None:
    """Against a model: a key fires once, at the earliest deadline asked
    for since it last fired; discarded keys never fire."""
    heap: TimerHeap[int] = TimerHeap()
    model: dict[int, float] = {}
    now = 0.0
    for op, key, value in steps:
        if op == "schedule":
            at = now + value
            heap.schedule(key, at)
            if key not in model or at < model[key]:
                model[key] = at
        elif op == "discard":
            heap.discard(key)
            model.pop(key, None)
        else:
            now += value
            due = heap.pop_due(now)
            expected = {k for k, at in model.items() if at <= now}
            assert sorted(due) == sorted(expected)  # each once
            for k in expected:
                del model[k]
        assert len(heap) == len(model)
        assert heap.next_at() == min(model.values(), default=math.inf)
        # stale entries never pile up
        assert heap.entries <= max(65, 2 * len(model) + 1)


def test_timer_heap_later_deadline_costs_no_entry() -> None:
    heap: TimerHeap[str] = TimerHeap()
    assert heap.schedule("a", 10.0)
    assert not heap.schedule("a", 20.0)  # the 10 s entry fires; the owner reschedules
    assert not heap.schedule("a", math.inf)
    assert heap.entries == 1
    assert heap.pop_due(9.9) == []
    assert heap.pop_due(10.0) == ["a"]
    assert heap.next_at() == math.inf


# ------------------------------------------------------ one link, simulated


def simulate(
    ka: LinkKeepalive,
    *,
    dies_at: float,
    rtt: float,
    peer_interval: float | None,
    horizon: float,
) -> tuple[float | None, float]:
    """Run ``ka`` against a peer that answers PINGs after ``rtt`` (and, with
    ``peer_interval``, sends its own PING that often) until ``dies_at``.
    Returns (when DEAD was declared or None, the last time anything was
    received)."""
    last_rx = 0.0
    ack_at: float | None = None
    peer_next = peer_interval
    now = 0.0
    while now <= horizon:
        # the next thing that happens: our poll, an ACK, a peer PING
        candidates = [ka.due(last_rx)]
        if ack_at is not None:
            candidates.append(ack_at)
        if peer_next is not None:
            candidates.append(peer_next)
        now = min(candidates)
        if now > horizon:
            break
        if ack_at is not None and now == ack_at:
            ack_at = None
            if now < dies_at:
                last_rx = now
                ka.acked(b"p" * 8, now)
            continue
        if peer_next is not None and now == peer_next:
            assert peer_interval is not None
            peer_next = now + peer_interval
            if now < dies_at:
                last_rx = now
            continue
        action = ka.poll(now, last_rx)
        if action is Action.DEAD:
            return now, last_rx
        if action is Action.PING:
            assert ka.mode is Mode.DRIVE
            ka.ping_sent(b"p" * 8, now)
            ack_at = now + rtt
    return None, last_rx


intervals = st.floats(min_value=0.5, max_value=120.0)


@given(intervals, st.floats(0.5, 60.0), st.floats(0.0, 1.0), st.floats(0.0, 1000.0))
@settings(max_examples=300)
def test_driving_side_detects_a_dead_link_within_interval_plus_timeout(
    interval: float, timeout: float, rtt_share: float, dies_at: float
) -> None:
    rtt = rtt_share * timeout * 0.9  # answers come in time while alive
    ka = LinkKeepalive.drive(interval, timeout)
    dead, last_rx = simulate(
        ka,
        dies_at=dies_at,
        rtt=rtt,
        peer_interval=None,
        horizon=dies_at + 10 * (interval + timeout),
    )
    assert dead is not None, "a dead link must be detected"
    assert dead >= dies_at  # never while the peer answered
    assert dead - last_rx <= interval + timeout + 1e-9
    assert dead - last_rx >= timeout - 1e-9


@given(intervals, st.floats(0.0, 0.99), st.floats(0.0, 1000.0))
@settings(max_examples=300)
def test_answering_side_drops_a_link_after_a_few_silent_intervals(
    interval: float, jitter: float, dies_at: float
) -> None:
    """The peer pings every ``interval`` (plus up to one interval of jitter:
    an ACK wait, a slow link); we send nothing and drop it only after
    DEAD_AFTER_INTERVALS of silence."""
    ka = LinkKeepalive.answer(interval)
    dead, last_rx = simulate(
        ka,
        dies_at=dies_at,
        rtt=0.0,
        peer_interval=interval * (1 + jitter),
        horizon=dies_at + 10 * interval * DEAD_AFTER_INTERVALS,
    )
    assert dead is not None
    assert dead >= dies_at
    assert dead - last_rx == pytest.approx(interval * DEAD_AFTER_INTERVALS)


def test_any_read_after_a_ping_proves_the_link() -> None:
    """An ACK stuck behind bulk data: the data itself shows the peer is there."""
    ka = LinkKeepalive.drive(10, 5)
    assert ka.poll(10.0, 0.0) is Action.PING
    ka.ping_sent(b"12345678", 10.0)
    assert ka.poll(14.0, 0.0) is Action.NONE
    assert ka.poll(15.0, 12.0) is Action.NONE  # bytes came at 12 s: alive
    assert ka.awaiting is None
    assert ka.due(12.0) == 22.0
    assert ka.acked(b"12345678", 16.0) is None  # late ACK: no longer awaited


def test_only_our_pings_ack_gives_an_rtt() -> None:
    ka = LinkKeepalive.drive(1, 1)
    ka.ping_sent(b"ours....", 5.0)
    assert ka.acked(b"theirs..", 5.1) is None
    assert ka.acked(b"ours....", 5.25) == pytest.approx(0.25)


@pytest.mark.parametrize("interval", [0.0, -1.0, math.inf, math.nan])
def test_no_keepalive(interval: float) -> None:
    ka = LinkKeepalive.drive(interval, 15)
    assert ka.mode is Mode.OFF
    assert ka.due(0.0) == math.inf
    assert ka.poll(1e9, 0.0) is Action.NONE


# ------------------------------------------------------ the announced value


@given(st.text(max_size=40))
@settings(max_examples=500)
def test_any_announcement_is_bounded_or_refused(raw: str) -> None:
    ann = keepalive.announced({HEADER: raw})
    assert len(ann.raw) <= keepalive.MAX_HEADER_LEN
    if ann.verdict is Verdict.INVALID:
        assert ann.interval is None
    else:
        assert ann.interval is not None
        assert MIN_INTERVAL_MS / 1000 <= ann.interval <= MAX_INTERVAL_MS / 1000


@given(st.integers(MIN_INTERVAL_MS, MAX_INTERVAL_MS))
def test_an_interval_in_range_is_taken_as_is(ms: int) -> None:
    assert keepalive.announced({HEADER: str(ms)}) == Announcement(
        Verdict.ACCEPTED, ms / 1000, str(ms)
    )


@given(st.floats(1.0, 600.0))
def test_what_an_agent_announces_is_accepted(seconds: float) -> None:
    value = keepalive.header_value(seconds)
    assert value is not None
    ann = keepalive.announced({HEADER: value})
    assert ann.verdict is Verdict.ACCEPTED
    assert ann.interval == pytest.approx(seconds, abs=0.001)


@pytest.mark.parametrize(
    "raw,verdict,interval",
    [
        ("0", Verdict.INVALID, None),
        ("-5000", Verdict.INVALID, None),
        ("", Verdict.INVALID, None),
        ("15s", Verdict.INVALID, None),
        ("1e4", Verdict.INVALID, None),
        ("\u0661\u0665\u0660\u0660\u0660", Verdict.INVALID, None),  # Arabic-Indic: isdigit()
        ("9" * 13, Verdict.INVALID, None),  # longer than any sane number
        ("999999999999", Verdict.CLAMPED, MAX_INTERVAL_MS / 1000),
        ("1", Verdict.CLAMPED, MIN_INTERVAL_MS / 1000),
        (" 15000 ", Verdict.ACCEPTED, 15.0),
    ],
)
def test_hostile_announcements(raw: str, verdict: Verdict, interval: float | None) -> None:
    ann = keepalive.announced({HEADER: raw})
    assert (ann.verdict, ann.interval) == (verdict, interval)


def test_absent_and_who_drives() -> None:
    assert keepalive.announced({}).verdict is Verdict.ABSENT
    assert keepalive.header_value(0) is None  # no keepalive: announce nothing
    ann = keepalive.announced({HEADER: "15000"})
    assert keepalive.peer_drives(ann, 15.0) == 15.0
    assert keepalive.peer_drives(ann, 20.0) == 15.0
    # a broker tuned shorter keeps driving, so its bound holds
    assert keepalive.peer_drives(ann, 0.2) is None
    assert keepalive.peer_drives(keepalive.announced({}), 15.0) is None
    assert keepalive.peer_drives(keepalive.announced({HEADER: "junk"}), 15.0) is None


def test_wake_at_is_the_earliest_deadline_plus_the_slack() -> None:
    heap: TimerHeap[str] = TimerHeap()
    assert heap.wake_at() == math.inf
    heap.schedule("a", 10.0)
    heap.schedule("b", 10.01)
    assert heap.wake_at() == 10.0 + TIMER_SLACK
    assert heap.wake_at(0.0) == 10.0


async def test_deadlines_close_together_share_one_wake_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """200 deadlines spread over 40 ms (10,000 agents reach theirs about
    this densely): the process's timer task wakes once or twice for all of
    them, and none fires before its deadline or more than the slack after."""
    timers = KeepaliveTimers()
    fired: dict[int, float] = {}

    class Target:
        def __init__(self, i: int, at: float) -> None:
            self.i, self.at = i, at

        def keepalive_due(self, now: float) -> None:
            fired[self.i] = now

    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        await trio.sleep(0.001)
        start = trio.current_time()
        targets = [Target(i, start + 1.0 + i * 0.0002) for i in range(200)]
        for t in targets:
            timers.schedule(t, t.at)
        await trio.sleep(2.0)
        nursery.cancel_scope.cancel()
    assert len(fired) == 200
    for t in targets:
        assert t.at <= fired[t.i] <= t.at + TIMER_SLACK + 1e-9
    assert timers.wakeups <= 2
