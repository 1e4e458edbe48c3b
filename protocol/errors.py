"""The one exception family raised by the sans-IO protocol layer.

Every decoder and state machine in :mod:`protocol` raises only subclasses of
:class:`ProtocolError`, whatever bytes it is fed. Callers at the I/O boundary
catch ``ProtocolError`` and turn it into a stream reset, a connection close, a
status code or a gRPC status, plus a log line and a metric.

Wire error codes (what goes into a ``dial_fail`` or ``close`` message) live in
:mod:`protocol.codes`, apart from these Python exceptions.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class: the peer sent something this implementation cannot accept.

    ``reason`` is a short stable token suitable as a metric label.
    """

    reason: str = "protocol_error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class MalformedMessage(ProtocolError):
    """Bytes that do not decode as the expected message or frame."""

    reason = "malformed"


class MessageTooLarge(ProtocolError):
    """A message or frame exceeds its configured size limit."""

    reason = "too_large"


class InvalidMessage(ProtocolError):
    """A message decoded, but a field has the wrong type or an invalid value."""

    reason = "invalid"


class SessionError(ProtocolError):
    """The peer broke the tunnel session rules (wrong stream, wrong order)."""

    reason = "session"


class HandshakeRejected(ProtocolError):
    """The control stream was answered with a non-200 status."""

    reason = "rejected"

    def __init__(self, status: int, error: str, refusal: str = "") -> None:
        super().__init__(f"broker rejected the connection: {status} {error}")
        self.status = status
        self.error = error
        #: The broker's refusal token (protocol/handshake.py); "" from older brokers.
        self.refusal = refusal
