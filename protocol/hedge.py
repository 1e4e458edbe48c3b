"""Hedged reconnect: the agent's policy for a link that went quiet
(docs/protocol.md, 6. Reconnect), sans-IO with an injected clock.

After a link outage the tunnel's TCP connection sits in retransmission
backoff: whatever was sent during the outage (a keepalive PING, a dial) is
retried at growing intervals, so the first request after the link returns
can wait seconds for the next retransmission. A fresh connection has no
such history. So when a link has heard nothing for ``after`` seconds (well
below the dead-link timeout) the agent first sends one cheap probe PING;
if that goes unanswered for ``probe_timeout`` the link is *suspect* and a
race begins: every ``retry`` seconds a fresh connection attempt starts
(each bounded by ``attempt_timeout``), overlapping, until either

- an attempt is accepted by the broker: it takes new dials (``won``), the
  old connection's streams finish or die with it;
- the old link is heard from again but no attempt won within
  ``recover_after`` seconds of that (the broker takes no new connections):
  the race stops (``recovered``). The old link answering does not stop the
  race by itself: its TCP connection is still in the backoff the outage
  left, a fresh one is not. The clock starts when the old link is first
  heard again, not when the race began: after a long outage the first
  retransmission arrives long after the race started, and the fresh
  attempts need the restored link to win. Hearing the old link again is
  also the first sign that the link is back: an attempt starts at once
  instead of at the next ``retry`` tick;
- the old link died and nothing won within ``linger`` seconds: the race
  gives up and the ordinary reconnect schedule takes over (``gave_up``).

Every attempt that fails counts as ``failed``, one that connects after the
race was decided as ``late``. The caller counts what :class:`HedgePolicy`
returns (``tether_agent_hedges_total{outcome}``).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable

import attrs


class Outcome(enum.Enum):
    """The ``outcome`` label of ``tether_agent_hedges_total``."""

    WON = "won"
    RECOVERED = "recovered"
    FAILED = "failed"
    LATE = "late"
    GAVE_UP = "gave_up"


class Action(enum.Enum):
    #: Nothing to do before ``Step.wait`` seconds (or an event) pass.
    WAIT = "wait"
    #: Send one probe PING now.
    PROBE = "probe"
    #: Start one fresh connection attempt now.
    ATTEMPT = "attempt"


class State(enum.Enum):
    WATCHING = "watching"
    RACING = "racing"
    #: Decided (won or gave up): this policy has nothing more to do.
    DONE = "done"


@attrs.frozen
class Step:
    action: Action
    #: Seconds until the policy wants to be asked again (inf: only on an event).
    wait: float = math.inf
    #: An outcome to count, if this step decided one.
    outcome: Outcome | None = None


@attrs.define
class HedgePolicy:
    """One link's hedging decisions. Call :meth:`step` whenever something
    happened or its last ``wait`` elapsed; report what the adapter did with
    :meth:`probe_sent`, :meth:`attempt_ended` and :meth:`link_died`."""

    #: Silence (seconds since the link last received anything) before a probe.
    after: float
    clock: Callable[[], float] = attrs.field(repr=False)
    #: Spacing of fresh connection attempts while racing.
    retry: float = 0.5
    #: How long one attempt may take (TCP, TLS, the broker's welcome).
    attempt_timeout: float = 5.0
    #: At least this long for the probe's answer (else 4 round trips).
    min_probe_timeout: float = 1.0
    #: How long the race goes on once the old link died.
    linger: float = 60.0
    #: The most attempts in flight at once.
    max_parallel: int = 8
    #: This long after the old link is heard again with no win: stop racing.
    recover_after: float = 5.0
    state: State = State.WATCHING
    in_flight: int = 0
    _probe_at: float | None = None
    _race_at: float = 0.0
    _last_attempt: float = -math.inf
    _died_at: float | None = None
    #: When the old link was first heard from again during this race.
    _heard_at: float | None = None
    #: The race was started by a route change, not by silence.
    triggered: bool = False

    def __attrs_post_init__(self) -> None:
        if not (self.after > 0 and self.retry > 0 and self.attempt_timeout > 0):
            raise ValueError("hedging needs after, retry and attempt_timeout > 0")

    def probe_timeout(self, rtt: float | None) -> float:
        return max(self.min_probe_timeout, 4 * (rtt or 0.0))

    @property
    def racing(self) -> bool:
        return self.state is State.RACING

    @property
    def awaiting_answer(self) -> bool:
        """Racing and the old link not heard from since: step again on its
        next byte (the link is back; an attempt starts at once)."""
        return self.state is State.RACING and self._heard_at is None

    def step(self, last_rx: float, rtt: float | None = None) -> Step:
        """What to do now, given when the link last received anything."""
        now = self.clock()
        if self.state is State.DONE:
            return Step(Action.WAIT)
        if self.state is State.RACING:
            return self._race_step(now, last_rx)
        if self._probe_at is not None and last_rx >= self._probe_at:
            self._probe_at = None  # answered (or anything else arrived)
        silent = now - last_rx
        if self._probe_at is None:
            if silent < self.after:
                return Step(Action.WAIT, self.after - silent)
            self._probe_at = now
            return Step(Action.PROBE, self.probe_timeout(rtt))
        waited = now - self._probe_at
        if waited < self.probe_timeout(rtt):
            return Step(Action.WAIT, self.probe_timeout(rtt) - waited)
        self._start_race(now)
        return self._race_step(now, last_rx)

    def trigger(self) -> None:
        """Race now, whatever the silence (the route to the broker moved)."""
        if self.state is State.WATCHING:
            self.triggered = True
            self._start_race(self.clock())

    def _start_race(self, now: float) -> None:
        self.state = State.RACING
        self._race_at = now
        self._last_attempt = -math.inf
        self._heard_at = None

    def _race_step(self, now: float, last_rx: float) -> Step:
        heard_now = self._heard_at is None and last_rx > self._race_at
        if heard_now:
            self._heard_at = last_rx
        if (
            self._died_at is None
            and self._heard_at is not None
            and not self.triggered
            and now - self._heard_at >= self.recover_after
        ):
            # The old link answers and no fresh connection gets through: keep it.
            self.state = State.WATCHING
            self._probe_at = None
            return Step(Action.WAIT, 0.0, Outcome.RECOVERED)
        if self._died_at is not None and now - self._died_at >= self.linger:
            self.state = State.DONE
            return Step(Action.WAIT, math.inf, Outcome.GAVE_UP)
        since = now - self._last_attempt
        if (since >= self.retry or heard_now) and self.in_flight < self.max_parallel:
            self.in_flight += 1
            self._last_attempt = now
            return Step(Action.ATTEMPT, self.retry)
        return Step(Action.WAIT, max(0.0, self.retry - since) if since < self.retry else self.retry)

    def link_died(self) -> bool:
        """The old link ended. True: the race goes on (the caller must not
        start its ordinary reconnect yet); False: it was not racing."""
        if self.state is not State.RACING:
            self.state = State.DONE
            return False
        if self._died_at is None:
            self._died_at = self.clock()
        return True

    def attempt_cancelled(self) -> None:
        """An attempt was abandoned (the race was decided): nothing to count."""
        self.in_flight = max(0, self.in_flight - 1)

    def attempt_ended(self, connected: bool) -> tuple[bool, Outcome]:
        """An attempt finished its handshake (``connected``) or failed.
        Returns whether a connected attempt takes over, and what to count."""
        self.in_flight = max(0, self.in_flight - 1)
        if not connected:
            return False, Outcome.FAILED
        if self.state is State.RACING:
            self.state = State.DONE
            return True, Outcome.WON
        return False, Outcome.LATE
