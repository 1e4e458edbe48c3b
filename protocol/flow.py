"""The flow-control rules, in one place (sans-IO, pure functions).

- *Connection* credit goes back as soon as DATA lands in a bounded buffer,
  batched per :data:`CREDIT_STEP` of the connection window
  (:func:`connection_credit_due`, applied by :mod:`protocol.h2base`), so
  stalled streams never hold it hostage.
- *Stream* credit goes back only once the destination took the bytes,
  continuously: whenever :data:`CREDIT_STEP` of the stream's window has been
  taken (:func:`stream_credit_due`), so a sender is never more than that
  short of a full window in flight. A stream's buffered bytes are therefore
  bounded by its window. Windows themselves follow the link
  (:mod:`protocol.tuner`).
- A sender takes from its source only what the peer's window and its own
  outbox allow (:func:`writable`); what it may put into HTTP/2 now is
  :func:`payload_room` (a tunnel payload is a msgpack ``bin`` with a header
  of up to :data:`BIN_HEADER` bytes).
- How much a stream may queue to send is :func:`protocol.budget.outbox_limit`.
"""

from __future__ import annotations

import attrs

#: Bytes of the largest msgpack ``bin`` header (``bin32``).
BIN_HEADER = 5
#: Credit goes back once this share of a window is owed (1/16: a WINDOW_UPDATE
#: per 64 KiB of a 1 MiB window, about one per DATA frame) while the window is
#: tight for the link: what the sender lacks of a full window is what it
#: cannot have in flight.
CREDIT_STEP = 16
#: A window of this many bandwidth-delay products is ample: the sender keeps
#: the link full even a quarter (streams) or an eighth (connection) short of
#: it, so credit goes back in those larger steps, a quarter of the
#: WINDOW_UPDATEs (and of the wake-ups they cause) on a short link.
AMPLE_BDPS = 4
AMPLE_STREAM_STEP = 4
AMPLE_CONNECTION_STEP = 8


def _ample(window: int, bdp: int) -> bool:
    return bdp > 0 and window >= AMPLE_BDPS * bdp


def connection_credit_due(unacked: int, connection_window: int, bdp: int = 0) -> bool:
    """Whether connection credit earned so far should go back now; ``bdp``:
    the link's bandwidth-delay product in bytes (0: not known yet)."""
    step = AMPLE_CONNECTION_STEP if _ample(connection_window, bdp) else CREDIT_STEP
    return unacked >= connection_window // step


def stream_credit_due(unacked: int, window: int, bdp: int = 0) -> bool:
    """Whether a stream's earned credit should go back now (WINDOW_UPDATE);
    ``bdp`` as for :func:`connection_credit_due`."""
    step = AMPLE_STREAM_STEP if _ample(window, bdp) else CREDIT_STEP
    return unacked >= window // step


def payload_room(send_window: int, send_chunk: int) -> int:
    """Payload bytes one ``bin`` may carry now, given the peer's window."""
    return max(min(send_window, send_chunk + BIN_HEADER) - BIN_HEADER, 0)


@attrs.frozen
class Writable:
    #: Payload bytes the sender may queue now (0: it must wait).
    cap: int
    #: The wait is for the peer's window (a flow-control stall), not for
    #: room in our own outbox.
    stalled: bool


def writable(capacity: int, queued: int, outbox_limit: int) -> Writable:
    """What a stream's sender may queue: bounded by the peer's window
    (``capacity``, minus what is ``queued`` already) and by its outbox."""
    window = capacity - queued
    cap = min(window, outbox_limit - queued)
    return Writable(max(cap, 0), stalled=window <= 0)
