"""TCP options for the agent-to-broker connection (Linux).

- ``TCP_USER_TIMEOUT`` and TCP keepalive make the kernel give up on a dead
  link on its own, even when the tunnel is busy and HTTP/2 PINGs are stuck
  behind unacknowledged data.
- ``TCP_CONGESTION`` picks the congestion control; BBR copes with random
  loss on radio links far better than CUBIC.
- ``TCP_NOTSENT_LOWAT`` keeps the unsent part of the kernel's send queue
  small, so bulk data waits in our scheduler, where an interactive stream can
  overtake it, rather than in the kernel, where it cannot.

Every option is best effort: a platform without one keeps working.
"""

from __future__ import annotations

import fcntl
import logging
import socket
import struct
import termios
from pathlib import Path

import attrs

log = logging.getLogger(__name__)

TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)
TCP_CONGESTION = getattr(socket, "TCP_CONGESTION", 13)
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)


@attrs.frozen
class TunnelSocketOptions:
    #: Seconds of unacknowledged data before the kernel drops the connection.
    user_timeout: float | None = None
    #: Idle seconds before TCP keepalive probes start (None: no keepalive).
    keepalive_idle: float | None = None
    keepalive_interval: float = 5.0
    keepalive_count: int = 3
    #: Congestion control name (e.g. "bbr"); None keeps the system default.
    congestion: str | None = None
    notsent_lowat: int | None = None


def available_congestion_controls() -> list[str]:
    try:
        return Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split()
    except OSError:
        return []


def apply(sock: socket.socket, opts: TunnelSocketOptions) -> None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    tcp = socket.IPPROTO_TCP
    _set(sock, tcp, socket.TCP_NODELAY, 1, "TCP_NODELAY")
    if opts.user_timeout:
        _set(sock, tcp, TCP_USER_TIMEOUT, int(opts.user_timeout * 1000), "TCP_USER_TIMEOUT")
    if opts.keepalive_idle:
        _set(sock, socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1, "SO_KEEPALIVE")
        _set(
            sock,
            tcp,
            getattr(socket, "TCP_KEEPIDLE", 4),
            max(1, int(opts.keepalive_idle)),
            "TCP_KEEPIDLE",
        )
        _set(
            sock,
            tcp,
            getattr(socket, "TCP_KEEPINTVL", 5),
            max(1, int(opts.keepalive_interval)),
            "TCP_KEEPINTVL",
        )
        _set(sock, tcp, getattr(socket, "TCP_KEEPCNT", 6), opts.keepalive_count, "TCP_KEEPCNT")
    if opts.congestion:
        try:
            sock.setsockopt(tcp, TCP_CONGESTION, opts.congestion.encode())
        except OSError as exc:
            log.warning(
                "congestion control %r unavailable (%s); available: %s",
                opts.congestion,
                exc.strerror,
                " ".join(available_congestion_controls()) or "unknown",
            )
    if opts.notsent_lowat:
        _set(sock, tcp, TCP_NOTSENT_LOWAT, opts.notsent_lowat, "TCP_NOTSENT_LOWAT")


def _set(sock: socket.socket, level: int, opt: int, value: int, name: str) -> None:
    try:
        sock.setsockopt(level, opt, value)
    except OSError as exc:
        log.debug("%s not set: %s", name, exc)


def _raw_socket(stream: object) -> socket.socket | None:
    raw = getattr(stream, "socket", None)
    for attr in ("transport_stream", "transport"):
        if raw is None:
            raw = getattr(getattr(stream, attr, None), "socket", None)
    if raw is None or raw.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return raw  # type: ignore[no-any-return]


def unacked_bytes(stream: object) -> int:
    """Bytes in the kernel's send queue not yet acknowledged by the peer
    (SIOCOUTQ); 0 when unknown."""
    raw = _raw_socket(stream)
    if raw is None:
        return 0
    try:
        return int(struct.unpack("i", fcntl.ioctl(raw.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0])
    except (OSError, ValueError):
        return 0


#: ioctl: bytes in the send queue not yet sent (linux/sockios.h).
SIOCOUTQNSD = 0x894B


def unsent_bytes(stream: object) -> int:
    """Bytes in the kernel's send queue not yet sent (SIOCOUTQNSD); -1 when
    unknown (not a TCP socket, or a kernel without the ioctl)."""
    raw = _raw_socket(stream)
    if raw is None:
        return -1
    try:
        return int(struct.unpack("i", fcntl.ioctl(raw.fileno(), SIOCOUTQNSD, b"\0" * 4))[0])
    except (OSError, ValueError):
        return -1


def set_linger_zero(stream: object) -> None:
    """Turn the close of ``stream`` (a socket stream, or a TLS stream over
    one) into a TCP RST, so the far end sees an abort as one and the kernel
    keeps no orphaned socket with unsent data for a peer that does not read."""
    raw = _raw_socket(stream)
    if raw is None:
        return
    try:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
