"""systemd's service notification protocol, without libsystemd.

A ``Type=notify`` unit learns about the service through datagrams sent to
the AF_UNIX socket named in ``$NOTIFY_SOCKET``: ``READY=1``, ``STATUS=…``,
``STOPPING=1`` and watchdog keep-alives (``WATCHDOG=1``). Outside systemd
the variable is unset and every call here is a no-op.

The watchdog ping runs as a trio task in the agent's own event loop. A
sleeping task that wakes up on time is itself the proof that the loop
schedules: if anything blocks the loop (a synchronous call, a livelock in a
task that never checkpoints), the pings stop and systemd kills and restarts
the agent. A ping from a helper thread would keep a wedged agent alive, so
there deliberately is none.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import socket
import sys
from collections.abc import Mapping

import trio

log = logging.getLogger("tether.agent")


def _socket_address(value: str) -> str | bytes | None:
    """The ``sendto`` address for a ``$NOTIFY_SOCKET`` value, or None."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        # Linux abstract namespace: a leading NUL, no terminator.
        return b"\0" + value[1:].encode()
    return None


class Notifier:
    """Sends notifications to the service manager, if there is one.

    Sending never blocks and never raises: the socket is non-blocking, and a
    full or vanished receiver loses the message (logged at debug level). A
    new socket per message, like libsystemd's ``sd_notify``, keeps no file
    descriptor open between messages.
    """

    def __init__(self, notify_socket: str | None) -> None:
        self.notify_socket = notify_socket or None
        self._address = _socket_address(notify_socket) if notify_socket else None
        if notify_socket and self._address is None:
            log.warning(
                "NOTIFY_SOCKET=%r is not a path or an abstract name; ignored", notify_socket
            )

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines as one datagram; True if it was sent."""
        if self._address is None or not assignments:
            return False
        payload = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.sendto(payload, self._address)
        except OSError as exc:
            log.debug("sd_notify %r not delivered: %s", assignments, exc)
            return False
        return True

    def ready(self) -> bool:
        return self.notify("READY=1")

    def status(self, text: str) -> bool:
        # One line: a newline would start a new assignment.
        return self.notify("STATUS=" + " ".join(text.split()))

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")


def watchdog_timeout(environ: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout in seconds that systemd asks for, or None.

    Like ``sd_watchdog_enabled``: ``WATCHDOG_USEC`` must be a positive
    integer, and ``WATCHDOG_PID``, when set, must be this process (a child
    that inherited the variables must not ping on its parent's behalf).
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid is not None and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000


async def watchdog_loop(notifier: Notifier, interval: float) -> None:
    """Ping every ``interval`` seconds for as long as the event loop runs."""
    while True:
        notifier.watchdog()
        await trio.sleep(interval)


async def run_watchdog(notifier: Notifier, environ: Mapping[str, str] | None = None) -> None:
    """Keep systemd's watchdog fed from this trio loop, if it asked for one.

    Pings go out at half the timeout, as ``sd_watchdog_enabled(3)``
    recommends. When the watchdog does fire, systemd sends SIGABRT (unless
    the unit sets ``WatchdogSignal=``); faulthandler then writes every
    thread's Python stack to stderr, so the journal shows where the loop was
    stuck.
    """
    timeout = watchdog_timeout(environ)
    if timeout is None or not notifier.enabled:
        return
    if not faulthandler.is_enabled():
        try:
            faulthandler.enable(file=sys.stderr, all_threads=True)
        except (RuntimeError, ValueError, OSError) as exc:  # stderr has no usable fd
            log.debug("faulthandler not enabled: %s", exc)
    log.debug("systemd watchdog: timeout %.1fs, ping every %.1fs", timeout, timeout / 2)
    await watchdog_loop(notifier, timeout / 2)
