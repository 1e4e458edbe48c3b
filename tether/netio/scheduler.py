"""The stream scheduler: queued payload into HTTP/2, round robin, with a
fast lane for small messages.

Each stream with queued output waits in a line; the writer asks for up to
one write batch at a time (:meth:`RoundRobin.fill`) and every stream in the
line gets :data:`QUANTUM` bytes per turn, so a bulk stream can neither
starve an interactive one nor queue megabytes ahead of it. A stream alone
in the line may fill the whole batch.

A stream that queues a small message (at most :data:`SMALL_MESSAGE` bytes
when it joins, and little lately: its owner says, ``Schedulable.small``)
waits in the *fast lane* instead, which every batch serves
first: a keystroke or an RPC reply does not wait behind a turn of every
bulk stream. The fast lane takes at most half of a batch, and a stream in
it gets one message's worth per turn before it must queue again (a stream
that keeps more queued is bulk and joins the ordinary line), so bulk
streams keep at least half of every batch.
"""

from __future__ import annotations

import collections
from typing import Protocol

#: Bytes a stream gets per turn of the round-robin scheduler.
QUANTUM = 16 * 1024
#: A stream joining with at most this much queued (and not sending fast,
#: see :data:`SMALL_RATE`) goes to the fast lane.
SMALL_MESSAGE = 4 * 1024
#: Bytes per :data:`SMALL_WINDOW_S` seconds above which a stream is bulk,
#: however small its writes (about 1.3 Mbit/s).
SMALL_RATE = 16 * 1024
SMALL_WINDOW_S = 0.1


class Schedulable(Protocol):
    """What the scheduler needs from a stream."""

    #: In the line already (set and cleared by the scheduler only).
    queued: bool

    @property
    def aborted(self) -> bool: ...

    @property
    def has_output(self) -> bool: ...

    @property
    def small(self) -> bool:
        """What it has queued is one small message, and it sends little
        (:data:`SMALL_MESSAGE`, :data:`SMALL_RATE`)."""
        ...

    def take(self, limit: int) -> int:
        """Move up to ``limit`` queued bytes into HTTP/2; return how many."""
        ...


class RoundRobin:
    """The line of streams with output waiting."""

    def __init__(self) -> None:
        self._line: collections.deque[Schedulable] = collections.deque()
        self._fast: collections.deque[Schedulable] = collections.deque()
        #: Turns served from the fast lane (for tests and metrics).
        self.fast_turns = 0

    @property
    def ready(self) -> bool:
        """Some stream has output waiting."""
        return bool(self._line) or bool(self._fast)

    def schedule(self, stream: Schedulable) -> None:
        """Put ``stream`` in a line (once): the fast lane when what it has
        queued is one small message, else the round robin."""
        if not stream.queued:
            stream.queued = True
            if stream.small:
                self._fast.append(stream)
            else:
                self._line.append(stream)

    def fill(self, budget: int) -> None:
        """Move queued stream data into HTTP/2: the fast lane first (at most
        half the budget when bulk waits too), then QUANTUM per stream per
        turn, until ``budget`` bytes or nothing more can go."""
        if self._fast:
            budget -= self._fill_fast(budget // 2 if self._line else budget)
        line = self._line
        while line and budget > 0:
            stream = line.popleft()
            if stream.aborted:
                stream.queued = False
                continue
            # Alone, a stream may fill the whole batch; with company, quanta.
            sent = stream.take(min(QUANTUM, budget) if line else budget)
            budget -= sent
            if stream.has_output and sent > 0:
                line.append(stream)  # more to send: back of the line
            else:
                # Drained, or blocked on window: the owner schedules it
                # again when the window opens.
                stream.queued = False

    def _fill_fast(self, budget: int) -> int:
        """One turn per fast-lane stream, up to ``budget`` bytes; what is left
        of a stream (more than one message after all) joins the round robin."""
        fast, spent = self._fast, 0
        while fast and spent < budget:
            stream = fast.popleft()
            if stream.aborted:
                stream.queued = False
                continue
            self.fast_turns += 1
            sent = stream.take(min(SMALL_MESSAGE, budget - spent))
            spent += sent
            if stream.has_output and sent > 0:
                self._line.append(stream)
            else:
                stream.queued = False
        return spent
