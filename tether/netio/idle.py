"""One task that watches every idle agent connection of a trio run.

A broker with 10,000 agents connected spends its idle time answering their
keepalive PINGs: about 670 a second at the default 15 s interval. Answered
by each connection's own reader task, every PING costs a trio task switch,
a re-registration of the socket with trio's epoll, and the reader's and the
TLS stream's async layers around a few dozen bytes.

A connection whose last read was a lone PING is *parked* instead
(:meth:`IdlePoller.park`, from :class:`tether.netio.h2driver.H2Driver`'s
reader): its socket goes into one epoll set of this module, level-triggered,
registered once, and its reader task sleeps. The poller task waits for that
set and, for each socket that became readable, calls the connection's
``on_readable`` synchronously: a PING is read, decrypted, answered and
written there and then, and the connection stays parked; anything else (a
frame that is not one PING, EOF, an error, a flood budget spent, a socket
that is busy writing) is kept for the reader, which is woken and goes on as
if it had read it itself. Parking changes no bytes and no order: it only
moves who reads while nothing but PINGs arrive.

Only on Linux (``select.epoll``); elsewhere :func:`poller` is None and
readers never park.
"""

from __future__ import annotations

import logging
import select
from collections.abc import Callable

import trio

log = logging.getLogger(__name__)

#: Ready sockets handled per poll.
BATCH = 256

#: ``on_readable()``: True to stay parked, False to wake the reader.
OnReadable = Callable[[], bool]


class Totals:
    """The process's idle pollers together (metrics: every trio run of the
    process, in practice one)."""

    def __init__(self) -> None:
        #: Connections parked now.
        self.parked = 0
        #: Reads the pollers handled without waking a reader (PINGs answered).
        self.answered = 0
        #: Readers woken because their socket brought more than a PING.
        self.woken = 0


TOTALS = Totals()


class IdlePoller:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        #: Parked sockets by file descriptor: the callback and the reader's wake-up.
        self._parked: dict[int, tuple[OnReadable, trio.Event]] = {}

    async def park(self, fd: int, on_readable: OnReadable) -> None:
        """Sleep until ``on_readable`` returns False (or the caller is
        cancelled); meanwhile the poller calls it whenever ``fd`` is
        readable. Returns at once if ``fd`` cannot be watched."""
        woken = trio.Event()
        try:
            self._epoll.register(fd, select.EPOLLIN)
        except (OSError, ValueError):  # not a socket, or the poller is gone
            await trio.lowlevel.checkpoint()
            return
        self._parked[fd] = (on_readable, woken)
        TOTALS.parked += 1
        try:
            await woken.wait()
        finally:
            self._release(fd)

    def _release(self, fd: int) -> trio.Event | None:
        entry = self._parked.pop(fd, None)
        if entry is None:
            return None
        TOTALS.parked -= 1
        try:
            self._epoll.unregister(fd)
        except OSError:  # pragma: no cover - the fd is open while parked
            pass
        return entry[1]

    async def run(self) -> None:
        try:
            while True:
                await trio.lowlevel.wait_readable(self._epoll)
                for fd, _ in self._epoll.poll(0, BATCH):
                    entry = self._parked.get(fd)
                    if entry is None:
                        continue
                    try:
                        stay = entry[0]()
                    except Exception:  # one connection's bug must not stop the others
                        log.exception("idle read of fd %d failed", fd)
                        stay = False
                    if stay:
                        TOTALS.answered += 1
                        continue
                    woken = self._release(fd)
                    if woken is not None:
                        TOTALS.woken += 1
                        woken.set()
        finally:
            # Never leave a reader asleep with nobody watching its socket.
            for fd in list(self._parked):
                woken = self._release(fd)
                if woken is not None:
                    woken.set()
            self._epoll.close()


_POLLER: trio.lowlevel.RunVar[IdlePoller | None] = trio.lowlevel.RunVar("tether_idle_poller")


def poller() -> IdlePoller | None:
    """This trio run's idle poller (started on first use); None where
    ``select.epoll`` does not exist."""
    try:
        return _POLLER.get()
    except LookupError:
        pass
    found = IdlePoller() if hasattr(select, "epoll") else None
    _POLLER.set(found)
    if found is not None:
        trio.lowlevel.spawn_system_task(found.run, name="tether idle poller")
    return found
