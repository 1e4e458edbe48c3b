"""The tunnel session: a sans-IO state machine over ``h2.H2Connection``.

One :class:`TunnelSession` drives one agent-to-broker connection, in either
role. The agent is the HTTP/2 client: it opens the control stream and one data
stream per successful dial. The broker is the server: it accepts or rejects
the control stream and pairs each data stream with a pending dial.

Like h11 and h2, the session does no I/O. Feed it received bytes with
:meth:`TunnelSession.receive_data`, act on the returned events, and send
whatever :meth:`TunnelSession.data_to_send` returns after *every* call.

Flow control follows design section 2:

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
import os
import time
from collections.abc import Callable

import attrs
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import msgpack

from protocol import framing, h2compat, handshake, messages
from protocol.errors import HandshakeRejected, ProtocolError, SessionError
from protocol.flood import (
    ControlGuard,
    FloodDetected,
    FloodGuard,
    FloodLimits,
    FrameSizeGuard,
    FrameTooLarge,
    unsent_bytes,
)

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
    #: Largest HTTP/2 frame payload we accept.
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


# ---------------------------------------------------------------------- events


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
    #: Credit to hand back through :meth:`TunnelSession.acknowledge`.
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
    """GOAWAY received, or the control stream ended: the session is over."""

    error_code: int
    reason: str


Event = (
    ControlRequested
    | ControlAccepted
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


@attrs.define
class _Stream:
    stream_id: int
    dial_id: int
    decoder: framing.DataStreamDecoder
    #: Our receive window for it: what the peer may have in flight.
    window: int
    unacked: int = 0  # stream credit earned but not yet sent as WINDOW_UPDATE
    accepted: bool = False  # broker: answered 200 (paired with its dial)
    local_ended: bool = False
    remote_ended: bool = False


def _header_dict(headers: object) -> dict[str, str]:
    """h2 decodes header names and values to str (header_encoding is set)."""
    out: dict[str, str] = {}
    for name, value in headers:  # type: ignore[attr-defined]
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


class TunnelSession:
    """One tunnel connection's protocol state, in either role."""

    def __init__(
        self,
        role: Role,
        config: SessionConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.role = role
        self.config = config or SessionConfig()
        #: Only the flood budgets read it (the session does no I/O).
        self._clock = clock
        self._flood = FloodGuard(self.config.flood, clock())
        #: Per-type budgets for the agent's control messages (broker only).
        self._control = ControlGuard(self._flood) if role is Role.BROKER else None
        self._unread_replies = 0  # bytes h2 queued in reply since our last flush
        self._frame_sizes = FrameSizeGuard(
            self.config.max_frame_size, preface=24 if role is Role.BROKER else 0
        )
        self._backlog = b""  # received and scanned, not yet fed to h2
        self._backlog_headers: list[int] = []  # offsets past HEADERS frame headers in it
        h2_config = h2.config.H2Configuration(
            client_side=role is Role.AGENT,
            header_encoding="utf-8",
            validate_inbound_headers=True,
        )
        self._h2 = h2.connection.H2Connection(config=h2_config)
        self._control_id: int | None = None
        self._control_decoder = framing.ControlDecoder(self.config.max_message_size)
        self._control_open = False
        self._streams: dict[int, _Stream] = {}
        self._conn_unacked = 0
        self._closed = False
        self._rejected_status = 0
        self._refusal = ""  # the refusal token of a rejected control stream

    # ------------------------------------------------------------- lifecycle

    def initiate(self) -> None:
        """Send the connection preface and our settings."""
        cfg = self.config
        h2compat.initiate(
            self._h2,
            client=self.role is Role.AGENT,
            max_concurrent_streams=cfg.max_concurrent_streams,
            stream_window=cfg.min_stream_window,
            max_frame_size=cfg.max_frame_size,
            max_header_list_size=cfg.max_header_list_size,
            connection_window=cfg.connection_window,
        )

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def control_open(self) -> bool:
        return self._control_open

    @property
    def open_data_streams(self) -> int:
        return len(self._streams)

    def data_to_send(self) -> bytes:
        self._unread_replies = 0
        return self._h2.data_to_send()

    def close(self, error_code: int = 0, reason: str = "") -> None:
        """Send GOAWAY. Streams already open may finish (graceful drain)."""
        if not self._closed:
            self._closed = True
            try:
                self._h2.close_connection(
                    error_code=error_code, additional_data=reason.encode()[:256] or None
                )
            except h2.exceptions.ProtocolError:
                pass  # h2 already closed it (a GOAWAY in the same read)

    def send_ping(self) -> bytes:
        payload = os.urandom(8)
        if not self._closed:  # h2 refuses frames after GOAWAY; no ACK will come
            self._h2.ping(payload)
        return payload

    # ------------------------------------------------------- control stream

    def open_control(self, headers: dict[str, str], authority: str) -> None:
        """Agent: open the control stream (the first request)."""
        self._require(Role.AGENT)
        if self._control_id is not None:
            raise SessionError("control stream already open")
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
        if self._control_id is None or self._control_open:
            raise SessionError("no control stream to accept")
        response = [(":status", "200"), ("content-type", CONTENT_TYPE), *sorted(headers.items())]
        try:
            self._raise_window(self._control_id, self.config.stream_window)
            self._h2.send_headers(self._control_id, response)
        except h2.exceptions.ProtocolError:
            # The agent reset the stream (or sent GOAWAY) in the same read as
            # its request; the ConnectionClosed event after it ends things.
            self._closed = True
            return
        self._control_open = True

    def reject_control(
        self, status: int, error: str, headers: dict[str, str] | None = None
    ) -> None:
        """Broker: answer the control stream with an error and close;
        ``headers``: the refusal's (:class:`protocol.handshake.Refusal`)."""
        self._require(Role.BROKER)
        if self._control_id is None:
            raise SessionError("no control stream to reject")
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
            self._h2.send_data(self._control_id, body, end_stream=True)
        except h2.exceptions.ProtocolError:
            pass  # the agent already reset the stream: nobody to tell
        self.close(0, "rejected")

    def send_message(self, msg: messages.Message) -> None:
        """Queue one control message. Control messages are small and rare;
        they bypass the payload flow-control dance and are sent at once when
        the window allows, else h2 raises and the connection is doomed."""
        if self._control_id is None or (self.role is Role.BROKER and not self._control_open):
            raise SessionError("control stream is not open")
        if self._closed:
            raise SessionError("connection is closing")
        data = messages.encode(msg)
        try:
            if self._h2.local_flow_control_window(self._control_id) < len(data):
                raise SessionError("control stream window exhausted: peer is not reading")
            self._send_frames(self._control_id, data)
        except h2.exceptions.ProtocolError as exc:
            raise SessionError(f"control stream is closed: {exc!r}") from None
        if self._control is not None and isinstance(msg, messages.Dial):
            self._control.dial_sent(msg.id)  # owed an answer: not a flood

    # --------------------------------------------------------- data streams

    def open_data_stream(self, dial_id: int, authority: str, window: int | None = None) -> int:
        """Agent: open the data stream for a successful dial. ``window``: our
        receive window for it (default ``stream_window``)."""
        self._require(Role.AGENT)
        if not self._control_open:
            raise SessionError("control stream is not open")
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
            raise SessionError(f"no data stream {stream_id}")
        stream = self._streams[stream_id]
        stream.accepted = True
        stream.window = self._window(window)
        try:
            if not stream.remote_ended:
                self._raise_window(stream_id, stream.window)
            self._h2.send_headers(stream_id, [(":status", "200"), ("content-type", CONTENT_TYPE)])
        except h2.exceptions.ProtocolError:
            # GOAWAY arrived in the same read: the ConnectionClosed event
            # that follows aborts every stream, this one included.
            self._streams.pop(stream_id, None)

    def send_capacity(self, stream_id: int) -> int:
        """Payload bytes that may be sent on ``stream_id`` right now."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_ended or self._closed:
            return 0
        try:
            window = self._h2.local_flow_control_window(stream_id)
        except h2.exceptions.StreamClosedError:
            return 0
        room = min(window, self.config.send_chunk + 5) - 5
        return max(room, 0)

    def send_data(self, stream_id: int, data: bytes | memoryview) -> int:
        """Send up to :meth:`send_capacity` payload bytes; return how many."""
        n = min(len(data), self.send_capacity(stream_id))
        if n <= 0:
            return 0
        self._send_frames(stream_id, framing.bin_header(n) + data[:n])
        return n

    def send_close(self, stream_id: int, close: messages.Close) -> bool:
        """Error-close our direction: a ``close`` map, then END_STREAM.

        Returns False when the window cannot take the map; the caller then
        resets the stream instead.
        """
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_ended or self._closed:
            return False  # after GOAWAY h2 sends nothing more; the caller resets
        data = messages.encode(close)
        try:
            if self._h2.local_flow_control_window(stream_id) < len(data):
                return False
        except h2.exceptions.StreamClosedError:
            return False
        self._send_frames(stream_id, data)
        return self.end_stream(stream_id)

    def end_stream(self, stream_id: int) -> bool:
        """Half-close our direction (END_STREAM)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_ended or self._closed:
            return False
        stream.local_ended = True
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
        if stream is not None and self.role is Role.BROKER and not stream.accepted:
            # Refused (unknown or replayed dial id): counts like a rapid reset.
            self._flood.spend("resets", self._clock())
        try:
            self._h2.reset_stream(stream_id, error_code=error_code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass

    def acknowledge(self, stream_id: int, flow_len: int) -> None:
        """The destination took ``flow_len`` wire bytes of this stream."""
        stream = self._streams.get(stream_id)
        if stream is None or flow_len <= 0:
            return
        self._earn(stream, flow_len)

    def _earn(self, stream: _Stream, n: int) -> None:
        stream.unacked += n
        # Batch WINDOW_UPDATEs; a quarter window keeps the sender streaming,
        # and a blocked sender always has at least that much outstanding.
        if stream.unacked >= stream.window // 4:
            self._credit_stream(stream)

    def stream_window(self, stream_id: int) -> int:
        """Our receive window for a data stream (0: no such stream)."""
        stream = self._streams.get(stream_id)
        return stream.window if stream is not None else 0

    def grow_window(self, stream_id: int, n: int) -> bool:
        """Raise a data stream's receive window by ``n`` (the caller asked
        its :class:`protocol.budget.BufferBudget` first); say whether it grew."""
        stream = self._streams.get(stream_id)
        if stream is None or n <= 0 or stream.remote_ended or self._closed:
            return False
        if stream.window + n > 2**31 - 1:
            return False
        stream.window += n
        self._credit_stream_now(stream_id, n)
        return True

    def _window(self, window: int | None) -> int:
        cfg = self.config
        if window is None:
            return cfg.stream_window
        if not cfg.min_stream_window <= window <= 2**31 - 1:
            raise SessionError(f"stream window {window} below min_stream_window")
        return window

    def _raise_window(self, stream_id: int, window: int) -> None:
        """Raise a new stream from the announced initial window to ``window``."""
        extra = window - self.config.min_stream_window
        if extra > 0:
            self._credit_stream_now(stream_id, extra)

    # -------------------------------------------------------------- receive

    @property
    def backlog(self) -> bool:
        """Received bytes still to process: call :meth:`receive_data` with
        ``b""`` (after handling the events) until this is False."""
        return bool(self._backlog)

    def _next_input(self, data: bytes) -> bytes:
        """What to feed h2 now: at most ``headers_per_call`` new streams' worth."""
        try:
            opened = self._frame_sizes.check(data)
        except FrameTooLarge as exc:
            self.close(h2.errors.ErrorCodes.FRAME_SIZE_ERROR, "frame too large")
            raise SessionError(f"HTTP/2 protocol violation: {exc}", reason="h2") from None
        limit = self.config.headers_per_call
        if not self._backlog and len(opened) <= limit:
            return data  # the common case: no copy
        base = len(self._backlog)
        self._backlog += data
        self._backlog_headers += [base + offset for offset in opened]
        cut = len(self._backlog)
        if len(self._backlog_headers) > limit:
            cut = self._backlog_headers[limit - 1]
        chunk, self._backlog = self._backlog[:cut], self._backlog[cut:]
        self._backlog_headers = [o - cut for o in self._backlog_headers[limit:]]
        return chunk

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the transport; return the resulting events.

        Raises :class:`ProtocolError` for a connection-level violation; a
        GOAWAY is then queued in :meth:`data_to_send`. A peer over one of its
        flood budgets gets GOAWAY(ENHANCE_YOUR_CALM) and :class:`FloodDetected`.
        A burst of new streams is taken in parts: see :attr:`backlog`.
        """
        queued_before = unsent_bytes(self._h2)
        data = self._next_input(data)
        try:
            h2_events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._closed = True
            raise SessionError(f"HTTP/2 protocol violation: {exc}", reason="h2") from None
        except UnicodeDecodeError:
            # h2 decodes header bytes as UTF-8 (header_encoding) and lets the
            # error escape, queueing no GOAWAY: a violation like any other.
            self.close(h2.errors.ErrorCodes.PROTOCOL_ERROR, "header_encoding")
            raise SessionError("header field is not UTF-8", reason="header_encoding") from None
        out: list[Event] = []
        try:
            for ev in h2_events:
                self._handle(ev, out)
            self._flush_conn_credit()
            # Replies h2 queued on its own (ACKs, RST_STREAMs) pile up while
            # the transport is not flushed, i.e. while the peer is not reading.
            self._unread_replies += max(0, unsent_bytes(self._h2) - queued_before)
            if self._unread_replies > self.config.flood.max_unread_replies:
                self._flood.exhausted = self._flood.exhausted or "flood_unread_replies"
            self._flood.check()
        except HandshakeRejected:
            raise
        except FloodDetected as exc:
            # Answer none of the flood (its ACKs and RSTs); just the GOAWAY.
            self._h2.clear_outbound_data_buffer()
            self.close(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, exc.reason)
            raise
        except ProtocolError as exc:
            # A control-stream violation: the whole connection goes.
            self.close(h2.errors.ErrorCodes.PROTOCOL_ERROR, exc.reason)
            raise
        return out

    def _handle(self, ev: h2.events.Event, out: list[Event]) -> None:
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
            out.append(WindowOpened(ev.stream_id or None))
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            self._flood.spend("settings", self._clock())
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in ev.changed_settings:
                out.append(WindowOpened(None))
        elif isinstance(ev, h2.events.PingReceived):
            self._flood.spend("pings", self._clock())  # h2 queued the ACK itself
        elif isinstance(ev, h2.events.PingAckReceived):
            out.append(PingAcked(bytes(ev.ping_data)))
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self._closed = True
            reason = (ev.additional_data or b"").decode("utf-8", "replace")
            out.append(ConnectionClosed(int(ev.error_code or 0), reason or "goaway"))
        # Trailers (h2 emits StreamEnded for them separately), SETTINGS ACKs, PINGs (h2 answers them itself), priority and unknown
        # frames need no action beyond flushing data_to_send().

    def _on_request(self, ev: h2.events.RequestReceived, out: list[Event]) -> None:
        headers = _header_dict(ev.headers)
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
            if self._control_id is not None:
                self._refuse(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR)
                return
            self._control_id = sid
            out.append(ControlRequested(sid, headers))
            return
        raw_id = headers.get(DIAL_ID_HEADER, "")
        ok_id = raw_id.isascii() and raw_id.isdigit()  # isdigit() alone admits '²'
        if not self._control_open or not ok_id or int(raw_id) >= 2**64:
            self._refuse(sid, h2.errors.ErrorCodes.CANCEL)
            return
        # Until accept_data_stream raises it, the stream has the initial window.
        stream = _Stream(
            sid, int(raw_id), framing.DataStreamDecoder(), self.config.min_stream_window
        )
        self._streams[sid] = stream
        if self._control is not None:
            self._control.dial_answered(int(raw_id))
        out.append(DataStreamRequested(sid, int(raw_id)))

    def _on_response(self, ev: h2.events.ResponseReceived, out: list[Event]) -> None:
        headers = _header_dict(ev.headers)
        status = headers.get(":status", "")
        if ev.stream_id == self._control_id:
            if status == "200":
                self._control_open = True
                out.append(ControlAccepted(headers))
            else:
                self._rejected_status = int(status) if status.isascii() and status.isdigit() else 0
                self._refusal = handshake.Refusal.token_from_headers(headers)
            return
        if ev.stream_id in self._streams:
            if status == "200":
                out.append(DataStreamAccepted(ev.stream_id))
            else:
                self.reset_stream(ev.stream_id)
                out.append(StreamReset(ev.stream_id, 0, remote=True, reason=f"status {status}"))

    def _on_data(self, ev: h2.events.DataReceived, out: list[Event]) -> None:
        sid = ev.stream_id
        flow = ev.flow_controlled_length or 0
        data = bytes(ev.data or b"")
        # Connection credit: the bytes now sit in a bounded per-stream buffer.
        self._conn_unacked += flow
        padding = flow - len(data)
        if sid == self._control_id:
            self._on_control_data(sid, data, flow, out)
            return
        stream = self._streams.get(sid)
        if stream is None:
            return  # a stream we already reset; h2 still counts it
        if padding > 0:
            self._credit_stream_now(sid, padding)
        try:
            items = stream.decoder.feed(data)
        except ProtocolError as exc:
            self.reset_stream(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            out.append(StreamReset(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR, False, str(exc)))
            return
        for item in items:
            if isinstance(item, framing.Payload):
                if item.data:
                    out.append(StreamData(sid, item.data, item.wire_len))
                else:
                    self._earn(stream, item.wire_len)
            else:
                self._earn(stream, item.wire_len)
                out.append(StreamClosed(sid, item.close))

    def _on_control_data(self, sid: int, data: bytes, flow: int, out: list[Event]) -> None:
        if self.role is Role.AGENT and not self._control_open:
            self._on_rejection_body(data, out)
            return
        if flow:
            self._credit_stream_now(sid, flow)
        # A ProtocolError closes the connection; so does a spent budget.
        for msg, size in self._control_decoder.feed_sized(data):
            if self._control is not None and not self._control.admit(msg, size, self._clock()):
                return  # receive_data raises FloodDetected: none of it is handed out
            if msg is not None:
                out.append(MessageReceived(msg))

    def _on_rejection_body(self, data: bytes, out: list[Event]) -> None:
        status = self._rejected_status
        try:
            body = msgpack.unpackb(data, raw=False)
            error = str(body.get("error", "")) if isinstance(body, dict) else ""
        except Exception:
            error = data[:200].decode("utf-8", "replace")
        self._closed = True
        raise HandshakeRejected(status, error, self._refusal)

    def _on_stream_ended(self, sid: int, out: list[Event]) -> None:
        if sid == self._control_id:
            if self.role is Role.AGENT and not self._control_open:
                raise HandshakeRejected(self._rejected_status, "", self._refusal)
            self._closed = True
            out.append(ConnectionClosed(0, "control stream ended"))
            return
        stream = self._streams.get(sid)
        if stream is None:
            return
        if stream.decoder.mid_object:
            self.reset_stream(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            out.append(StreamReset(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR, False, "truncated"))
            return
        stream.remote_ended = True
        out.append(StreamEnded(sid))
        self._maybe_forget(stream)

    def _on_stream_reset(self, ev: h2.events.StreamReset, out: list[Event]) -> None:
        sid = ev.stream_id
        self._flood.spend("resets", self._clock())
        if sid == self._control_id:
            if not ev.remote_reset:
                # h2 reset it for a violation (say, a window overflow): the
                # connection cannot go on without its control stream.
                raise SessionError(
                    f"control stream violation (error code {int(ev.error_code or 0)})",
                    reason="h2",
                )
            self._closed = True
            out.append(ConnectionClosed(int(ev.error_code or 0), "control stream reset"))
            return
        if self._streams.pop(sid, None) is not None:
            out.append(StreamReset(sid, int(ev.error_code or 0), remote=bool(ev.remote_reset)))

    # ------------------------------------------------------------- helpers

    def _require(self, role: Role) -> None:
        if self.role is not role:
            raise SessionError(f"only the {role.value} may do this")

    def _refuse(self, sid: int, code: int) -> None:
        self._flood.spend("resets", self._clock())
        try:
            self._h2.reset_stream(sid, error_code=code)
        except h2.exceptions.ProtocolError:
            pass

    def _send_frames(self, stream_id: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            size = self._h2.max_outbound_frame_size
            self._h2.send_data(stream_id, view[:size])
            view = view[size:]

    def _credit_stream_now(self, stream_id: int, n: int) -> None:
        try:
            self._h2.increment_flow_control_window(n, stream_id=stream_id)
        # h2 looks the stream up with a bare dict access: a closed stream it
        # has already purged (a new stream opened later in the same read)
        # raises KeyError, not StreamClosedError.
        except (h2.exceptions.ProtocolError, KeyError):
            pass

    def _credit_stream(self, stream: _Stream) -> None:
        if stream.unacked > 0 and not stream.remote_ended:
            self._credit_stream_now(stream.stream_id, stream.unacked)
        stream.unacked = 0

    def _flush_conn_credit(self) -> None:
        if self._conn_unacked >= self.config.connection_window // 8:
            self._h2.increment_flow_control_window(self._conn_unacked)
            self._conn_unacked = 0

    def _maybe_forget(self, stream: _Stream) -> None:
        if stream.local_ended and stream.remote_ended:
            self._forget(stream.stream_id)

    def _forget(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)
