"""The agent listener: TLS with ALPN ``h2`` and mandatory client
certificates, then one tunnel session per connection.

The agent server owns registry membership: an authenticated agent joins the
registry here (:meth:`AgentServer.join`), the connection it replaces is
closed here (:meth:`AgentServer.joined`), and it leaves when its connection
ends."""

from __future__ import annotations

import logging
import ssl
from typing import TYPE_CHECKING

import trio

from broker.agent_conn import AgentConnection, ServerInfo
from broker.auth import Authenticator
from broker.registry import Membership, Registry, RegistryRefused, RoutableAgent
from protocol import handshake
from protocol.agent_port import FirstRequest, Kind
from protocol.budget import BufferBudget
from protocol.errors import ProtocolError
from protocol.flood import FloodDetected, FloodPenalties
from protocol.grpc_framing import DEFAULT_MAX_MESSAGE_SIZE
from protocol.h2base import H2Base
from protocol.messages import Drain
from protocol.outcomes import CloseReason
from protocol.session import Role, SessionConfig, TunnelSession
from tether.netio import sockopts
from tether.netio.admission import Pass
from tether.netio.limits import PeerSlot, PerPeerLimiter
from tether.netio.logs import event, limited
from tether.netio.tls_stream import TLSStream
from tether.netio.tunnel import Keepalive, TunnelClosed, TunnelConnection

if TYPE_CHECKING:
    # Imported on the first konnectivity agent: protobuf and the gRPC server
    # cost a broker without one ~4 MiB of idle memory (issue 16).
    from broker.konnectivity_agent import KonnectivityConnection

log = logging.getLogger("tether.broker")


class _Probe:
    """One liveness probe of a registered connection and its result."""

    def __init__(self) -> None:
        self.done = trio.Event()
        #: Unknown (the probe was cancelled) counts as live: the newcomer is refused.
        self.live = True


#: Superseded connections an agent may keep open beside its registered one
#: (hedged reconnects, docs/protocol.md 6.): a further hedge closes the oldest.
MAX_SUPERSEDED = 2


class AgentServer:
    def __init__(
        self,
        registry: Registry,
        server: ServerInfo,
        authenticator: Authenticator,
        ssl_context: ssl.SSLContext,
        session_config: SessionConfig,
        keepalive: Keepalive,
        handshake_timeout: float,
        socket_options: sockopts.TunnelSocketOptions,
        max_handshakes_per_ip: int = 128,
        budget: BufferBudget | None = None,
        flood_penalty_after: int = 3,
    ) -> None:
        self.registry = registry
        self.metrics = registry.metrics
        self.server = server
        self.authenticator = authenticator
        self.ssl_context = ssl_context
        self.session_config = session_config
        #: The broker's buffer budget, shared by every agent connection.
        self.budget = budget
        self.keepalive = keepalive
        self.handshake_timeout = handshake_timeout
        #: Connections not yet authenticated, per source address.
        self.handshakes = PerPeerLimiter(max_handshakes_per_ip)
        #: Addresses whose connections keep ending in a flood (protocol/flood.py).
        self.penalties = FloodPenalties(free=flood_penalty_after)
        self.connections: set[TunnelConnection] = set()
        #: Connections of stock konnectivity agents (broker/konnectivity_agent.py).
        self.konnectivity: set[KonnectivityConnection] = set()
        #: Every agent connection being served, registered or not.
        self.agents: set[AgentConnection] = set()
        #: Connections a newly admitted agent replaces, closed once it is told.
        self._replacing: dict[AgentConnection, RoutableAgent] = {}
        #: Per (cluster, agent id): older connections a hedge superseded that
        #: still carry streams, oldest first (at most MAX_SUPERSEDED).
        self.superseded: dict[tuple[str, str], list[AgentConnection]] = {}
        #: Liveness probes in flight, per registered connection.
        self._probes: dict[AgentConnection, _Probe] = {}
        self.socket_options = socket_options
        self.draining = False

    def stream_count(self) -> int:
        """Data streams open on every agent connection (a metrics gauge)."""
        return sum(len(conn.streams) for conn in self.connections)

    # ------------------------------------------------------ membership

    async def join(self, agent: AgentConnection) -> handshake.Refusal | None:
        """Register an authenticated ``agent``; the refusal to send when refused.

        A newcomer with the id and credential of a registered connection
        replaces it at once when it is the same agent process (same instance
        id): a reconnect whose old connection is stale. From another process
        (or one that sends no instance id) it replaces the old connection
        only if that is dead: heard from within the probe bound or answering
        a PING within it, the old one is live and the newcomer is refused
        (``agent_id_live``), so two devices sharing one identity never flap
        (docs/security.md)."""
        assert agent.identity is not None
        identity = agent.identity
        for _ in range(3):
            old = self.registry.get(agent.cluster, agent.agent_id)
            if not self._needs_probe(agent, old):
                break
            assert isinstance(old, AgentConnection)
            if await self._live(old):
                return handshake.Refusal(
                    409,
                    handshake.RefusalReason.AGENT_ID_LIVE.value,
                    f"agent_id_live: agent id {agent.agent_id} is live on another connection from "
                    f"{old.remote} (instance {old.instance or '?'}); two devices may "
                    "share one identity",
                )
            if self.registry.get(agent.cluster, agent.agent_id) is old:
                break  # dead: replace it below
        else:
            return handshake.Refusal(
                409,
                handshake.RefusalReason.AGENT_ID_LIVE.value,
                f"agent_id_live: agent id {agent.agent_id} is contended by several connections",
            )
        old = self.registry.get(agent.cluster, agent.agent_id)
        if (
            isinstance(old, AgentConnection)
            and old.hedge
            and self._hedges(agent, old)
            and old.conn is not None
            and trio.current_time() - old.conn.last_rx < self.probe_timeout(old)
        ):
            # Two fresh connections of one race: the first accepted keeps
            # the place (the agent keeps the first welcome it reads).
            return handshake.Refusal(
                409,
                handshake.RefusalReason.DUPLICATE.value,
                "duplicate: another hedged connection of this agent already takes new dials",
            )
        try:
            replaced = self.registry.add(
                agent, Membership(identity.credential, identity.cap_key, identity.cap)
            )
        except RegistryRefused as exc:
            return handshake.Refusal(exc.status, exc.reason, str(exc))
        if replaced is not None:
            self._replacing[agent] = replaced
        return None

    @staticmethod
    def _needs_probe(agent: AgentConnection, old: RoutableAgent | None) -> bool:
        """Whether ``agent`` would replace ``old`` (same credential) without
        being known as the same agent process."""
        if not isinstance(old, AgentConnection) or old is agent or old.identity is None:
            return False
        assert agent.identity is not None
        credential = agent.identity.credential
        if credential is None or old.identity.credential != credential:
            return False  # the registry refuses it (identity_in_use)
        return not (agent.instance and agent.instance == old.instance)

    def probe_timeout(self, old: AgentConnection) -> float:
        """How long a registered connection gets to prove it is live:
        max(1 s, 4 round trips), within half the handshake deadline."""
        rtt = old.rtt or 0.0
        return min(max(1.0, 4 * rtt), max(1.0, self.handshake_timeout / 2))

    async def _live(self, old: AgentConnection) -> bool:
        """Whether ``old`` is live; one probe per connection at a time, the
        other newcomers wait for its result."""
        pending = self._probes.get(old)
        if pending is None:
            pending = self._probes[old] = _Probe()
            try:
                assert old.conn is not None
                pending.live = await old.conn.probe(self.probe_timeout(old))
            finally:
                pending.done.set()
                del self._probes[old]
        else:
            await pending.done.wait()
        return pending.live

    def joined(self, agent: AgentConnection) -> None:
        """A reconnecting agent replaces its stale connection at once rather
        than waiting for keepalive to notice that the old one is dead; the
        old one is told why before it closes."""
        self.metrics.agents_by_kind.labels("tether").inc()
        replaced = self._replacing.pop(agent, None)
        if replaced is not None:
            log.info(
                "agent %s/%s reconnected from %s (instance %s); closing its old connection",
                agent.cluster,
                agent.agent_id,
                agent.remote,
                agent.instance or "?",
                extra=event(
                    "agent_replaced",
                    agent_id=agent.agent_id,
                    cluster=agent.cluster,
                    remote=agent.remote,
                    instance=agent.instance or None,
                ),
            )
            if isinstance(replaced, AgentConnection) and self._hedges(agent, replaced):
                self._supersede(agent, replaced)
            elif isinstance(replaced, AgentConnection):
                moved = replaced.replace(agent, same_process=self._same_process(agent, replaced))
                if moved:
                    log.info(
                        "agent %s/%s: %d unanswered dial(s) of its old connection go again "
                        "on the new one",
                        agent.cluster,
                        agent.agent_id,
                        moved,
                    )
            else:
                replaced.abort("replaced by a new connection from the same agent")

    @classmethod
    def _hedges(cls, agent: AgentConnection, old: AgentConnection) -> bool:
        """Whether ``agent`` is a hedge of ``old``: the marker, and the same
        agent process (instance) authenticated by the same credential. A
        marker from anyone else changes nothing (docs/security.md)."""
        return agent.hedge and cls._same_process(agent, old)

    @staticmethod
    def _same_process(agent: AgentConnection, old: AgentConnection) -> bool:
        """``agent`` is the agent process of ``old`` (its instance id)
        authenticated by the same credential: a reconnect of it."""
        return (
            bool(agent.instance)
            and agent.instance == old.instance
            and agent.identity is not None
            and old.identity is not None
            and agent.identity.credential is not None
            and agent.identity.credential == old.identity.credential
        )

    def _supersede(self, agent: AgentConnection, old: AgentConnection) -> None:
        """``agent`` takes new dials; ``old`` keeps its open streams until it
        ends (the agent closes it when they are done, keepalive when dead)."""
        key = (agent.cluster, agent.agent_id)
        held = [c for c in self.superseded.get(key, []) if not c.closed and c.conn is not None]
        held.append(old)
        rerouted = old.supersede()
        self.metrics.agents_by_kind.labels("tether").dec()  # counted once, as the newcomer
        while len(held) > MAX_SUPERSEDED:
            held.pop(0).replace(agent)
        self.superseded[key] = held
        self.metrics.hedges_accepted.inc()
        log.info(
            "agent %s/%s hedged from %s; its connection from %s keeps %d stream(s) until it "
            "ends, %d unanswered dial(s) go again on the new one",
            agent.cluster,
            agent.agent_id,
            agent.remote,
            old.remote,
            len(old.conn.streams) if old.conn is not None else 0,
            rerouted,
            extra=event(
                "agent_hedged",
                agent_id=agent.agent_id,
                cluster=agent.cluster,
                remote=agent.remote,
                previous=old.remote,
            ),
        )

    def _unsupersede(self, agent: AgentConnection) -> None:
        key = (agent.cluster, agent.agent_id)
        held = self.superseded.get(key)
        if held is not None and agent in held:
            held.remove(agent)
            if not held:
                del self.superseded[key]

    def _promote(self, ended: AgentConnection) -> None:
        """The registered connection ``ended`` is gone: the newest connection
        it superseded that still runs takes dials again (two hedges may
        reach the broker in one race, and the agent keeps the first)."""
        key = (ended.cluster, ended.agent_id)
        held = self.superseded.get(key, [])
        while held:
            cand = held.pop()
            if cand.closed or cand.conn is None or cand.conn.closed_reason is not None:
                continue
            assert cand.identity is not None
            identity = cand.identity
            try:
                self.registry.add(
                    cand, Membership(identity.credential, identity.cap_key, identity.cap)
                )
            except RegistryRefused:
                continue
            cand.superseded = False
            self.metrics.agents_by_kind.labels("tether").inc()
            log.info(
                "agent %s/%s: its connection from %s ended; the one from %s takes dials again",
                ended.cluster,
                ended.agent_id,
                ended.remote,
                cand.remote,
                extra=event(
                    "agent_hedged",
                    agent_id=cand.agent_id,
                    cluster=cand.cluster,
                    remote=cand.remote,
                    previous=ended.remote,
                ),
            )
            break
        if not held:
            self.superseded.pop(key, None)

    def refresh(self, agent: AgentConnection) -> None:
        """``agent``'s identifiers changed: the registry routes by the new ones."""
        self.registry.refresh(agent)

    def refuse_source(self, host: str, first: bool) -> None:
        """A connection from ``host`` is closed unread: the address already
        holds ``--max-handshakes-per-ip`` unauthenticated connections (in
        admission or in the handshake). ``first``: log it (once an episode)."""
        self.metrics.bad_input.labels("agent", "too_many_handshakes").inc()
        if first:
            log.warning(
                "agent port: %s holds %d unauthenticated connections; refusing more",
                host,
                self.handshakes.limit,
            )

    async def handle(self, tcp: trio.SocketStream, admitted: Pass | None = None) -> None:
        """Serve one agent connection; every failure stays inside.
        ``admitted``: its admission (tether/netio/admission.py), whose
        handshake slot is given back once the TLS handshake is over."""
        try:
            host, port = tcp.socket.getpeername()[:2]
            remote = f"{host}:{port}"
        except OSError:
            host, remote = "?", "?"
        if self.penalties.refused(host, trio.current_time()):
            self.metrics.bad_input.labels("agent", "flood_penalty").inc()
            await trio.aclose_forcefully(tcp)
            return
        slot = self.handshakes.acquire(host)
        if slot is None:
            self.refuse_source(host, self.handshakes.first_refusal(host))
            await trio.aclose_forcefully(tcp)
            return
        try:
            await self._handle(tcp, remote, slot, admitted)
        except Exception:
            log.exception("agent connection from %s: internal error", remote)
        finally:
            slot.release()
            await trio.aclose_forcefully(tcp)

    async def _handle(
        self, tcp: trio.SocketStream, remote: str, slot: PeerSlot, admitted: Pass | None
    ) -> None:
        if self.draining:
            return
        sockopts.apply(tcp.socket, self.socket_options)  # type: ignore[arg-type]
        tls = TLSStream(tcp, self.ssl_context, server_side=True)
        try:
            with trio.fail_after(self.handshake_timeout):
                await tls.do_handshake()
            self.metrics.tls_handshakes.labels("yes" if tls.session_reused else "no").inc()
        except trio.TooSlowError:
            self.metrics.bad_input.labels("agent", "tls_handshake_timeout").inc()
            limited(
                log,
                logging.WARNING,
                _host(remote),
                "agent connection from %s: TLS handshake timed out",
                remote,
                key="tls_handshake_failed/agent",
                extra=event(
                    "tls_handshake_failed", listener="agent", remote=remote, reason="timeout"
                ),
            )
            return
        except trio.BrokenResourceError as exc:
            self.metrics.bad_input.labels("agent", "tls_handshake").inc()
            limited(
                log,
                logging.WARNING,
                _host(remote),
                "agent connection from %s: TLS handshake failed: %s",
                remote,
                exc.__cause__ or exc,
                extra=event("tls_handshake_failed", listener="agent", remote=remote, reason="tls"),
                key="tls_handshake_failed/agent",
            )
            return
        finally:
            if admitted is not None:
                admitted.release()  # the costly part is over
        shed = admitted is not None and admitted.shed
        if tls.selected_alpn_protocol() != "h2":
            self.metrics.bad_input.labels("agent", "alpn").inc()
            limited(
                log,
                logging.WARNING,
                _host(remote),
                "agent connection from %s: no h2 ALPN; closing",
                remote,
                key="agent_no_alpn",
            )
            await trio.aclose_forcefully(tls)
            return
        # One HTTP/2 engine for both kinds of agent: our SETTINGS go out now,
        # the first request's path picks the protocol (protocol/agent_port.py).
        base = H2Base(
            TunnelSession.h2_settings(self.session_config), client=False, now=trio.current_time()
        )
        base.initiate()
        first = FirstRequest()
        kind: Kind | None = None
        with trio.move_on_after(self.handshake_timeout):
            try:
                await tls.send_all(base.data_to_send())
                while kind is None:
                    data = await tls.receive_some(64 * 1024)
                    if not data:
                        return
                    kind = first.feed(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
        if kind is None:
            self.metrics.bad_input.labels("agent", "no_control_stream").inc()
            limited(
                log,
                logging.WARNING,
                _host(remote),
                "agent connection from %s: no control stream within %gs; closing",
                remote,
                self.handshake_timeout,
                key="agent_no_control_stream",
            )
            await trio.aclose_forcefully(tls)
            return
        if kind is Kind.KONNECTIVITY and shed:
            return  # konnectivity has no retry hint: its own backoff
        if kind is Kind.KONNECTIVITY:
            await self._serve_konnectivity(tls, base, bytes(first.buffer), remote, slot)
            return
        agent = AgentConnection(
            self.metrics,
            self,
            self.server,
            self.authenticator,
            tls.getpeercert(binary_form=True),
            remote,
            shed_retry_ms=admitted.retry_after_ms if admitted is not None and shed else None,
        )
        sess = TunnelSession(Role.BROKER, self.session_config, clock=trio.current_time, base=base)
        conn = TunnelConnection(
            tls,
            sess,
            agent,
            keepalive=self.keepalive,
            name=f"agent {remote}",
            budget=self.budget,
            initial=bytes(first.buffer),
            auto_lowat=self.socket_options.auto_notsent_lowat,
            # The agent drives keepalive: between its PINGs the connection
            # is parked with the idle poller (tether/netio/idle.py).
            park_when_idle=True,
        )

        def rtt_seen(rtt: float) -> None:
            agent.rtt = rtt
            self.metrics.keepalive_rtt.observe(rtt)

        conn.set_rtt_observer(rtt_seen)
        conn.set_stall_observer(self.metrics.window_stalls.inc)

        def bad_stream(stream_id: int, reason: str) -> None:
            self.metrics.bad_input.labels("agent", "bad_data_stream").inc()
            log.info(
                "agent %s from %s: data stream %d reset: %s",
                agent.agent_id or "?",
                remote,
                stream_id,
                reason,
            )

        conn.set_bad_stream_observer(bad_stream)
        agent.conn = conn
        self.connections.add(conn)
        self.agents.add(agent)
        try:
            async with trio.open_nursery() as nursery:
                agent.nursery = nursery
                nursery.start_soon(self._control_deadline, agent, conn, slot)
                await conn.run()
                nursery.cancel_scope.cancel()
        finally:
            self.connections.discard(conn)
            self.agents.discard(agent)
            self._replacing.pop(agent, None)
            was_registered = self.registry.get(agent.cluster, agent.agent_id) is agent
            self.registry.remove(agent)  # a no-op unless this connection is the registered one
            self._unsupersede(agent)
            if was_registered:
                self._promote(agent)
            agent.fail_all(conn.closed_reason or "closed")
            if conn.close_reason is CloseReason.CONTROL_UNUSABLE:
                # Not reading its control stream (a window that stays shut).
                self.metrics.bad_input.labels("agent", "control_stream_stalled").inc()
            if isinstance(conn.protocol_error, FloodDetected):
                penalty = self.penalties.record_flood(_host(remote), trio.current_time())
                if penalty:
                    limited(
                        log,
                        logging.WARNING,
                        _host(remote),
                        "agent port: %s keeps flooding; its new connections are refused for %.0fs",
                        _host(remote),
                        penalty,
                        key="flood_penalty",
                        extra=event("flood_penalty", remote=remote, seconds=penalty),
                    )
            if conn.protocol_error is not None:
                self.metrics.bad_input.labels("agent", conn.protocol_error.reason).inc()
                limited(
                    log,
                    logging.WARNING,
                    _host(remote),
                    "agent %s from %s: protocol violation: %s",
                    agent.agent_id or "?",
                    remote,
                    conn.protocol_error,
                    extra=event(
                        "protocol_violation",
                        agent_id=agent.agent_id,
                        remote=remote,
                        reason=conn.protocol_error.reason,
                    ),
                )
            if agent.registered.is_set():
                if not agent.superseded:
                    self.metrics.agents_by_kind.labels("tether").dec()
                cause = _cause(conn)
                self.metrics.agent_disconnects.labels(cause).inc()
                log.info(
                    "agent disconnected: id=%s cluster=%s reason=%s",
                    agent.agent_id,
                    agent.cluster,
                    conn.closed_reason,
                    extra=event(
                        "agent_disconnected",
                        agent_id=agent.agent_id,
                        cluster=agent.cluster,
                        remote=remote,
                        cause=cause,
                        reason=conn.closed_reason,
                    ),
                )

    async def _serve_konnectivity(
        self, tls: TLSStream, base: H2Base, initial: bytes, remote: str, slot: PeerSlot
    ) -> None:
        """A stock konnectivity agent: its ``/AgentService/Connect`` call."""
        from broker.konnectivity_agent import KonnectivityConnection

        conn = KonnectivityConnection(
            transport=tls,
            base=base,
            initial=initial,
            registry=self.registry,
            server=self.server,
            authenticator=self.authenticator,
            peer_der=tls.getpeercert(binary_form=True),
            remote=remote,
            max_message_size=DEFAULT_MAX_MESSAGE_SIZE,
            call_window=self.session_config.stream_window,
            handshake_timeout=self.handshake_timeout,
            keepalive=self.keepalive,
            budget=self.budget,
            draining=self.draining,
        )
        self.konnectivity.add(conn)

        async def release_slot() -> None:
            await conn.registered.wait()
            slot.release()  # authenticated (or refused): no longer counts

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(release_slot)
                await conn.run()
                nursery.cancel_scope.cancel()
        finally:
            self.konnectivity.discard(conn)
            if isinstance(conn.driver.protocol_error, FloodDetected):
                self.penalties.record_flood(_host(remote), trio.current_time())

    async def _control_deadline(
        self, agent: AgentConnection, conn: TunnelConnection, slot: PeerSlot
    ) -> None:
        with trio.move_on_after(self.handshake_timeout):
            await agent.settled.wait()
        if agent.registered.is_set():
            slot.release()  # authenticated: no longer counts against its address
            return
        if not agent.closed:
            self.metrics.bad_input.labels("agent", "no_control_stream").inc()
            limited(
                log,
                logging.WARNING,
                _host(agent.remote),
                "%s: no control stream within %gs; closing",
                conn.name,
                self.handshake_timeout,
                key="agent_no_control_stream",
            )
        else:
            await trio.sleep(0.5)  # let the rejection body reach the agent
        conn.abort(CloseReason.HANDSHAKE_TIMEOUT, "no accepted control stream")

    async def drain(self, retry_ms: int) -> None:
        """Tell every agent to go elsewhere within ``retry_ms``; stop new ones.

        Open tunnels keep running: h2 allows no stream traffic after a
        GOAWAY, so GOAWAY waits for :meth:`close_all`.
        """
        self.draining = True
        for agent in self.agents:
            agent.draining = True
        conns = list(self.connections)
        for conn in conns:
            try:
                conn.send_message(Drain(retry_ms=retry_ms))
            except (TunnelClosed, ProtocolError) as exc:
                log.debug("drain to %s not sent: %s", conn.name, exc)
        # konnectivity has no drain message to agents: a graceful GOAWAY,
        # and no new dials; the Connect call ends at close_all.
        konn = list(self.konnectivity)
        for kconn in konn:
            kconn.goaway()
        await self._flush(conns, konn)

    async def close_all(self) -> None:
        """GOAWAY to every agent, flushed (bounded), before the process exits."""
        conns = list(self.connections)
        for conn in conns:
            conn.goaway("broker shutting down")
        konn = list(self.konnectivity)
        for kconn in konn:
            kconn.close("broker shutting down")
        await self._flush(conns, konn)

    @staticmethod
    async def _flush(
        conns: list[TunnelConnection],
        konn: tuple[KonnectivityConnection, ...] | list[KonnectivityConnection] = (),
    ) -> None:
        async with trio.open_nursery() as nursery:
            for conn in conns:
                nursery.start_soon(conn.flush)
            for kconn in konn:
                nursery.start_soon(kconn.flush)


def _host(remote: str) -> str:
    """The address part of ``host:port``: the source a log budget is kept for."""
    return remote.rpartition(":")[0] or remote


#: The ``cause`` label of ``agent_disconnects`` for each close reason
#: (anything else: ``shutdown``).
_CAUSES = {
    CloseReason.PROTOCOL_ERROR: "protocol_error",
    CloseReason.FLOOD: "protocol_error",
    CloseReason.CONTROL_UNUSABLE: "protocol_error",
    CloseReason.KEEPALIVE_TIMEOUT: "keepalive_timeout",
    CloseReason.REPLACED: "replaced",
    CloseReason.TRANSPORT_ERROR: "peer_closed",
    CloseReason.PEER_CLOSED: "peer_closed",
    CloseReason.GOAWAY: "peer_closed",
    CloseReason.CONTROL_CLOSED: "peer_closed",
}


def _cause(conn: TunnelConnection) -> str:
    if conn.protocol_error is not None:
        return "protocol_error"
    return _CAUSES.get(conn.close_reason, "shutdown") if conn.close_reason else "shutdown"
