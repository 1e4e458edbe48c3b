"""The gRPC frontend (egress ``proxyProtocol: GRPC``), wire-compatible with
konnectivity-client.

kube-apiserver speaks h2c with prior knowledge on a Unix socket and opens one
``/ProxyService/Proxy`` call per dial; some versions open a connection per
dial, others reuse one connection for many concurrent calls. Each call is a
bidirectional stream of length-prefixed ``Packet`` messages (design section 3).

Semantics follow konnectivity-server's ``serveRecvFrontend``:

- DIAL_REQ starts a dial through the registry; DIAL_RSP carries the client's
  ``random`` and a nonzero, process-wide unique ``connectID``, or ``error``.
- DATA is relayed both ways; CLOSE_REQ is answered with CLOSE_RSP; a target
  that closes (or aborts) first produces CLOSE_RSP (with the error text).
- DIAL_CLS for the pending dial cancels it, and the agent is told to abort.
- A second DIAL_REQ on the same call gets its own error DIAL_RSP; the first
  dial is untouched. konnectivity-server does not check this at all (it dials
  again and only notices on the first DATA whose connectID differs, tearing
  both connections down); we keep one tunnel per call and tell the client at
  once. A DATA packet naming another connectID is handled as konnectivity
  does: CLOSE_RSP "mismatched connection IDs" for both IDs, then the end.
- When the client's call ends or is reset, everything behind it goes: a
  pending dial is cancelled, a tunnel is closed (FIN when the client ended
  the call cleanly, RST when it reset it).

Flow control (design sections 2 and 7): connection credit is returned as soon
as a DATA frame lands in its call's bounded queue, stream credit only once the
bytes have gone into the tunnel stream (``send_all`` returned). Downstream we
acknowledge tunnel bytes only after h2 took the gRPC message within the
client's window. A slow client or target therefore stalls its own call and
nothing else, and memory per call stays within one window plus one message.
"""

from __future__ import annotations

import collections
import enum
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame
import trio

from broker.dialing import DialError
from broker.metrics import BrokerMetrics
from broker.registry import Registry
from protocol import h2base, packets
from protocol import konnectivity_pb2 as pb
from protocol.errors import InvalidMessage, ProtocolError
from protocol.flood import FloodGuard, FloodLimits, FrameSizeGuard, FrameTooLarge
from protocol.grpc_framing import (
    DEFAULT_MAX_MESSAGE_SIZE,
    GrpcMessageDecoder,
    GrpcStatus,
    encode_message,
    grpc_trailers,
    parse_timeout,
    status_for_error,
)
from protocol.messages import split_host_port
from tether.netio.h2driver import linger
from tether.netio.logs import event, limited
from tether.netio.tunnel import StreamAborted, TunnelClosed, TunnelStream

log = logging.getLogger("tether.broker.grpc")

METHOD_PATH = "/ProxyService/Proxy"
FRONTEND = "grpc"  # metric label
READ_SIZE = 256 * 1024
#: Largest payload put into one downstream DATA packet; far below the 4 MiB a
#: grpc client accepts by default, large enough to keep per-message cost low.
MAX_DATA_PAYLOAD = 256 * 1024
#: How long a final packet (CLOSE_RSP, DIAL_RSP) may wait for a client that
#: does not read before the call is reset instead.
FINAL_SEND_TIMEOUT = 10.0

#: HEADERS frames (new calls) fed to h2 per part of a read: h2 counts open
#: streams in O(n) per new one, and every call started costs a task.
HEADERS_PER_PART = 64

#: connectIDs are unique per broker process and never 0 (0 means "none" in
#: the konnectivity protocol).
_CONNECT_IDS = itertools.count(1)

_GRPC_CONTENT_TYPE = "application/grpc"


@attrs.frozen
class GrpcSettings:
    cluster: str
    dial_timeout: float
    #: Seconds a new connection has to send the HTTP/2 preface and SETTINGS.
    handshake_timeout: float = 10.0
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    #: INITIAL_WINDOW_SIZE: bounds what one call may have queued upstream.
    stream_window: int = 1024 * 1024
    connection_window: int = 16 * 1024 * 1024
    max_frame_size: int = 64 * 1024
    #: Each open call costs a task and ~10 KiB, and h2 counts open streams
    #: in O(n) per new stream; grpc clients queue calls beyond this limit.
    max_concurrent_streams: int = 1000
    #: After a clean close (CLOSE_REQ, client half-close), how long the tunnel
    #: may take to finish flushing before it is reset.
    linger: float = 5.0
    #: Bytes handed to the socket but not yet written before senders wait.
    write_buffer: int = 4 * 1024 * 1024
    #: Budgets for frames that cost us work (rapid reset, PING floods, ...).
    flood: FloodLimits = attrs.field(factory=FloodLimits)


class _ClientGone(Exception):
    """The call was reset, or its connection was lost: nothing can be sent."""


class _Tunnel(enum.Enum):
    RESET = "reset"  # abort the tunnel stream (TCP RST)
    CLOSE = "close"  # FIN, then let the agent finish within the linger time


@attrs.frozen
class _Ending:
    """How a call ends: trailers for the client, and what to do with the tunnel."""

    label: str
    status: GrpcStatus = GrpcStatus.OK
    message: str = ""
    tunnel: _Tunnel = _Tunnel.RESET
    #: No trailers: the call is already reset or its connection is gone.
    client_gone: bool = False


_CLIENT_GONE = _Ending("client_gone", GrpcStatus.CANCELLED, client_gone=True)


class GrpcFrontend:
    """Serves Proxy calls on frontend connections; one instance per broker."""

    def __init__(self, registry: Registry, metrics: BrokerMetrics, settings: GrpcSettings) -> None:
        self.registry = registry
        self.metrics = metrics
        self.settings = settings
        self._connections: set[_Connection] = set()
        self.draining = False

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve one h2c connection until it ends; never raises for client trouble.

        It returns only once every call's tunnel is disposed of, so the
        broker's drain accounting covers lingering tunnels too.
        """
        conn = _Connection(self, stream)
        self._connections.add(conn)
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)

    def drain(self) -> None:
        """Broker shutdown: GOAWAY everywhere; open calls may finish."""
        self.draining = True
        log.info("gRPC frontend draining %d connection(s)", len(self._connections))
        for conn in list(self._connections):
            conn.goaway()


class _Connection:
    """One h2c connection: a reader, a single writer, and a task per call."""

    def __init__(self, frontend: GrpcFrontend, transport: trio.abc.Stream) -> None:
        self.fe = frontend
        self.settings = frontend.settings
        self.metrics = frontend.metrics
        self.transport = transport
        self.h2 = h2.connection.H2Connection(
            config=h2.config.H2Configuration(
                client_side=False, header_encoding="utf-8", validate_inbound_headers=True
            )
        )
        self.calls: dict[int, _ProxyCall] = {}
        self.calls_served = 0
        self.lost = False
        self._goaway_sent = False
        self._violation = False  # we sent GOAWAY for a protocol error or a flood
        self._raw_out: list[bytes] = []  # frames h2 must not know about (GOAWAY)
        self._want_write = trio.Event()
        self._flushed = trio.Event()
        self._pending_out = 0  # taken by the writer, not yet written
        self._queued = 0  # handed to h2 by senders, not yet taken by the writer
        self._writing = False
        self._conn_unacked = 0
        self._preface_seen = trio.Event()
        #: Rapid reset, PING and SETTINGS floods (see protocol.flood).
        self._flood = FloodGuard(self.settings.flood, trio.current_time())
        self._unread_replies = 0  # bytes h2 queued in reply since the writer took output
        self._frame_sizes = FrameSizeGuard(self.settings.max_frame_size, preface=24)
        self._io_scope: trio.CancelScope | None = None
        self._calls_nursery: trio.Nursery | None = None

    # ------------------------------------------------------------------ run

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as calls:
                self._calls_nursery = calls
                try:
                    await self._run_io()
                finally:
                    # Calls outlive the connection only to dispose of their
                    # tunnels; tell them no client is left.
                    self.lost = True
                    for call in list(self.calls.values()):
                        call.client_gone("connection lost")
        except Exception:
            log.exception("gRPC frontend connection failed")
        finally:
            await trio.aclose_forcefully(self.transport)
            log.debug("gRPC frontend connection closed after %d call(s)", self.calls_served)

    async def _run_io(self) -> None:
        s = self.settings
        h2base.initiate(
            self.h2,
            h2base.H2Settings(
                initial_window=s.stream_window,
                connection_window=s.connection_window,
                max_frame_size=s.max_frame_size,
                max_concurrent_streams=s.max_concurrent_streams,
                max_header_list_size=16 * 1024,
            ),
            client=False,
        )
        self.wake_writer()
        try:
            with trio.CancelScope() as self._io_scope:
                async with trio.open_nursery() as io:
                    io.start_soon(self._writer)
                    io.start_soon(self._handshake_deadline)
                    await self._reader()
                    # The writer may hold the last frames (a GOAWAY):
                    # cancelling it mid-write would lose them.
                    with trio.move_on_after(1):
                        while self._want_write.is_set() or self._writing:
                            self._flushed = trio.Event()
                            await self._flushed.wait()
                    io.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._final_flush()
                if self._violation and not self._writing:
                    await linger(self.transport)
                await trio.aclose_forcefully(self.transport)

    def abort(self) -> None:
        if self._io_scope is not None:
            self._io_scope.cancel()

    def goaway(self) -> None:
        """Ask the client to open no new calls here; existing ones may finish.

        h2 4.x refuses every frame after its own GOAWAY, so the frame is
        written beside h2 rather than through ``close_connection``.
        """
        if self._goaway_sent or self.lost:
            return
        self._goaway_sent = True
        frame = hyperframe.frame.GoAwayFrame(
            0, last_stream_id=self.h2.highest_inbound_stream_id, error_code=0
        )
        self._raw_out.append(frame.serialize())
        self.wake_writer()
        if not self.calls:
            self._close_when_flushed()

    def _close_when_flushed(self) -> None:
        # _run_io's shielded final flush sends what is queued before closing.
        self.abort()

    async def _handshake_deadline(self) -> None:
        with trio.move_on_after(self.settings.handshake_timeout):
            await self._preface_seen.wait()
            return
        self.metrics.bad_input.labels(FRONTEND, "handshake_timeout").inc()
        log.info("gRPC frontend: no HTTP/2 preface within %gs", self.settings.handshake_timeout)
        self.abort()

    # ------------------------------------------------------------- writing

    def wake_writer(self) -> None:
        self._want_write.set()

    def _take_output(self) -> bytes:
        self._queued = 0
        self._unread_replies = 0
        data = self.h2.data_to_send()
        if self._raw_out:
            data += b"".join(self._raw_out)
            self._raw_out.clear()
        return data

    async def _writer(self) -> None:
        while True:
            await self._want_write.wait()
            self._want_write = trio.Event()
            data = self._take_output()
            if not data:
                continue
            self._pending_out += len(data)
            self._writing = True
            try:
                await self.transport.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.debug("gRPC frontend: write failed: %r", exc)
                self.abort()
                return
            finally:
                # A cancelled send_all leaves the stream unusable: the
                # connection is over either way, so no retry.
                self._writing = False
                self._pending_out -= len(data)
                self._flushed.set()

    async def wait_flushed_below(self, queued: int) -> None:
        """Backpressure from the socket: wait while too much is unwritten.

        ``queued`` is what the caller just handed to h2: h2's own buffer
        counts too, or senders could pile up data while the writer is busy.
        """
        self._queued += queued
        while self._pending_out + self._queued > self.settings.write_buffer:
            if self.lost:
                raise _ClientGone("connection lost")
            self._flushed = trio.Event()
            await self._flushed.wait()

    async def _final_flush(self) -> None:
        if self._writing:
            return  # a half-written frame is on the wire; more would corrupt it
        data = self._take_output()
        if not data:
            return
        with trio.move_on_after(1):
            try:
                await self.transport.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    # ------------------------------------------------------------- reading

    async def _reader(self) -> None:
        while True:
            try:
                data = await self.transport.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.debug("gRPC frontend: read failed: %r", exc)
                return
            if not data:
                return
            data = bytes(data)
            try:
                opened = self._frame_sizes.check(data)
            except FrameTooLarge as exc:
                self.metrics.bad_input.labels(FRONTEND, "h2_protocol").inc()
                log.warning("gRPC frontend: HTTP/2 protocol violation: %s", exc)
                self._goaway_now(h2.errors.ErrorCodes.FRAME_SIZE_ERROR)
                return
            # A burst of new calls is fed to h2 in parts, letting the calls
            # of each part run (and a reset one end) before the next starts.
            cuts = opened[HEADERS_PER_PART - 1 :: HEADERS_PER_PART]
            for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
                if not self._receive(data[start:end]):
                    return
                if end < len(data):
                    await trio.lowlevel.checkpoint()

    def _receive(self, data: bytes) -> bool:
        """Feed h2 and handle its events; False when the connection is over."""
        queued_before = unsent_bytes(self.h2)
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # h2 queued a GOAWAY; the final flush sends it.
            self._violation = True
            self.metrics.bad_input.labels(FRONTEND, "h2_protocol").inc()
            log.warning("gRPC frontend: HTTP/2 protocol violation: %s", exc)
            return False
        except UnicodeDecodeError:
            # h2 decodes headers as UTF-8 and lets the error escape.
            self.metrics.bad_input.labels(FRONTEND, "header_encoding").inc()
            log.warning("gRPC frontend: header field is not UTF-8; closing")
            self._goaway_now(h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return False
        finally:
            self.wake_writer()
        for ev in events:
            if not self._dispatch(ev):
                return False
        self._flush_conn_credit()
        # h2's own replies (ACKs, RST_STREAMs) pile up while the writer
        # is stuck, i.e. while the client does not read them.
        self._unread_replies += max(0, unsent_bytes(self.h2) - queued_before)
        if self._unread_replies > self.settings.flood.max_unread_replies:
            self._flood.exhausted = self._flood.exhausted or "flood_unread_replies"
        if self._flood.exhausted is not None:
            self.metrics.bad_input.labels(FRONTEND, self._flood.exhausted).inc()
            log.warning(
                "gRPC frontend: client flood (%s): GOAWAY ENHANCE_YOUR_CALM",
                self._flood.exhausted,
            )
            self.h2.clear_outbound_data_buffer()  # answer none of the flood
            self._goaway_now(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, self._flood.exhausted)
            return False
        return True

    def _dispatch(self, ev: h2.events.Event) -> bool:
        """Handle one h2 event; False when the connection is over."""
        if isinstance(ev, h2.events.PingReceived):
            self._flood.spend("pings", trio.current_time())  # h2 queued the ACK
        elif isinstance(ev, h2.events.DataReceived):
            flow = ev.flow_controlled_length or 0
            # Connection credit now: the bytes sit in the call's bounded queue.
            self._conn_unacked += flow
            call = self.calls.get(ev.stream_id)
            if call is not None:
                call.deliver(bytes(ev.data or b""), flow)
        elif isinstance(ev, h2.events.RequestReceived):
            self._on_request(ev)
        elif isinstance(ev, h2.events.StreamEnded):
            if (call := self.calls.get(ev.stream_id)) is not None:
                call.remote_ended()
        elif isinstance(ev, h2.events.StreamReset):
            self._flood.spend("resets", trio.current_time())
            if (call := self.calls.get(ev.stream_id)) is not None:
                call.client_gone(f"stream reset by the client (error code {ev.error_code})")
        elif isinstance(ev, h2.events.WindowUpdated):
            if ev.stream_id == 0:
                for call in self.calls.values():
                    call.window_opened()
            elif (call := self.calls.get(ev.stream_id)) is not None:
                call.window_opened()
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            self._preface_seen.set()
            self._flood.spend("settings", trio.current_time())
            changed = ev.changed_settings
            if (
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in changed
                or h2.settings.SettingCodes.MAX_FRAME_SIZE in changed
            ):
                for call in self.calls.values():
                    call.window_opened()
        elif isinstance(ev, h2.events.ConnectionTerminated):
            # h2 refuses every frame after a GOAWAY in either direction, so a
            # client's GOAWAY ends the connection for its calls too.
            log.debug("gRPC frontend: client sent GOAWAY (%s)", ev.error_code)
            return False
        return True

    def _flush_conn_credit(self) -> None:
        # Batched: an eighth of the window keeps the client streaming.
        if self._conn_unacked >= self.settings.connection_window // 8:
            try:
                self.h2.increment_flow_control_window(self._conn_unacked)
            except h2.exceptions.ProtocolError:
                pass
            self._conn_unacked = 0
            self.wake_writer()

    def credit_stream(self, stream_id: int, n: int) -> None:
        if n <= 0:
            return
        try:
            self.h2.increment_flow_control_window(n, stream_id=stream_id)
        # KeyError: h2 already purged the closed stream (bare dict lookup).
        except (h2.exceptions.ProtocolError, KeyError):
            pass  # the stream is closed; nothing to credit
        self.wake_writer()

    # ------------------------------------------------------------ requests

    def _on_request(self, ev: h2.events.RequestReceived) -> None:
        sid = ev.stream_id
        headers: dict[str, str] = {}
        for name, value in ev.headers or ():
            headers[str(name)] = str(value)
        if self._goaway_sent or self.fe.draining:
            self._reset(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        if headers.get(":method") != "POST":
            self._http_error(sid, 405)
            return
        if not headers.get("content-type", "").startswith(_GRPC_CONTENT_TYPE):
            # The gRPC spec's answer to a non-gRPC content type.
            self._http_error(sid, 415)
            return
        path = headers.get(":path", "")
        if path != METHOD_PATH:
            self.metrics.bad_input.labels(FRONTEND, "unknown_method").inc()
            self._trailers_only(sid, GrpcStatus.UNIMPLEMENTED, _unknown_method(path))
            return
        encoding = headers.get("grpc-encoding", "identity")
        if encoding != "identity":
            self.metrics.bad_input.labels(FRONTEND, "grpc_encoding").inc()
            self._trailers_only(
                sid,
                GrpcStatus.UNIMPLEMENTED,
                f'grpc: Decompressor is not installed for grpc-encoding "{encoding}"',
                extra=[("grpc-accept-encoding", "identity")],
            )
            return
        timeout: float | None = None
        if "grpc-timeout" in headers:
            timeout = parse_timeout(headers["grpc-timeout"])
            if timeout is None:
                self.metrics.bad_input.labels(FRONTEND, "grpc_timeout").inc()
                self._trailers_only(
                    sid, GrpcStatus.INTERNAL, f"malformed grpc-timeout: {headers['grpc-timeout']}"
                )
                return
        assert self._calls_nursery is not None
        call = _ProxyCall(self, sid, timeout)
        self.calls[sid] = call
        self.calls_served += 1
        self._calls_nursery.start_soon(call.run)

    def call_done(self, call: _ProxyCall) -> None:
        self.calls.pop(call.stream_id, None)
        if self._goaway_sent and not self.calls:
            self._close_when_flushed()

    def _goaway_now(self, code: int, reason: str = "") -> None:
        """End the connection with GOAWAY(``code``); the final flush sends it."""
        try:
            self.h2.close_connection(error_code=code, additional_data=reason.encode() or None)
        except h2.exceptions.ProtocolError:
            pass  # h2 already closed the connection
        self._goaway_sent = True
        self._violation = True

    def _reset(self, sid: int, code: int) -> None:
        self._flood.spend("resets", trio.current_time())
        try:
            self.h2.reset_stream(sid, error_code=code)
        except h2.exceptions.ProtocolError:
            pass
        self.wake_writer()

    def _http_error(self, sid: int, status: int) -> None:
        self.metrics.bad_input.labels(FRONTEND, f"http_{status}").inc()
        self._flood.spend("resets", trio.current_time())
        try:
            self.h2.send_headers(sid, [(":status", str(status))], end_stream=True)
        except h2.exceptions.ProtocolError:
            pass
        self.end_request(sid)

    def _trailers_only(
        self,
        sid: int,
        status: GrpcStatus,
        message: str,
        extra: list[tuple[str, str]] | None = None,
    ) -> None:
        self._flood.spend("resets", trio.current_time())  # a refused call
        headers = [
            (":status", "200"),
            ("content-type", _GRPC_CONTENT_TYPE),
            *(extra or []),
            *grpc_trailers(status, message),
        ]
        try:
            self.h2.send_headers(sid, headers, end_stream=True)
        except h2.exceptions.ProtocolError:
            pass
        self.end_request(sid)

    def end_request(self, sid: int) -> None:
        """After our response ended: stop a client still sending (RST NO_ERROR).

        That is what HTTP/2 (RFC 9113 section 8.1) and grpc-go do; a stream
        the client already ended is fully closed and h2 refuses the reset,
        which is fine.
        """
        try:
            self.h2.reset_stream(sid, error_code=h2.errors.ErrorCodes.NO_ERROR)
        except h2.exceptions.ProtocolError:
            pass
        self.wake_writer()


def unsent_bytes(conn: h2.connection.H2Connection) -> int:
    """Bytes h2 holds for the transport (its private buffer; gone once this
    connection runs on :class:`protocol.h2base.H2Base`)."""
    return len(getattr(conn, "_data_to_send", b""))


def _unknown_method(path: str) -> str:
    # grpc-go's wording, so kube-apiserver logs read the same.
    service, _, method = path.lstrip("/").partition("/")
    if service == "ProxyService":
        return f"unknown method {method} for service ProxyService"
    return f"unknown service {service}"


class _ProxyCall:
    """One ``/ProxyService/Proxy`` call: at most one dial and one tunnel."""

    def __init__(self, conn: _Connection, stream_id: int, timeout: float | None) -> None:
        self.conn = conn
        self.fe = conn.fe
        self.metrics = conn.metrics
        self.settings = conn.settings
        self.stream_id = stream_id
        self.timeout = timeout
        # Upstream: raw h2 DATA not yet decoded, bounded by the stream window.
        self._inbound: collections.deque[tuple[bytes, int]] = collections.deque()
        self._decoder = GrpcMessageDecoder(self.settings.max_message_size)
        self._messages: collections.deque[bytes] = collections.deque()
        self._uncredited = 0  # flow-controlled bytes fed but not yet credited
        self._remote_ended = False
        self._gone: str | None = None
        self._readable = trio.Event()
        self._writable = trio.Event()
        # Downstream: whole messages only, one sender at a time.
        self._send_lock = trio.Lock()
        self._headers_sent = False
        self._broken = False  # a message was cut short: only a reset can follow
        # Dial and tunnel.
        self._dial_random: int | None = None
        self._dialing = False
        self.ts: TunnelStream | None = None
        self.connect_id = 0
        self._ending: _Ending | None = None
        self._nursery: trio.Nursery | None = None

    # ---------------------------------------------- fed by the connection

    def deliver(self, data: bytes, flow: int) -> None:
        if self._ending is not None:
            return  # no longer read; the connection already has its credit
        self._inbound.append((data, flow))
        self._readable.set()

    def remote_ended(self) -> None:
        self._remote_ended = True
        self._readable.set()

    def window_opened(self) -> None:
        self._writable.set()

    def client_gone(self, reason: str) -> None:
        if self._gone is None:
            self._gone = reason
        self._readable.set()
        self._writable.set()
        self._finish(_CLIENT_GONE)

    # ------------------------------------------------------------------ run

    async def run(self) -> None:
        try:
            await self._serve()
        except Exception:
            log.exception("gRPC Proxy call %d failed", self.stream_id)
            self._finish(_Ending("internal_error", GrpcStatus.INTERNAL, "internal error"))
            self._end_stream(self._ending or _CLIENT_GONE)
        finally:
            self.conn.call_done(self)
            if self.ts is not None:
                # Reached only on a bug or a broker shutdown: never leak a tunnel.
                self._reset_tunnel(self.ts)

    async def _serve(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.timeout is not None:
                nursery.cancel_scope.deadline = trio.current_time() + self.timeout
            nursery.start_soon(self._guard, self._upstream)
        if self._ending is None:  # only the grpc-timeout deadline gets here
            self._ending = _Ending(
                "deadline", GrpcStatus.DEADLINE_EXCEEDED, "context deadline exceeded"
            )
        ending = self._ending
        if self._dialing:  # one count per dial: its outcome as the client saw it
            label = "200" if self.connect_id else ending.label
            self.metrics.frontend_requests.labels(FRONTEND, label).inc()
        log.debug("Proxy call %d ended: %s", self.stream_id, ending.label)
        self._end_stream(ending)
        ts, self.ts = self.ts, None
        if ts is not None:
            await self._dispose_tunnel(ts, ending.tunnel)

    def _finish(self, ending: _Ending) -> None:
        """Record how the call ends (first caller wins) and stop its tasks."""
        if self._ending is None:
            self._ending = ending
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _guard(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        try:
            await fn(*args)
        except _ClientGone:
            self._finish(_CLIENT_GONE)

    # ----------------------------------------------------------- upstream

    async def _next_packet(self) -> pb.Packet | None:
        """The client's next packet; None when it half-closed the call.

        Stream credit for a chunk is returned once every message it completed
        has been handled, i.e. here, when the next packet is wanted. Bytes of
        a message still incomplete are credited on arrival: the message
        cannot be handled before the client sends the rest, and the decoder
        bounds it by the maximum message size.
        """
        while True:
            if self._messages:
                raw = self._messages.popleft()
                try:
                    return packets.decode_packet(raw)
                except InvalidMessage as exc:
                    # konnectivity-server ignores packets it does not expect.
                    self.metrics.bad_input.labels(FRONTEND, exc.reason).inc()
                    log.info("Proxy call %d: packet ignored: %s", self.stream_id, exc)
                    continue
            # Batched, as a quarter window keeps the client streaming; always
            # before waiting, as the client may be waiting for exactly this.
            if self._uncredited >= self.settings.stream_window // 4 or (
                self._uncredited and not self._inbound
            ):
                self.conn.credit_stream(self.stream_id, self._uncredited)
                self._uncredited = 0
            if self._gone is not None:
                raise _ClientGone(self._gone)
            if self._inbound:
                data, flow = self._inbound.popleft()
                self._uncredited += flow
                self._messages.extend(self._decoder.feed(data))
                continue
            if self._remote_ended:
                self._decoder.end_of_stream_check()
                return None
            self._readable = trio.Event()
            await self._readable.wait()

    async def _upstream(self) -> None:
        while self._ending is None:
            try:
                pkt = await self._next_packet()
            except ProtocolError as exc:
                status, message = status_for_error(exc)
                self.metrics.bad_input.labels(FRONTEND, exc.reason).inc()
                log.warning("Proxy call %d: %s: %s", self.stream_id, status.name, message)
                self._finish(_Ending(exc.reason, status, message))
                return
            if pkt is None:
                # konnectivity-server: the client's EOF ends the call, and
                # what is behind it is closed (not reset).
                self._finish(_Ending("client_half_close", tunnel=_Tunnel.CLOSE))
                return
            await self._on_packet(pkt)

    async def _on_packet(self, pkt: pb.Packet) -> None:
        if pkt.type == pb.DIAL_REQ:
            await self._on_dial_request(pkt.dialRequest)
        elif pkt.type == pb.DATA:
            await self._on_data(pkt.data)
        elif pkt.type == pb.CLOSE_REQ:
            cid = pkt.closeRequest.connectID
            if self.ts is not None and cid == self.connect_id:
                await self._send_final(
                    packets.close_response(cid), _Ending("client_close", tunnel=_Tunnel.CLOSE)
                )
            else:
                await self._send(packets.close_response(cid, "unknown connectID"))
        elif pkt.type == pb.DIAL_CLS:
            random = pkt.closeDial.random
            if self._dialing and self.ts is None and random == self._dial_random:
                log.info("Proxy call %d: dial cancelled by the client (DIAL_CLS)", self.stream_id)
                self._finish(_Ending("dial_cancelled"))
            else:
                log.info("Proxy call %d: DIAL_CLS for no pending dial ignored", self.stream_id)
        else:
            log.debug("Proxy call %d: ignoring %s", self.stream_id, pb.PacketType.Name(pkt.type))

    async def _on_dial_request(self, req: pb.DialRequest) -> None:
        if self._dial_random is not None:
            self.metrics.bad_input.labels(FRONTEND, "second_dial").inc()
            log.info("Proxy call %d: second DIAL_REQ refused", self.stream_id)
            await self._send(
                packets.dial_response(
                    req.random, error="a Proxy stream carries one dial; open a new stream"
                )
            )
            return
        self._dial_random = req.random
        if req.protocol != "tcp":
            error = f"protocol {req.protocol!r} not supported"
        else:
            try:
                split_host_port(req.address)
                error = ""
            except InvalidMessage as exc:  # validated before routing: never reaches an agent
                error = str(exc)
                self.metrics.bad_input.labels(FRONTEND, exc.reason).inc()
                limited(
                    log,
                    logging.INFO,
                    FRONTEND,
                    "Proxy call %d: DIAL_REQ refused: %s",
                    self.stream_id,
                    error,
                    extra=event("bad_input", source=FRONTEND, reason=exc.reason),
                )
        if error:
            self.metrics.frontend_requests.labels(FRONTEND, "400").inc()
            await self._send_final(packets.dial_response(req.random, error=error), _Ending("400"))
            return
        self._dialing = True
        assert self._nursery is not None
        self._nursery.start_soon(self._guard, self._dial, req.random, req.address)

    async def _dial(self, random: int, address: str) -> None:
        fe = self.fe
        try:
            ts, _agent = await fe.registry.dial(
                self.settings.cluster, address, self.settings.dial_timeout
            )
        except DialError as exc:
            await self._send_final(
                packets.dial_response(random, error=exc.message),
                _Ending(str(exc.http_status)),
            )
            return
        self.ts = ts  # from here on, every way out disposes of it
        self.connect_id = next(_CONNECT_IDS)
        self.metrics.established.labels(FRONTEND).inc()
        log.debug(
            "Proxy call %d: %s connected as connectID %d", self.stream_id, address, self.connect_id
        )
        await self._send(packets.dial_response(random, connect_id=self.connect_id))
        assert self._nursery is not None
        self._nursery.start_soon(self._guard, self._downstream, ts, self.connect_id)

    async def _on_data(self, data: pb.Data) -> None:
        cid = data.connectID
        if cid == 0:
            self.metrics.bad_input.labels(FRONTEND, "data_without_connect_id").inc()
            return  # as konnectivity-server: logged and skipped
        if self.ts is None:
            await self._send_final(
                packets.close_response(cid, "backend not initialized"), _Ending("data_too_early")
            )
            return
        if cid != self.connect_id:
            self.metrics.bad_input.labels(FRONTEND, "mismatched_connect_id").inc()
            await self._send(packets.close_response(cid, "mismatched connection IDs"))
            await self._send_final(
                packets.close_response(self.connect_id, "mismatched connection IDs"),
                _Ending("mismatched_connect_id"),
            )
            return
        payload = data.data
        if not payload:
            return
        try:
            await self.ts.send_all(payload)
        except (StreamAborted, TunnelClosed):
            return  # the downstream task reports the close to the client
        self.metrics.bytes_relayed.labels("up").inc(len(payload))

    # --------------------------------------------------------- downstream

    async def _downstream(self, ts: TunnelStream, cid: int) -> None:
        down = self.metrics.bytes_relayed.labels("down")
        while True:
            try:
                chunk = await ts.receive()
            except StreamAborted as exc:
                await self._send_final(
                    packets.close_response(cid, f"connection aborted: {exc}"),
                    _Ending("target_reset"),
                )
                return
            if chunk is None:
                await self._send_final(
                    packets.close_response(cid), _Ending("target_closed", tunnel=_Tunnel.CLOSE)
                )
                return
            # Coalesce what is already buffered (no checkpoint while pieces
            # remain) into one message: fewer, larger packets are cheaper.
            pieces, flow, size = [chunk.data], chunk.flow_len, len(chunk.data)
            while ts.buffered and size < MAX_DATA_PAYLOAD:
                more = await ts.receive()
                if more is None:
                    break
                pieces.append(more.data)
                flow += more.flow_len
                size += len(more.data)
            data = b"".join(pieces)
            for off in range(0, len(data), MAX_DATA_PAYLOAD):
                await self._send(packets.data_packet(cid, data[off : off + MAX_DATA_PAYLOAD]))
            # Only now may the agent send more: h2 holds the bytes.
            ts.acknowledge(flow)
            down.inc(len(data))

    # ------------------------------------------------------------ sending

    async def _send(self, pkt: pb.Packet) -> None:
        """Send one packet as a whole message; dropped once the call is ending."""
        message = encode_message(packets.encode_packet(pkt))
        async with self._send_lock:
            if self._ending is not None:
                return
            await self._send_bytes(message)

    async def _send_final(self, pkt: pb.Packet, ending: _Ending) -> None:
        """Send the packet that ends the call, then end it.

        The ending is claimed first, under the send lock, so no other task
        can slip a packet in after the final one.
        """
        message = encode_message(packets.encode_packet(pkt))
        async with self._send_lock:
            if self._ending is not None:
                return
            self._ending = ending
            with trio.move_on_after(FINAL_SEND_TIMEOUT) as scope:
                await self._send_bytes(message)
            if scope.cancelled_caught:
                log.info("Proxy call %d: client not reading; resetting it", self.stream_id)
                self._broken = True
        self._finish(ending)

    async def _send_bytes(self, data: bytes) -> None:
        """Hand ``data`` to h2 within the client's windows, one frame at a time."""
        h2c = self.conn.h2
        sid = self.stream_id
        view = memoryview(data)
        try:
            if not self._headers_sent:
                h2c.send_headers(sid, [(":status", "200"), ("content-type", _GRPC_CONTENT_TYPE)])
                self._headers_sent = True
            while view:
                if self._gone is not None:
                    raise _ClientGone(self._gone)
                # Re-read both on every frame: a SETTINGS frame changes them.
                window = h2c.local_flow_control_window(sid)
                if window <= 0:  # it can go negative
                    self._writable = trio.Event()
                    await self._writable.wait()
                    continue
                n = min(window, h2c.max_outbound_frame_size, len(view))
                h2c.send_data(sid, bytes(view[:n]))
                view = view[n:]
                self.conn.wake_writer()
                await self.conn.wait_flushed_below(n)
        except h2.exceptions.ProtocolError as exc:
            raise _ClientGone(f"stream closed: {exc}") from None
        except BaseException:
            if len(view) not in (0, len(data)):
                self._broken = True
            raise
        finally:
            self.conn.wake_writer()

    def _end_stream(self, ending: _Ending) -> None:
        """Trailers with the status, or a reset when no clean end is possible."""
        if ending.client_gone or self._gone is not None or self.conn.lost:
            return
        h2c = self.conn.h2
        try:
            if self._broken:
                h2c.reset_stream(self.stream_id, error_code=h2.errors.ErrorCodes.CANCEL)
                self.conn.wake_writer()
                return
            trailers = grpc_trailers(ending.status, ending.message)
            if not self._headers_sent:  # trailers-only response
                trailers = [(":status", "200"), ("content-type", _GRPC_CONTENT_TYPE), *trailers]
            h2c.send_headers(self.stream_id, trailers, end_stream=True)
        except h2.exceptions.ProtocolError:
            pass
        self.conn.end_request(self.stream_id)

    # -------------------------------------------------------------- tunnel

    async def _dispose_tunnel(self, ts: TunnelStream, how: _Tunnel) -> None:
        """Close or reset the tunnel; a clean close lingers so data is not cut.

        A FIN follows everything already sent, but resetting right after it
        could overtake those bytes at the agent. So we wait (bounded) for the
        agent's side to end too, discarding what the target still sends.
        """
        done = False
        try:
            if how is _Tunnel.CLOSE and not ts.aborted:
                ts.send_eof()
                with trio.move_on_after(self.settings.linger):
                    while (chunk := await ts.receive()) is not None:
                        ts.acknowledge(chunk.flow_len)
                    done = True
        except (StreamAborted, TunnelClosed):
            done = True
        except h2.exceptions.ProtocolError:
            pass
        finally:
            if not done:
                self._reset_tunnel(ts)
            log.debug("Proxy call %d: tunnel %s", self.stream_id, "closed" if done else "reset")
            ts.conn.forget(ts.stream_id)
            self.metrics.established.labels(FRONTEND).dec()

    def _reset_tunnel(self, ts: TunnelStream) -> None:
        if self.ts is ts:
            self.ts = None
            self.metrics.established.labels(FRONTEND).dec()
        if not ts.aborted:
            try:
                ts.reset()
            except h2.exceptions.ProtocolError:
                pass
        ts.conn.forget(ts.stream_id)
