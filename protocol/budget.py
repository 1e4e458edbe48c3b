"""A per-process budget for buffered tunnel data, sans-IO.

Flow control bounds what one tunneled connection buffers (its stream window
on the receiving side, its outbox on the sending side); this module bounds
their sum over every tunnel of the process, so that tunnels x windows never
exceeds a fixed figure (``--max-buffered-bytes``) however many clients stop
reading.

Each data stream holds one :class:`Grant` from the process's
:class:`BufferBudget` from before its dial is sent (broker) or served
(agent) until it ends. A grant names the stream's receive window and the
outbox it may queue, and costs their sum. Below the high-water mark a new
stream gets the full window; above it, the floor; when not even the floor
fits, there is no grant and the dial is refused (``busy``). Streams already
open keep their grants, so they keep moving.

Windows may later grow (toward a link's bandwidth-delay product) only
through :meth:`BufferBudget.grow`, which says whether the budget allows it.
"""

from __future__ import annotations

import attrs

#: Most payload a stream queues for the scheduler (its outbox), at full window.
OUTBOX_LIMIT = 256 * 1024
#: The smallest window a stream is given (HTTP/2's initial window is 64 KiB - 1).
MIN_WINDOW = 64 * 1024
#: Default budgets: the agent's fits the ``MemoryMax=128M`` of its systemd
#: unit (it idles near 30 MiB); the broker serves many agents.
AGENT_DEFAULT = 64 * 1024 * 1024
BROKER_DEFAULT = 256 * 1024 * 1024


def outbox_limit(window: int) -> int:
    """Payload a stream with this receive window may queue to send: a quarter
    of the window, at most :data:`OUTBOX_LIMIT` (the peer's window bounds it
    again when sending)."""
    return max(1, min(OUTBOX_LIMIT, window // 4))


def stream_cost(window: int) -> int:
    """Bytes one stream may hold buffered in this process: its receive window
    plus its outbox."""
    return window + outbox_limit(window)


@attrs.define(eq=False)
class Grant:
    """One stream's share of the budget. Release it exactly once."""

    window: int
    cost: int
    released: bool = False


@attrs.define(eq=False)
class BufferBudget:
    """Reservations of buffered tunnel data in one process.

    ``limit``: the budget in bytes. ``high_water``: above it, new streams get
    ``min_window`` instead of ``window`` (default: half the limit).
    Invariant: ``0 <= reserved <= limit``; every stream's cost is counted
    from :meth:`open` until :meth:`release`.
    """

    limit: int
    window: int = 1024 * 1024
    min_window: int = MIN_WINDOW
    high_water: int = -1
    reserved: int = 0
    streams: int = 0
    #: Streams opened with the floor window, and opens refused (for metrics).
    shrunk_total: int = 0
    refused_total: int = 0
    #: Window growths granted, refused (past the high-water mark), and
    #: windows shrunk back (for metrics; see protocol/tuner.py).
    grown_total: int = 0
    growth_refused_total: int = 0
    window_shrunk_total: int = 0
    #: The last :meth:`open` was refused (callers log the change, not each refusal).
    exhausted: bool = False

    def __attrs_post_init__(self) -> None:
        if not 0 < self.min_window <= self.window:
            raise ValueError("min_window must be between 1 and window")
        if self.limit < stream_cost(self.min_window):
            raise ValueError(
                f"the budget must hold at least one stream at the floor window "
                f"({stream_cost(self.min_window)} bytes)"
            )
        if self.high_water < 0:
            self.high_water = self.limit // 2
        self.high_water = min(self.high_water, self.limit)

    @property
    def available(self) -> int:
        return self.limit - self.reserved

    def open(self) -> Grant | None:
        """A grant for a new stream, or None: the budget is exhausted (busy)."""
        window = self.window
        if self.reserved + stream_cost(window) > self.high_water:
            window = self.min_window
        cost = stream_cost(window)
        if cost > self.available:
            self.refused_total += 1
            self.exhausted = True
            return None
        self.exhausted = False
        if window < self.window:
            self.shrunk_total += 1
        self.reserved += cost
        self.streams += 1
        return Grant(window, cost)

    def may_grow(self, grant: Grant, n: int) -> bool:
        """Whether ``grant``'s window may grow by ``n`` bytes now."""
        if grant.released or n <= 0:
            return False
        added = stream_cost(grant.window + n) - grant.cost
        return self.reserved + added <= self.high_water

    def grow(self, grant: Grant, n: int) -> bool:
        """Grow ``grant``'s window by ``n`` if :meth:`may_grow`; say whether it did."""
        if not self.may_grow(grant, n):
            if not grant.released and n > 0:
                self.growth_refused_total += 1
            return False
        self.grown_total += 1
        cost = stream_cost(grant.window + n)
        self.reserved += cost - grant.cost
        grant.window += n
        grant.cost = cost
        return True

    def shrink(self, grant: Grant, n: int) -> None:
        """Give back ``n`` bytes of ``grant``'s window (never below the floor)."""
        if grant.released:
            return
        window = max(self.min_window, grant.window - max(0, n))
        self.window_shrunk_total += window < grant.window
        cost = stream_cost(window)
        self.reserved -= grant.cost - cost
        grant.window, grant.cost = window, cost

    def release(self, grant: Grant) -> None:
        """The stream ended: return its share. A second call does nothing."""
        if grant.released:
            return
        grant.released = True
        self.reserved -= grant.cost
        self.streams -= 1
        assert self.reserved >= 0 and self.streams >= 0

    def describe(self) -> str:
        return f"{self.reserved} of {self.limit} bytes reserved by {self.streams} tunnel(s)"
