"""Admission of new agent connections during a reconnect storm (sans-IO).

After a broker crash every agent dials again within seconds. Taking them
all at once makes every TLS handshake compete for the CPU with the health
endpoint, the frontends and the agents already back. The controller keeps
that bounded:

- **accept pacing**: a token bucket (``accept_rate`` per second, burst
  ``accept_burst``) says when the listener may take the next connection
  from the kernel's backlog (:meth:`Admission.accept_delay`);
- **bounded handshakes**: at most ``max_handshakes`` connections are in
  their TLS handshake and hello at once (:attr:`Verdict.ADMIT`); the next
  ones wait in a FIFO queue of at most ``max_queue`` (:attr:`Verdict.QUEUE`)
  for at most ``max_wait`` seconds;
- **shedding**: a connection the queue cannot take, or one that waited too
  long, is *shed*: it gets a handshake in a small separate lane
  (``max_shedding``) and its hello is answered ``503 overloaded`` with a
  retry hint (:meth:`Admission.retry_after_ms`), so the agent comes back when
  the backlog should have drained instead of on its own backoff. With the
  shedding lane full too, it is dropped (closed before any TLS);
- **one source cannot take it all**: a source address holds at most
  ``max_per_source`` connections in admission (handshaking, queued or
  shed; beyond, dropped) and at most ``max_active_per_source`` of the
  handshake slots; the queue lets a connection of another source overtake
  one whose source is at its share (looking ``SCAN`` places deep).

Pure and clock-free: every call takes ``now`` (seconds, any monotonic
origin) and the retry hint takes the random draw it jitters with. The trio
adapter around the agent listener is :mod:`tether.netio.admission`.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque

import attrs


class Verdict(enum.Enum):
    """What becomes of one accepted connection."""

    #: Handshake now (it holds one of ``max_handshakes`` slots).
    ADMIT = "admit"
    #: Wait for a slot (:meth:`Admission.finished` or :meth:`Admission.expire` decide).
    QUEUE = "queue"
    #: Handshake in the shedding lane, then ``503 overloaded`` with a retry hint.
    SHED = "shed"
    #: Close at once, before any TLS.
    DROP = "drop"
    #: Not the controller's: the adapter found the peer had closed a queued
    #: connection by the time it was admitted (it gave up waiting), and
    #: closed it before any TLS.
    ABANDONED = "abandoned"


@attrs.frozen
class AdmissionConfig:
    max_handshakes: int = 32
    accept_rate: float = 1000.0
    accept_burst: int = 100
    max_queue: int = 16384
    max_wait: float = 7.0
    max_shedding: int = 8
    #: Connections of one source address in admission / in handshake slots.
    max_per_source: int = 128
    max_active_per_source: int = 8
    #: The retry hint's bounds, in milliseconds.
    min_retry_ms: int = 1000
    max_retry_ms: int = 30_000

    def __attrs_post_init__(self) -> None:
        if self.max_handshakes < 1:
            raise ValueError("max_handshakes must be at least 1")
        if self.accept_rate <= 0 or self.accept_burst < 1:
            raise ValueError("accept_rate must be > 0 and accept_burst at least 1")
        if self.max_queue < 0 or self.max_shedding < 0 or self.max_wait <= 0:
            raise ValueError("max_queue and max_shedding must be >= 0, max_wait > 0")
        if self.max_per_source < 1 or self.max_active_per_source < 1:
            raise ValueError("max_per_source and max_active_per_source must be at least 1")
        if not 0 < self.min_retry_ms <= self.max_retry_ms:
            raise ValueError("need 0 < min_retry_ms <= max_retry_ms")


@attrs.define(eq=False)
class Ticket:
    """One accepted connection's place in admission; ``verdict`` changes
    from QUEUE to ADMIT, SHED or DROP when the controller decides."""

    number: int
    arrived: float
    verdict: Verdict
    source: str = ""
    done: bool = False
    #: Dropped because its source already holds ``max_per_source``
    #: connections (a flood from one address, not load): ``first`` is True
    #: for the first such drop of an episode (log once).
    source_refused: bool = False
    first_refusal: bool = False


#: How many recent handshake completions the rate estimate looks at.
_RATE_WINDOW = 64
#: How deep the queue is searched for a connection whose source has room.
SCAN = 64


class Admission:
    """The controller; see the module docstring. Counts are exact: every
    ADMIT and SHED ticket must be handed back to :meth:`finished` once."""

    def __init__(self, config: AdmissionConfig, now: float) -> None:
        self.config = config
        self._tokens = float(config.accept_burst)
        self._refilled = now
        self._numbers = itertools.count()
        self.active = 0
        self.shedding = 0
        self._queue: deque[Ticket] = deque()
        self._completions: deque[float] = deque(maxlen=_RATE_WINDOW)
        #: Per source: connections in admission, and those in handshake slots.
        self._held: dict[str, int] = {}
        self._active_by: dict[str, int] = {}
        #: Sources at ``max_per_source`` that have had a connection dropped.
        self._refusing: set[str] = set()
        #: Totals per verdict, as first decided or later changed to.
        self.totals = {v: 0 for v in Verdict}

    # ------------------------------------------------------ accept pacing

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self._refilled)
        self._tokens = min(
            float(self.config.accept_burst), self._tokens + elapsed * self.config.accept_rate
        )
        self._refilled = max(self._refilled, now)

    def accept_delay(self, now: float) -> float:
        """Seconds until the listener may take the next connection (0: now)."""
        self._refill(now)
        if self._tokens >= 1.0:
            return 0.0
        return (1.0 - self._tokens) / self.config.accept_rate

    # ---------------------------------------------------------- admission

    @property
    def queued(self) -> int:
        return len(self._queue)

    def arrive(self, now: float, source: str = "") -> Ticket:
        """A connection from ``source`` (its address) was accepted (spends
        one accept token); call :meth:`expire` first to act on the changes."""
        self._refill(now)
        self._tokens = max(0.0, self._tokens - 1.0)
        ticket = Ticket(next(self._numbers), now, Verdict.QUEUE, source)
        if self._held.get(source, 0) >= self.config.max_per_source:
            self._set(ticket, Verdict.DROP)
            ticket.done = True
            ticket.source_refused = True
            ticket.first_refusal = source not in self._refusing
            self._refusing.add(source)
            return ticket
        self._held[source] = self._held.get(source, 0) + 1
        if (
            self.active < self.config.max_handshakes
            and self._has_room(source)
            and self._eligible() is None  # none waiting ahead that could go first
        ):
            self._set(ticket, Verdict.ADMIT)
        elif len(self._queue) < self.config.max_queue:
            self._queue.append(ticket)
            self.totals[Verdict.QUEUE] += 1
        else:
            self._shed_or_drop(ticket)
        return ticket

    def _has_room(self, source: str) -> bool:
        return self._active_by.get(source, 0) < self.config.max_active_per_source

    def finished(self, ticket: Ticket, now: float) -> list[Ticket]:
        """``ticket``'s handshake (ADMIT or SHED) is over, or a queued one
        was given up by its connection; the tickets whose verdict changed."""
        changed: list[Ticket] = []
        if ticket.done:
            return changed
        if ticket.verdict is Verdict.ADMIT:
            self.active -= 1
            self._uncount(self._active_by, ticket.source)
            self._completions.append(now)
        elif ticket.verdict is Verdict.SHED:
            self.shedding -= 1
        elif ticket.verdict is Verdict.QUEUE:
            self._queue.remove(ticket)
        self._leave(ticket)
        changed.extend(self.expire(now))
        while self.active < self.config.max_handshakes:
            head = self._pop_eligible()
            if head is None:
                break
            self._set(head, Verdict.ADMIT)
            changed.append(head)
        return changed

    def _eligible(self) -> int | None:
        """Where the oldest queued ticket (within ``SCAN``) whose source
        has room is."""
        for i, ticket in enumerate(itertools.islice(self._queue, SCAN)):
            if self._has_room(ticket.source):
                return i
        return None

    def _pop_eligible(self) -> Ticket | None:
        i = self._eligible()
        if i is None:
            return None
        ticket = self._queue[i]
        del self._queue[i]
        return ticket

    def _leave(self, ticket: Ticket) -> None:
        ticket.done = True
        self._uncount(self._held, ticket.source)
        if self._held.get(ticket.source, 0) < self.config.max_per_source:
            self._refusing.discard(ticket.source)

    @staticmethod
    def _uncount(counts: dict[str, int], source: str) -> None:
        left = counts.get(source, 0) - 1
        if left > 0:
            counts[source] = left
        else:
            counts.pop(source, None)

    def expire(self, now: float) -> list[Ticket]:
        """Queued tickets older than ``max_wait``: shed or dropped."""
        changed = []
        while self._queue and now - self._queue[0].arrived > self.config.max_wait:
            ticket = self._queue.popleft()
            self._shed_or_drop(ticket)
            changed.append(ticket)
        return changed

    def next_expiry(self) -> float | None:
        """When the oldest queued ticket expires (None: queue empty)."""
        return self._queue[0].arrived + self.config.max_wait if self._queue else None

    def _shed_or_drop(self, ticket: Ticket) -> None:
        if self.shedding < self.config.max_shedding:
            self._set(ticket, Verdict.SHED)
        else:
            self._set(ticket, Verdict.DROP)
            self._leave(ticket)

    def _set(self, ticket: Ticket, verdict: Verdict) -> None:
        ticket.verdict = verdict
        self.totals[verdict] += 1
        if verdict is Verdict.ADMIT:
            self.active += 1
            self._active_by[ticket.source] = self._active_by.get(ticket.source, 0) + 1
        elif verdict is Verdict.SHED:
            self.shedding += 1

    # --------------------------------------------------------- retry hint

    def handshake_rate(self) -> float:
        """Completed handshakes per second lately (the accept rate until
        enough have completed to tell)."""
        if len(self._completions) >= 8:
            span = self._completions[-1] - self._completions[0]
            if span > 0:
                return min(self.config.accept_rate, (len(self._completions) - 1) / span)
        return self.config.accept_rate

    def retry_after_ms(self, draw: float) -> int:
        """The hint for a shed agent: how long the backlog ahead of it
        should take to drain (within the configured bounds), jittered by
        ``draw`` (uniform in [0, 1)) to between 0.5x and 1.5x of that (on
        average the estimate itself), never past ``max_retry_ms``."""
        backlog = self.active + self.queued + self.shedding
        drain_ms = backlog / self.handshake_rate() * 1000.0
        base = min(self.config.max_retry_ms, max(self.config.min_retry_ms, drain_ms))
        ms = base * (0.5 + min(max(draw, 0.0), 1.0))
        return int(min(self.config.max_retry_ms, max(1.0, ms)))
