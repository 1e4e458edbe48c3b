"""Keepalive, sans-IO: who sends PINGs, when a link counts as dead, and one
timer heap for every connection of a process (docs/protocol.md, 5. Keepalive and liveness).

One side drives, the other only answers. An agent that announces its
interval in the ``tether-keepalive-ms`` header of its control request
drives: it sends a PING whenever it has heard nothing for an interval and
drops the link when the ACK does not come within its timeout. The broker
then sends no PINGs of its own to that agent (h2 answers the agent's): it
keeps only a dead-link deadline of :data:`DEAD_AFTER_INTERVALS` announced
intervals since it last heard anything. An older agent, which announces
nothing, keeps the broker-driven keepalive it always had, and so does one
that announces a longer interval than the broker's own (:func:`peer_drives`).

The announced interval is bounded (:func:`announced`): a value that is not
a positive decimal integer is refused (the broker drives, as for an old
agent); one outside :data:`MIN_INTERVAL_MS` .. :data:`MAX_INTERVAL_MS` is
clamped into it. Both are reported, so the adapter can count them.

:class:`TimerHeap` keeps one deadline per connection in one binary heap, so
a process with 10,000 idle connections has one timer, not 10,000 sleeping
tasks. Nothing here reads a clock or draws random numbers: callers pass
``now`` and the PING payloads.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
from collections.abc import Mapping
from typing import Generic, TypeVar

import attrs

#: The control request header in which an agent announces its interval.
HEADER = "tether-keepalive-ms"
#: Bounds of an announced interval (1 s .. 10 min).
MIN_INTERVAL_MS = 1_000
MAX_INTERVAL_MS = 600_000
#: Longest header value considered (a 6-digit number fits; more is junk).
MAX_HEADER_LEN = 12
#: An answering side drops a link silent for this many announced intervals.
DEAD_AFTER_INTERVALS = 3


class Mode(enum.Enum):
    #: Send a PING after ``interval`` of silence; dead without its ACK
    #: within ``timeout``.
    DRIVE = "drive"
    #: Send nothing; dead after ``timeout`` of silence.
    ANSWER = "answer"
    #: No keepalive (interval 0 or not finite).
    OFF = "off"


class Action(enum.Enum):
    NONE = "none"
    PING = "ping"
    DEAD = "dead"


class Verdict(enum.Enum):
    """What became of an announced interval (a metric label)."""

    ABSENT = "absent"
    ACCEPTED = "accepted"
    CLAMPED = "clamped"
    INVALID = "invalid"


@attrs.frozen
class Announcement:
    verdict: Verdict
    #: The interval to use, seconds; None: the broker drives (absent, invalid).
    interval: float | None = None
    #: The value as received, shortened, for a log line.
    raw: str = ""


def announced(headers: Mapping[str, str]) -> Announcement:
    """The agent's announced keepalive interval from its control request."""
    raw = headers.get(HEADER)
    if raw is None:
        return Announcement(Verdict.ABSENT)
    shown = raw[:MAX_HEADER_LEN]
    text = raw.strip()
    if not text or len(text) > MAX_HEADER_LEN or not text.isascii() or not text.isdigit():
        return Announcement(Verdict.INVALID, raw=shown)
    ms = int(text)
    if ms <= 0:
        return Announcement(Verdict.INVALID, raw=shown)
    clamped = min(MAX_INTERVAL_MS, max(MIN_INTERVAL_MS, ms))
    verdict = Verdict.ACCEPTED if clamped == ms else Verdict.CLAMPED
    return Announcement(verdict, clamped / 1000, shown)


def peer_drives(ann: Announcement, own_interval: float) -> float | None:
    """The interval to answer (the agent drives), or None: we drive.

    We answer only an interval no longer than our own, so an operator's
    shorter ``--keepalive-time`` still bounds how long a dead link stays
    routable: an agent that pings less often is pinged by us, as before
    (a PING received counts as traffic, so it then sends none itself)."""
    if ann.interval is None:
        return None
    if math.isfinite(own_interval) and own_interval > 0 and ann.interval > own_interval:
        return None
    return ann.interval


def header_value(interval: float) -> str | None:
    """What an agent with keepalive ``interval`` (seconds) announces; None
    when it runs no keepalive (it then announces nothing and the broker
    drives)."""
    if not math.isfinite(interval) or interval <= 0:
        return None
    return str(min(MAX_INTERVAL_MS, max(MIN_INTERVAL_MS, round(interval * 1000))))


@attrs.define
class LinkKeepalive:
    """The keepalive of one connection. The owner calls :meth:`poll` at
    :meth:`due` (or later), passing the time of the last read that brought
    bytes; a PING it was told to send is reported with :meth:`ping_sent`,
    its ACK with :meth:`acked`."""

    mode: Mode
    interval: float
    timeout: float
    _ping: bytes | None = None
    _sent_at: float = 0.0

    @classmethod
    def drive(cls, interval: float, timeout: float) -> LinkKeepalive:
        if not (math.isfinite(interval) and interval > 0):
            return cls(Mode.OFF, math.inf, math.inf)
        return cls(Mode.DRIVE, interval, timeout)

    @classmethod
    def answer(cls, interval: float) -> LinkKeepalive:
        """The peer drives with ``interval``: only a dead-link deadline."""
        return cls(Mode.ANSWER, interval, interval * DEAD_AFTER_INTERVALS)

    @property
    def awaiting(self) -> bytes | None:
        """The payload of the PING whose ACK is awaited, if any."""
        return self._ping

    def due(self, last_rx: float) -> float:
        """When :meth:`poll` next has something to decide (inf: never)."""
        if self.mode is Mode.OFF:
            return math.inf
        if self.mode is Mode.ANSWER:
            return last_rx + self.timeout
        if self._ping is not None:
            return self._sent_at + self.timeout
        return last_rx + self.interval

    def poll(self, now: float, last_rx: float) -> Action:
        # Every threshold is the same sum :meth:`due` returns, so a poll at
        # ``due`` always acts (no float rounding can make it spin).
        if self.mode is Mode.OFF:
            return Action.NONE
        if self.mode is Mode.ANSWER:
            return Action.DEAD if now >= last_rx + self.timeout else Action.NONE
        if self._ping is not None:
            if last_rx >= self._sent_at:
                # Any read since the PING went also proves the link: an ACK
                # queued behind bulk data arrives later, but the bytes arrive.
                self._ping = None
            elif now >= self._sent_at + self.timeout:
                return Action.DEAD
            else:
                return Action.NONE
        return Action.PING if now >= last_rx + self.interval else Action.NONE

    def ping_sent(self, payload: bytes, now: float) -> None:
        self._ping = payload
        self._sent_at = now

    def acked(self, payload: bytes, now: float) -> float | None:
        """The round trip of our awaited PING if ``payload`` is its ACK."""
        if self._ping is None or payload != self._ping:
            return None
        self._ping = None
        return now - self._sent_at


K = TypeVar("K")


#: How late a keepalive deadline may fire so that the ones due close
#: together fire in one wake-up: 10,000 agents answered at the default 15 s
#: reach a deadline about 220 times a second, one wake-up each without it.
#: Small beside any keepalive interval (1 s at the least).
TIMER_SLACK = 0.05


class TimerHeap(Generic[K]):
    """One deadline per key, in one heap. Moving a key's deadline later
    costs nothing here (the old entry fires, and the owner, finding nothing
    due yet, schedules again); moving it earlier pushes a new entry and
    leaves the old one to be skipped. Removed keys' entries are skipped."""

    __slots__ = ("_at", "_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, K]] = []
        self._at: dict[K, float] = {}
        self._seq = itertools.count()

    def __len__(self) -> int:
        """Keys with a deadline."""
        return len(self._at)

    @property
    def entries(self) -> int:
        """Heap entries, stale ones included (bounded: see :meth:`schedule`)."""
        return len(self._heap)

    def schedule(self, key: K, at: float) -> bool:
        """Make sure ``key`` fires at ``at`` or earlier; True when that
        pushed an entry."""
        if math.isinf(at):
            return False
        current = self._at.get(key)
        if current is not None and current <= at:
            return False
        self._at[key] = at
        heapq.heappush(self._heap, (at, next(self._seq), key))
        self._compact()
        return True

    def discard(self, key: K) -> None:
        self._at.pop(key, None)
        self._compact()

    def next_at(self) -> float:
        """The earliest live deadline (inf when none)."""
        heap = self._heap
        while heap and self._at.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else math.inf

    def wake_at(self, slack: float = TIMER_SLACK) -> float:
        """When the owner of the heap should next wake: the earliest
        deadline, ``slack`` late, so that every deadline due within
        ``slack`` of it is served by the same wake-up (inf when none)."""
        return self.next_at() + slack

    def pop_due(self, now: float) -> list[K]:
        """Every key whose deadline is at or before ``now``; they no longer
        have one (the owner schedules again)."""
        out: list[K] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            at, _, key = heapq.heappop(heap)
            if self._at.get(key) == at:
                del self._at[key]
                out.append(key)
        return out

    def _compact(self) -> None:
        # Stale entries stay until they come up; rebuilt when they would
        # be most of the heap, so it never exceeds twice the live keys.
        if len(self._heap) > 64 and len(self._heap) > 2 * len(self._at):
            self._heap = [e for e in self._heap if self._at.get(e[2]) == e[0]]
            heapq.heapify(self._heap)
