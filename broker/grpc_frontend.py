"""The gRPC frontend (egress ``proxyProtocol: GRPC``), wire-compatible with
konnectivity-client.

kube-apiserver speaks h2c with prior knowledge on a Unix socket and opens one
``/ProxyService/Proxy`` call per dial; some versions open a connection per
dial, others reuse one connection for many concurrent calls. Each call is a
bidirectional stream of length-prefixed ``Packet`` messages. HTTP/2 and the
gRPC call layer (headers, messages, windows, trailers) are the sans-IO
:class:`protocol.grpc_server.GrpcServer`; this module is its trio driver and
the konnectivity ``Proxy`` semantics, which follow konnectivity-server's
``serveRecvFrontend``:

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

Flow control (docs/protocol.md section 4): the reader never waits for
anything but the socket. A message goes into its call's queue and its stream
credit comes back only once the call has handled it (for DATA: once
``send_all`` into the tunnel returned), so a call's backpressure is its
HTTP/2 stream window and nothing else. Downstream we acknowledge tunnel
bytes only after HTTP/2 took the gRPC message within the client's window. A
slow client or target therefore stalls its own call and nothing else, and
memory per call stays within one window plus one message.
"""

from __future__ import annotations

import collections
import enum
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from broker.dialing import DialError
from broker.metrics import BrokerMetrics
from broker.registry import Registry
from protocol import grpc_events as ev
from protocol import konnectivity_pb2 as pb
from protocol import packets
from protocol.errors import InvalidMessage, ProtocolError, RemoteProtocolError
from protocol.flood import FloodDetected, FloodLimits
from protocol.grpc_framing import (
    DEFAULT_MAX_MESSAGE_SIZE,
    GrpcStatus,
    status_for_error,
)
from protocol.grpc_server import REFUSED_STREAM, SENDING, GrpcServer, GrpcServerSettings
from protocol.h2base import H2Settings
from protocol.messages import split_host_port
from protocol.outcomes import CloseReason
from tether.netio.h2driver import H2Driver
from tether.netio.logs import event, limited
from tether.netio.tunnel import StreamAborted, Tunnel, TunnelClosed

log = logging.getLogger("tether.broker.grpc")

METHOD_PATH = "/ProxyService/Proxy"
#: konnectivity's service_method label for frontend calls.
METHOD = "Proxy"
FRONTEND = "grpc"  # metric label
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

    def server_settings(self) -> GrpcServerSettings:
        return GrpcServerSettings(
            H2Settings(
                initial_window=self.stream_window,
                connection_window=self.connection_window,
                max_frame_size=self.max_frame_size,
                max_concurrent_streams=self.max_concurrent_streams,
                max_header_list_size=16 * 1024,
                headers_per_call=HEADERS_PER_PART,
                flood=self.flood,
            ),
            max_message_size=self.max_message_size,
        )


class _ClientGone(Exception):
    """The call was reset, or its connection was lost: nothing can be sent."""


class Phase(enum.Enum):
    """Where a Proxy call is; :data:`PHASES` has every allowed move."""

    IDLE = "idle"  # no DIAL_REQ yet
    DIALING = "dialing"  # a dial is in flight through the registry
    CONNECTED = "connected"  # the tunnel is open (connectID given)
    ENDED = "ended"  # the ending is decided; the tasks stop, the tunnel goes


class PhaseInput(enum.Enum):
    DIAL = "dial"
    CONNECTED = "connected"
    END = "end"


PHASES: dict[tuple[Phase, PhaseInput], Phase] = {
    (Phase.IDLE, PhaseInput.DIAL): Phase.DIALING,
    (Phase.DIALING, PhaseInput.CONNECTED): Phase.CONNECTED,
    **{(phase, PhaseInput.END): Phase.ENDED for phase in Phase if phase is not Phase.ENDED},
}


class Disposal(enum.Enum):
    """What happens to the call's tunnel when it ends."""

    RESET = "reset"  # abort the tunnel stream (TCP RST)
    CLOSE = "close"  # FIN, then let the agent finish within the linger time


@attrs.frozen
class Ending:
    """How a call ends: its trailers, and what happens to the tunnel.

    ``label`` is a stable token (metrics, logs). ``status`` None: no
    trailers, the call is reset or its connection gone.
    """

    label: str
    status: GrpcStatus | None = GrpcStatus.OK
    message: str = ""
    tunnel: Disposal = Disposal.RESET


CLIENT_GONE = Ending("client_gone", None)
DEADLINE = Ending("deadline", GrpcStatus.DEADLINE_EXCEEDED, "context deadline exceeded")
INTERNAL_ERROR = Ending("internal_error", GrpcStatus.INTERNAL, "internal error")


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


class _Engine:
    """The connection's GrpcServer as the driver's engine: violations are
    logged and counted here, where they happen, and every time the writer
    takes output the senders waiting for room are woken."""

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn
        self.server = conn.server

    @property
    def backlog(self) -> bool:
        return self.server.backlog

    def receive_data(self, data: bytes) -> list[ev.Event]:
        conn = self.conn
        try:
            events = self.server.receive_data(data)
        except FloodDetected as exc:
            conn.metrics.bad_input.labels(FRONTEND, exc.reason).inc()
            log.warning("gRPC frontend: client flood (%s): GOAWAY ENHANCE_YOUR_CALM", exc.reason)
            raise
        except RemoteProtocolError as exc:
            if exc.reason == "header_encoding":
                conn.metrics.bad_input.labels(FRONTEND, "header_encoding").inc()
                log.warning("gRPC frontend: header field is not UTF-8; closing")
            else:
                conn.metrics.bad_input.labels(FRONTEND, "h2_protocol").inc()
                log.warning("gRPC frontend: %s", exc)
            raise
        if self.server.settings_received:
            conn.driver.handshake_done()
        return events

    def data_to_send(self) -> bytes:
        return self.server.data_to_send()


class _Connection:
    """One h2c connection: GrpcServer run by the shared driver (reader,
    single writer, final flush, linger, handshake deadline), and a task per
    call."""

    def __init__(self, frontend: GrpcFrontend, transport: trio.abc.Stream) -> None:
        self.fe = frontend
        self.settings = frontend.settings
        self.metrics = frontend.metrics
        self.server = GrpcServer(
            self.settings.server_settings(), methods={METHOD_PATH}, clock=trio.current_time
        )
        if frontend.draining:
            self.server.refuse_new_calls()
        self.driver = H2Driver(
            transport,
            _Engine(self),
            self._dispatch,
            write_buffer=self.settings.write_buffer,
            handshake_timeout=self.settings.handshake_timeout,
            on_handshake_timeout=self._on_handshake_timeout,
        )
        self.calls: dict[int, _ProxyCall] = {}
        self.calls_served = 0
        self.lost = False
        self._calls_nursery: trio.Nursery | None = None

    # ------------------------------------------------------------------ run

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as calls:
                self._calls_nursery = calls
                try:
                    self.server.initiate()
                    await self.driver.run()
                finally:
                    # Calls outlive the connection only to dispose of their
                    # tunnels; tell them no client is left.
                    self.lost = True
                    for call in list(self.calls.values()):
                        call.client_gone("connection lost")
        except Exception:
            log.exception("gRPC frontend connection failed")
        finally:
            log.debug("gRPC frontend connection closed after %d call(s)", self.calls_served)

    def goaway(self) -> None:
        """Ask the client to open no new calls here; existing ones may finish."""
        if self.server.goaway_sent or self.lost:
            return
        self.server.goaway()
        self.server.refuse_new_calls()
        self.wake_writer()
        if not self.calls:
            self._close_when_flushed()

    def _close_when_flushed(self) -> None:
        # The driver's final flush sends what is queued before closing.
        self.driver.abort(CloseReason.DRAIN)

    def _on_handshake_timeout(self) -> None:
        self.metrics.bad_input.labels(FRONTEND, "handshake_timeout").inc()
        log.info("gRPC frontend: no HTTP/2 preface within %gs", self.settings.handshake_timeout)

    def wake_writer(self) -> None:
        self.driver.wake_writer()

    # ------------------------------------------------------------- reading

    def _dispatch(self, e: ev.Event) -> bool:
        """Handle one server event (in the reader, which waits for nothing
        but the socket); True when the connection is over."""
        if isinstance(e, ev.MessageReceived):
            if (call := self.calls.get(e.stream_id)) is not None:
                call.deliver(e.message, e.flow_len)
        elif isinstance(e, ev.CallWritable):
            if (call := self.calls.get(e.stream_id)) is not None:
                call.progress.unpark_all()
        elif isinstance(e, ev.CallStarted):
            self._start_call(e)
        elif isinstance(e, ev.CallHalfClosed):
            if (call := self.calls.get(e.stream_id)) is not None:
                call.deliver_end(None)
        elif isinstance(e, ev.BadMessage):
            if (call := self.calls.get(e.stream_id)) is not None:
                call.deliver_end(e.error)
        elif isinstance(e, ev.CallCancelled):
            if (call := self.calls.get(e.stream_id)) is not None:
                call.client_gone(f"stream reset by the client (error code {e.error_code})")
        elif isinstance(e, ev.CallRefused):
            # Every refusal but our own (draining) is the client's fault.
            if e.reason != REFUSED_STREAM:
                self.metrics.bad_input.labels(FRONTEND, e.reason).inc()
        elif isinstance(e, ev.ConnectionEnded):
            # h2 accepts no frame after a GOAWAY in either direction, so a
            # client's GOAWAY ends the connection for its calls too.
            log.debug("gRPC frontend: client sent GOAWAY (%s)", e.error_code)
            return True
        return False

    def _start_call(self, e: ev.CallStarted) -> None:
        assert self._calls_nursery is not None
        call = _ProxyCall(self, e.stream_id, e.deadline)
        self.calls[e.stream_id] = call
        self.calls_served += 1
        self.metrics.grpc_connections.labels(METHOD).inc()
        self._calls_nursery.start_soon(call.run)

    def call_done(self, call: _ProxyCall) -> None:
        if self.calls.pop(call.stream_id, None) is not None:
            self.metrics.grpc_connections.labels(METHOD).dec()
        if self.server.goaway_sent and not self.calls:
            self._close_when_flushed()


class _Open(enum.Enum):
    """The client may still send on the call."""

    OPEN = "open"


#: How a call's request stream ended: None for a clean half-close, the
#: framing error that ended it, or not yet.
_End = RemoteProtocolError | None | _Open


class _ProxyCall:
    """One ``/ProxyService/Proxy`` call: at most one dial and one tunnel."""

    def __init__(self, conn: _Connection, stream_id: int, timeout: float | None) -> None:
        self.conn = conn
        self.server = conn.server
        self.fe = conn.fe
        self.metrics = conn.metrics
        self.settings = conn.settings
        self.stream_id = stream_id
        self.timeout = timeout
        self.phase = Phase.IDLE
        #: The phase the call was in when its ending was decided.
        self.ended_in = Phase.IDLE
        self.ending: Ending | None = None
        # Upstream: whole messages, bounded by the stream window (their
        # credit returns only once handled), then how the stream ended.
        self._messages: collections.deque[tuple[bytes, int]] = collections.deque()
        self._end: _End = _Open.OPEN
        self._readable = trio.lowlevel.ParkingLot()
        #: Senders waiting for the call's queued output to reach HTTP/2.
        self.progress = trio.lowlevel.ParkingLot()
        # Downstream: whole messages only, one sender at a time.
        self._send_lock = trio.Lock()
        # Dial and tunnel.
        self._dial_random: int | None = None
        self.ts: Tunnel | None = None
        self.connect_id = 0
        self._nursery: trio.Nursery | None = None

    def _move(self, what: PhaseInput) -> None:
        try:
            self.phase = PHASES[self.phase, what]
        except KeyError:
            raise AssertionError(f"Proxy call: {what.value} in phase {self.phase.value}") from None

    # ---------------------------------------------- fed by the connection

    def deliver(self, message: bytes, flow: int) -> None:
        self._messages.append((message, flow))
        self._readable.unpark_all()

    def deliver_end(self, end: _End) -> None:
        self._end = end
        self._readable.unpark_all()

    def client_gone(self, reason: str) -> None:
        log.debug("Proxy call %d: %s", self.stream_id, reason)
        self._finish(CLIENT_GONE)
        self._readable.unpark_all()
        self.progress.unpark_all()

    # ------------------------------------------------------------------ run

    async def run(self) -> None:
        try:
            await self._serve()
        except Exception:
            log.exception("gRPC Proxy call %d failed", self.stream_id)
            self._finish(INTERNAL_ERROR)
            self._end_stream(self.ending or CLIENT_GONE)
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
        if self.ending is None:  # only the grpc-timeout deadline gets here
            self._finish(DEADLINE)
        ending = self.ending
        assert ending is not None
        if self.ended_in is not Phase.IDLE:
            # One count per dial: its outcome as the client saw it.
            label = "200" if self.ended_in is Phase.CONNECTED else ending.label
            self.metrics.frontend_requests.labels(FRONTEND, label).inc()
        log.debug("Proxy call %d ended: %s", self.stream_id, ending.label)
        self._end_stream(ending)
        ts, self.ts = self.ts, None
        if ts is not None:
            await self._dispose_tunnel(ts, ending.tunnel)

    def _finish(self, ending: Ending) -> None:
        """Record how the call ends (first caller wins) and stop its tasks."""
        if self.ending is None:
            self.ending = ending
            self.ended_in = self.phase
            self._move(PhaseInput.END)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _guard(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        try:
            await fn(*args)
        except _ClientGone:
            self._finish(CLIENT_GONE)

    # ----------------------------------------------------------- upstream

    async def _next_message(self) -> tuple[bytes, int] | None:
        """The client's next message and its credit; None when it half-closed.
        Raises the framing error that ended its stream."""
        while True:
            if self.ending is CLIENT_GONE:
                raise _ClientGone("call reset")
            if self._messages:
                return self._messages.popleft()
            if self._end is None:
                return None
            if self._end is not _Open.OPEN:
                raise self._end
            await self._readable.park()

    async def _upstream(self) -> None:
        while self.ending is None:
            try:
                item = await self._next_message()
                if item is None:
                    # konnectivity-server: the client's EOF ends the call, and
                    # what is behind it is closed (not reset).
                    self._finish(Ending("client_half_close", tunnel=Disposal.CLOSE))
                    return
                raw, flow = item
                try:
                    pkt = packets.decode_packet(raw)
                except InvalidMessage as exc:
                    # konnectivity-server ignores packets it does not expect.
                    self.metrics.bad_input.labels(FRONTEND, exc.reason).inc()
                    log.info("Proxy call %d: packet ignored: %s", self.stream_id, exc)
                    pkt = None
            except ProtocolError as exc:
                status, message = status_for_error(exc)
                self.metrics.bad_input.labels(FRONTEND, exc.reason).inc()
                log.warning("Proxy call %d: %s: %s", self.stream_id, status.name, message)
                self._finish(Ending(exc.reason, status, message))
                return
            if pkt is not None:
                await self._on_packet(pkt)
            # Handled: only now may the client send more on this call.
            self.server.acknowledge(self.stream_id, flow)
            self.conn.wake_writer()

    async def _on_packet(self, pkt: pb.Packet) -> None:
        if pkt.type == pb.DIAL_REQ:
            await self._on_dial_request(pkt.dialRequest)
        elif pkt.type == pb.DATA:
            await self._on_data(pkt.data)
        elif pkt.type == pb.CLOSE_REQ:
            cid = pkt.closeRequest.connectID
            if self.phase is Phase.CONNECTED and cid == self.connect_id:
                await self._send_final(
                    packets.close_response(cid), Ending("client_close", tunnel=Disposal.CLOSE)
                )
            else:
                await self._send(packets.close_response(cid, "unknown connectID"))
        elif pkt.type == pb.DIAL_CLS:
            random = pkt.closeDial.random
            if self.phase is Phase.DIALING and random == self._dial_random:
                log.info("Proxy call %d: dial cancelled by the client (DIAL_CLS)", self.stream_id)
                self._finish(Ending("dial_cancelled"))
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
            await self._send_final(packets.dial_response(req.random, error=error), Ending("400"))
            return
        self._move(PhaseInput.DIAL)
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
                packets.dial_response(random, error=exc.message), Ending(str(exc.http_status))
            )
            return
        self.ts = ts  # from here on, every way out disposes of it
        self.connect_id = next(_CONNECT_IDS)
        self._move(PhaseInput.CONNECTED)
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
        if self.phase is not Phase.CONNECTED or self.ts is None:
            await self._send_final(
                packets.close_response(cid, "backend not initialized"), Ending("data_too_early")
            )
            return
        if cid != self.connect_id:
            self.metrics.bad_input.labels(FRONTEND, "mismatched_connect_id").inc()
            await self._send(packets.close_response(cid, "mismatched connection IDs"))
            await self._send_final(
                packets.close_response(self.connect_id, "mismatched connection IDs"),
                Ending("mismatched_connect_id"),
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

    async def _downstream(self, ts: Tunnel, cid: int) -> None:
        down = self.metrics.bytes_relayed.labels("down")
        while True:
            try:
                chunk = await ts.receive()
            except StreamAborted as exc:
                await self._send_final(
                    packets.close_response(cid, f"connection aborted: {exc}"),
                    Ending("target_reset"),
                )
                return
            if chunk is None:
                await self._send_final(
                    packets.close_response(cid), Ending("target_closed", tunnel=Disposal.CLOSE)
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
            data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            with memoryview(data) as view:
                for off in range(0, len(data), MAX_DATA_PAYLOAD):
                    await self._send_data(cid, view[off : off + MAX_DATA_PAYLOAD])
            # Only now may the agent send more: HTTP/2 holds the bytes.
            ts.acknowledge(flow)
            down.inc(len(data))

    # ------------------------------------------------------------ sending

    async def _send(self, pkt: pb.Packet) -> None:
        """Send one packet as a whole message; dropped once the call is ending."""
        async with self._send_lock:
            if self.ending is not None:
                return
            await self._send_message(packets.encode_packet(pkt))

    async def _send_data(self, cid: int, data: memoryview) -> None:
        """Send one DATA packet; its payload is copied once, into the message."""
        async with self._send_lock:
            if self.ending is not None:
                return
            await self._send_message(packets.data_message(cid, data), framed=True)

    async def _send_final(self, pkt: pb.Packet, ending: Ending) -> None:
        """Send the packet that ends the call, then end it.

        The ending is claimed first, under the send lock, so no other task
        can slip a packet in after the final one. A client that does not
        take it in time gets a reset instead of trailers (see _end_stream).
        """
        async with self._send_lock:
            if self.ending is not None:
                return
            self._finish_later(ending)
            with trio.move_on_after(FINAL_SEND_TIMEOUT) as scope:
                await self._send_message(packets.encode_packet(pkt))
            if scope.cancelled_caught:
                log.info("Proxy call %d: client not reading; resetting it", self.stream_id)
        self._finish(ending)

    def _finish_later(self, ending: Ending) -> None:
        """Claim the ending without stopping the tasks yet (the final packet
        is still to be sent)."""
        self.ending = ending
        self.ended_in = self.phase
        self._move(PhaseInput.END)

    async def _send_message(self, message: bytes, *, framed: bool = False) -> None:
        """Queue ``message`` on the call and wait until HTTP/2 took all of
        it (within the client's windows) and the socket keeps up."""
        sid = self.stream_id
        if self.conn.lost or self.server.call_state(sid) not in SENDING:
            raise _ClientGone("call reset")
        self.server.send_message(sid, message, framed=framed)
        self.conn.wake_writer()
        while self.server.unsent(sid):
            await self.progress.park()
            if self.conn.lost:
                raise _ClientGone("connection lost")
        if self.server.call_state(sid) is None:
            raise _ClientGone("call reset")
        # Socket backpressure: the shared driver's (its waiters park and
        # recheck, so none loses another's wake-up).
        if not await self.conn.driver.wait_writable(len(message)):
            raise _ClientGone("connection lost")

    def _end_stream(self, ending: Ending) -> None:
        """Trailers with the status, or a reset when no clean end is possible."""
        sid = self.stream_id
        if ending.status is None or self.conn.lost or self.server.call_state(sid) is None:
            return
        if self.server.unsent(sid):
            # A message was cut short (or the client would not take the
            # final one): only a reset can follow.
            self.server.reset_call(sid)
        else:
            self.server.end_call(sid, ending.status, ending.message)
        self.conn.wake_writer()

    # -------------------------------------------------------------- tunnel

    async def _dispose_tunnel(self, ts: Tunnel, how: Disposal) -> None:
        """Close or reset the tunnel; a clean close lingers so data is not cut.

        A FIN follows everything already sent, but resetting right after it
        could overtake those bytes at the agent. So we wait (bounded) for the
        agent's side to end too, discarding what the target still sends.
        """
        done = False
        try:
            if how is Disposal.CLOSE and not ts.aborted:
                ts.send_eof()
                with trio.move_on_after(self.settings.linger):
                    while (chunk := await ts.receive()) is not None:
                        ts.acknowledge(chunk.flow_len)
                    done = True
        except (StreamAborted, TunnelClosed):
            done = True
        finally:
            if not done:
                self._reset_tunnel(ts)
            log.debug("Proxy call %d: tunnel %s", self.stream_id, "closed" if done else "reset")
            ts.forget()
            self.metrics.established.labels(FRONTEND).dec()

    def _reset_tunnel(self, ts: Tunnel) -> None:
        if self.ts is ts:
            self.ts = None
            self.metrics.established.labels(FRONTEND).dec()
        if not ts.aborted:
            ts.reset()
        ts.forget()
