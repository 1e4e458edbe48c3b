"""The stream scheduler: queued payload into HTTP/2, round robin.

Each stream with queued output waits in one line; the writer asks for up to
one write batch at a time (:meth:`RoundRobin.fill`) and every stream in the
line gets :data:`QUANTUM` bytes per turn, so a bulk stream can neither
starve an interactive one nor queue megabytes ahead of it. A stream alone
in the line may fill the whole batch.
"""

from __future__ import annotations

import collections
from typing import Protocol

#: Bytes a stream gets per turn of the round-robin scheduler.
QUANTUM = 16 * 1024


class Schedulable(Protocol):
    """What the scheduler needs from a stream."""

    #: In the line already (set and cleared by the scheduler only).
    queued: bool

    @property
    def aborted(self) -> bool: ...

    @property
    def has_output(self) -> bool: ...

    def take(self, limit: int) -> int:
        """Move up to ``limit`` queued bytes into HTTP/2; return how many."""
        ...


class RoundRobin:
    """The line of streams with output waiting."""

    def __init__(self) -> None:
        self._line: collections.deque[Schedulable] = collections.deque()

    @property
    def ready(self) -> bool:
        """Some stream has output waiting."""
        return bool(self._line)

    def schedule(self, stream: Schedulable) -> None:
        """Put ``stream`` in the line (once)."""
        if not stream.queued:
            stream.queued = True
            self._line.append(stream)

    def fill(self, budget: int) -> None:
        """Move queued stream data into HTTP/2: QUANTUM per stream per turn,
        until ``budget`` bytes or nothing more can go."""
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
