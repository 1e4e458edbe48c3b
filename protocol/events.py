"""The events :class:`protocol.session.TunnelSession` hands its owner.

Like h11's and h2's, they are plain values: the session returns them from
``receive_data`` and never calls back. Rejections are events too
(:class:`ControlRejected`), not exceptions: only a broken rule raises.
"""

from __future__ import annotations

import attrs

from protocol import messages


@attrs.frozen
class ControlRequested:
    """Broker: an agent opened the control stream. Accept or reject it."""

    stream_id: int
    headers: dict[str, str]


@attrs.frozen
class ControlAccepted:
    """Agent: the broker accepted the control stream."""

    headers: dict[str, str]


@attrs.frozen
class ControlRejected:
    """Agent: the broker answered the control stream with an error status.

    ``reason_token`` is the broker's stable refusal token
    (:class:`protocol.handshake.Refusal`; empty from a broker that sends
    none); ``message`` the human-readable text.
    """

    status: int
    reason_token: str
    message: str
    #: The broker's retry hint (``tether-retry-after``) in seconds; None without one.
    retry_after: float | None = None


@attrs.frozen
class MessageReceived:
    message: messages.Message


@attrs.frozen
class DataStreamRequested:
    """Broker: the agent opened a data stream for ``dial_id``."""

    stream_id: int
    dial_id: int


@attrs.frozen
class DataStreamAccepted:
    """Agent: the broker paired the data stream with its dial."""

    stream_id: int


@attrs.frozen
class StreamData:
    stream_id: int
    data: bytes
    #: Credit to hand back through :meth:`protocol.session.TunnelSession.acknowledge`.
    flow_len: int


@attrs.frozen
class StreamClosed:
    """The peer sent a ``close`` map: an error close, with its reason."""

    stream_id: int
    close: messages.Close


@attrs.frozen
class StreamEnded:
    """The peer half-closed its direction (END_STREAM, a TCP FIN)."""

    stream_id: int


@attrs.frozen
class StreamReset:
    """The stream was aborted, by the peer (``remote``) or by the session."""

    stream_id: int
    error_code: int
    remote: bool
    reason: str = ""


@attrs.frozen
class WindowOpened:
    """Send credit may have grown; ``stream_id`` None means every stream."""

    stream_id: int | None


@attrs.frozen
class PingAcked:
    payload: bytes


@attrs.frozen
class ConnectionClosed:
    """GOAWAY received, or the control stream ended or was reset: the
    session is over."""

    error_code: int
    reason: str
    #: True for a GOAWAY; False when the control stream ended or was reset.
    goaway: bool = True


Event = (
    ControlRequested
    | ControlAccepted
    | ControlRejected
    | MessageReceived
    | DataStreamRequested
    | DataStreamAccepted
    | StreamData
    | StreamClosed
    | StreamEnded
    | StreamReset
    | WindowOpened
    | PingAcked
    | ConnectionClosed
)
