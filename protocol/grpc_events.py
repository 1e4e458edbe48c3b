"""Events of the sans-IO gRPC server (:mod:`protocol.grpc_server`).

:meth:`protocol.grpc_server.GrpcServer.receive_data` returns them in the
order the peer's bytes caused them. Every event about a call names its HTTP/2
``stream_id``.
"""

from __future__ import annotations

import attrs

from protocol.errors import RemoteProtocolError


@attrs.frozen
class CallStarted:
    """A request passed every header check; the call is open."""

    stream_id: int
    path: str
    #: Seconds from ``grpc-timeout``, or None when the client set none. The
    #: caller turns it into a deadline on its own clock.
    deadline: float | None
    #: Request headers other than the pseudo-headers.
    metadata: dict[str, str]


@attrs.frozen
class CallRefused:
    """A request the server answered itself (HTTP 405/415, trailers-only
    UNIMPLEMENTED/INTERNAL, or REFUSED_STREAM); ``reason`` is a stable token
    for metrics: ``http_405``, ``http_415``, ``unknown_method``,
    ``grpc_encoding``, ``grpc_timeout`` or ``refused``."""

    stream_id: int
    reason: str


@attrs.frozen
class MessageReceived:
    """One whole length-prefixed message of an open call.

    ``flow_len`` is the stream credit to give back with
    :meth:`~protocol.grpc_server.GrpcServer.acknowledge` once the message
    has been handled: that, and only that, lets the client send more.
    """

    stream_id: int
    message: bytes
    flow_len: int


@attrs.frozen
class BadMessage:
    """The call's request body broke the gRPC framing (compressed flag,
    oversized or truncated message); no more messages follow. The caller
    ends the call, usually with :func:`protocol.grpc_framing.status_for_error`."""

    stream_id: int
    error: RemoteProtocolError


@attrs.frozen
class CallHalfClosed:
    """The client ended its request stream (END_STREAM) cleanly."""

    stream_id: int


@attrs.frozen
class CallCancelled:
    """The client reset the call (RST_STREAM); nothing more can be sent."""

    stream_id: int
    error_code: int


@attrs.frozen
class CallWritable:
    """Everything queued on the call has gone into HTTP/2 (its outbox is
    empty); senders waiting for the client's window may go on."""

    stream_id: int


@attrs.frozen
class PingAcked:
    """The client acknowledged our PING (:meth:`~protocol.grpc_server.GrpcServer.send_ping`)."""

    payload: bytes


@attrs.frozen
class ConnectionEnded:
    """The client sent GOAWAY (or h2 closed the connection): no call can
    continue, as h2 accepts no frame afterwards."""

    error_code: int


Event = (
    CallStarted
    | CallRefused
    | MessageReceived
    | BadMessage
    | CallHalfClosed
    | CallCancelled
    | CallWritable
    | PingAcked
    | ConnectionEnded
)
