"""Wire-level error codes, kept apart from the Python exception classes."""

from __future__ import annotations

import enum


class DialFailCode(enum.StrEnum):
    """Codes an agent puts in ``dial_fail`` (``docs/protocol.md`` section 2)."""

    REFUSED = "refused"
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"
    DNS = "dns"
    FORBIDDEN = "forbidden"
    #: The address is malformed (protocol.addresses): a bug or a hostile
    #: sender upstream, never a property of the target.
    BAD_ADDRESS = "bad_address"
    ERROR = "error"
    #: The agent's buffer budget (``--max-buffered-bytes``) is exhausted.
    BUSY = "busy"


class CloseCode(enum.StrEnum):
    """Codes carried by the ``close`` map on a data stream."""

    RESET = "reset"  # the far socket was reset
    ERROR = "error"  # an I/O error on the far socket
    PROTOCOL = "protocol"  # the peer broke the data-stream rules
    SHUTDOWN = "shutdown"  # the process is going away
