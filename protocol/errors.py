"""The one exception family raised by the sans-IO protocol layer.

Every decoder and state machine in :mod:`protocol` raises only subclasses of
:class:`ProtocolError`, whatever bytes it is fed. As in h11, the family splits
in two:

- :class:`RemoteProtocolError`: the peer broke the rules (malformed bytes, a
  frame in the wrong state, a flood). Callers at the I/O boundary turn it into
  a stream reset, a connection close, a status code or a gRPC status, plus a
  log line and a metric labelled with its ``reason``.
- :class:`LocalProtocolError`: our own code misused a state machine (sent on
  a stream that is not open, asked the wrong role to act). It is a bug or a
  race on our side, never the peer's fault.

``except ProtocolError`` catches both. Every instance carries ``reason``, a
short stable token suitable as a metric label; rewording a message never
changes it.

Wire error codes (what goes into a ``dial_fail`` or ``close`` message) live in
:mod:`protocol.codes`, apart from these Python exceptions.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class of both kinds; ``reason`` is a short stable token."""

    reason: str = "protocol_error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol (wrong stream, wrong order, bad bytes)."""

    reason = "session"


class LocalProtocolError(ProtocolError):
    """Our own code used a state machine in a way its state does not allow."""

    reason = "local"


class MalformedMessage(RemoteProtocolError):
    """Bytes that do not decode as the expected message or frame."""

    reason = "malformed"


class MessageTooLarge(RemoteProtocolError):
    """A message or frame exceeds its configured size limit."""

    reason = "too_large"


class InvalidMessage(RemoteProtocolError):
    """A message decoded, but a field has the wrong type or an invalid value."""

    reason = "invalid"
