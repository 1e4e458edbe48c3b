"""Every state the tunnel's connections and streams can be in, and every
allowed move between them, in one table per kind (the h11 style).

Three machines:

- :class:`ConnState`, one per HTTP/2 connection (kept by
  :class:`protocol.h2base.H2Base`): ``OPEN``, then ``GOAWAY_SENT`` after our
  graceful GOAWAY (streams already open may finish), then ``CLOSED`` (an error
  GOAWAY, a GOAWAY received, or h2 itself closed it).
- :class:`ControlState`, the tunnel's control stream (kept by
  :class:`protocol.session.TunnelSession`).
- :class:`DataState`, each tunnel data stream. ``PENDING`` is a stream not yet
  answered with ``:status 200`` (the agent opened it, or the broker received
  it); the agent may relay at once, so it may end its direction while
  pending (``PENDING_LOCAL_ENDED``), and the broker may see the agent end its
  direction before the broker answers (``PENDING_REMOTE_ENDED``).

:func:`transition` is the only way a state changes. A move the table does
not have raises :class:`LocalProtocolError` for one of our own inputs
(``Side.LOCAL``: our code asked for something the state forbids) and
:class:`RemoteProtocolError` for one of the peer's (``Side.REMOTE``).
"""

from __future__ import annotations

import enum
from typing import TypeVar

from protocol.errors import LocalProtocolError, RemoteProtocolError


class Side(enum.Enum):
    LOCAL = "local"  # something we did
    REMOTE = "remote"  # something the peer did


class ConnState(enum.Enum):
    OPEN = "open"
    GOAWAY_SENT = "goaway_sent"
    CLOSED = "closed"


class ConnInput(enum.Enum):
    SEND_GOAWAY = "send_goaway"  # graceful: open streams may finish
    CLOSE = "close"  # error GOAWAY sent, GOAWAY received, h2 closed it


class ControlState(enum.Enum):
    IDLE = "idle"  # no control stream yet
    REQUESTED = "requested"  # agent: request sent; broker: request received
    OPEN = "open"  # answered 200
    REJECTED = "rejected"  # answered with an error status
    CLOSED = "closed"  # ended or reset after it was open


class ControlInput(enum.Enum):
    REQUEST = "request"
    ACCEPT = "accept"
    REJECT = "reject"
    CLOSE = "close"


class DataState(enum.Enum):
    PENDING = "pending"
    PENDING_LOCAL_ENDED = "pending_local_ended"
    PENDING_REMOTE_ENDED = "pending_remote_ended"
    OPEN = "open"
    LOCAL_ENDED = "local_ended"  # we sent END_STREAM; the peer may still send
    REMOTE_ENDED = "remote_ended"  # the peer sent END_STREAM; we may still send
    CLOSED = "closed"


class DataInput(enum.Enum):
    ACCEPT = "accept"  # :status 200 sent (broker) or received (agent)
    END_LOCAL = "end_local"  # we send END_STREAM
    END_REMOTE = "end_remote"  # the peer's END_STREAM arrived
    RESET = "reset"  # either side reset it


_C = ConnState
CONN_TRANSITIONS: dict[tuple[ConnState, ConnInput], ConnState] = {
    (_C.OPEN, ConnInput.SEND_GOAWAY): _C.GOAWAY_SENT,
    (_C.GOAWAY_SENT, ConnInput.SEND_GOAWAY): _C.GOAWAY_SENT,
    (_C.OPEN, ConnInput.CLOSE): _C.CLOSED,
    (_C.GOAWAY_SENT, ConnInput.CLOSE): _C.CLOSED,
    (_C.CLOSED, ConnInput.CLOSE): _C.CLOSED,
}

_K = ControlState
CONTROL_TRANSITIONS: dict[tuple[ControlState, ControlInput], ControlState] = {
    (_K.IDLE, ControlInput.REQUEST): _K.REQUESTED,
    (_K.REQUESTED, ControlInput.ACCEPT): _K.OPEN,
    (_K.REQUESTED, ControlInput.REJECT): _K.REJECTED,
    (_K.IDLE, ControlInput.CLOSE): _K.CLOSED,
    (_K.REQUESTED, ControlInput.CLOSE): _K.CLOSED,
    (_K.OPEN, ControlInput.CLOSE): _K.CLOSED,
    (_K.REJECTED, ControlInput.CLOSE): _K.REJECTED,
    (_K.CLOSED, ControlInput.CLOSE): _K.CLOSED,
}

_D = DataState
DATA_TRANSITIONS: dict[tuple[DataState, DataInput], DataState] = {
    (_D.PENDING, DataInput.ACCEPT): _D.OPEN,
    (_D.PENDING_LOCAL_ENDED, DataInput.ACCEPT): _D.LOCAL_ENDED,
    (_D.PENDING_REMOTE_ENDED, DataInput.ACCEPT): _D.REMOTE_ENDED,
    (_D.PENDING, DataInput.END_LOCAL): _D.PENDING_LOCAL_ENDED,
    (_D.PENDING, DataInput.END_REMOTE): _D.PENDING_REMOTE_ENDED,
    # Not reached today (a broker ends only accepted streams, and the agent
    # sees END_STREAM only after :status), but legal in HTTP/2.
    (_D.PENDING_REMOTE_ENDED, DataInput.END_LOCAL): _D.CLOSED,
    (_D.PENDING_LOCAL_ENDED, DataInput.END_REMOTE): _D.CLOSED,
    (_D.OPEN, DataInput.END_LOCAL): _D.LOCAL_ENDED,
    (_D.OPEN, DataInput.END_REMOTE): _D.REMOTE_ENDED,
    (_D.LOCAL_ENDED, DataInput.END_REMOTE): _D.CLOSED,
    (_D.REMOTE_ENDED, DataInput.END_LOCAL): _D.CLOSED,
    **{(state, DataInput.RESET): _D.CLOSED for state in DataState},
}

#: Data states in which we may still send payload (our direction is open).
DATA_SENDING = frozenset({_D.PENDING, _D.PENDING_REMOTE_ENDED, _D.OPEN, _D.REMOTE_ENDED})
#: Data states in which the peer may still send payload (its direction is open).
DATA_RECEIVING = frozenset({_D.PENDING, _D.PENDING_LOCAL_ENDED, _D.OPEN, _D.LOCAL_ENDED})
#: Data states answered with ``:status 200``.
DATA_ACCEPTED = frozenset({_D.OPEN, _D.LOCAL_ENDED, _D.REMOTE_ENDED, _D.CLOSED})

_S = TypeVar("_S", bound=enum.Enum)
_I = TypeVar("_I", bound=enum.Enum)


def transition(table: dict[tuple[_S, _I], _S], state: _S, event: _I, side: Side) -> _S:
    """The state after ``event``; raises if the table has no such move."""
    try:
        return table[state, event]
    except KeyError:
        message = f"{event.value} is not allowed in state {state.value}"
        token = f"{event.value}_in_{state.value}"
        if side is Side.LOCAL:
            raise LocalProtocolError(message, reason=token) from None
        raise RemoteProtocolError(message, reason=token) from None
