"""One keepalive timer for every connection of a trio run.

A thin adapter over :class:`protocol.keepalive.TimerHeap`: the first
connection that asks for a deadline starts one system task per trio run,
which sleeps until the earliest deadline of all connections and calls each
connection that is due. 10,000 idle connections then cost one sleeping task
and a heap entry each, instead of a task and a cancel scope each. The task
wakes :data:`protocol.keepalive.TIMER_SLACK` after the earliest deadline,
so the deadlines that fall close together are served by one wake-up.
"""

from __future__ import annotations

import logging
from typing import Protocol

import trio

from protocol.keepalive import TIMER_SLACK, TimerHeap

log = logging.getLogger(__name__)


class Due(Protocol):
    """A connection with a keepalive deadline."""

    def keepalive_due(self, now: float) -> None:
        """Its deadline came: act, and schedule the next one."""


#: The slack of the timer task :func:`timers` starts. A benchmark that
#: simulates many agents in one process sets 0: in a real fleet each agent
#: has its own timer, so their PINGs never leave together.
SLACK = TIMER_SLACK


class KeepaliveTimers:
    def __init__(self, slack: float = TIMER_SLACK) -> None:
        self.slack = slack
        self.heap: TimerHeap[Due] = TimerHeap()
        self._scope: trio.CancelScope | None = None
        self.wakeups = 0  # for tests and benchmarks: timer task wake-ups

    def schedule(self, target: Due, at: float) -> None:
        if self.heap.schedule(target, at) and self._scope is not None:
            self._scope.deadline = min(self._scope.deadline, at + self.slack)

    def discard(self, target: Due) -> None:
        self.heap.discard(target)

    async def run(self) -> None:
        while True:
            with trio.CancelScope(deadline=self.heap.wake_at(self.slack)) as self._scope:
                await trio.sleep_forever()
            self._scope = None
            self.wakeups += 1
            now = trio.current_time()
            for target in self.heap.pop_due(now):
                try:
                    target.keepalive_due(now)
                except Exception:  # one connection's bug must not stop every keepalive
                    log.exception("keepalive of %r failed", target)


_TIMERS: trio.lowlevel.RunVar[KeepaliveTimers] = trio.lowlevel.RunVar("tether_keepalive")


def timers() -> KeepaliveTimers:
    """This trio run's keepalive timers (started on first use)."""
    try:
        return _TIMERS.get()
    except LookupError:
        pass
    found = KeepaliveTimers(SLACK)
    _TIMERS.set(found)
    trio.lowlevel.spawn_system_task(found.run, name="tether keepalive timers")
    return found
