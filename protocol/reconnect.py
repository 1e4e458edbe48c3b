"""The agent's reconnect policy (docs/protocol.md, 6. Reconnect and 7.
Shutdown), pure: the caller passes the random source and how long links
lasted; nothing here reads a clock.

The agent's connection loop turns every link into a :class:`LinkOutcome`
and asks :meth:`ReconnectPolicy.after` what to do next. The policy owns
both schedules: the *backoff* (base ``--sync-interval``, cap
``--sync-interval-cap``, reset once a link stayed healthy) for brokers that
answered and refused, dropped us or drained, and the short *probe* schedule
(cap ``--probe-interval-cap``) while no broker can be reached at all. It
applies a broker's drain hint (reconnect within its retry window) and an
overloaded broker's retry hint (wait that long, jittered), sends an
authentication rejection straight to the cap, spaces out a balancer's
duplicate picks, and once the agent is stopping it never dials again.
"""

from __future__ import annotations

import enum
import random

import attrs

from protocol.backoff import Backoff


class Cause(enum.Enum):
    """Why a link failed or ended: the metric label and log field ``cause``."""

    DRAIN = "drain"
    REJECTED = "rejected"
    #: 503 overloaded: the broker sheds new connections (a reconnect storm).
    OVERLOADED = "overloaded"
    CONNECT_TIMEOUT = "connect_timeout"
    CONNECT_FAILED = "connect_failed"
    TLS_HANDSHAKE = "tls_handshake"
    NO_H2 = "no_h2"
    TOKEN_UNREADABLE = "token_unreadable"
    CONTROL_TIMEOUT = "control_timeout"
    KEEPALIVE_TIMEOUT = "keepalive_timeout"
    PROTOCOL_ERROR = "protocol_error"
    BROKER_CLOSED = "broker_closed"
    TRANSPORT_ERROR = "transport_error"
    #: The broker replaced this link by another connection with our agent id.
    REPLACED = "replaced"
    #: The local address the link was bound to disappeared (the device moved).
    ADDRESS_GONE = "address_gone"
    OTHER = "other"


#: Failures before any byte reached a broker process: the network's fault.
UNREACHABLE = frozenset({Cause.CONNECT_FAILED, Cause.CONNECT_TIMEOUT})
#: A link that ended because the device moved: dial again at once, once.
MOVED = frozenset({Cause.ADDRESS_GONE})


class Kind(enum.Enum):
    #: Accepted and kept: the agent now holds this replica.
    CONNECTED = "connected"
    #: The balancer chose a replica the agent already holds.
    DUPLICATE = "duplicate"
    #: Never became a working link (unreachable, refused, handshake failed).
    FAILED = "failed"
    #: A working link ended.
    LOST = "lost"
    #: Ended because the agent itself is stopping.
    STOPPED = "stopped"


@attrs.frozen
class LinkOutcome:
    """What became of one link, as the connection loop saw it."""

    kind: Kind
    #: Why it failed or ended (FAILED and LOST).
    cause: Cause | None = None
    #: The full text for logs (the ``reason`` field), unbounded.
    detail: str = ""
    #: The broker accepted the control stream.
    accepted: bool = False
    #: The broker's drain hint: reconnect within this many seconds.
    drain_retry: float | None = None
    #: The broker's refusal token (protocol/handshake.py), "" if none.
    refusal: str = ""
    #: How long the link lasted (LOST: since its control stream was opened;
    #: FAILED: since the dial began).
    lasted: float | None = None
    #: An overloaded broker's retry hint (``tether-retry-after``), seconds.
    retry_after: float | None = None

    @classmethod
    def connected(cls) -> LinkOutcome:
        return cls(Kind.CONNECTED, accepted=True)

    @classmethod
    def duplicate(cls, detail: str = "") -> LinkOutcome:
        return cls(Kind.DUPLICATE, detail=detail)

    @classmethod
    def failed(
        cls,
        cause: Cause,
        detail: str,
        *,
        accepted: bool = False,
        drain_retry: float | None = None,
        refusal: str = "",
        retry_after: float | None = None,
    ) -> LinkOutcome:
        return cls(
            Kind.FAILED, cause, detail, accepted, drain_retry, refusal, retry_after=retry_after
        )

    @property
    def label(self) -> str:
        return self.cause.value if self.cause is not None else self.kind.value


class Schedule(enum.Enum):
    BACKOFF = "backoff"
    PROBE = "probe"
    #: The short jittered pause after a duplicate (uniform(0, base)).
    DUPLICATE = "duplicate"
    #: Dial again at once (a replica was just reached; maybe more to reach).
    NOW = "now"


@attrs.frozen
class Decision:
    """What the loop does next: wait ``delay`` then dial, unless ``redial``
    is False (the agent is stopping: never dial again)."""

    redial: bool
    delay: float = 0.0
    schedule: Schedule = Schedule.NOW
    #: The schedule's attempt number after this decision, and its ceiling.
    attempt: int = 0
    ceiling: float = 0.0
    #: Worth a WARNING: the third failure in a row, then every tenth.
    loud: bool = False

    @property
    def logged(self) -> bool:
        """A reconnect the operator hears about (log line and metric)."""
        return self.redial and self.schedule in (Schedule.BACKOFF, Schedule.PROBE)


#: Never dial again.
STOP = Decision(redial=False)


@attrs.define
class ReconnectPolicy:
    """Both schedules, the drain hint and the stop; see the module docstring."""

    base: float
    cap: float
    stable_after: float
    probe_cap: float
    rng: random.Random = attrs.field(repr=False)
    stopping: bool = False
    backoff: Backoff = attrs.field(init=False)
    probe: Backoff = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.backoff = Backoff(self.base, self.cap, self.stable_after, rng=self.rng)
        # A probe is one cheap SYN: keep probing often, so service resumes
        # within seconds of the link coming back.
        self.probe = Backoff(
            min(self.base, self.probe_cap), self.probe_cap, self.stable_after, rng=self.rng
        )

    def stop(self) -> None:
        """The agent is draining: from now on no outcome leads to a dial."""
        self.stopping = True

    @property
    def may_dial(self) -> bool:
        return not self.stopping

    def after(self, outcome: LinkOutcome) -> Decision:
        """The decision after ``outcome``; advances the schedules."""
        if self.stopping or outcome.kind is Kind.STOPPED:
            return STOP
        if outcome.kind is Kind.CONNECTED:
            self.probe.attempt = 0
            return Decision(redial=True)
        if outcome.kind is Kind.DUPLICATE:
            delay = self.rng.uniform(0, self.base)
            return Decision(True, delay, Schedule.DUPLICATE, ceiling=self.base)
        if outcome.kind is Kind.LOST and outcome.cause in MOVED:
            # The link worked until the address went away: the next one is
            # expected to work at once (a failure then follows the probes).
            return Decision(True, 0.0, Schedule.NOW)
        unreachable = outcome.cause in UNREACHABLE
        schedule = self.probe if unreachable else self.backoff
        if outcome.lasted is not None:
            schedule.connected_for(outcome.lasted)
        if outcome.cause is Cause.REJECTED:
            self.backoff.rejected()
        if outcome.drain_retry is not None:
            self.backoff.drain_hint(outcome.drain_retry)
        if outcome.retry_after is not None:
            self.backoff.retry_hint(outcome.retry_after)
        ceiling = schedule.ceiling()
        delay = schedule.next_delay()
        attempt = schedule.attempt
        loud = attempt == 3 or (attempt > 3 and attempt % 10 == 0)
        which = Schedule.PROBE if unreachable else Schedule.BACKOFF
        return Decision(True, delay, which, attempt, ceiling, loud)
