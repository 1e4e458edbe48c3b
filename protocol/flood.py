"""Limits on HTTP/2 frames that are cheap to send and cost the receiver work.

A peer can make an HTTP/2 server work, or answer, for free:

- HEADERS then RST_STREAM at once, over and over (CVE-2023-44487, "rapid
  reset"); likewise requests the server must refuse (unknown dial id,
  unknown path), each one a lookup, a log line and an RST_STREAM;
- PING and SETTINGS frames, each of which must be acknowledged
  (CVE-2019-9512, CVE-2019-9515);
- frames that make the server answer while the peer never reads the answers
  (CVE-2019-9514 and the above), so that they pile up in memory.

:class:`FloodGuard` keeps one token bucket per kind of frame and connection.
A legitimate peer never comes near the limits; a peer that empties a bucket
is told GOAWAY(ENHANCE_YOUR_CALM) and dropped, with a metric. The clock is
passed in, so this stays sans-IO and testable with any clock.
"""

from __future__ import annotations

import attrs

from protocol.errors import ProtocolError


class FloodDetected(ProtocolError):
    """The peer exceeded a frame budget; ``reason`` names which one."""

    reason = "flood"


@attrs.frozen
class Budget:
    """A token bucket: ``burst`` at once, refilled at ``rate`` per second."""

    rate: float
    burst: float


@attrs.frozen
class FloodLimits:
    #: Streams the peer reset, or that we refused (rapid reset, unknown ids).
    resets: Budget = Budget(rate=1000.0, burst=5000.0)
    #: PINGs we must acknowledge. Keepalive sends one per 15 s; gRPC clients
    #: probe bandwidth with a few per second at most while data flows.
    pings: Budget = Budget(rate=200.0, burst=1000.0)
    #: SETTINGS frames we must acknowledge; peers send one or two per connection.
    settings: Budget = Budget(rate=10.0, burst=100.0)
    #: Bytes of automatic replies (ACKs, RST_STREAMs) queued while the peer
    #: does not read what we already sent.
    max_unread_replies: int = 1024 * 1024


class FloodGuard:
    """Per-connection budgets; :meth:`spend` says when one is exhausted."""

    KINDS = ("resets", "pings", "settings")

    def __init__(self, limits: FloodLimits, now: float) -> None:
        self.limits = limits
        self._tokens = {kind: self._budget(kind).burst for kind in self.KINDS}
        self._stamp = dict.fromkeys(self.KINDS, now)
        #: The first budget exhausted, if any (a FloodDetected ``reason``).
        self.exhausted: str | None = None

    def _budget(self, kind: str) -> Budget:
        budget: Budget = getattr(self.limits, kind)
        return budget

    def spend(self, kind: str, now: float, n: int = 1) -> bool:
        """Take ``n`` tokens of ``kind``; False (and remembered) once empty."""
        budget = self._budget(kind)
        elapsed = max(0.0, now - self._stamp[kind])
        self._stamp[kind] = now
        tokens = min(budget.burst, self._tokens[kind] + elapsed * budget.rate) - n
        self._tokens[kind] = tokens
        if tokens < 0:
            self.exhausted = self.exhausted or f"flood_{kind}"
            return False
        return True

    def check(self) -> None:
        """Raise :class:`FloodDetected` if any budget ran out."""
        if self.exhausted is not None:
            raise FloodDetected(
                f"peer exceeded its {self.exhausted[6:]} budget", reason=self.exhausted
            )


class FrameSizeGuard:
    """Rejects an oversized HTTP/2 frame as soon as its 9-byte header arrives.

    h2 checks a frame's length only once the whole frame is buffered, so a
    header claiming 16 MiB makes it buffer up to 16 MiB first. This watches
    the byte stream ahead of h2 and raises at the header instead.
    """

    def __init__(self, max_frame_size: int, *, preface: int = 0) -> None:
        self.max_frame_size = max_frame_size
        self._skip = preface  # bytes before the next frame header
        self._header = bytearray()

    def check(self, data: bytes) -> list[int]:
        """Raise :class:`FrameTooLarge` if ``data`` starts an oversized frame.

        Returns the offsets in ``data`` just past each HEADERS frame header
        (where a new stream may open), so a burst can be fed to h2 in parts.
        """
        view = memoryview(data)
        headers: list[int] = []
        while view:
            if self._skip:
                n = min(self._skip, len(view))
                self._skip -= n
                view = view[n:]
                continue
            need = 9 - len(self._header)
            self._header += view[:need]
            view = view[need:]
            if len(self._header) == 9:
                length = int.from_bytes(self._header[:3], "big")
                if length > self.max_frame_size:
                    raise FrameTooLarge(
                        f"Received overlong frame: length {length}, max {self.max_frame_size}"
                    )
                if self._header[3] == 0x1:  # HEADERS
                    headers.append(len(data) - len(view))
                self._skip = length
                self._header.clear()
        return headers


class FrameTooLarge(ProtocolError):
    """A frame header announced more than our MAX_FRAME_SIZE."""

    reason = "h2"


def unsent_bytes(conn: object) -> int:
    """Bytes an ``h2.connection.H2Connection`` holds for the transport.

    h2 has no public way to ask without taking them; its output buffer has
    been ``_data_to_send`` since h2 2.x.
    """
    buf = getattr(conn, "_data_to_send", b"")
    return len(buf)
