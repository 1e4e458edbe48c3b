"""A sans-IO gRPC server: calls over one guarded HTTP/2 connection.

:class:`GrpcServer` sits on :class:`protocol.h2base.H2Base` (frame-size
guard, stream admission, flood budgets, connection credit, GOAWAY) and adds
the gRPC call layer, in the h11 style: bytes in, events
(:mod:`protocol.grpc_events`) and bytes out, no I/O, no clock.

- Request headers are checked in the order grpc-go checks them: ``:method``
  POST (else HTTP 405), ``content-type`` ``application/grpc*`` (else HTTP
  415), ``:path`` in the caller's method table (else trailers-only
  UNIMPLEMENTED), ``grpc-encoding`` identity (else UNIMPLEMENTED with
  ``grpc-accept-encoding: identity``), ``grpc-timeout`` well formed (else
  INTERNAL). A refused request is answered here and reported as
  :class:`~protocol.grpc_events.CallRefused`; an accepted one is
  :class:`~protocol.grpc_events.CallStarted`.
- Request bodies are decoded into whole messages. Stream credit for the
  bytes of a message comes back only when the caller
  :meth:`acknowledges <GrpcServer.acknowledge>` it: per-call backpressure is
  HTTP/2 stream credit and nothing else, so the caller never has to block
  its reader. A message's credit is its whole wire length, so what a call
  holds is bounded by its window; only a message longer than half the
  window is credited as it arrives (it could not complete otherwise; the
  decoder bounds it by the maximum message size).
- Responses: :meth:`send_message` queues a whole message on the call; the
  server moves queued bytes into HTTP/2 within the client's windows, round
  robin across calls whenever a window opens, and reports
  :class:`~protocol.grpc_events.CallWritable` once a call's queue is empty.
  :meth:`end_call` sends the trailers (trailers-only when no message was
  sent) after everything queued; :meth:`reset_call` abandons the call.

Every call is in one :class:`CallState`; :data:`CALL_TRANSITIONS` is the one
table of allowed moves. Our own misuse raises
:class:`~protocol.errors.LocalProtocolError`; a peer that breaks HTTP/2 makes
:meth:`GrpcServer.receive_data` raise
:class:`~protocol.errors.RemoteProtocolError` (a GOAWAY is then queued).
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Callable, Collection, Iterable

import attrs
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from protocol import grpc_events as ev
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.grpc_framing import (
    DEFAULT_MAX_MESSAGE_SIZE,
    HEADER_SIZE,
    GrpcMessageDecoder,
    GrpcStatus,
    encode_message,
    grpc_trailers,
    parse_timeout,
)
from protocol.h2base import H2Base, H2Settings

CONTENT_TYPE = "application/grpc"

#: Reason tokens of :class:`~protocol.grpc_events.CallRefused`.
REFUSED_METHOD = "http_405"
REFUSED_CONTENT_TYPE = "http_415"
REFUSED_UNKNOWN_METHOD = "unknown_method"
REFUSED_ENCODING = "grpc_encoding"
REFUSED_TIMEOUT = "grpc_timeout"
REFUSED_STREAM = "refused"


class CallState(enum.Enum):
    OPEN = "open"  # accepted; the client may still send
    REMOTE_ENDED = "remote_ended"  # no more messages will come (half-close, bad body)
    ENDING = "ending"  # our trailers wait behind the queued messages
    CLOSED = "closed"  # trailers sent
    RESET = "reset"  # reset by either side, or the connection ended


class CallInput(enum.Enum):
    END_REMOTE = "end_remote"  # the client's END_STREAM, or a body we stop reading
    END = "end"  # we end the call (trailers queued)
    TRAILERS_SENT = "trailers_sent"
    RESET = "reset"  # RST_STREAM either way, or the connection ended


_S = CallState
_I = CallInput
CALL_TRANSITIONS: dict[tuple[CallState, CallInput], CallState] = {
    (_S.OPEN, _I.END_REMOTE): _S.REMOTE_ENDED,
    (_S.OPEN, _I.END): _S.ENDING,
    (_S.REMOTE_ENDED, _I.END): _S.ENDING,
    (_S.ENDING, _I.TRAILERS_SENT): _S.CLOSED,
    # Ending a call the client reset meanwhile is a race, not misuse.
    (_S.RESET, _I.END): _S.RESET,
    **{(state, _I.RESET): _S.RESET for state in (_S.OPEN, _S.REMOTE_ENDED, _S.ENDING, _S.RESET)},
    # A client reset after our trailers changes nothing.
    (_S.CLOSED, _I.RESET): _S.CLOSED,
}

#: States in which messages may still be queued with :meth:`GrpcServer.send_message`.
SENDING = frozenset({_S.OPEN, _S.REMOTE_ENDED})


def transition(state: CallState, event: CallInput) -> CallState:
    """The call's state after ``event`` (always one of ours: a move the table
    does not have is our own misuse)."""
    try:
        return CALL_TRANSITIONS[state, event]
    except KeyError:
        raise LocalProtocolError(
            f"{event.value} is not allowed in call state {state.value}",
            reason=f"call_{event.value}_in_{state.value}",
        ) from None


def unknown_method_message(path: str, methods: Collection[str]) -> str:
    """grpc-go's wording for a path outside the method table, so a client's
    log reads the same whichever server it talked to."""
    service, _, method = path.lstrip("/").partition("/")
    if any(m.lstrip("/").partition("/")[0] == service for m in methods):
        return f"unknown method {method} for service {service}"
    return f"unknown service {service}"


@attrs.frozen
class GrpcServerSettings:
    #: What the HTTP/2 connection announces (its ``initial_window`` bounds
    #: what one call may have unacknowledged) and its guards' limits.
    h2: H2Settings = attrs.field(factory=H2Settings)
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE


@attrs.define(eq=False)
class _Call:
    stream_id: int
    decoder: GrpcMessageDecoder
    state: CallState = CallState.OPEN
    headers_sent: bool = False
    #: Framed response messages not yet (wholly) handed to HTTP/2; the
    #: first has ``offset`` bytes gone, and ``unsent`` counts what is left.
    outbox: collections.deque[bytes] = attrs.field(factory=collections.deque)
    offset: int = 0
    unsent: int = 0
    trailers: list[tuple[str, str]] | None = None  # queued by end_call
    #: Stream credit acknowledged but not yet returned, and messages
    #: delivered but not yet acknowledged.
    uncredited: int = 0
    unacknowledged: int = 0
    queued: bool = False  # in the round robin of calls with output
    #: Credit already returned for the message still incomplete (a long one).
    early: int = 0


class GrpcServer:
    """The server side of one gRPC HTTP/2 connection; see the module docstring."""

    def __init__(
        self,
        settings: GrpcServerSettings,
        *,
        methods: Collection[str],
        clock: Callable[[], float],
        base: H2Base | None = None,
    ) -> None:
        self.settings = settings
        self.methods = frozenset(methods)
        #: The caller's clock (seconds), read for the flood budgets only.
        self.clock = clock
        #: ``base``: a connection already initiated with ``settings.h2`` (the
        #: agent port's, :mod:`protocol.agent_port`); do not initiate again.
        self.base = base or H2Base(settings.h2, client=False, now=clock())
        self.calls: dict[int, _Call] = {}
        #: Every request from now on is refused (REFUSED_STREAM): the server
        #: is draining and wants no new calls, even on a new connection.
        self.refusing = False
        #: The client's first SETTINGS frame arrived (its preface is complete).
        self.settings_received = False
        self._ready: collections.deque[_Call] = collections.deque()
        #: Events of the receive_data call in progress (None outside one).
        self._events: list[ev.Event] | None = None
        #: Bytes moved into HTTP/2 since the last :meth:`data_to_send`.
        self._moved = 0
        #: A WINDOW_UPDATE or SETTINGS in the read being handled gave room.
        self._window_opened = False

    # ------------------------------------------------------------ connection

    def initiate(self) -> None:
        """Queue our preface (SETTINGS, the larger connection window)."""
        self.base.initiate()

    @property
    def backlog(self) -> bool:
        """Received bytes not yet processed: call ``receive_data(b"")``
        (after handling the events) until False."""
        return self.base.backlog

    @property
    def closed(self) -> bool:
        return self.base.closed

    @property
    def goaway_sent(self) -> bool:
        return self.base.goaway_sent

    @property
    def queued_output(self) -> int:
        """Response bytes handed to HTTP/2 since the transport last took
        output: what a writer must still write, besides what it holds."""
        return self._moved

    def data_to_send(self) -> bytes:
        self._moved = 0
        return self.base.data_to_send()

    def goaway(self) -> None:
        """Graceful GOAWAY: no new calls, open ones may finish."""
        self.base.goaway()

    def send_ping(self, payload: bytes) -> None:
        """Queue a PING with the caller's 8 bytes (keepalive); its ACK is
        :class:`~protocol.grpc_events.PingAcked`. Nothing after a GOAWAY."""
        if not self.base.closed:
            self.base.h2.ping(payload)

    def refuse_new_calls(self) -> None:
        self.refusing = True

    def receive_data(self, data: bytes) -> list[ev.Event]:
        """Feed bytes from the client; return what they caused.

        Raises :class:`~protocol.errors.RemoteProtocolError` (including
        :class:`~protocol.flood.FloodDetected`) when the client broke
        HTTP/2 or spent a flood budget; the GOAWAY is queued already.
        """
        now = self.clock()
        events: list[ev.Event] = []
        self._events = events
        try:
            try:
                self.base.receive_data(data, now, lambda h2ev: self._on_h2(h2ev, events, now))
            except RemoteProtocolError:
                self._connection_over()
                raise
            # Windows that opened are used only now, after H2Base counted
            # the replies h2 queued on its own: our DATA is none of them.
            if self._window_opened:
                self._window_opened = False
                self._pump_all()
        finally:
            self._events = None
        return events

    # ----------------------------------------------------------------- calls

    def call_state(self, stream_id: int) -> CallState | None:
        """The call's state; None once it is over (closed or reset) and forgotten."""
        call = self.calls.get(stream_id)
        return None if call is None else call.state

    def unsent(self, stream_id: int) -> int:
        """Bytes queued on the call that HTTP/2 has not taken yet (0 once gone)."""
        call = self.calls.get(stream_id)
        return 0 if call is None else call.unsent

    def send_headers(self, stream_id: int, metadata: Iterable[tuple[str, str]] = ()) -> None:
        """Send the response headers now, with ``metadata`` (grpc-go's
        ``SendHeader``: a client may wait for them before anything else);
        a no-op once they went."""
        call = self._call(stream_id)
        if call.headers_sent or call.state not in SENDING:
            return
        self._send_headers(call, [(":status", "200"), ("content-type", CONTENT_TYPE), *metadata])

    def raise_window(self, stream_id: int, n: int) -> None:
        """Give the call ``n`` more bytes of stream window for good (a long
        call multiplexing many flows wants more than the initial window)."""
        if stream_id in self.calls:
            self.base.credit_stream(stream_id, n)

    def send_message(self, stream_id: int, message: bytes, *, framed: bool = False) -> None:
        """Queue one whole message (response headers go first, once);
        ``framed``: ``message`` already carries its gRPC prefix.

        What the client's windows allow goes into HTTP/2 at once; the rest
        follows as windows open (see :attr:`unsent` and CallWritable).
        """
        call = self._call(stream_id)
        if call.state not in SENDING:
            raise LocalProtocolError(
                f"cannot send on a call in state {call.state.value}",
                reason=f"call_send_in_{call.state.value}",
            )
        if not call.headers_sent:
            self._send_headers(call, [(":status", "200"), ("content-type", CONTENT_TYPE)])
            if call.state is not CallState.OPEN and call.state is not CallState.REMOTE_ENDED:
                return
        wire = message if framed else encode_message(message)
        call.outbox.append(wire)
        call.unsent += len(wire)
        self._pump(call, call.unsent)
        self._park(call)

    def end_call(
        self,
        stream_id: int,
        status: GrpcStatus,
        message: str = "",
        extra: Iterable[tuple[str, str]] = (),
    ) -> None:
        """End the call with ``status`` once every queued message has gone.

        A call already over (the client reset it meanwhile) is left alone.
        """
        call = self.calls.get(stream_id)
        if call is None:
            return
        call.state = transition(call.state, CallInput.END)
        if call.state is CallState.RESET:
            return
        trailers = [*extra, *grpc_trailers(status, message)]
        if not call.headers_sent:  # trailers-only response
            trailers = [(":status", "200"), ("content-type", CONTENT_TYPE), *trailers]
        call.trailers = trailers
        self._pump(call, 0)
        self._park(call)

    def reset_call(self, stream_id: int, error_code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """RST_STREAM: drop what is queued; a no-op for a call already over."""
        call = self.calls.get(stream_id)
        if call is None or call.state is CallState.CLOSED:
            return
        self.base.reset(stream_id, error_code)
        self._drop(call)

    def acknowledge(self, stream_id: int, flow_len: int) -> None:
        """A delivered message has been handled: return its stream credit.

        Batched per quarter of the stream window, and always returned once
        no delivered message is left unacknowledged (the client may be
        waiting for exactly this credit).
        """
        call = self.calls.get(stream_id)
        if call is None or call.state is not CallState.OPEN:
            return  # nothing more is read on this call
        call.unacknowledged = max(0, call.unacknowledged - 1)
        call.uncredited += flow_len
        if call.uncredited >= self.settings.h2.initial_window // 4 or not call.unacknowledged:
            self.base.credit_stream(stream_id, call.uncredited)
            call.uncredited = 0

    # -------------------------------------------------------------- internals

    def _call(self, stream_id: int) -> _Call:
        call = self.calls.get(stream_id)
        if call is None:
            raise LocalProtocolError(f"no call on stream {stream_id}", reason="call_unknown")
        return call

    def _connection_over(self) -> None:
        """No frame can be sent any more: every call is reset."""
        for call in list(self.calls.values()):
            self._drop(call)
        self._ready.clear()

    def _drop(self, call: _Call) -> None:
        call.state = transition(call.state, CallInput.RESET)
        call.outbox.clear()
        call.offset = call.unsent = 0
        call.trailers = None
        self.calls.pop(call.stream_id, None)

    def _send_headers(
        self, call: _Call, headers: list[tuple[str, str]], end_stream: bool = False
    ) -> None:
        try:
            self.base.h2.send_headers(call.stream_id, headers, end_stream=end_stream)
        except h2.exceptions.ProtocolError:
            # h2 has the stream closed (reset in a read not handled yet).
            self._drop(call)
            return
        call.headers_sent = True

    def _pump(self, call: _Call, limit: int) -> int:
        """Move up to ``limit`` queued bytes of ``call`` into HTTP/2, within
        the client's windows; then its trailers, once nothing is queued.
        Returns the bytes moved."""
        moved = 0
        sid = call.stream_id
        while call.unsent and moved < limit:
            n = min(limit - moved, call.unsent, self.base.send_window(sid))
            if n <= 0:
                break
            head = call.outbox[0]
            n = min(n, len(head) - call.offset)
            try:
                self.base.send_data(sid, memoryview(head)[call.offset : call.offset + n])
            except h2.exceptions.ProtocolError:
                # h2 has the stream (or the connection) closed: the call is over.
                self._drop(call)
                return moved
            moved += n
            self._moved += n
            call.unsent -= n
            call.offset += n
            if call.offset == len(head):
                call.outbox.popleft()
                call.offset = 0
        if call.unsent:
            return moved
        if call.trailers is not None:
            trailers, call.trailers = call.trailers, None
            self._send_headers(call, trailers, end_stream=True)
            if call.state is CallState.ENDING:
                call.state = transition(call.state, CallInput.TRAILERS_SENT)
                # Stop a client still sending (RFC 9113 section 8.1, as
                # grpc-go does); h2 refuses it for a stream already closed
                # both ways, which is fine.
                self.base.reset(sid, h2.errors.ErrorCodes.NO_ERROR)
                self.calls.pop(sid, None)
        if moved and self._events is not None:
            self._events.append(ev.CallWritable(sid))
        return moved

    def _park(self, call: _Call) -> None:
        """A call with output left waits for a window to open."""
        if call.unsent and not call.queued and self.calls.get(call.stream_id) is call:
            call.queued = True
            self._ready.append(call)

    def _pump_all(self) -> None:
        """A window opened: round robin over the calls with output, one
        frame's worth per call per turn, until no call can move more."""
        quantum = self.base.h2.max_outbound_frame_size
        turn = list(self._ready)
        self._ready.clear()
        for call in turn:
            call.queued = False
        while turn:
            again: list[_Call] = []
            for call in turn:
                if self.calls.get(call.stream_id) is not call:
                    continue
                if self._pump(call, quantum) and call.unsent:
                    again.append(call)
                else:
                    self._park(call)  # drained, or blocked on a window
            turn = again

    def _on_h2(self, h2ev: h2.events.Event, events: list[ev.Event], now: float) -> None:
        if isinstance(h2ev, h2.events.DataReceived):
            self._on_data(
                events, h2ev.stream_id, bytes(h2ev.data or b""), h2ev.flow_controlled_length or 0
            )
        elif isinstance(h2ev, h2.events.RequestReceived):
            self._on_request(events, h2ev.stream_id, h2ev.headers, now)
        elif isinstance(h2ev, h2.events.StreamEnded):
            call = self.calls.get(h2ev.stream_id)
            if call is not None and call.state is CallState.OPEN:
                call.state = transition(call.state, CallInput.END_REMOTE)
                try:
                    call.decoder.end_of_stream_check()
                except RemoteProtocolError as exc:
                    events.append(ev.BadMessage(call.stream_id, exc))
                else:
                    events.append(ev.CallHalfClosed(call.stream_id))
        elif isinstance(h2ev, h2.events.StreamReset):
            call = self.calls.get(h2ev.stream_id)
            if call is not None and call.state is not CallState.CLOSED:
                self._drop(call)
                events.append(ev.CallCancelled(h2ev.stream_id, int(h2ev.error_code or 0)))
        elif isinstance(h2ev, h2.events.WindowUpdated):
            self._window_opened = True
        elif isinstance(h2ev, h2.events.RemoteSettingsChanged):
            self.settings_received = True
            changed = h2ev.changed_settings
            if (
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in changed
                or h2.settings.SettingCodes.MAX_FRAME_SIZE in changed
            ):
                for call in self.calls.values():
                    self._park(call)
                self._window_opened = True
        elif isinstance(h2ev, h2.events.PingAckReceived):
            events.append(ev.PingAcked(bytes(h2ev.ping_data or b"")))
        elif isinstance(h2ev, h2.events.ConnectionTerminated):
            self._connection_over()
            events.append(ev.ConnectionEnded(int(h2ev.error_code or 0)))

    def _on_data(self, events: list[ev.Event], stream_id: int, data: bytes, flow: int) -> None:
        call = self.calls.get(stream_id)
        if call is None or call.state is not CallState.OPEN:
            return  # no longer read (connection credit is already back)
        if flow > len(data):
            self.base.credit_stream(stream_id, flow - len(data))  # padding
        try:
            messages = call.decoder.feed(data)
        except RemoteProtocolError as exc:
            call.state = transition(call.state, CallInput.END_REMOTE)
            events.append(ev.BadMessage(stream_id, exc))
            return
        # Each message's credit is its whole wire length, returned only when
        # it is acknowledged: what a call holds is bounded by its window.
        # Only a message longer than half the window is credited as it
        # arrives (it could never complete otherwise; the decoder bounds it
        # by the maximum message size).
        call.unacknowledged += len(messages)
        for message in messages:
            wire = len(message) + HEADER_SIZE
            early, call.early = call.early, 0
            events.append(ev.MessageReceived(stream_id, message, wire - early))
        partial = call.decoder.buffered
        if partial > self.settings.h2.initial_window // 2 and partial > call.early:
            self.base.credit_stream(stream_id, partial - call.early)
            call.early = partial

    def _on_request(
        self,
        events: list[ev.Event],
        stream_id: int,
        raw: Iterable[tuple[object, object]] | None,
        now: float,
    ) -> None:
        headers: dict[str, str] = {}
        for name, value in raw or ():
            headers[str(name)] = str(value)
        reason = self._check_request(stream_id, headers, now)
        if reason is not None:
            events.append(ev.CallRefused(stream_id, reason))
            return
        timeout_text = headers.get("grpc-timeout")
        call = _Call(stream_id, GrpcMessageDecoder(self.settings.max_message_size))
        self.calls[stream_id] = call
        events.append(
            ev.CallStarted(
                stream_id,
                headers[":path"],
                None if timeout_text is None else parse_timeout(timeout_text),
                {k: v for k, v in headers.items() if k[:1] != ":"},  # no pseudo-headers
            )
        )

    def _check_request(self, stream_id: int, headers: dict[str, str], now: float) -> str | None:
        """Answer a request that cannot become a call; return why, or None."""
        if self.refusing:
            self.base.refuse(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM, now)
            return REFUSED_STREAM
        if headers.get(":method") != "POST":
            self._answer(stream_id, [(":status", "405")], now)
            return REFUSED_METHOD
        # The content type is "application/grpc" optionally followed by
        # "+proto", ";params" and so on; lower-case by HTTP/2 rules.
        content_type = headers.get("content-type", "")
        if content_type[: len(CONTENT_TYPE)] != CONTENT_TYPE:
            # The gRPC spec's answer to a non-gRPC content type.
            self._answer(stream_id, [(":status", "415")], now)
            return REFUSED_CONTENT_TYPE
        path = headers.get(":path", "")
        if path not in self.methods:
            self._refuse_call(
                stream_id, GrpcStatus.UNIMPLEMENTED, unknown_method_message(path, self.methods), now
            )
            return REFUSED_UNKNOWN_METHOD
        encoding = headers.get("grpc-encoding", "identity")
        if encoding != "identity":
            self._refuse_call(
                stream_id,
                GrpcStatus.UNIMPLEMENTED,
                f'grpc: Decompressor is not installed for grpc-encoding "{encoding}"',
                now,
                extra=[("grpc-accept-encoding", "identity")],
            )
            return REFUSED_ENCODING
        timeout_text = headers.get("grpc-timeout")
        if timeout_text is not None and parse_timeout(timeout_text) is None:
            self._refuse_call(
                stream_id, GrpcStatus.INTERNAL, f"malformed grpc-timeout: {timeout_text}", now
            )
            return REFUSED_TIMEOUT
        return None

    def _refuse_call(
        self,
        stream_id: int,
        status: GrpcStatus,
        message: str,
        now: float,
        extra: Iterable[tuple[str, str]] = (),
    ) -> None:
        """A trailers-only response for a request that is no call of ours."""
        headers = [
            (":status", "200"),
            ("content-type", CONTENT_TYPE),
            *extra,
            *grpc_trailers(status, message),
        ]
        self._answer(stream_id, headers, now)

    def _answer(self, stream_id: int, headers: list[tuple[str, str]], now: float) -> None:
        # A refused request costs a reset from the budget, as a rapid reset would.
        self.base.spend("resets", now)
        try:
            self.base.h2.send_headers(stream_id, headers, end_stream=True)
        except h2.exceptions.ProtocolError:
            pass  # h2 has the stream closed already
        # Stop a client still sending (RFC 9113 section 8.1).
        self.base.reset(stream_id, h2.errors.ErrorCodes.NO_ERROR)
