"""A stock konnectivity agent on the agent port: one ``/AgentService/Connect``
call, served beside Tether's control stream (docs/protocol.md, section 10).

The agent server (:mod:`broker.agent_server`) tells the two kinds apart by
the first request's path (:mod:`protocol.agent_port`) and hands a
konnectivity connection, with its already-initiated HTTP/2 engine and the
bytes sniffed so far, to :class:`KonnectivityConnection`. The call is the
sans-IO :class:`protocol.grpc_server.GrpcServer` run by the shared driver
(:class:`tether.netio.h2driver.H2Driver`), as the gRPC frontend's calls are.

konnectivity-server's ``Connect`` semantics, followed here:

- request metadata ``agentid`` (exactly one), ``agentidentifiers``
  (konnectivity's query form) and ``authorization: Bearer <ServiceAccount
  token>``; the response headers carry ``serverid`` and ``servercount``
  at once (the agent reads them before anything else, and opens
  ``servercount`` connections through the balancer);
- to the agent: DIAL_REQ (``random``: our dial id), DATA, CLOSE_REQ and
  DIAL_CLS (a pending dial is given up); from the agent: DIAL_RSP
  (``connectID`` or ``error``), DATA, CLOSE_RSP, DIAL_CLS (the agent gave
  the dial up) and DRAIN (it is leaving: no new dials);
- DATA for a connectID it does not know is answered with CLOSE_REQ; a
  DIAL_RSP nobody waits for, with a connectID, too.

A konnectivity agent is an ordinary backend (:class:`broker.registry.RoutableAgent`):
the same authentication (its client certificate, or its token through the
configured TokenReview; :class:`broker.auth.Authenticator`), identifier
checks, routing, HA count, drain and metrics (``kind`` label) as a Tether
agent.

Isolation. konnectivity multiplexes every tunnel of an agent in one gRPC
stream, handled in order. Each tunnel buffers at most
:data:`TUNNEL_BUFFER` bytes the frontend has not taken; when one is full the
call stops reading (its HTTP/2 stream credit is not returned), so the agent's
whole stream stalls until that client reads: that is konnectivity's own
limit, and it stays inside this agent's stream. The socket reader never
waits, so other agents (either kind) on the broker keep their pace.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import urllib.parse

import trio

from broker.agent_conn import ServerInfo, fail_pending, warn_identifiers_not_allowed
from broker.auth import Authenticator, AuthError, Identity
from broker.dialing import DialError, DialOutcome
from broker.metrics import BrokerMetrics
from broker.registry import Membership, Registry, RegistryRefused
from protocol import grpc_events as ev
from protocol import handshake, packets
from protocol import konnectivity_pb2 as pb
from protocol.agent_port import (
    KONN_AGENT_ID,
    KONN_AGENT_IDENTIFIERS,
    KONN_SERVER_COUNT,
    KONN_SERVER_ID,
    KONNECTIVITY_CONNECT_PATH,
)
from protocol.budget import BufferBudget, Grant
from protocol.codes import CloseCode
from protocol.errors import InvalidMessage, ProtocolError, RemoteProtocolError
from protocol.events import StreamData
from protocol.flood import FloodDetected
from protocol.grpc_framing import GrpcStatus, status_for_error
from protocol.grpc_server import REFUSED_STREAM, SENDING, GrpcServer, GrpcServerSettings
from protocol.h2base import H2Base, H2Settings
from protocol.identifiers import AgentIdentifiers, Allowance
from protocol.outcomes import CloseReason
from tether.netio.h2driver import H2Driver
from tether.netio.logs import event, limited
from tether.netio.tunnel import Keepalive, ReceiveQueue, StreamAborted, TunnelClosed

log = logging.getLogger("tether.broker")

KIND = "konnectivity"
SOURCE = "konnectivity_agent"  # bad_input source label
#: What one tunnel may hold that its frontend has not taken yet; past it the
#: agent's stream stalls (see the module docstring).
TUNNEL_BUFFER = 256 * 1024
#: Largest payload put into one DATA packet to the agent.
MAX_DATA_PAYLOAD = 64 * 1024
#: Packets queued on the call (not yet in HTTP/2) before senders wait.
SEND_QUEUE = 1024 * 1024
#: Connection ids we closed and still accept late packets for, per agent.
MAX_CLOSING = 4096
#: Log lines per agent for each kind of routine packet trouble.
_LOG_FIRST = 10


class KonnectivityTunnel(ReceiveQueue):
    """One connection of a konnectivity agent (a ``connectID``), as the
    frontends use a tunnel (:class:`tether.netio.tunnel.Tunnel`)."""

    def __init__(
        self,
        agent: KonnectivityAgent,
        connect_id: int,
        dial_id: int,
        grant: Grant | None = None,
    ) -> None:
        self.agent = agent
        self.stream_id = connect_id
        self.dial_id = dial_id
        #: The tunnel's share of the broker's buffer budget (its buffer).
        self.grant = grant
        self.limit = min(TUNNEL_BUFFER, grant.window) if grant is not None else TUNNEL_BUFFER
        ReceiveQueue.__init__(self)
        #: Delivered to the frontend (or buffered) and not yet acknowledged.
        self._held = 0
        self._closing = False  # CLOSE_REQ sent
        #: The agent's packet loop waits here for room in the buffer.
        self.room = trio.lowlevel.ParkingLot()

    # ---------------------------------------------- fed by the packet loop

    @property
    def full(self) -> bool:
        return self._held >= self.limit and self._abort is None

    def deliver(self, data: bytes) -> None:
        if self._abort is not None or self._eof:
            return
        self._held += len(data)
        self._deliver(StreamData(self.stream_id, data, len(data)))

    def ended(self, error: str = "") -> None:
        """CLOSE_RSP from the agent: the target side is gone."""
        if error:
            self.aborted_by(StreamAborted(f"closed by the agent: {error}"))
        else:
            self._ended()

    def aborted_by(self, exc: StreamAborted) -> None:
        self._record_abort(exc)
        self.room.unpark_all()

    # ------------------------------------------------------------ frontend

    def acknowledge(self, flow_len: int) -> None:
        self._held = max(0, self._held - flow_len)
        if self._held < self.limit:
            self.room.unpark_all()

    async def wait_writable(self) -> int:
        if self._abort is not None:
            raise self._abort
        if self._closing:
            raise StreamAborted("tunnel closed")
        await self.agent.wait_send_room()
        if self._abort is not None:
            raise self._abort
        return MAX_DATA_PAYLOAD

    async def send_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            await self.wait_writable()
            piece, view = bytes(view[:MAX_DATA_PAYLOAD]), view[MAX_DATA_PAYLOAD:]
            self.agent.send_packet(packets.data_packet(self.stream_id, piece))

    def send_eof(self) -> None:
        # konnectivity has no half-close: a client's EOF closes the tunnel,
        # as konnectivity-server's own frontends do.
        self._close()

    def send_close(self, code: CloseCode, msg: str) -> None:
        self._close()

    def reset(self, error_code: int = 0x8) -> None:  # CANCEL: no error codes in konnectivity
        self._close()
        self.aborted_by(StreamAborted("reset locally"))
        self.agent.forget(self.stream_id)

    def forget(self) -> None:
        self._close()
        self.agent.forget(self.stream_id)

    def _close(self) -> None:
        if not self._closing and self._abort is None and not self._eof:
            self._closing = True
            self.agent.send_packet(_close_request(self.stream_id))
        self._closing = True


class _PendingDial:
    def __init__(self, dial_id: int, addr: str, grant: Grant | None) -> None:
        self.dial_id = dial_id
        self.addr = addr
        self.grant = grant
        self.done = trio.Event()
        self.tunnel: KonnectivityTunnel | None = None
        self.error: DialError | None = None


class KonnectivityAgent:
    """The routable side of a konnectivity agent (:class:`broker.registry.RoutableAgent`)."""

    kind = KIND

    def __init__(self, conn: KonnectivityConnection, identity: Identity, remote: str) -> None:
        self.conn = conn
        self.metrics = conn.metrics
        self._cluster = identity.cluster
        self._agent_id = identity.agent_id
        self.identity = identity
        self.auth_method = identity.method
        self.remote = remote
        self.instance = ""
        self._identifiers = AgentIdentifiers()
        self.pending: dict[int, _PendingDial] = {}
        self.tunnels: dict[int, KonnectivityTunnel] = {}
        #: Connection ids we closed whose CLOSE_RSP has not come yet.
        self.closing: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.draining = False
        self.closed = False
        self.counts: collections.Counter[str] = collections.Counter()

    # -------------------------------------------------------- RoutableAgent

    @property
    def cluster(self) -> str:
        return self._cluster

    @property
    def agent_id(self) -> str:
        return self._agent_id

    @property
    def identifiers(self) -> AgentIdentifiers:
        return self._identifiers

    @property
    def usable(self) -> bool:
        return not (self.draining or self.closed)

    @property
    def load(self) -> int:
        return len(self.pending) + len(self.tunnels)

    async def dial(
        self, dial_id: int, addr: str, timeout: float, early: bytes | None = None
    ) -> KonnectivityTunnel:
        if self.closed:
            raise DialError(DialOutcome.AGENT_LOST, "agent connection lost")
        budget = self.conn.budget
        grant = budget.open() if budget is not None else None
        if budget is not None:
            if grant is None:
                raise DialError(
                    DialOutcome.BUSY, f"broker busy: {budget.describe()}", code="broker_busy"
                )
            # A konnectivity tunnel buffers at most TUNNEL_BUFFER: reserve that.
            budget.shrink(grant, grant.window - TUNNEL_BUFFER)
        pending = _PendingDial(dial_id, addr, grant)
        self.pending[dial_id] = pending
        self.metrics.pending_dials.inc()
        delivered = False
        try:
            self.send_packet(
                pb.Packet(
                    type=pb.DIAL_REQ,
                    dialRequest=pb.DialRequest(protocol="tcp", address=addr, random=dial_id),
                )
            )
            with trio.move_on_after(timeout):
                await pending.done.wait()
            if pending.error is not None:
                raise pending.error
            tunnel = pending.tunnel
            if tunnel is None:
                raise DialError(DialOutcome.TIMEOUT, f"dial to {addr} timed out after {timeout:g}s")
            if early:
                try:
                    await tunnel.send_all(early)
                except (StreamAborted, TunnelClosed) as exc:
                    raise DialError(
                        DialOutcome.AGENT_LOST, f"agent connection lost: {exc}"
                    ) from None
            delivered = True
            return tunnel
        finally:
            self.pending.pop(dial_id, None)
            self.metrics.pending_dials.dec()
            if not delivered:
                if pending.tunnel is not None:
                    pending.tunnel.reset()  # returns the grant
                elif budget is not None and grant is not None:
                    budget.release(grant)
                if pending.tunnel is None and not pending.done.is_set() and not self.closed:
                    # Given up (timeout, cancelled): the agent drops the dial.
                    self.send_packet(
                        pb.Packet(type=pb.DIAL_CLS, closeDial=pb.CloseDial(random=dial_id))
                    )

    def abort(self, reason: str) -> None:
        """A newcomer with this agent's id and credential replaced it."""
        self.fail_all(reason)
        self.conn.driver.abort(CloseReason.REPLACED, reason)

    # -------------------------------------------------------------- sending

    def send_packet(self, pkt: pb.Packet) -> None:
        self.conn.send_packet(pkt)

    async def wait_send_room(self) -> None:
        await self.conn.wait_send_room()

    def forget(self, connect_id: int) -> None:
        tunnel = self.tunnels.pop(connect_id, None)
        if tunnel is None:
            return
        self.metrics.konnectivity_tunnels.dec()
        grant, tunnel.grant = tunnel.grant, None
        if grant is not None and self.conn.budget is not None:
            self.conn.budget.release(grant)
        if not tunnel.aborted and not tunnel.at_eof:
            self.closing[connect_id] = None
            while len(self.closing) > MAX_CLOSING:
                self.closing.popitem(last=False)
        tunnel.room.unpark_all()

    # ------------------------------------------------------ agent's packets

    async def on_packet(self, pkt: pb.Packet) -> None:
        """Handle one packet from the agent; waits only while the tunnel a
        DATA packet is for has no room (the agent's stream stalls)."""
        t = pkt.type
        if t == pb.DATA:
            await self._on_data(pkt.data)
        elif t == pb.DIAL_RSP:
            self._on_dial_response(pkt.dialResponse)
        elif t == pb.CLOSE_RSP:
            cid = pkt.closeResponse.connectID
            tunnel = self.tunnels.get(cid)
            if tunnel is not None:
                tunnel.ended(pkt.closeResponse.error)
            elif cid in self.closing:
                del self.closing[cid]
            else:
                self._bad("unknown_connect_id", f"CLOSE_RSP for unknown connectID {cid}")
        elif t == pb.DIAL_CLS:
            random = pkt.closeDial.random
            pending = self.pending.get(random)
            if pending is not None and not pending.done.is_set():
                pending.error = DialError(DialOutcome.FAILED, "dial closed by the agent (DIAL_CLS)")
                pending.done.set()
            else:
                self._bad("unknown_dial_id", f"DIAL_CLS for unknown dial {random}")
        elif t == pb.DRAIN:
            if not self.draining:
                log.info(
                    "konnectivity agent %s/%s is draining: no new dials",
                    self.cluster,
                    self.agent_id,
                )
            self.draining = True
        else:
            # DIAL_REQ, CLOSE_REQ: a server's packets; konnectivity ignores them.
            self._bad("unexpected_packet", f"unexpected {pb.PacketType.Name(t)} from an agent")

    async def _on_data(self, data: pb.Data) -> None:
        cid = data.connectID
        tunnel = self.tunnels.get(cid)
        if tunnel is None:
            if cid in self.closing:
                return  # in flight when we closed it
            self._bad("unknown_connect_id", f"DATA for unknown connectID {cid}")
            if cid:
                self.send_packet(_close_request(cid))
                self.closing[cid] = None
                while len(self.closing) > MAX_CLOSING:
                    self.closing.popitem(last=False)
            return
        if data.data:
            while tunnel.full and self.tunnels.get(cid) is tunnel:
                self.metrics.window_stalls.inc()
                await tunnel.room.park()
            tunnel.deliver(data.data)

    def _on_dial_response(self, rsp: pb.DialResponse) -> None:
        pending = self.pending.get(rsp.random)
        if pending is None or pending.done.is_set():
            self._bad("unknown_dial_id", f"DIAL_RSP for unknown dial {rsp.random}")
            if rsp.connectID and not rsp.error:
                self.send_packet(_close_request(rsp.connectID))
            return
        if rsp.error:
            pending.error = DialError(DialOutcome.FAILED, f"dial failed at the agent: {rsp.error}")
        elif rsp.connectID == 0 or rsp.connectID in self.tunnels:
            self._bad("bad_connect_id", f"DIAL_RSP with unusable connectID {rsp.connectID}")
            pending.error = DialError(DialOutcome.FAILED, "agent answered with a bad connectID")
        else:
            tunnel = KonnectivityTunnel(self, rsp.connectID, rsp.random, pending.grant)
            self.tunnels[rsp.connectID] = tunnel
            self.closing.pop(rsp.connectID, None)
            self.metrics.konnectivity_tunnels.inc()
            pending.tunnel = tunnel
        pending.done.set()

    def _bad(self, reason: str, text: str) -> None:
        self.metrics.bad_input.labels(SOURCE, reason).inc()
        self.counts[reason] += 1
        n = self.counts[reason]
        if n <= _LOG_FIRST or n % 1000 == 0:
            log.info(
                "konnectivity agent %s/%s: %s (%d so far)", self.cluster, self.agent_id, text, n
            )

    # ------------------------------------------------------------ teardown

    def fail_all(self, reason: str) -> None:
        """The connection is gone: pending dials fail at once, tunnels abort."""
        self.closed = True
        fail_pending(self.pending.values(), reason)
        for tunnel in list(self.tunnels.values()):
            tunnel.aborted_by(StreamAborted(f"agent connection lost: {reason}"))


def _close_request(connect_id: int) -> pb.Packet:
    return pb.Packet(type=pb.CLOSE_REQ, closeRequest=pb.CloseRequest(connectID=connect_id))


def server_settings(h2: H2Settings, max_message_size: int) -> GrpcServerSettings:
    return GrpcServerSettings(h2, max_message_size=max_message_size)


class KonnectivityConnection:
    """One agent-port connection whose first request is ``/AgentService/Connect``."""

    def __init__(
        self,
        *,
        transport: trio.abc.Stream,
        base: H2Base,
        initial: bytes,
        registry: Registry,
        server: ServerInfo,
        authenticator: Authenticator,
        peer_der: bytes | None,
        remote: str,
        max_message_size: int,
        call_window: int,
        handshake_timeout: float,
        keepalive: Keepalive | None = None,
        budget: BufferBudget | None = None,
        draining: bool = False,
    ) -> None:
        self.registry = registry
        self.metrics: BrokerMetrics = registry.metrics
        self.server_info = server
        self.authenticator = authenticator
        self.peer_der = peer_der
        self.remote = remote
        self.call_window = call_window
        self.handshake_timeout = handshake_timeout
        self.keepalive = keepalive or Keepalive()
        #: The broker's buffer budget, shared with Tether agents' tunnels.
        self.budget = budget
        self._ping: tuple[bytes, trio.Event] | None = None
        self.server = GrpcServer(
            server_settings(base.settings, max_message_size),
            methods={KONNECTIVITY_CONNECT_PATH},
            clock=trio.current_time,
            base=base,
        )
        self.driver: H2Driver[ev.Event] = H2Driver(
            transport, _Engine(self), self._dispatch, initial=initial
        )
        self.agent: KonnectivityAgent | None = None
        self.call_id: int | None = None
        self.draining = draining
        self._messages: collections.deque[tuple[bytes, int]] = collections.deque()
        self._end: RemoteProtocolError | bool | None = False  # False: still open
        self._readable = trio.lowlevel.ParkingLot()
        self._room = trio.lowlevel.ParkingLot()
        self._nursery: trio.Nursery | None = None
        self.registered = trio.Event()
        #: How the call ended (a log and metric token) and whether the agent
        #: broke the protocol.
        self.ending = ""
        self.violation = False

    # ------------------------------------------------------------------ run

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._call_deadline)
            nursery.start_soon(self._keepalive)
            try:
                await self.driver.run()
            finally:
                nursery.cancel_scope.cancel()
                self._room.unpark_all()
                if self.agent is not None:
                    self.agent.fail_all(self.driver.close_detail or "closed")

    async def _call_deadline(self) -> None:
        with trio.move_on_after(self.handshake_timeout):
            await self.registered.wait()
            return
        if self.call_id is None:
            self.metrics.bad_input.labels(SOURCE, "no_connect_call").inc()
            self.driver.abort(CloseReason.HANDSHAKE_TIMEOUT, "no Connect call")

    async def _keepalive(self) -> None:
        """A dead link (no FIN) must not keep a dead agent routable: PING
        after ``interval`` of silence, give up after ``timeout``, as the
        Tether agent's connections do (tether/netio/tunnel.py)."""
        interval, timeout = self.keepalive.interval, self.keepalive.timeout
        if not math.isfinite(interval) or interval <= 0:
            return
        while True:
            idle_for = trio.current_time() - self.driver.last_rx
            if idle_for < interval:
                await trio.sleep(interval - idle_for)
                continue
            payload = os.urandom(8)
            acked = trio.Event()
            self._ping = (payload, acked)
            self.server.send_ping(payload)
            self.driver.wake_writer()
            with trio.move_on_after(timeout):
                await acked.wait()
            self._ping = None
            if not acked.is_set():
                self.ending = "keepalive_timeout"
                self.driver.abort(
                    CloseReason.KEEPALIVE_TIMEOUT, f"keepalive: no PING ACK within {timeout:g}s"
                )
                return
            await trio.sleep(interval)

    def goaway(self) -> None:
        """Drain: the agent must not open a new call here; the open one runs
        until :meth:`close` (its tunnels finish)."""
        self.draining = True
        if self.agent is not None:
            self.agent.draining = True
        self.server.goaway()
        self.server.refuse_new_calls()
        self.driver.wake_writer()

    def close(self, message: str) -> None:
        """End the call (UNAVAILABLE: the agent reconnects elsewhere) and the
        connection, after a bounded flush."""
        if self.call_id is not None and self.server.call_state(self.call_id) in SENDING:
            self.server.end_call(self.call_id, GrpcStatus.UNAVAILABLE, message)
        self.server.goaway()
        self.driver.wake_writer()

    async def flush(self) -> None:
        await self.driver.flush(1.0)

    # ------------------------------------------------------------- sending

    def send_packet(self, pkt: pb.Packet) -> None:
        """Queue one packet on the call (never waits; senders of bulk data
        wait for room first with :meth:`wait_send_room`)."""
        sid = self.call_id
        if sid is None or self.driver.closed or self.server.call_state(sid) not in SENDING:
            return
        self.server.send_message(sid, packets.encode_packet(pkt))
        self.driver.wake_writer()

    async def wait_send_room(self) -> None:
        sid = self.call_id
        while True:
            if sid is None or self.driver.closed or self.server.call_state(sid) not in SENDING:
                raise TunnelClosed("konnectivity agent connection lost")
            if self.server.unsent(sid) < SEND_QUEUE:
                break
            await self._room.park()
        if not await self.driver.wait_writable(0):
            raise TunnelClosed("konnectivity agent connection lost")

    # ------------------------------------------------------------- reading

    def _dispatch(self, e: ev.Event) -> bool:
        if isinstance(e, ev.MessageReceived):
            if e.stream_id == self.call_id:
                self._messages.append((e.message, e.flow_len))
                self._readable.unpark_all()
        elif isinstance(e, ev.CallWritable):
            self._room.unpark_all()
        elif isinstance(e, ev.PingAcked):
            if self._ping is not None and self._ping[0] == e.payload:
                self._ping[1].set()
        elif isinstance(e, ev.CallStarted):
            self._start_call(e)
        elif isinstance(e, ev.CallHalfClosed | ev.BadMessage):
            if e.stream_id == self.call_id:
                self._end = e.error if isinstance(e, ev.BadMessage) else None
                self._readable.unpark_all()
        elif isinstance(e, ev.CallCancelled):
            if e.stream_id == self.call_id:
                self.driver.note_close(
                    CloseReason.CONTROL_CLOSED, "Connect call reset by the agent"
                )
                return True
        elif isinstance(e, ev.CallRefused):
            if e.reason != REFUSED_STREAM:
                self.metrics.bad_input.labels(SOURCE, e.reason).inc()
        elif isinstance(e, ev.ConnectionEnded):
            self.driver.note_close(CloseReason.GOAWAY, "agent sent GOAWAY")
            return True
        return False

    def _start_call(self, e: ev.CallStarted) -> None:
        assert self._nursery is not None
        if self.call_id is not None:
            # One Connect call per connection, as a konnectivity agent opens.
            self.metrics.bad_input.labels(SOURCE, "second_connect").inc()
            self.server.end_call(
                e.stream_id, GrpcStatus.ALREADY_EXISTS, "one Connect call per connection"
            )
            return
        self.call_id = e.stream_id
        if self.call_window > self.server.settings.h2.initial_window:
            self.server.raise_window(
                e.stream_id, self.call_window - self.server.settings.h2.initial_window
            )
        self._nursery.start_soon(self._serve_call, e)

    async def _serve_call(self, e: ev.CallStarted) -> None:
        sid = e.stream_id
        refusal = await self._authenticate(e.metadata)
        if isinstance(refusal, tuple):
            status, reason, text = refusal
            self._refuse(sid, status, reason, text)
            return
        agent = refusal
        self.agent = agent
        self.metrics.agents_by_kind.labels(KIND).inc()
        try:
            await self._registered_call(sid, agent)
        finally:
            self.metrics.agents_by_kind.labels(KIND).dec()
            self.registry.remove(agent)
            agent.fail_all(self.driver.close_detail or self.ending or "closed")
            cause = self.ending or "peer_closed"
            self.metrics.agent_disconnects.labels(self._cause_label()).inc()
            log.info(
                "agent disconnected: id=%s cluster=%s kind=%s reason=%s",
                agent.agent_id,
                agent.cluster,
                KIND,
                self.driver.close_detail or cause,
                extra=event(
                    "agent_disconnected",
                    agent_id=agent.agent_id,
                    cluster=agent.cluster,
                    remote=self.remote,
                    kind=KIND,
                    cause=cause,
                    reason=self.driver.close_detail or cause,
                ),
            )

    def _cause_label(self) -> str:
        """``tether_agent_disconnects_total``'s cause, as for Tether agents."""
        if self.violation:
            return "protocol_error"
        reason = self.driver.close_reason
        if reason is CloseReason.KEEPALIVE_TIMEOUT:
            return "keepalive_timeout"
        if reason is CloseReason.REPLACED:
            return "replaced"
        return "peer_closed"

    async def _registered_call(self, sid: int, agent: KonnectivityAgent) -> None:
        while True:
            if not self._messages:
                if self._end is not False:
                    break
                if self.driver.closed:
                    return
                await self._readable.park()
                continue
            raw, flow = self._messages.popleft()
            try:
                pkt = packets.decode_packet(raw)
            except InvalidMessage as exc:
                # Unknown types, a payload that does not match: ignored, as
                # konnectivity-server does.
                agent._bad(exc.reason, str(exc))
                pkt = None
            except ProtocolError as exc:  # not a Packet at all
                status, message = status_for_error(exc)
                self.metrics.bad_input.labels(SOURCE, exc.reason).inc()
                limited(
                    log,
                    logging.WARNING,
                    self.remote.rpartition(":")[0] or "?",
                    "konnectivity agent %s/%s: %s; ending its stream",
                    agent.cluster,
                    agent.agent_id,
                    message,
                    key="konnectivity_bad_packet",
                    extra=event(
                        "protocol_violation",
                        agent_id=agent.agent_id,
                        remote=self.remote,
                        reason=exc.reason,
                    ),
                )
                self.ending = f"bad_{exc.reason}"
                self.violation = True
                self.server.end_call(sid, status, message)
                self.driver.wake_writer()
                await self.driver.flush(0.5)
                self.driver.abort(CloseReason.PROTOCOL_ERROR, message)
                return
            if pkt is not None:
                await agent.on_packet(pkt)
            self.server.acknowledge(sid, flow)
            self.driver.wake_writer()
        end = self._end
        if isinstance(end, RemoteProtocolError):
            status, message = status_for_error(end)
            self.metrics.bad_input.labels(SOURCE, end.reason).inc()
            log.warning(
                "konnectivity agent %s/%s: %s: %s",
                agent.cluster,
                agent.agent_id,
                status.name,
                message,
            )
            self.ending = f"bad_{end.reason}"
            self.violation = True
            self.server.end_call(sid, status, message)
        else:
            self.ending = "agent_half_close"
            self.server.end_call(sid, GrpcStatus.OK)
        self.driver.wake_writer()
        await self.driver.flush(0.5)
        self.driver.abort(CloseReason.CONTROL_CLOSED, self.ending)

    async def _authenticate(
        self, metadata: dict[str, str]
    ) -> KonnectivityAgent | tuple[GrpcStatus, str, str]:
        agent_id = metadata.get(KONN_AGENT_ID, "")
        if "," in agent_id:
            return GrpcStatus.INVALID_ARGUMENT, "bad_agent_id", "expected one agentID"
        headers = {handshake.AGENT_ID: agent_id.strip()}
        if handshake.AUTHORIZATION in metadata:
            headers[handshake.AUTHORIZATION] = metadata[handshake.AUTHORIZATION]
        source = self.remote.rpartition(":")[0] or self.remote
        try:
            identity = await self.authenticator.authenticate(self.peer_der, headers, source)
            claimed = AgentIdentifiers.parse(
                _konn_identifiers(metadata.get(KONN_AGENT_IDENTIFIERS, ""))
            )
        except AuthError as exc:
            status = (
                GrpcStatus.UNAUTHENTICATED if exc.status == 401 else GrpcStatus.PERMISSION_DENIED
            )
            if exc.status in (429, 503):
                status = GrpcStatus.UNAVAILABLE
            return status, exc.reason, str(exc)
        except ValueError as exc:
            return GrpcStatus.INVALID_ARGUMENT, "bad_identifiers", f"agentIdentifiers: {exc}"
        if self.draining:
            return GrpcStatus.UNAVAILABLE, "draining", "broker is draining"
        agent = KonnectivityAgent(self, identity, self.remote)
        try:
            replaced = self.registry.add(
                agent, Membership(identity.credential, identity.cap_key, identity.cap)
            )
        except RegistryRefused as exc:
            return GrpcStatus.ALREADY_EXISTS, exc.reason, str(exc)
        agent._identifiers = _restrict(agent, identity.allowed, claimed)
        self.registry.refresh(agent)
        # The agent reads these before anything else (HA: it opens
        # servercount connections through the balancer, one per server id).
        self.server.send_headers(
            self.call_id or 0,
            [
                (KONN_SERVER_ID, self.server_info.server_id),
                (KONN_SERVER_COUNT, str(self.server_info.server_count)),
            ],
        )
        self.driver.wake_writer()
        if replaced is not None:
            replaced.abort("replaced by a new connection from the same agent")
        self.registered.set()
        log.info(
            "agent connected: id=%s cluster=%s from=%s identifiers=%s kind=%s",
            agent.agent_id,
            agent.cluster,
            self.remote,
            agent.identifiers.render(),
            KIND,
            extra=event(
                "agent_connected",
                agent_id=agent.agent_id,
                cluster=agent.cluster,
                remote=self.remote,
                identifiers=agent.identifiers.render(),
                auth=identity.method,
                kind=KIND,
            ),
        )
        return agent

    def _refuse(self, sid: int, status: GrpcStatus, reason: str, text: str) -> None:
        self.metrics.agent_rejected.labels(reason).inc()
        limited(
            log,
            logging.WARNING,
            self.remote.rpartition(":")[0] or "?",
            "konnectivity agent connection from %s rejected (%s): %s",
            self.remote,
            status.name,
            text,
            key=f"auth_rejected/{reason}",
            extra=event(
                "auth_rejected", remote=self.remote, status=int(status), reason=reason, kind=KIND
            ),
        )
        self.ending = reason
        self.server.end_call(sid, status, text[:512])
        self.server.goaway()
        self.driver.wake_writer()
        self.registered.set()

        async def close_soon() -> None:
            await self.driver.flush(0.5)
            self.driver.abort(CloseReason.REJECTED, text)

        assert self._nursery is not None
        self._nursery.start_soon(close_soon)


def _konn_identifiers(text: str) -> str:
    """konnectivity sends its identifiers URL-encoded (url.Values.Encode);
    ours read the same form decoded."""
    if "%" not in text and "+" not in text:
        return text
    pairs = urllib.parse.parse_qsl(text, keep_blank_values=True)
    return "&".join(f"{k}={v}" for k, v in pairs)


def _restrict(
    agent: KonnectivityAgent, allowed: Allowance | None, claimed: AgentIdentifiers
) -> AgentIdentifiers:
    if allowed is None:
        return claimed
    kept, refused = allowed.restrict(claimed)
    if refused:
        agent.metrics.bad_input.labels(SOURCE, "identifier_not_allowed").inc()
        warn_identifiers_not_allowed(agent.cluster, agent.agent_id, agent.remote, refused)
    return kept


class _Engine:
    """The GrpcServer as the driver's engine; connection-level violations
    are counted here."""

    def __init__(self, conn: KonnectivityConnection) -> None:
        self.conn = conn

    @property
    def backlog(self) -> bool:
        return self.conn.server.backlog

    def receive_data(self, data: bytes) -> list[ev.Event]:
        try:
            return self.conn.server.receive_data(data)
        except FloodDetected as exc:
            self.conn.metrics.bad_input.labels(SOURCE, exc.reason).inc()
            log.warning("konnectivity agent %s: flood (%s): GOAWAY", self.conn.remote, exc.reason)
            raise
        except RemoteProtocolError as exc:
            self.conn.metrics.bad_input.labels(SOURCE, "h2_protocol").inc()
            log.warning("konnectivity agent %s: %s", self.conn.remote, exc)
            raise

    def data_to_send(self) -> bytes:
        return self.conn.server.data_to_send()
