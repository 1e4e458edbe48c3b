"""The reconnect policy (protocol/reconnect.py), in process: every schedule,
the reset after a healthy link, the drain hint, rejection and stopping."""

from __future__ import annotations

import random

import pytest

from protocol.reconnect import (
    STOP,
    Cause,
    Kind,
    LinkOutcome,
    ReconnectPolicy,
    Schedule,
)

pytestmark = [pytest.mark.timeout(5)]


class Top(random.Random):
    """A random source that always draws the top of the range, so every
    delay equals its ceiling and the schedules can be read off exactly."""

    def uniform(self, a: float, b: float) -> float:
        return b


def policy(**kw: float) -> ReconnectPolicy:
    args = {"base": 1.0, "cap": 30.0, "stable_after": 30.0, "probe_cap": 3.0, **kw}
    return ReconnectPolicy(rng=Top(), **args)


def closed() -> LinkOutcome:
    return LinkOutcome.failed(Cause.BROKER_CLOSED, "peer closed the connection")


def lost(lasted: float, drain_retry: float | None = None) -> LinkOutcome:
    cause = Cause.DRAIN if drain_retry is not None else Cause.BROKER_CLOSED
    out = LinkOutcome.failed(cause, "peer closed: bye", accepted=True, drain_retry=drain_retry)
    return LinkOutcome(Kind.LOST, out.cause, out.detail, True, out.drain_retry, out.refusal, lasted)


REFUSED = LinkOutcome.failed(
    Cause.CONNECT_FAILED, "connect failed: 127.0.0.1:1: connection refused"
)


def test_the_backoff_doubles_up_to_the_cap() -> None:
    p = policy(base=1.0, cap=10.0)
    delays = []
    for n in range(1, 7):
        d = p.after(closed())
        assert d.redial and d.schedule is Schedule.BACKOFF and d.logged
        assert d.attempt == n and d.delay == d.ceiling
        delays.append(d.delay)
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_full_jitter_stays_within_the_ceiling() -> None:
    p = ReconnectPolicy(1.0, 30.0, 30.0, 3.0, rng=random.Random(7))
    for _ in range(50):
        d = p.after(closed())
        assert 0.0 <= d.delay <= d.ceiling <= 30.0


def test_an_unreachable_broker_gets_the_short_probe_schedule() -> None:
    p = policy(base=1.0, cap=30.0, probe_cap=3.0)
    got = [p.after(REFUSED) for _ in range(4)]
    assert [d.schedule for d in got] == [Schedule.PROBE] * 4
    assert [d.delay for d in got] == [1.0, 2.0, 3.0, 3.0]
    timeout = LinkOutcome.failed(Cause.CONNECT_TIMEOUT, "connect timed out")
    assert p.after(timeout).schedule is Schedule.PROBE
    # The backoff schedule kept its own count.
    assert p.after(closed()).delay == 1.0
    # The probe cap also bounds the probe's base.
    assert policy(base=5.0, probe_cap=3.0).after(REFUSED).ceiling == 3.0


def test_a_connection_resets_the_probe_but_not_the_backoff() -> None:
    p = policy()
    for _ in range(3):
        p.after(REFUSED)
        p.after(closed())
    connected = p.after(LinkOutcome.connected())
    assert connected.redial and connected.schedule is Schedule.NOW and not connected.logged
    assert p.after(REFUSED).attempt == 1
    assert p.after(closed()).attempt == 4


def test_the_backoff_resets_after_a_healthy_link_only() -> None:
    p = policy(stable_after=30.0)
    for _ in range(4):
        p.after(closed())
    short = p.after(lost(lasted=29.9))
    assert short.attempt == 5 and short.delay == 16.0
    healthy = p.after(lost(lasted=30.0))
    assert healthy.attempt == 1 and healthy.delay == 1.0


def test_a_rejection_backs_off_to_the_cap_once() -> None:
    p = policy(cap=30.0)
    rejected = LinkOutcome.failed(Cause.REJECTED, "rejected: 401 bad_token: x", refusal="bad_token")
    d = p.after(rejected)
    assert d.schedule is Schedule.BACKOFF and d.ceiling == 30.0 and d.delay == 30.0
    assert p.after(closed()).ceiling == 2.0  # back on the exponential schedule


def test_a_drain_hint_asks_for_a_prompt_reconnect() -> None:
    p = policy(cap=30.0)
    for _ in range(6):
        p.after(closed())
    d = p.after(lost(lasted=1.0, drain_retry=0.5))
    assert d.schedule is Schedule.BACKOFF and d.ceiling == 0.5 and d.delay == 0.5
    assert p.after(closed()).ceiling == 30.0  # the hint was for one reconnect
    # A drain that fails the next dial too (the broker refused while draining).
    p2 = policy()
    failed = LinkOutcome.failed(Cause.DRAIN, "drain: peer closed", drain_retry=2.0)
    assert p2.after(failed).ceiling == 2.0


def test_the_drain_hint_wins_over_a_rejection() -> None:
    p = policy(cap=30.0)
    rejected = LinkOutcome.failed(Cause.REJECTED, "rejected: 403 token_scope: x", drain_retry=1.5)
    assert p.after(rejected).ceiling == 1.5


def test_a_duplicate_costs_a_short_jittered_pause() -> None:
    p = policy(base=0.2)
    p.after(closed())
    d = p.after(LinkOutcome.duplicate("409 duplicate"))
    assert d.redial and d.schedule is Schedule.DUPLICATE and not d.logged
    assert d.delay == 0.2
    assert p.after(closed()).attempt == 2  # the backoff did not move


@pytest.mark.parametrize(
    "outcome",
    [
        LinkOutcome.connected(),
        LinkOutcome.duplicate(),
        REFUSED,
        closed(),
        lost(lasted=100.0, drain_retry=0.0),
        LinkOutcome(Kind.STOPPED),
    ],
)
def test_stopping_never_dials_again(outcome: LinkOutcome) -> None:
    p = policy()
    assert p.may_dial
    p.stop()
    assert not p.may_dial
    assert p.after(outcome) is STOP and not STOP.redial and not STOP.logged


def test_a_link_set_up_during_the_drain_reports_stopped() -> None:
    assert policy().after(LinkOutcome(Kind.STOPPED)) is STOP


def test_loud_from_the_third_attempt_then_every_tenth() -> None:
    p = policy()
    loud = [d.attempt for d in (p.after(REFUSED) for _ in range(31)) if d.loud]
    assert loud == [3, 10, 20, 30]


def test_labels_are_the_documented_tokens() -> None:
    assert [c.value for c in Cause] == [
        "drain",
        "rejected",
        "overloaded",
        "connect_timeout",
        "connect_failed",
        "tls_handshake",
        "no_h2",
        "token_unreadable",
        "control_timeout",
        "keepalive_timeout",
        "protocol_error",
        "broker_closed",
        "transport_error",
        "replaced",
        "address_gone",
        "other",
    ]
    assert REFUSED.label == "connect_failed"
    assert LinkOutcome.connected().label == "connected"


def test_agent_id_live_backs_off_to_the_cap_and_replaced_uses_the_normal_backoff() -> None:
    """Issue 15 item 4: a refused second device waits up to the cap every
    time (it never takes over the live connection); a replaced agent comes
    back on its normal backoff, never at once."""
    p = policy()
    live = LinkOutcome.failed(
        Cause.REJECTED, "rejected: 409 agent_id_live: ...", refusal="agent_id_live"
    )
    for _ in range(3):
        d = p.after(live)
        assert (d.schedule, d.ceiling, d.delay) == (Schedule.BACKOFF, 30.0, 30.0)
    q = policy()
    replaced = LinkOutcome(Kind.LOST, Cause.REPLACED, "replaced", True, lasted=60.0)
    d = q.after(replaced)
    assert (d.redial, d.schedule, d.ceiling) == (True, Schedule.BACKOFF, 1.0)
    assert d.logged and replaced.label == "replaced"
