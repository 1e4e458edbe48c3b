"""TCP options for the agent-to-broker connection (Linux).

- ``TCP_USER_TIMEOUT`` and TCP keepalive make the kernel give up on a dead
  link on its own, even when the tunnel is busy and HTTP/2 PINGs are stuck
  behind unacknowledged data.
- ``TCP_CONGESTION`` picks the congestion control; BBR copes with random
  loss on radio links far better than CUBIC.
- ``TCP_NOTSENT_LOWAT`` keeps the unsent part of the kernel's send queue
  small, so bulk data waits in our scheduler, where an interactive stream can
  overtake it, rather than in the kernel, where it cannot. By default it is
  set, and kept up to date, from the link's estimate
  (:meth:`protocol.tuner.LinkEstimate.notsent_lowat`, :func:`set_notsent_lowat`).
- :func:`tcp_info` reads the kernel's RTT and delivery rate for the window
  tuner (:mod:`protocol.tuner`).

Every option is best effort: a platform without one keeps working.
"""

from __future__ import annotations

import fcntl
import logging
import socket
import struct
import termios
from collections.abc import Callable
from pathlib import Path

import attrs

log = logging.getLogger(__name__)

TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)
TCP_CONGESTION = getattr(socket, "TCP_CONGESTION", 13)
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
TCP_INFO = getattr(socket, "TCP_INFO", 11)


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
    #: Fixed TCP_NOTSENT_LOWAT in bytes; None: automatic (the connection sets
    #: it from the link's estimate); 0 or less: not set at all.
    notsent_lowat: int | None = None

    @property
    def auto_notsent_lowat(self) -> bool:
        return self.notsent_lowat is None


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
    if opts.notsent_lowat is not None and opts.notsent_lowat > 0:
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


#: tcpi_state values (include/net/tcp_states.h) of a connection the peer
#: has closed (FIN or RST received).
_PEER_CLOSED_STATES = frozenset({7, 8, 9})  # CLOSE, CLOSE_WAIT, LAST_ACK


def peer_closed(stream: object) -> bool:
    """Whether the peer has already closed ``stream``'s TCP connection (a
    client that gave up while its connection waited in our queue); False
    when unknown."""
    state = _tcp_info_bytes(stream, 1)  # tcpi_state is the first byte
    return state is not None and len(state) == 1 and state[0] in _PEER_CLOSED_STATES


def unsent_probe(stream: object) -> Callable[[], int]:
    """A function that says how many bytes of ``stream`` the kernel has
    not sent yet (SIOCOUTQNSD; -1 when unknown: not a TCP socket, or a
    kernel without the ioctl). The socket is looked up once, for callers
    that ask on every write (its family and the wrappers around it are not
    free to walk each time). Only while the stream is open: the
    descriptor's number is kept, not the socket."""
    raw = _raw_socket(stream)
    if raw is None:
        return lambda: -1
    fd = raw.fileno()
    arg = b"\0" * 4
    ioctl, unpack = fcntl.ioctl, struct.unpack

    def probe() -> int:
        try:
            return int(unpack("i", ioctl(fd, SIOCOUTQNSD, arg))[0])
        except (OSError, ValueError):
            return -1

    return probe


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


@attrs.frozen
class TcpInfo:
    """What the window tuner reads from ``TCP_INFO``."""

    #: Smoothed and lowest round-trip time, seconds (0: not measured yet).
    rtt: float
    min_rtt: float
    #: The kernel's latest delivery-rate estimate, bytes per second (0: none).
    delivery_rate: float
    #: Bytes in the send queue not yet sent.
    notsent: int


#: Offsets in ``struct tcp_info`` (linux/tcp.h): 8 bytes of u8 fields, then
#: u32s (tcpi_rtt is the 16th), then u64s and more u32s.
_RTT_OFFSET = 8 + 15 * 4
_NOTSENT_OFFSET = 8 + 24 * 4 + 4 * 8 + 2 * 4
_MIN_RTT_OFFSET = _NOTSENT_OFFSET + 4
_DELIVERY_RATE_OFFSET = _MIN_RTT_OFFSET + 3 * 4
_TCP_INFO_LEN = _DELIVERY_RATE_OFFSET + 8


def _tcp_info_bytes(stream: object, size: int) -> bytes | None:
    """The first ``size`` bytes of ``stream``'s ``struct tcp_info``; None
    when it is not a TCP socket or the kernel refuses."""
    raw = _raw_socket(stream)
    if raw is None:
        return None
    try:
        return bytes(raw.getsockopt(socket.IPPROTO_TCP, TCP_INFO, size))
    except OSError:
        return None


def tcp_info(stream: object) -> TcpInfo | None:
    """The kernel's view of ``stream``'s TCP connection; None when unknown
    (not TCP, or a kernel too old to report a delivery rate)."""
    buf = _tcp_info_bytes(stream, 256)
    if buf is None or len(buf) < _TCP_INFO_LEN:
        return None
    (rtt_us,) = struct.unpack_from("I", buf, _RTT_OFFSET)
    notsent, min_rtt_us = struct.unpack_from("II", buf, _NOTSENT_OFFSET)
    (rate,) = struct.unpack_from("Q", buf, _DELIVERY_RATE_OFFSET)
    return TcpInfo(rtt_us / 1e6, min_rtt_us / 1e6, float(rate), notsent)


def set_notsent_lowat(stream: object, nbytes: int) -> bool:
    """Set ``TCP_NOTSENT_LOWAT`` on ``stream``'s socket; say whether it took."""
    raw = _raw_socket(stream)
    if raw is None:
        return False
    try:
        raw.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, nbytes)
    except OSError:
        return False
    return True
