"""The guarded HTTP/2 connection every h2 user here sits on (sans-IO).

:class:`H2Base` wraps one ``h2.connection.H2Connection`` in either role
(``client=True``: the tunnel's agent; ``client=False``: the tunnel's broker,
or a gRPC server) and adds what a connection facing an untrusted peer needs,
once for every protocol built on it:

- our SETTINGS in force from the first byte, and the larger connection
  window (:meth:`initiate`);
- the frame-size guard: a frame header announcing more than our
  MAX_FRAME_SIZE is refused when its 9 bytes arrive, before h2 buffers it;
- admission of new streams in batches: at most ``headers_per_call`` HEADERS
  frames reach h2 per :meth:`receive_data` call, the rest wait in
  :attr:`backlog` (h2 counts open streams in O(n) for each new one);
- flood budgets (:class:`protocol.flood.FloodGuard`): PINGs, SETTINGS,
  resets (the peer's and our refusals) and replies the peer leaves unread;
- h2's own ``ProtocolError`` and ``UnicodeDecodeError`` mapped to
  :class:`RemoteProtocolError` with a stable ``reason`` token, and a GOAWAY
  queued for every connection-level violation;
- connection credit returned as soon as DATA lands (batched per eighth of
  the window), and stream credit that tolerates streams h2 already purged;
- a graceful GOAWAY written beside h2 (:meth:`goaway`): h2 4.x refuses every
  frame after its own GOAWAY, so streams already open could not finish;
  :meth:`close` is the error GOAWAY that ends everything; and since h2
  refuses every frame after a GOAWAY it *received*, input after the peer's
  GOAWAY (its credit and resets for streams it lets finish) is dropped, not
  turned into a violation;
- DATA split by the peer's frame size (:meth:`send_data`), and our own count
  of queued output (h2 keeps its buffer private).

It never reads a clock: every call that may spend a budget takes ``now``.

Use::

    base = H2Base(H2Settings(...), client=False, now=now)
    base.initiate()
    base.receive_data(data, now, handle)   # handle(ev) per h2 event
    while base.backlog:                    # after handling what came out
        base.receive_data(b"", now, handle)
    wire = base.data_to_send()              # after every call

``handle`` sees every h2 event except requests arriving after our graceful
GOAWAY (refused here with REFUSED_STREAM). It may raise
:class:`ProtocolError`: the connection then ends with GOAWAY(PROTOCOL_ERROR)
and the error propagates. Headers, trailers, resets and everything
protocol-specific go through :attr:`h2` and the helpers below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import attrs
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame

from protocol import flow, h2compat, states
from protocol.errors import ProtocolError, RemoteProtocolError
from protocol.flood import FloodDetected, FloodGuard, FloodLimits, FrameSizeGuard, FrameTooLarge
from protocol.states import ConnInput, ConnState

#: Bytes of the client connection preface (``PRI * HTTP/2.0...``).
PREFACE_LEN = 24
#: One PING frame: the 9-byte header (length 8, type 6, no flags, stream 0)
#: and its 8 bytes of payload; the ACK differs in the flags byte.
PING_LEN = 17
_PING_HEAD = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00"
_PING_ACK_HEAD = b"\x00\x00\x08\x06\x01\x00\x00\x00\x00"


@attrs.frozen
class H2Settings:
    """What we announce, and the guards' limits."""

    #: INITIAL_WINDOW_SIZE: every stream the peer opens starts with it.
    initial_window: int = 64 * 1024
    #: Window of the whole connection.
    connection_window: int = 16 * 1024 * 1024
    #: Largest HTTP/2 frame payload we accept.
    max_frame_size: int = 64 * 1024
    max_concurrent_streams: int = 1000
    max_header_list_size: int = 16 * 1024
    #: HEADERS frames fed to h2 per :meth:`H2Base.receive_data` call.
    headers_per_call: int = 64
    flood: FloodLimits = attrs.field(factory=FloodLimits)


def header_dict(headers: Iterable[tuple[object, object]] | None) -> dict[str, str]:
    """h2's header list as a dict (h2 decodes to str: header_encoding is
    set); a repeated name's values are joined with ``", "``."""
    out: dict[str, str] = {}
    for name, value in headers or ():
        key, text = str(name), str(value)
        out[key] = f"{out[key]}, {text}" if key in out else text
    return out


def initiate(conn: h2.connection.H2Connection, settings: H2Settings, *, client: bool) -> None:
    """Start ``conn`` with our SETTINGS in force at once and the larger
    connection window (what :meth:`H2Base.initiate` does).

    Values set this way count as current at once (the peer cannot use them
    before it sees our SETTINGS), so they are mirrored into h2's caches.
    """
    s = settings
    conn.local_settings = h2compat.CompactSettings(
        client=client,
        initial_values={
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: s.max_concurrent_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: s.initial_window,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: s.max_frame_size,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: s.max_header_list_size,
        },
    )
    h2compat.compact_settings(conn)  # the remote settings' stacks in lists too
    conn.max_inbound_frame_size = s.max_frame_size
    conn.decoder.max_header_list_size = s.max_header_list_size
    conn.initiate_connection()
    extra = s.connection_window - conn.inbound_flow_control_window
    if extra > 0:
        conn.increment_flow_control_window(extra)


class H2Base:
    """One guarded h2 connection; see the module docstring."""

    def __init__(self, settings: H2Settings, *, client: bool, now: float) -> None:
        self.settings = settings
        self.client = client
        self.h2 = h2.connection.H2Connection(
            config=h2.config.H2Configuration(
                client_side=client, header_encoding="utf-8", validate_inbound_headers=True
            )
        )
        self.flood = FloodGuard(settings.flood, now)
        self.state = ConnState.OPEN
        #: The last stream our graceful GOAWAY let through (GOAWAY_SENT only).
        self.last_stream_id = 0
        self._frame_sizes = FrameSizeGuard(
            settings.max_frame_size, preface=0 if client else PREFACE_LEN
        )
        self._backlog = b""  # received and scanned, not yet fed to h2
        self._input_closed = False  # the peer's GOAWAY was fed to h2: no more input
        self._backlog_headers: list[int] = []  # offsets past HEADERS frame headers in it
        self._out = bytearray()  # output taken from h2 (or written beside it), in order
        self._unread_replies = 0  # bytes h2 queued in reply since the last data_to_send
        self._conn_unacked = 0
        #: Our receive window for the whole connection (grows with the
        #: streams' windows, :meth:`grow_connection_window`).
        self.connection_window = settings.connection_window
        #: The link's bandwidth-delay product in bytes as the driver last
        #: measured it (0: unknown): how large credit steps may be
        #: (:func:`protocol.flow.stream_credit_due`).
        self.link_bdp = 0

    # ------------------------------------------------------------- lifecycle

    def initiate(self) -> None:
        """Queue the preface with our SETTINGS and raise the connection window."""
        initiate(self.h2, self.settings, client=self.client)

    @property
    def closed(self) -> bool:
        """No new work may start: a GOAWAY went either way (or h2 closed)."""
        return self.state is not ConnState.OPEN

    @property
    def goaway_sent(self) -> bool:
        return self.state is ConnState.GOAWAY_SENT

    def _move(self, event: ConnInput) -> None:
        self.state = states.transition(
            states.CONN_TRANSITIONS, self.state, event, states.Side.LOCAL
        )

    def goaway(self, reason: str = "") -> None:
        """Graceful GOAWAY: no new streams, those open may finish.

        Written beside h2 (which would refuse every later frame, even the
        peer's WINDOW_UPDATEs sent before it saw ours); requests that arrive
        later are refused with REFUSED_STREAM.
        """
        if self.state is not ConnState.OPEN:
            return
        self.last_stream_id = self.h2.highest_inbound_stream_id
        frame = hyperframe.frame.GoAwayFrame(
            0,
            last_stream_id=self.last_stream_id,
            error_code=0,
            additional_data=reason.encode()[:256],
        )
        self._write_beside(frame.serialize())
        self._move(ConnInput.SEND_GOAWAY)

    def close(self, error_code: int, reason: str = "") -> None:
        """Error GOAWAY (through h2): the connection is over."""
        if self.state is ConnState.CLOSED:
            return
        self._move(ConnInput.CLOSE)
        try:
            self.h2.close_connection(
                error_code=error_code, additional_data=reason.encode()[:256] or None
            )
        except h2.exceptions.ProtocolError:
            pass  # h2 already closed it (a GOAWAY in the same read)

    # --------------------------------------------------------------- output

    def _absorb(self) -> int:
        """Move what h2 queued into our buffer; return how many bytes."""
        data = self.h2.data_to_send()
        if data:
            self._out += data
        return len(data)

    def _write_beside(self, frame: bytes) -> None:
        self._absorb()  # everything h2 queued so far goes first
        self._out += frame

    def data_to_send(self) -> bytes:
        """Everything queued for the transport, in order."""
        self._unread_replies = 0
        if not self._out:
            return self.h2.data_to_send()
        data = bytes(self._out) + self.h2.data_to_send()
        self._out.clear()
        return data

    def discard_output(self) -> None:
        """Drop everything queued (a flood is answered with its GOAWAY only)."""
        self._out.clear()
        self.h2.clear_outbound_data_buffer()

    # ---------------------------------------------------------------- input

    @property
    def backlog(self) -> bool:
        """Received bytes still to feed h2: call :meth:`receive_data` with
        ``b""`` (after handling the events) until this is False."""
        return bool(self._backlog)

    def _next_input(self, data: bytes) -> bytes:
        """What to feed h2 now: at most ``headers_per_call`` new streams' worth,
        and nothing after the peer's GOAWAY."""
        if self._input_closed:
            data = b""
        try:
            opened = self._frame_sizes.check(data)
        except FrameTooLarge as exc:
            self.close(h2.errors.ErrorCodes.FRAME_SIZE_ERROR, "frame too large")
            raise RemoteProtocolError(f"HTTP/2 protocol violation: {exc}", reason="h2") from None
        end = self._frame_sizes.goaway_end
        if end is not None:
            # h2 refuses every frame after a GOAWAY it received, yet the peer
            # may legitimately send more (credit and resets for the streams it
            # lets finish): the connection is over for us, so the rest is
            # dropped rather than turned into a violation.
            data = data[:end]
            opened = [offset for offset in opened if offset <= end]
            self._input_closed = True
        limit = self.settings.headers_per_call
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

    def quick_ping(self, data: bytes, now: float) -> bytes | None:
        """The ACK to send if ``data`` is exactly one PING (not an ACK)
        arriving between frames of an open connection; None: feed it to
        :meth:`receive_data` as usual. A PING changes no connection state,
        so h2 need not parse it: on an idle connection whose peer drives
        keepalive nearly every read is one. Its budget is spent as for any
        PING (an exhausted budget falls through to :meth:`receive_data`,
        which raises)."""
        if len(data) != PING_LEN or data[:9] != _PING_HEAD:
            return None
        if self.state is not ConnState.OPEN or self._backlog or self._input_closed:
            return None
        if not (self._frame_sizes.between_frames and h2compat.between_frames(self.h2)):
            return None
        if not self.flood.spend("pings", now):
            return None
        return _PING_ACK_HEAD + data[9:]

    def receive_data(
        self, data: bytes, now: float, handle: Callable[[h2.events.Event], None]
    ) -> None:
        """Feed received bytes; call ``handle`` for each h2 event.

        Raises :class:`RemoteProtocolError` for a connection-level violation
        (a GOAWAY is then queued), and :class:`FloodDetected` for a spent
        budget (GOAWAY(ENHANCE_YOUR_CALM) replaces every queued reply).
        """
        self._absorb()  # ours, not replies
        chunk = self._next_input(data)
        try:
            events = self.h2.receive_data(chunk)
        except h2.exceptions.ProtocolError as exc:
            # h2 queued its own GOAWAY.
            self._move(ConnInput.CLOSE)
            raise RemoteProtocolError(f"HTTP/2 protocol violation: {exc}", reason="h2") from None
        except UnicodeDecodeError:
            # h2 decodes header bytes as UTF-8 (header_encoding) and lets the
            # error escape, queueing no GOAWAY: a violation like any other.
            self.close(h2.errors.ErrorCodes.PROTOCOL_ERROR, "header_encoding")
            raise RemoteProtocolError(
                "header field is not UTF-8", reason="header_encoding"
            ) from None
        try:
            for ev in events:
                if self._guard(ev, now):
                    handle(ev)
            self._flush_conn_credit()
            # Replies h2 queued on its own (ACKs, RST_STREAMs) pile up while
            # the transport is not flushed, i.e. while the peer is not reading.
            self._unread_replies += self._absorb()
            if self._unread_replies > self.settings.flood.max_unread_replies:
                self.flood.exhaust("flood_unread_replies")
            self.flood.check()
        except FloodDetected as exc:
            # Answer none of the flood (its ACKs and RSTs); just the GOAWAY.
            self.discard_output()
            self.close(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, exc.reason)
            raise
        except ProtocolError as exc:
            self.close(h2.errors.ErrorCodes.PROTOCOL_ERROR, exc.reason)
            raise

    def _guard(self, ev: h2.events.Event, now: float) -> bool:
        """The bookkeeping every event needs; False: not for the caller."""
        if isinstance(ev, h2.events.DataReceived):
            # Connection credit on landing: the caller buffers it, bounded
            # by the stream's window.
            self._conn_unacked += ev.flow_controlled_length or 0
        elif isinstance(ev, h2.events.RequestReceived):
            if self.state is ConnState.GOAWAY_SENT and ev.stream_id > self.last_stream_id:
                self.refuse(ev.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM, now)
                return False
        elif isinstance(ev, h2.events.StreamReset):
            self.flood.spend("resets", now)
        elif isinstance(ev, h2.events.PingReceived):
            self.flood.spend("pings", now)  # h2 queued the ACK itself
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            self.flood.spend("settings", now)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self._move(ConnInput.CLOSE)
        return True

    def _flush_conn_credit(self) -> None:
        if flow.connection_credit_due(self._conn_unacked, self.connection_window, self.link_bdp):
            try:
                self.h2.increment_flow_control_window(self._conn_unacked)
            except h2.exceptions.ProtocolError:
                pass  # closed meanwhile
            self._conn_unacked = 0

    # -------------------------------------------------------------- streams

    def grow_connection_window(self, n: int) -> bool:
        """Raise our connection receive window by ``n`` (a WINDOW_UPDATE on
        stream 0); say whether it grew (never past 2**31 - 1)."""
        if n <= 0 or self.connection_window + n > 2**31 - 1 or self.closed:
            return False
        try:
            self.h2.increment_flow_control_window(n)
        except h2.exceptions.ProtocolError:
            return False
        self.connection_window += n
        return True

    def peer_credit(self, stream_id: int) -> int:
        """Bytes the peer may still send us on ``stream_id`` (0: gone)."""
        try:
            return self.h2.remote_flow_control_window(stream_id)
        except (h2.exceptions.ProtocolError, KeyError):
            return 0

    def credit_stream(self, stream_id: int, n: int) -> None:
        """Return ``n`` bytes of stream credit (WINDOW_UPDATE); a no-op for
        a stream that is gone."""
        if n <= 0:
            return
        try:
            self.h2.increment_flow_control_window(n, stream_id=stream_id)
        # h2 looks the stream up with a bare dict access: a closed stream it
        # has already purged (a new stream opened later in the same read)
        # raises KeyError, not StreamClosedError.
        except (h2.exceptions.ProtocolError, KeyError):
            pass

    def send_window(self, stream_id: int) -> int:
        """Bytes the peer's windows let us send on ``stream_id`` now (0: gone)."""
        try:
            return self.h2.local_flow_control_window(stream_id)
        except (h2.exceptions.ProtocolError, KeyError):
            return 0

    @property
    def max_outbound_frame_size(self) -> int:
        """The largest DATA frame payload the peer accepts (its SETTINGS)."""
        size: int = self.h2.max_outbound_frame_size
        return size

    def send_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool = False) -> None:
        """Queue DATA in frames of the peer's MAX_FRAME_SIZE (the caller
        checked the window; h2 raises past it)."""
        view = memoryview(data)
        if not view and not end_stream:
            return
        while True:
            size = self.h2.max_outbound_frame_size
            last = len(view) <= size
            self.h2.send_data(stream_id, view[:size], end_stream=end_stream and last)
            view = view[size:]
            if last:
                return

    def reset(self, stream_id: int, error_code: int) -> bool:
        """RST_STREAM; False when h2 has the stream closed already."""
        try:
            self.h2.reset_stream(stream_id, error_code=error_code)
        except h2.exceptions.ProtocolError:
            return False
        return True

    def refuse(self, stream_id: int, error_code: int, now: float) -> None:
        """Reset a stream the peer should not have opened: it costs a reset
        from the budget, as a rapid reset would."""
        self.flood.spend("resets", now)
        self.reset(stream_id, error_code)

    def spend(self, kind: str, now: float) -> None:
        """Spend one token of a flood budget (``receive_data`` raises once
        one is empty)."""
        self.flood.spend(kind, now)
