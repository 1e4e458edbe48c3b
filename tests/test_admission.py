"""Admission control of new agent connections (protocol/admission.py):
accept pacing, bounded handshakes, the queue, shedding and the retry
hint, with an injected clock; and the agent's side of the hint
(protocol/backoff.py, protocol/reconnect.py, protocol/handshake.py)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_config_layering import broker_creds

from broker import config as broker_config
from broker.app import Broker
from protocol import handshake
from protocol.admission import Admission, AdmissionConfig, Ticket, Verdict
from protocol.backoff import RETRY_JITTER, Backoff
from protocol.reconnect import Cause, LinkOutcome, ReconnectPolicy
from tether.tools.certs import PkiPaths


def config(**kw: float) -> AdmissionConfig:
    base = {
        "max_handshakes": 2,
        "accept_rate": 10.0,
        "accept_burst": 5,
        "max_queue": 3,
        "max_wait": 1.0,
        "max_shedding": 1,
    }
    base.update(kw)
    return AdmissionConfig(**base)  # type: ignore[arg-type]


def test_slots_then_queue_then_shed_then_drop() -> None:
    a = Admission(config(), now=0.0)
    verdicts = [a.arrive(0.0).verdict for _ in range(7)]
    assert verdicts == [Verdict.ADMIT] * 2 + [Verdict.QUEUE] * 3 + [Verdict.SHED, Verdict.DROP]
    assert (a.active, a.queued, a.shedding) == (2, 3, 1)


def test_a_finished_handshake_admits_the_oldest_queued() -> None:
    a = Admission(config(), now=0.0)
    first, _second = a.arrive(0.0), a.arrive(0.0)
    queued = [a.arrive(0.1), a.arrive(0.2)]
    changed = a.finished(first, 0.3)
    assert changed == [queued[0]] and queued[0].verdict is Verdict.ADMIT
    assert queued[1].verdict is Verdict.QUEUE
    assert a.finished(first, 0.3) == []  # twice is once
    assert a.active == 2 and a.queued == 1


def test_queued_too_long_is_shed_then_dropped() -> None:
    a = Admission(config(max_shedding=1), now=0.0)
    a.arrive(0.0), a.arrive(0.0)
    q1, q2 = a.arrive(0.0), a.arrive(0.5)
    assert a.next_expiry() == pytest.approx(1.0)
    assert a.expire(0.9) == []
    assert a.expire(1.01) == [q1] and q1.verdict is Verdict.SHED
    assert a.expire(1.6) == [q2] and q2.verdict is Verdict.DROP and q2.done
    assert a.next_expiry() is None


def test_a_queued_connection_that_goes_away_leaves_the_queue() -> None:
    a = Admission(config(), now=0.0)
    a.arrive(0.0), a.arrive(0.0)
    gone = a.arrive(0.0)
    a.finished(gone, 0.1)
    assert a.queued == 0 and a.active == 2


def test_accept_pacing_is_a_token_bucket() -> None:
    a = Admission(config(accept_rate=10.0, accept_burst=3, max_handshakes=100), now=0.0)
    for _ in range(3):
        assert a.accept_delay(0.0) == 0.0
        a.arrive(0.0)
    assert a.accept_delay(0.0) == pytest.approx(0.1)
    assert a.accept_delay(0.05) == pytest.approx(0.05)
    assert a.accept_delay(0.1) == 0.0
    # Idle time refills up to the burst only.
    assert a.accept_delay(100.0) == 0.0
    for _ in range(3):
        a.arrive(100.0)
    assert a.accept_delay(100.0) > 0


def test_retry_hint_grows_with_the_backlog_and_is_bounded() -> None:
    cfg = config(max_handshakes=4, max_queue=1000, accept_rate=100.0, min_retry_ms=1000)
    a = Admission(cfg, now=0.0)
    small = a.retry_after_ms(0.0)
    for i in range(600):
        a.arrive(0.0, f"10.0.{i // 250}.{i % 250}")
    big = a.retry_after_ms(0.5)  # the middle draw: the estimate itself
    assert small == cfg.min_retry_ms // 2
    assert big == pytest.approx(600 / 100.0 * 1000, rel=0.01)
    assert a.retry_after_ms(0.999) <= cfg.max_retry_ms
    assert a.retry_after_ms(0.0) == pytest.approx(big * 0.5, rel=0.01)
    assert a.retry_after_ms(0.99) == pytest.approx(big * 1.49, rel=0.01)


def test_retry_hint_uses_the_measured_handshake_rate() -> None:
    a = Admission(config(max_handshakes=1, max_queue=100, accept_rate=1000.0), now=0.0)
    t = 0.0
    for _ in range(20):  # 10 handshakes per second, measured
        ticket = a.arrive(t)
        t += 0.1
        a.finished(ticket, t)
    assert a.handshake_rate() == pytest.approx(10.0)
    for _ in range(50):
        a.arrive(t)
    # 50 ahead at 10/s: 5 s.
    assert a.retry_after_ms(0.5) == pytest.approx(5000, rel=0.05)


@pytest.mark.parametrize(
    "kw",
    [
        {"max_handshakes": 0},
        {"accept_rate": 0},
        {"accept_burst": 0},
        {"max_queue": -1},
        {"max_wait": 0},
        {"min_retry_ms": 0},
        {"min_retry_ms": 5000, "max_retry_ms": 1000},
    ],
)
def test_bad_settings_are_refused(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        config(**kw)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["arrive", "finish", "expire"]),
            st.floats(0, 0.5),
            st.sampled_from(["a", "b", "c"]),
        ),
        max_size=200,
    ),
    st.integers(1, 5),
    st.integers(0, 5),
    st.integers(0, 3),
    st.integers(1, 6),
    st.integers(1, 3),
)
@settings(max_examples=300, deadline=None)
def test_counts_stay_exact_and_bounded(
    steps: list[tuple[str, float, str]],
    slots: int,
    queue: int,
    shed: int,
    per_source: int,
    active_per_source: int,
) -> None:
    """Whatever happens, in order: never more handshakes, queued or shed
    connections than configured, in all and per source; the queue is FIFO
    per source; every ticket ends once."""
    cfg = config(
        max_handshakes=slots,
        max_queue=queue,
        max_shedding=shed,
        max_wait=1.0,
        max_per_source=per_source,
        max_active_per_source=active_per_source,
    )
    a = Admission(cfg, now=0.0)
    now = 0.0
    live: list[Ticket] = []
    rng = random.Random(len(steps))
    for op, dt, source in steps:
        now += dt
        if op == "arrive":
            a.expire(now)
            ticket = a.arrive(now, source)
            if ticket.verdict is not Verdict.DROP:
                live.append(ticket)
        elif op == "finish" and live:
            a.finished(live.pop(rng.randrange(len(live))), now)
        else:
            a.expire(now)
        live = [t for t in live if not t.done]
        assert 0 <= a.active <= slots
        assert 0 <= a.queued <= queue
        assert 0 <= a.shedding <= shed
        counts = {v: sum(1 for t in live if t.verdict is v) for v in Verdict}
        assert (counts[Verdict.ADMIT], counts[Verdict.QUEUE], counts[Verdict.SHED]) == (
            a.active,
            a.queued,
            a.shedding,
        )
        for src in "abc":
            mine = [t for t in live if t.source == src]
            assert len(mine) <= per_source
            assert sum(1 for t in mine if t.verdict is Verdict.ADMIT) <= active_per_source
            queued = [t.number for t in mine if t.verdict is Verdict.QUEUE]
            assert queued == sorted(queued)
        # A slot sits free while connections wait only if their sources are at their share.
        if a.active < slots:
            waiting = {t.source for t in live if t.verdict is Verdict.QUEUE}
            admitted = [t.source for t in live if t.verdict is Verdict.ADMIT]
            assert all(admitted.count(src) >= active_per_source for src in waiting)
        assert 1 <= a.retry_after_ms(rng.random()) <= cfg.max_retry_ms


# ------------------------------------------------------ the agent's side


def test_refusal_carries_the_retry_hint() -> None:
    refusal = handshake.Refusal(503, "overloaded", "overloaded: later", retry_after_ms=2500)
    headers = refusal.to_headers()
    assert headers == {"tether-refusal": "overloaded", "tether-retry-after": "2500"}
    assert handshake.Refusal.retry_after_from_headers(headers) == 2.5
    assert handshake.Refusal.reason_of("overloaded") is handshake.RefusalReason.OVERLOADED


@pytest.mark.parametrize(
    "value", ["", "-1", "1.5", "abc", "99999999", str(handshake.MAX_RETRY_AFTER_MS + 1), "١٢"]
)
def test_a_bad_retry_hint_is_no_hint(value: str) -> None:
    assert handshake.Refusal.retry_after_from_headers({"tether-retry-after": value}) is None


def test_an_out_of_range_hint_cannot_be_sent() -> None:
    with pytest.raises(handshake.HandshakeError):
        handshake.Refusal(503, "overloaded", retry_after_ms=handshake.MAX_RETRY_AFTER_MS + 1)


@given(st.integers(0, 2**32), st.floats(0.0, 100.0), st.floats(1.0, 60.0))
@settings(max_examples=200)
def test_the_hint_is_waited_out_with_jitter_within_the_cap(
    seed: int, hint: float, cap: float
) -> None:
    b = Backoff(1.0, cap, 30.0, rng=random.Random(seed))
    b.retry_hint(hint)
    delay = b.next_delay()
    assert min(hint, cap) <= delay <= min(cap, hint * RETRY_JITTER) or delay == cap
    # One hint, one delay: the schedule is back to its own.
    assert b.ceiling() == min(cap, 1.0 * 2.0**b.attempt)


def policy(seed: int = 1) -> ReconnectPolicy:
    return ReconnectPolicy(
        base=1.0, cap=30.0, stable_after=30.0, probe_cap=5.0, rng=random.Random(seed)
    )


def test_overloaded_waits_the_hint_not_the_cap() -> None:
    overloaded = LinkOutcome.failed(
        Cause.OVERLOADED, "overloaded", refusal="overloaded", retry_after=4.0
    )
    for seed in range(50):
        decision = policy(seed).after(overloaded)
        assert 4.0 <= decision.delay <= 4.0 * RETRY_JITTER


def test_an_old_broker_without_the_hint_keeps_the_old_behaviour() -> None:
    # A plain rejection (no hint) still goes to the cap, as before.
    rejected = LinkOutcome.failed(Cause.REJECTED, "rejected: 503 busy", refusal="")
    p = policy()
    assert p.after(rejected).ceiling == 30.0
    # An overloaded answer without a hint: the normal backoff, not the cap.
    bare = LinkOutcome.failed(Cause.OVERLOADED, "overloaded", refusal="overloaded")
    assert policy().after(bare).ceiling == 1.0


# ------------------------------------------------------------ the flags


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--max-concurrent-handshakes=0", "--max-concurrent-handshakes must be at least 1"),
        ("--agent-accept-rate=0", "--agent-accept-rate must be above 0"),
        ("--agent-accept-rate=-5", "--agent-accept-rate must be above 0"),
        ("--agent-accept-rate=nan", "--agent-accept-rate must be above 0"),
        ("--agent-accept-queue=-1", "--agent-accept-queue must be 0 or more"),
    ],
)
def test_bad_admission_flags_are_one_line_errors(
    flag: str, message: str, pki: PkiPaths, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        broker_config.from_args([*broker_creds(pki), flag], {})
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) <= 2, err


def test_admission_flags_reach_the_controller(pki: PkiPaths) -> None:
    cfg = broker_config.from_args(
        [
            *broker_creds(pki),
            "--max-concurrent-handshakes=7",
            "--agent-accept-rate=50",
            "--agent-accept-queue=9",
            "--handshake-timeout=8",
        ],
        {},
    )
    admission = Broker(cfg).admission.admission.config
    assert (admission.max_handshakes, admission.accept_rate, admission.max_queue) == (7, 50.0, 9)
    assert (admission.accept_burst, admission.max_wait, admission.max_shedding) == (
        5,
        pytest.approx(5.6),
        1,
    )


def test_one_source_cannot_take_every_slot_or_the_queue() -> None:
    a = Admission(
        config(max_handshakes=4, max_queue=100, max_per_source=6, max_active_per_source=2),
        now=0.0,
    )
    hostile = [a.arrive(0.0, "10.0.0.66") for _ in range(8)]
    assert [t.verdict for t in hostile] == [Verdict.ADMIT] * 2 + [Verdict.QUEUE] * 4 + [
        Verdict.DROP
    ] * 2
    # Another source is admitted at once, ahead of the hostile queue.
    other = a.arrive(0.0, "10.0.0.7")
    assert other.verdict is Verdict.ADMIT
    # When a hostile handshake ends, its own queued one takes the slot back.
    changed = a.finished(hostile[0], 0.1)
    assert changed == [hostile[2]]


def test_a_flooding_source_is_refused_and_reported_once_an_episode() -> None:
    """Drops for the per-source cap are marked as such (the broker counts
    them as bad input and logs the first of each episode); load drops are not."""
    a = Admission(
        config(max_handshakes=2, max_queue=100, max_per_source=3, max_active_per_source=1),
        now=0.0,
    )
    held = [a.arrive(0.0, "10.0.0.66") for _ in range(3)]
    refused = [a.arrive(0.0, "10.0.0.66") for _ in range(3)]
    assert all(t.verdict is Verdict.DROP and t.source_refused for t in refused)
    assert [t.first_refusal for t in refused] == [True, False, False]
    assert not any(t.source_refused for t in held)
    # Below the cap again, the next refusal starts a new episode.
    a.finished(held[0], 0.1)
    a.arrive(0.1, "10.0.0.66")
    again = a.arrive(0.1, "10.0.0.66")
    assert again.source_refused and again.first_refusal
    # A drop because the queue and the shedding lane are full is load, not a flood.
    b = Admission(config(max_handshakes=1, max_queue=0, max_shedding=0), now=0.0)
    b.arrive(0.0, "10.0.0.1")
    load = b.arrive(0.0, "10.0.0.2")
    assert load.verdict is Verdict.DROP and not load.source_refused
