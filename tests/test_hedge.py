"""The hedging policy (protocol/hedge.py): sans-IO, driven by a fake clock."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.hedge import Action, HedgePolicy, Outcome, State


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(clock: Clock, **kw: float) -> HedgePolicy:
    return HedgePolicy(after=3.0, clock=clock, retry=0.5, linger=10.0, **kw)  # type: ignore[arg-type]


def race(clock: Clock, p: HedgePolicy, silent_for: float = 3.0) -> float:
    """From a quiet link to the race's first attempt; returns when it went quiet."""
    quiet_since = clock.now
    clock.now += silent_for
    assert p.step(quiet_since).action is Action.PROBE
    clock.now += 1.0
    assert p.step(quiet_since).action is Action.ATTEMPT
    return quiet_since


def fail_attempts(clock: Clock, p: HedgePolicy, last_rx: float, seconds: float, dt: float) -> None:
    """``seconds`` of a race in which every attempt fails and nothing is decided."""
    start = clock.now
    while clock.now - start < seconds:
        step = p.step(last_rx)
        assert step.outcome is None
        if step.action is Action.ATTEMPT:
            p.attempt_ended(False)
        clock.now += dt


@pytest.mark.timeout(10)
def test_quiet_link_probes_then_races() -> None:
    clock = Clock()
    p = make(clock)
    last_rx = clock.now
    step = p.step(last_rx)
    assert step.action is Action.WAIT and step.wait == pytest.approx(3.0)
    clock.now += 3.0
    step = p.step(last_rx)
    assert step.action is Action.PROBE and step.wait == pytest.approx(1.0)
    clock.now += 0.5
    assert p.step(last_rx).action is Action.WAIT  # the probe has time left
    clock.now += 0.5
    step = p.step(last_rx)
    assert step.action is Action.ATTEMPT and p.racing and p.in_flight == 1
    assert p.step(last_rx).action is Action.WAIT  # spaced by retry
    clock.now += 0.5
    assert p.step(last_rx).action is Action.ATTEMPT and p.in_flight == 2
    takes, outcome = p.attempt_ended(True)
    assert takes and outcome is Outcome.WON and p.state is State.DONE
    # A second attempt that connects later is late, and does not take over.
    assert p.attempt_ended(True) == (False, Outcome.LATE)
    assert p.step(last_rx).wait == math.inf


@pytest.mark.timeout(10)
def test_answered_probe_keeps_watching() -> None:
    clock = Clock()
    p = make(clock)
    clock.now += 3.0
    assert p.step(100.0).action is Action.PROBE
    clock.now += 0.2
    step = p.step(clock.now)  # the ACK arrived
    assert step.action is Action.WAIT and step.wait == pytest.approx(3.0) and not p.racing


@pytest.mark.timeout(10)
def test_old_link_answering_does_not_stop_the_race_until_recover_after() -> None:
    """The old link answers right after the outage: still in retransmission
    backoff, so the race goes on; only when fresh connections keep failing
    for ``recover_after`` does it stop and keep the old one."""
    clock = Clock()
    p = make(clock, recover_after=4.0)
    clock.now += 3.0
    assert p.step(100.0, rtt=0.6).wait == pytest.approx(2.4)  # 4 round trips
    clock.now += 2.0
    assert p.step(100.0, rtt=0.6).action is Action.WAIT
    clock.now += 0.4
    assert p.step(100.0, rtt=0.6).action is Action.ATTEMPT
    clock.now += 0.5
    answered = clock.now
    step = p.step(answered)  # the old link answered
    assert step.outcome is None and step.action is Action.ATTEMPT and p.racing
    while clock.now - answered < 4.0:
        assert p.step(clock.now).outcome is None
        p.attempt_ended(False)
        clock.now += 0.5
    step = p.step(clock.now)
    assert step.outcome is Outcome.RECOVERED and p.state is State.WATCHING
    p.attempt_cancelled()
    assert p.in_flight == 0


@pytest.mark.timeout(10)
def test_recover_after_counts_from_the_old_links_answer_not_the_race_start() -> None:
    """A 20 s outage: the race has run far longer than ``recover_after``
    when the link returns. The old link's first retransmission must not
    end the race at once: the fresh attempts need the restored link to win."""
    clock = Clock()
    p = make(clock, recover_after=4.0)
    quiet_since = race(clock, p)
    fail_attempts(clock, p, quiet_since, 12.0, 0.5)  # the outage
    answered = clock.now  # the link is back; the old one answers first
    step = p.step(answered)
    assert step.outcome is None and p.racing
    clock.now += 0.5
    step = p.step(answered)
    assert step.outcome is None and step.action is Action.ATTEMPT
    assert p.attempt_ended(True) == (True, Outcome.WON)
    # Had no attempt won, the race would stop recover_after after the answer.
    p = make(clock, recover_after=4.0)
    race(clock, p)
    clock.now += 10.0
    answered = clock.now
    fail_attempts(clock, p, answered, 4.0, 0.5)
    assert p.step(answered).outcome is Outcome.RECOVERED


@pytest.mark.timeout(10)
def test_old_link_heard_again_starts_an_attempt_at_once() -> None:
    """The first byte the old link receives in a race says the link is back:
    a fresh attempt starts then, not at the next ``retry`` tick (the ones
    in flight sent their SYNs into the outage)."""
    clock = Clock()
    p = make(clock)
    quiet_since = race(clock, p)
    clock.now += 0.1
    step = p.step(quiet_since)  # nothing heard: spaced by retry
    assert step.action is Action.WAIT and step.wait == pytest.approx(0.4)
    assert p.awaiting_answer
    heard = clock.now
    step = p.step(heard)
    assert step.action is Action.ATTEMPT and p.in_flight == 2
    assert not p.awaiting_answer
    clock.now += 0.05
    assert p.step(heard).action is Action.WAIT  # only the first answer counts
    # Not past max_parallel.
    p = make(clock, max_parallel=1)
    race(clock, p)
    clock.now += 0.1
    assert p.step(clock.now).action is Action.WAIT and p.in_flight == 1


@pytest.mark.timeout(10)
def test_dead_link_lingers_then_gives_up() -> None:
    clock = Clock()
    p = make(clock)
    assert p.link_died() is False and p.state is State.DONE  # not racing: nothing to do
    p = make(clock)
    quiet_since = race(clock, p, silent_for=4.0)
    assert p.racing
    assert p.link_died() is True
    fail_attempts(clock, p, quiet_since, 10.0, 0.25)
    assert p.step(quiet_since).outcome is Outcome.GAVE_UP and p.state is State.DONE


@pytest.mark.timeout(10)
def test_trigger_races_at_once_and_is_not_undone_by_traffic() -> None:
    clock = Clock()
    p = make(clock)
    p.trigger()
    assert p.step(clock.now).action is Action.ATTEMPT
    clock.now += 0.5
    step = p.step(clock.now)  # the old path still answers: the route moved anyway
    assert step.action is Action.ATTEMPT and step.outcome is None


@pytest.mark.timeout(10)
def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        HedgePolicy(after=0, clock=Clock())


@pytest.mark.timeout(60)
@given(st.lists(st.tuples(st.floats(0, 2), st.booleans(), st.sampled_from("sdfc")), max_size=80))
@settings(max_examples=200, deadline=None)
def test_in_flight_is_bounded_and_never_negative(
    events: list[tuple[float, bool, str]],
) -> None:
    clock = Clock()
    p = make(clock, max_parallel=4)
    last_rx = clock.now
    for dt, heard, what in events:
        clock.now += dt
        if heard:
            last_rx = clock.now
        step = p.step(last_rx)
        assert step.wait >= 0
        if what == "d":
            p.link_died()
        elif what == "s" and p.in_flight:
            p.attempt_ended(False)
        elif what == "c" and p.in_flight:
            p.attempt_cancelled()
        assert 0 <= p.in_flight <= 4
