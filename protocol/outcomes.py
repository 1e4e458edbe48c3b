"""Why a tunnel connection ended: a stable token plus free detail text.

:class:`CloseReason` is what :class:`tether.netio.tunnel.TunnelConnection`
records as ``close_reason`` (with ``close_detail`` for people); metrics,
backoff and log event fields read the token, never the text.
"""

from __future__ import annotations

import enum


class CloseReason(enum.Enum):
    #: No PING ACK within the keepalive timeout: a dead link.
    KEEPALIVE_TIMEOUT = "keepalive_timeout"
    #: The peer closed the transport (EOF) without a GOAWAY.
    PEER_CLOSED = "peer_closed"
    #: Reading or writing the transport failed.
    TRANSPORT_ERROR = "transport_error"
    #: The peer broke the protocol (we sent GOAWAY with an error code).
    PROTOCOL_ERROR = "protocol_error"
    #: The peer exceeded a flood budget (GOAWAY ENHANCE_YOUR_CALM).
    FLOOD = "flood"
    #: A control message could not be sent (the peer does not read its
    #: control stream, or closed it).
    CONTROL_UNUSABLE = "control_unusable"
    #: The peer ended or reset the control stream.
    CONTROL_CLOSED = "control_closed"
    #: The peer sent GOAWAY.
    GOAWAY = "goaway"
    #: Agent: the broker refused the control stream.
    REJECTED = "rejected"
    #: No accepted control stream within the handshake deadline.
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    #: Broker: a newer connection from the same agent took this one's place.
    REPLACED = "replaced"
    #: Agent: a second connection to a broker replica we already hold.
    DUPLICATE = "duplicate"
    #: Agent: a hedged connection took new dials and this one's streams are done.
    SUPERSEDED = "superseded"
    #: Agent: the local address the connection was bound to disappeared.
    ADDRESS_GONE = "address_gone"
    #: The owner ended it while draining.
    DRAIN = "drain"
    #: The owner ended it for another reason (shutdown, a test, ...).
    ABORTED = "aborted"
    #: The connection's task was cancelled from outside with no reason given.
    CLOSED = "closed"
