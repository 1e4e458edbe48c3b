"""The tunnel session: a sans-IO state machine over :class:`protocol.h2base.H2Base`.

One :class:`TunnelSession` drives one agent-to-broker connection, in either
role. The agent is the HTTP/2 client: it opens the control stream and one data
stream per successful dial. The broker is the server: it accepts or rejects
the control stream and pairs each data stream with a pending dial.

Like h11 and h2, the session does no I/O and reads no clock. Feed it received
bytes with :meth:`TunnelSession.receive_data`, act on the returned events
(:mod:`protocol.events`), and send whatever :meth:`TunnelSession.data_to_send`
returns after *every* call. The clock (for the flood budgets only) is passed
in by the caller.

The control stream and each data stream move through the states of
:mod:`protocol.states`; the guarded HTTP/2 connection underneath (frame-size
guard, stream admission, flood budgets, connection credit, GOAWAY) is
:mod:`protocol.h2base`.

Flow control:

* *Connection* credit is returned as soon as a DATA frame has been decoded
  into its stream's buffer, so stalled streams never hold it hostage.
* *Stream* credit is returned only through :meth:`acknowledge`, which the
  owner calls once the destination socket has taken the bytes. A stream's
  buffered bytes are therefore bounded by its window.
* :meth:`send_capacity` tells how many payload bytes may be sent now, so the
  owner never reads more from a socket than the peer's window allows.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import attrs
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import msgpack

from protocol import events, flow, framing, h2base, handshake, messages, states
from protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from protocol.flood import ControlGuard, FloodLimits
from protocol.states import ControlInput, ControlState, DataInput, DataState, Side

CONTROL_PATH = handshake.CONTROL_PATH
STREAM_PATH = handshake.STREAM_PATH
CONTENT_TYPE = handshake.CONTENT_TYPE
DIAL_ID_HEADER = handshake.DIAL_ID


class Role(enum.Enum):
    AGENT = "agent"
    BROKER = "broker"


@attrs.frozen
class SessionConfig:
    #: Window granted to each stream; also bounds a stream's receive buffer.
    #: A data stream may be given less (see :mod:`protocol.budget`).
    stream_window: int = 1024 * 1024
    #: The INITIAL_WINDOW_SIZE we announce: every stream starts with it and is
    #: then raised (WINDOW_UPDATE) to its own window, so a stream given a
    #: small window under memory pressure never receives more than that.
    min_stream_window: int = 64 * 1024
    #: Window of the whole connection.
    connection_window: int = 16 * 1024 * 1024
    #: Largest HTTP/2 frame payload we accept (and announce); we send DATA
    #: frames up to what the peer announces. Larger frames were measured
    #: (benchmarks/workcount.py, issue 16): 256 KiB frames save the receiver
    #: a little h2 work but cost the sender more (each 256 KiB frame is
    #: several 256 KiB buffers at once, and glibc trims and regrows the heap
    #: for them: agent system time doubled), so 64 KiB stays.
    max_frame_size: int = 64 * 1024
    max_concurrent_streams: int = 10_000
    max_header_list_size: int = 16 * 1024
    max_message_size: int = messages.MAX_MESSAGE_SIZE
    #: Largest payload put into one ``bin`` object when sending.
    send_chunk: int = 256 * 1024
    #: Budgets for frames that cost us work (rapid reset, PING floods, ...).
    flood: FloodLimits = attrs.field(factory=FloodLimits)
    #: HEADERS frames fed to h2 per :meth:`TunnelSession.receive_data` call:
    #: h2 counts open streams in O(n) for each new one, so a burst of
    #: thousands in one read would cost O(n^2) before anyone could refuse them.
    headers_per_call: int = 64

    def __attrs_post_init__(self) -> None:
        if not 64 * 1024 <= self.stream_window <= 2**31 - 1:
            raise ValueError("stream_window must be between 64 KiB and 2 GiB")
        if not 16 * 1024 <= self.min_stream_window <= self.stream_window:
            raise ValueError("min_stream_window must be between 16 KiB and stream_window")
        if not self.stream_window <= self.connection_window <= 2**31 - 1:
            raise ValueError("connection_window must be >= stream_window and < 2 GiB")
        if not 16 * 1024 <= self.max_frame_size <= 2**24 - 1:
            raise ValueError("max_frame_size must be between 16 KiB and 16 MiB")


@attrs.define
class _Stream:
    stream_id: int
    dial_id: int
    decoder: framing.DataStreamDecoder
    #: Our receive window for it: what the peer may have in flight.
    window: int
    state: DataState = DataState.PENDING
    unacked: int = 0  # stream credit earned but not yet sent as WINDOW_UPDATE
    #: Credit still to keep back after a shrink (see shrink_window).
    withheld: int = 0

    def move(self, event: DataInput, side: Side) -> None:
        self.state = states.transition(states.DATA_TRANSITIONS, self.state, event, side)

    @property
    def local_ended(self) -> bool:
        return self.state not in states.DATA_SENDING

    @property
    def remote_ended(self) -> bool:
        return self.state not in states.DATA_RECEIVING


class TunnelSession:
    """One tunnel connection's protocol state, in either role.

    ``clock`` (seconds, any epoch) is read only for the flood budgets; the
    trio runtime passes ``trio.current_time``.
    """

    def __init__(
        self,
        role: Role,
        config: SessionConfig | None = None,
        *,
        clock: Callable[[], float],
        base: h2base.H2Base | None = None,
    ) -> None:
        self.role = role
        self.config = config or SessionConfig()
        self._clock = clock
        #: ``base``: a connection already initiated with :meth:`h2_settings`
        #: (the agent port's, :mod:`protocol.agent_port`); do not initiate again.
        self._base = base or h2base.H2Base(
            self.h2_settings(self.config), client=role is Role.AGENT, now=clock()
        )
        #: Per-type budgets for the agent's control messages (broker only).
        self._control = ControlGuard(self._base.flood) if role is Role.BROKER else None
        self._control_id: int | None = None
        self._control_state = ControlState.IDLE
        self._control_decoder = framing.ControlDecoder(self.config.max_message_size)
        #: Status and refusal token of a rejected control stream, until its
        #: body (the message) arrives and ControlRejected reports them.
        self._refusal: tuple[int, str, float | None] | None = None
        self._streams: dict[int, _Stream] = {}

    @staticmethod
    def h2_settings(cfg: SessionConfig) -> h2base.H2Settings:
        """What a session with ``cfg`` announces, and its guards' limits."""
        return h2base.H2Settings(
            initial_window=cfg.min_stream_window,
            connection_window=cfg.connection_window,
            max_frame_size=cfg.max_frame_size,
            max_concurrent_streams=cfg.max_concurrent_streams,
            max_header_list_size=cfg.max_header_list_size,
            headers_per_call=cfg.headers_per_call,
            flood=cfg.flood,
        )

    @property
    def _h2(self) -> h2.connection.H2Connection:
        return self._base.h2

    # ------------------------------------------------------------- lifecycle

    def initiate(self) -> None:
        """Send the connection preface and our settings."""
        self._base.initiate()

    @property
    def closed(self) -> bool:
        """Nothing new may be sent: GOAWAY either way, or the control stream
        was rejected, ended or reset."""
        return self._base.closed or self._control_state in (
            ControlState.REJECTED,
            ControlState.CLOSED,
        )

    @property
    def control_state(self) -> ControlState:
        return self._control_state

    @property
    def control_open(self) -> bool:
        return self._control_state is ControlState.OPEN

    @property
    def open_data_streams(self) -> int:
        return len(self._streams)

    def data_to_send(self) -> bytes:
        return self._base.data_to_send()

    def close(self, error_code: int = 0, reason: str = "") -> None:
        """Send GOAWAY. With ``error_code`` 0 it is graceful: streams already
        open may finish, and what the peer sent before it saw our GOAWAY is
        still taken. Any other code ends the connection."""
        if error_code == 0:
            self._base.goaway(reason)
        else:
            self._base.close(error_code, reason)

    def send_ping(self, payload: bytes) -> bytes:
        """Queue a PING with the caller's 8 random bytes; return them."""
        if not self.closed:  # after GOAWAY no ACK would come
            self._h2.ping(payload)
        return payload

    def _control_move(self, event: ControlInput, side: Side) -> None:
        self._control_state = states.transition(
            states.CONTROL_TRANSITIONS, self._control_state, event, side
        )

    # ------------------------------------------------------- control stream

    def open_control(self, headers: dict[str, str], authority: str) -> None:
        """Agent: open the control stream (the first request)."""
        self._require(Role.AGENT)
        self._control_move(ControlInput.REQUEST, Side.LOCAL)
        sid = self._h2.get_next_available_stream_id()
        request = [
            (":method", "POST"),
            (":scheme", "https"),
            (":authority", authority),
            (":path", CONTROL_PATH),
            ("content-type", CONTENT_TYPE),
            *sorted(headers.items()),
        ]
        self._h2.send_headers(sid, request)
        self._control_id = sid
        self._raise_window(sid, self.config.stream_window)

    def accept_control(self, headers: dict[str, str]) -> None:
        """Broker: answer the control stream with 200."""
        self._require(Role.BROKER)
        if self._control_id is None or self._control_state is ControlState.OPEN:
            raise LocalProtocolError("no control stream to accept", reason="no_control_stream")
        if self.closed:
            return  # a GOAWAY in the same read as the request: nobody to answer
        response = [(":status", "200"), ("content-type", CONTENT_TYPE), *sorted(headers.items())]
        try:
            self._raise_window(self._control_id, self.config.stream_window)
            self._h2.send_headers(self._control_id, response)
        except h2.exceptions.ProtocolError:
            # The agent reset the stream in the same read as its request;
            # the ConnectionClosed event after it ends things.
            self._control_move(ControlInput.CLOSE, Side.REMOTE)
            return
        self._control_move(ControlInput.ACCEPT, Side.LOCAL)

    def reject_control(
        self, status: int, error: str, headers: dict[str, str] | None = None
    ) -> None:
        """Broker: answer the control stream with an error and close;
        ``headers``: the refusal's (:class:`protocol.handshake.Refusal`)."""
        self._require(Role.BROKER)
        if self._control_id is None:
            raise LocalProtocolError("no control stream to reject", reason="no_control_stream")
        if self._control_state is ControlState.REQUESTED:
            self._control_move(ControlInput.REJECT, Side.LOCAL)
        body = msgpack.packb({"error": error[:1024]}, use_bin_type=True)
        try:
            self._h2.send_headers(
                self._control_id,
                [
                    (":status", str(status)),
                    ("content-type", CONTENT_TYPE),
                    *sorted((headers or {}).items()),
                ],
            )
            self._base.send_data(self._control_id, body, end_stream=True)
        except h2.exceptions.ProtocolError:
            pass  # the agent already reset the stream: nobody to tell
        self.close(0, "rejected")

    def send_message(self, msg: messages.Message) -> None:
        """Queue one control message. Control messages are small and rare;
        they bypass the payload flow-control dance and are sent at once when
        the window allows, else the connection is doomed."""
        if self._control_id is None or (self.role is Role.BROKER and not self.control_open):
            raise LocalProtocolError("control stream is not open", reason="control_not_open")
        if self.closed:
            raise LocalProtocolError("connection is closing", reason="closing")
        data = messages.encode(msg)
        try:
            if self._h2.local_flow_control_window(self._control_id) < len(data):
                raise RemoteProtocolError(
                    "control stream window exhausted: peer is not reading",
                    reason="control_stalled",
                )
            self._base.send_data(self._control_id, data)
        except h2.exceptions.ProtocolError as exc:
            raise RemoteProtocolError(
                f"control stream is closed: {exc!r}", reason="control_closed"
            ) from None
        if self._control is not None and isinstance(msg, messages.Dial):
            self._control.dial_sent(msg.id)  # owed an answer: not a flood

    # --------------------------------------------------------- data streams

    def open_data_stream(self, dial_id: int, authority: str, window: int | None = None) -> int:
        """Agent: open the data stream for a successful dial. ``window``: our
        receive window for it (default ``stream_window``)."""
        self._require(Role.AGENT)
        if not self.control_open:
            raise LocalProtocolError("control stream is not open", reason="control_not_open")
        if self.closed:
            raise LocalProtocolError("connection is closing", reason="closing")
        window = self._window(window)
        sid = self._h2.get_next_available_stream_id()
        self._h2.send_headers(
            sid,
            [
                (":method", "POST"),
                (":scheme", "https"),
                (":authority", authority),
                (":path", STREAM_PATH),
                ("content-type", CONTENT_TYPE),
                (DIAL_ID_HEADER, str(dial_id)),
            ],
        )
        self._streams[sid] = _Stream(sid, dial_id, framing.DataStreamDecoder(), window)
        self._raise_window(sid, window)
        return sid

    def accept_data_stream(self, stream_id: int, window: int | None = None) -> None:
        """Broker: pair the stream with its pending dial (``:status 200``).
        ``window``: our receive window for it (default ``stream_window``)."""
        self._require(Role.BROKER)
        if stream_id not in self._streams:
            if stream_id % 2 and stream_id <= self._h2.highest_inbound_stream_id:
                # The agent reset it in the same read as its request; the
                # StreamReset event right after DataStreamRequested says so.
                return
            raise LocalProtocolError(f"no data stream {stream_id}", reason="no_data_stream")
        stream = self._streams[stream_id]
        stream.window = self._window(window)
        if self._base.closed:
            # GOAWAY arrived in the same read: the ConnectionClosed event
            # that follows aborts every stream, this one included.
            self._streams.pop(stream_id, None)
            return
        stream.move(DataInput.ACCEPT, Side.LOCAL)
        try:
            if not stream.remote_ended:
                self._raise_window(stream_id, stream.window)
            self._h2.send_headers(stream_id, [(":status", "200"), ("content-type", CONTENT_TYPE)])
        except h2.exceptions.ProtocolError:
            self._streams.pop(stream_id, None)

    def send_capacity(self, stream_id: int) -> int:
        """Payload bytes that may be sent on ``stream_id`` right now."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_ended or self.closed:
            return 0
        return flow.payload_room(self._base.send_window(stream_id), self.config.send_chunk)

    def send_data(self, stream_id: int, data: bytes | memoryview, *, more: bool = False) -> int:
        """Send up to :meth:`send_capacity` payload bytes; return how many.

        One ``bin`` per DATA frame, each as large as the peer's
        MAX_FRAME_SIZE allows: a bin never straddles two frames, so no
        frame carries only the few bytes the bin header pushed over (which
        would double the frame count of a stream alone on the connection).
        With ``more`` (the caller holds more payload that will follow), a
        last, partial frame is held back when a full one went: the bytes
        lead the next, full frame instead.
        """
        n = min(len(data), self.send_capacity(stream_id))
        if n <= 0:
            return 0
        frame = self._base.max_outbound_frame_size
        window = self._base.send_window(stream_id)
        view = memoryview(data)
        sent = 0
        while sent < n:
            avail = min(window, frame)
            room = avail - framing.bin_header_size(avail - 3)  # 3: bin 16's header
            if room <= 0:
                break
            k = min(n - sent, room)
            if k < room and sent and more:
                break  # a partial frame after full ones: it waits for the rest
            piece = framing.bin_header(k) + view[sent : sent + k]
            self._base.send_data(stream_id, piece)
            window -= len(piece)
            sent += k
        return sent

    def send_close(self, stream_id: int, close: messages.Close) -> bool:
        """Error-close our direction: a ``close`` map, then END_STREAM.

        Returns False when the window cannot take the map; the caller then
        resets the stream instead.
        """
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_ended or self.closed:
            return False  # after GOAWAY nothing more is sent; the caller resets
        data = messages.encode(close)
        if self._base.send_window(stream_id) < len(data):
            return False
        self._base.send_data(stream_id, data)
        return self.end_stream(stream_id)

    def end_stream(self, stream_id: int) -> bool:
        """Half-close our direction (END_STREAM)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_ended or self.closed:
            return False
        stream.move(DataInput.END_LOCAL, Side.LOCAL)
        try:
            self._h2.end_stream(stream_id)
        except h2.exceptions.StreamClosedError:
            self._forget(stream_id)
            return False
        self._maybe_forget(stream)
        return True

    def reset_stream(self, stream_id: int, error_code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """Abort a stream (RST_STREAM, a TCP RST)."""
        stream = self._streams.pop(stream_id, None)
        if stream is None and stream_id != self._control_id:
            return
        if (
            stream is not None
            and self.role is Role.BROKER
            and stream.state not in states.DATA_ACCEPTED
        ):
            # Refused (unknown or replayed dial id): counts like a rapid reset.
            self._base.spend("resets", self._clock())
        if stream is not None:
            stream.move(DataInput.RESET, Side.LOCAL)
        self._base.reset(stream_id, error_code)

    def acknowledge(self, stream_id: int, flow_len: int) -> bool:
        """The destination took ``flow_len`` wire bytes of this stream; True
        when that queued a WINDOW_UPDATE (output to write)."""
        stream = self._streams.get(stream_id)
        if stream is None or flow_len <= 0:
            return False
        return self._earn(stream, flow_len)

    def _earn(self, stream: _Stream, n: int) -> bool:
        if stream.withheld:
            kept = min(stream.withheld, n)
            stream.withheld -= kept
            n -= kept
        stream.unacked += n
        # Batched WINDOW_UPDATEs (see protocol.flow).
        if flow.stream_credit_due(stream.unacked, stream.window, self._base.link_bdp):
            self._credit_stream(stream)
            return True
        return False

    def stream_window(self, stream_id: int) -> int:
        """Our receive window for a data stream (0: no such stream)."""
        stream = self._streams.get(stream_id)
        return stream.window if stream is not None else 0

    def stream_state(self, stream_id: int) -> DataState | None:
        """A data stream's state (None: not tracked, or already forgotten)."""
        stream = self._streams.get(stream_id)
        return stream.state if stream is not None else None

    def grow_window(self, stream_id: int, n: int) -> bool:
        """Raise a data stream's receive window by ``n`` (the caller asked
        its :class:`protocol.budget.BufferBudget` first); say whether it grew."""
        stream = self._streams.get(stream_id)
        if stream is None or n <= 0 or stream.remote_ended or self.closed:
            return False
        if stream.window + n > 2**31 - 1:
            return False
        stream.window += n
        # Credit kept back after a shrink covers (part of) the growth.
        kept = min(stream.withheld, n)
        stream.withheld -= kept
        self._base.credit_stream(stream_id, n - kept)
        return True

    def shrink_window(self, stream_id: int, n: int) -> int:
        """Lower a data stream's receive window by up to ``n`` (never below
        ``min_stream_window``); return by how much. Credit already given
        cannot be taken back, so the next that many bytes the destination
        takes earn none (:meth:`withheld`): the buffered bytes fall to the
        new window as the reader catches up."""
        stream = self._streams.get(stream_id)
        if stream is None or n <= 0:
            return 0
        n = min(n, stream.window - self.config.min_stream_window)
        if n <= 0:
            return 0
        stream.window -= n
        stream.withheld += n
        return n

    def withheld(self, stream_id: int) -> int:
        """Credit a shrunk stream still keeps back (0: its buffer fits its window)."""
        stream = self._streams.get(stream_id)
        return stream.withheld if stream is not None else 0

    def peer_credit(self, stream_id: int) -> int:
        """Bytes the peer may still send on a data stream before it must wait."""
        return self._base.peer_credit(stream_id)

    @property
    def connection_window(self) -> int:
        """Our receive window for the whole connection."""
        return self._base.connection_window

    def link_measured(self, bdp: int) -> None:
        """The link's bandwidth-delay product as last measured (bytes, 0:
        unknown): windows several times larger take credit back in larger
        steps (:func:`protocol.flow.stream_credit_due`)."""
        self._base.link_bdp = max(0, bdp)

    def fit_connection_window(self) -> bool:
        """Grow the connection window when the data streams' windows together
        outgrow it (it costs no memory of its own: each stream's window bounds
        what it buffers); say whether a WINDOW_UPDATE was queued."""
        total = sum(st.window for st in self._streams.values())
        have = self._base.connection_window
        want = total + total // flow.CREDIT_STEP
        return want > have and self._base.grow_connection_window(want - have)

    def _window(self, window: int | None) -> int:
        cfg = self.config
        if window is None:
            return cfg.stream_window
        if not cfg.min_stream_window <= window <= 2**31 - 1:
            raise LocalProtocolError(
                f"stream window {window} below min_stream_window", reason="window"
            )
        return window

    def _raise_window(self, stream_id: int, window: int) -> None:
        """Raise a new stream from the announced initial window to ``window``."""
        self._base.credit_stream(stream_id, window - self.config.min_stream_window)

    # -------------------------------------------------------------- receive

    @property
    def backlog(self) -> bool:
        """Received bytes still to process: call :meth:`receive_data` with
        ``b""`` (after handling the events) until this is False."""
        return self._base.backlog

    def quick_ping(self, data: bytes) -> bytes | None:
        """The PING ACK to write if ``data`` is exactly one PING (see
        :meth:`protocol.h2base.H2Base.quick_ping`); None: use :meth:`receive_data`."""
        return self._base.quick_ping(data, self._clock())

    def receive_data(self, data: bytes) -> list[events.Event]:
        """Feed bytes from the transport; return the resulting events.

        Raises :class:`RemoteProtocolError` for a connection-level violation;
        a GOAWAY is then queued in :meth:`data_to_send`. A peer over one of
        its flood budgets gets GOAWAY(ENHANCE_YOUR_CALM) and
        :class:`protocol.flood.FloodDetected`. A burst of new streams is
        taken in parts: see :attr:`backlog`.
        """
        out: list[events.Event] = []
        self._base.receive_data(data, self._clock(), lambda ev: self._handle(ev, out))
        return out

    def _handle(self, ev: h2.events.Event, out: list[events.Event]) -> None:
        if isinstance(ev, h2.events.DataReceived):
            self._on_data(ev, out)
        elif isinstance(ev, h2.events.RequestReceived):
            self._on_request(ev, out)
        elif isinstance(ev, h2.events.ResponseReceived):
            self._on_response(ev, out)
        elif isinstance(ev, h2.events.StreamEnded):
            self._on_stream_ended(ev.stream_id, out)
        elif isinstance(ev, h2.events.StreamReset):
            self._on_stream_reset(ev, out)
        elif isinstance(ev, h2.events.WindowUpdated):
            out.append(events.WindowOpened(ev.stream_id or None))
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in ev.changed_settings:
                out.append(events.WindowOpened(None))
        elif isinstance(ev, h2.events.PingAckReceived):
            out.append(events.PingAcked(bytes(ev.ping_data)))
        elif isinstance(ev, h2.events.ConnectionTerminated):
            reason = (ev.additional_data or b"").decode("utf-8", "replace")
            out.append(events.ConnectionClosed(int(ev.error_code or 0), reason or "goaway"))
        # Trailers (h2 emits StreamEnded for them separately), SETTINGS ACKs,
        # PINGs (h2 answers them itself), priority and unknown frames need no
        # action beyond flushing data_to_send().

    def _on_request(self, ev: h2.events.RequestReceived, out: list[events.Event]) -> None:
        headers = h2base.header_dict(ev.headers)
        sid = ev.stream_id
        method, path = headers.get(":method"), headers.get(":path")
        if self.role is Role.AGENT:
            self._refuse(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return
        if method != "POST" or path not in (CONTROL_PATH, STREAM_PATH):
            try:
                self._h2.send_headers(sid, [(":status", "404")], end_stream=True)
            except h2.exceptions.ProtocolError:
                return  # already reset by the peer, in the same read
            # Stop a request body at once, so the stream does not stay open.
            self._refuse(sid, h2.errors.ErrorCodes.NO_ERROR)
            return
        if path == CONTROL_PATH:
            if self._control_state is not ControlState.IDLE:
                self._refuse(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR)
                return
            self._control_move(ControlInput.REQUEST, Side.REMOTE)
            self._control_id = sid
            out.append(events.ControlRequested(sid, headers))
            return
        raw_id = headers.get(DIAL_ID_HEADER, "")
        ok_id = raw_id.isascii() and raw_id.isdigit()  # isdigit() alone admits '²'
        if not self.control_open or not ok_id or int(raw_id) >= 2**64:
            self._refuse(sid, h2.errors.ErrorCodes.CANCEL)
            return
        # Until accept_data_stream raises it, the stream has the initial window.
        stream = _Stream(
            sid, int(raw_id), framing.DataStreamDecoder(), self.config.min_stream_window
        )
        self._streams[sid] = stream
        if self._control is not None:
            self._control.dial_answered(int(raw_id))
        out.append(events.DataStreamRequested(sid, int(raw_id)))

    def _on_response(self, ev: h2.events.ResponseReceived, out: list[events.Event]) -> None:
        headers = h2base.header_dict(ev.headers)
        status = headers.get(":status", "")
        if ev.stream_id == self._control_id:
            if self._control_state is not ControlState.REQUESTED:
                return  # h2 lets only one response through; nothing to do
            if status == "200":
                self._control_move(ControlInput.ACCEPT, Side.REMOTE)
                out.append(events.ControlAccepted(headers))
            else:
                self._control_move(ControlInput.REJECT, Side.REMOTE)
                code = int(status) if status.isascii() and status.isdigit() else 0
                self._refusal = (
                    code,
                    handshake.Refusal.token_from_headers(headers),
                    handshake.Refusal.retry_after_from_headers(headers),
                )
            return
        stream = self._streams.get(ev.stream_id)
        if stream is not None:
            if status == "200":
                if stream.state not in states.DATA_ACCEPTED:
                    stream.move(DataInput.ACCEPT, Side.REMOTE)
                out.append(events.DataStreamAccepted(ev.stream_id))
            else:
                self.reset_stream(ev.stream_id)
                out.append(
                    events.StreamReset(ev.stream_id, 0, remote=True, reason=f"status {status}")
                )

    def _on_data(self, ev: h2.events.DataReceived, out: list[events.Event]) -> None:
        sid = ev.stream_id
        flow_len = ev.flow_controlled_length or 0
        data = bytes(ev.data or b"")
        padding = flow_len - len(data)
        if sid == self._control_id:
            self._on_control_data(sid, data, flow_len, out)
            return
        stream = self._streams.get(sid)
        if stream is None:
            return  # a stream we already reset; h2 still counts it
        if padding > 0:
            self._base.credit_stream(sid, padding)
        try:
            items = stream.decoder.feed(data)
        except ProtocolError as exc:
            self.reset_stream(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            out.append(
                events.StreamReset(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR, False, str(exc))
            )
            return
        for item in items:
            if isinstance(item, framing.Payload):
                if item.data:
                    out.append(events.StreamData(sid, item.data, item.wire_len))
                else:
                    self._earn(stream, item.wire_len)
            else:
                self._earn(stream, item.wire_len)
                out.append(events.StreamClosed(sid, item.close))

    def _on_control_data(
        self, sid: int, data: bytes, flow_len: int, out: list[events.Event]
    ) -> None:
        if self._control_state is ControlState.REJECTED:
            if self.role is Role.AGENT:
                self._on_rejection_body(data, out)
            return
        if self.role is Role.AGENT and self._control_state is not ControlState.OPEN:
            return  # no response yet: h2 refuses DATA before HEADERS
        self._base.credit_stream(sid, flow_len)
        # A ProtocolError closes the connection; so does a spent budget.
        for msg, size in self._control_decoder.feed_sized(data):
            if self._control is not None and not self._control.admit(msg, size, self._clock()):
                return  # receive_data raises FloodDetected: none of it is handed out
            if msg is not None:
                out.append(events.MessageReceived(msg))

    def _on_rejection_body(self, data: bytes, out: list[events.Event]) -> None:
        try:
            body = msgpack.unpackb(data, raw=False)
            error = str(body.get("error", "")) if isinstance(body, dict) else ""
        except Exception:
            error = data[:200].decode("utf-8", "replace")
        self._report_refusal(error, out)

    def _report_refusal(self, message: str, out: list[events.Event]) -> None:
        """Agent: the one ControlRejected for a rejected control stream."""
        if self._refusal is not None:
            status, token, retry_after = self._refusal
            self._refusal = None
            out.append(events.ControlRejected(status, token, message, retry_after))

    def _on_stream_ended(self, sid: int, out: list[events.Event]) -> None:
        if sid == self._control_id:
            if self.role is Role.AGENT and self._control_state is ControlState.REJECTED:
                self._report_refusal("", out)  # a rejection without a body
                return
            self._control_move(ControlInput.CLOSE, Side.REMOTE)
            out.append(events.ConnectionClosed(0, "control stream ended", goaway=False))
            return
        stream = self._streams.get(sid)
        if stream is None:
            return
        if stream.decoder.mid_object:
            self.reset_stream(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            out.append(
                events.StreamReset(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR, False, "truncated")
            )
            return
        stream.move(DataInput.END_REMOTE, Side.REMOTE)
        out.append(events.StreamEnded(sid))
        self._maybe_forget(stream)

    def _on_stream_reset(self, ev: h2.events.StreamReset, out: list[events.Event]) -> None:
        sid = ev.stream_id
        if sid == self._control_id:
            if not ev.remote_reset:
                # h2 reset it for a violation (say, a window overflow): the
                # connection cannot go on without its control stream.
                raise RemoteProtocolError(
                    f"control stream violation (error code {int(ev.error_code or 0)})",
                    reason="h2",
                )
            self._control_move(ControlInput.CLOSE, Side.REMOTE)
            out.append(
                events.ConnectionClosed(
                    int(ev.error_code or 0), "control stream reset", goaway=False
                )
            )
            return
        stream = self._streams.pop(sid, None)
        if stream is not None:
            stream.move(DataInput.RESET, Side.REMOTE)
            out.append(
                events.StreamReset(sid, int(ev.error_code or 0), remote=bool(ev.remote_reset))
            )

    # ------------------------------------------------------------- helpers

    def _require(self, role: Role) -> None:
        if self.role is not role:
            raise LocalProtocolError(f"only the {role.value} may do this", reason="wrong_role")

    def _refuse(self, sid: int, code: int) -> None:
        self._base.refuse(sid, code, self._clock())

    def _credit_stream(self, stream: _Stream) -> None:
        if stream.unacked > 0 and not stream.remote_ended:
            self._base.credit_stream(stream.stream_id, stream.unacked)
        stream.unacked = 0

    def _maybe_forget(self, stream: _Stream) -> None:
        if stream.state is DataState.CLOSED:
            self._forget(stream.stream_id)

    def _forget(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)
