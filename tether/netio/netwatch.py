"""Local address and route changes, for the agent's mobility watch.

A ``NETLINK_ROUTE`` socket subscribed to the IPv4/IPv6 address and route
groups hands every change to the owner as it happens (parsed by
:mod:`protocol.netlink`). Where netlink cannot be opened (not Linux, a
sandbox without it) the owner is called every ``poll_interval`` seconds
with no changes, and checks for itself with :func:`address_present` and
:func:`route_source`, each a single cheap syscall on a UDP socket that
sends nothing.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable

import trio

from protocol import netlink

log = logging.getLogger("tether.netwatch")

#: How one ``recv`` may be at most (a burst of changes fits many times over).
_RECV_SIZE = 64 * 1024


def open_netlink() -> socket.socket | None:
    """A non-blocking ``NETLINK_ROUTE`` socket on the address and route
    groups; None (with the reason logged) where that is not possible."""
    family = getattr(socket, "AF_NETLINK", None)
    if family is None:
        log.info("no netlink on this system: polling for address changes")
        return None
    try:
        sock = socket.socket(family, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)  # NETLINK_ROUTE
    except OSError as exc:
        log.info("netlink unavailable (%s): polling for address changes", exc.strerror or exc)
        return None
    try:
        sock.bind((0, netlink.GROUPS))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        log.info("netlink unavailable (%s): polling for address changes", exc.strerror or exc)
        return None
    return sock


async def watch(
    on_changes: Callable[[list[netlink.Change] | None], None],
    *,
    poll_interval: float,
    on_error: Callable[[str], None] | None = None,
    use_netlink: bool = True,
    task_status: trio.TaskStatus[bool] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Call ``on_changes`` with each datagram's changes, or with None when the
    owner must check for itself (polling, a lost or broken message). Reports
    through ``task_status`` whether netlink is in use. Runs until cancelled."""
    raw = open_netlink() if use_netlink else None
    if raw is None:
        task_status.started(False)
        while True:
            await trio.sleep(poll_interval)
            on_changes(None)
    sock = trio.socket.from_stdlib_socket(raw)
    with sock:
        task_status.started(True)
        while True:
            try:
                data = await sock.recv(_RECV_SIZE)
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                # The kernel dropped messages (a burst overran the buffer).
                if on_error is not None:
                    on_error("netlink_overrun")
                on_changes(None)
                continue
            try:
                changes = netlink.parse(data)
            except netlink.NetlinkError as exc:
                log.warning("unreadable netlink message (%s); checking addresses directly", exc)
                if on_error is not None:
                    on_error(exc.reason)
                on_changes(None)
                continue
            if changes:
                on_changes(changes)


def route_source(address: str) -> str | None:
    """The local address the kernel would use to reach ``address`` now;
    None when there is no route. A UDP ``connect`` sends nothing."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect((address, 9))
            return str(s.getsockname()[0])
        except OSError:
            return None


def address_present(address: str) -> bool:
    """Whether ``address`` is still one of this host's addresses."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.bind((address, 0))
        except OSError as exc:
            return exc.errno != errno.EADDRNOTAVAIL
    return True
