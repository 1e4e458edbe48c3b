"""One connected agent, as the broker sees it: its control stream, its
pending dials and the data streams that answer them."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol

import attrs
import trio
from cryptography import x509

from broker.auth import Authenticator, AuthError, Identity
from broker.dialing import DialError, DialOutcome, Rerouted
from broker.metrics import BrokerMetrics
from protocol import events, handshake, keepalive, messages
from protocol.budget import Grant
from protocol.errors import ProtocolError
from protocol.identifiers import AgentIdentifiers, Allowance
from protocol.outcomes import CloseReason
from tether.netio.logs import event, limited
from tether.netio.tunnel import TunnelClosed, TunnelConnection, TunnelStream


@attrs.define
class ServerInfo:
    server_id: str
    #: What agents are told; with --enable-lease-controller it follows the
    #: live Leases (broker/leases.py), never below --server-count.
    server_count: int


log = logging.getLogger("tether.broker")


@attrs.define(eq=False)
class PendingDial:
    id: int
    addr: str
    done: trio.Event = attrs.Factory(trio.Event)
    stream: TunnelStream | None = None
    error: DialError | None = None
    #: The tunnel's share of the broker's buffer budget (None: no budget).
    grant: Grant | None = None
    #: The dial carried no early bytes (a reroute cannot deliver them twice).
    reroutable: bool = True
    #: Ended because a hedge superseded the connection before any answer.
    rerouted: bool = False


class Awaited(Protocol):
    """A dial a frontend waits on (either kind of agent's)."""

    done: trio.Event
    error: DialError | None


def fail_pending(pending: Iterable[Awaited], reason: str) -> None:
    """The agent's connection is gone: every dial still waiting fails at once."""
    for dial in pending:
        if not dial.done.is_set():
            dial.error = DialError(DialOutcome.AGENT_LOST, f"agent connection lost: {reason}")
            dial.done.set()


class Roster(Protocol):
    """Where an authenticated agent joins the routable set: the agent server,
    which owns registry membership (:mod:`broker.agent_server`)."""

    async def join(self, agent: AgentConnection) -> handshake.Refusal | None:
        """Register ``agent``; None when admitted, else the refusal to send.
        May probe (bounded) whether the connection it would replace is live."""

    def joined(self, agent: AgentConnection) -> None:
        """``agent`` was told it is accepted: close the connection it replaced."""

    def refresh(self, agent: AgentConnection) -> None:
        """``agent``'s identifiers changed: route by the new ones."""


class AgentConnection:
    """Handler for one agent's tunnel connection (see ConnectionHandler)."""

    #: Which protocol the agent speaks (metrics label, /agents).
    kind = "tether"

    def __init__(
        self,
        metrics: BrokerMetrics,
        roster: Roster,
        server: ServerInfo,
        authenticator: Authenticator,
        peer_der: bytes | None,
        remote: str,
        shed_retry_ms: int | None = None,
    ) -> None:
        self.metrics = metrics
        #: Shed by admission control (a reconnect storm): the hello is
        #: answered 503 overloaded with this retry hint, unauthenticated.
        self.shed_retry_ms = shed_retry_ms
        self.roster = roster
        self.server = server
        self.authenticator = authenticator
        self.peer_der = peer_der
        self.remote = remote
        self.agent_id = ""
        self.cluster = ""
        self.auth_method = ""
        self.identifiers = AgentIdentifiers()
        #: What this agent's credential (and the cluster) let it declare; None: any.
        self.allowed: Allowance | None = None
        self.identity: Identity | None = None
        self._claimed = AgentIdentifiers()  # as declared at connect, before the check
        self._identifiers_value: str | None = None  # of the last identifiers message
        self._held: tuple[str, ...] = ()  # server ids the agent already holds (hello)
        #: The agent process's instance id from its hello; "" from an older agent.
        self.instance = ""
        #: The hello carried the hedge marker (protocol/handshake.py ``AGENT_HEDGE``).
        self.hedge = False
        #: A hedge of this agent took its registered place; it keeps its streams.
        self.superseded = False
        #: The last keepalive round trip, seconds (None before the first).
        self.rtt: float | None = None
        self.conn: TunnelConnection | None = None
        self.nursery: trio.Nursery | None = None
        self.pending: dict[int, PendingDial] = {}
        self.refused_streams = 0  # data streams for unknown or stale dial ids
        self.refused_claims = 0  # identifiers messages with claims beyond the credential
        self.registered = trio.Event()
        #: Set once the control stream was either accepted or rejected.
        self.settled = trio.Event()
        self.draining = False
        self.closed = False

    # ------------------------------------------------------------ load

    @property
    def load(self) -> int:
        """What least-loaded routing compares: dials in flight plus streams."""
        return len(self.pending) + (len(self.conn.streams) if self.conn else 0)

    @property
    def usable(self) -> bool:
        return not (self.draining or self.closed) and self.conn is not None

    # --------------------------------------------------------- dialing

    async def dial(
        self, dial_id: int, addr: str, timeout: float, early: bytes | None = None
    ) -> TunnelStream:
        """Ask the agent to dial ``addr``; return the paired data stream.

        The tunnel's share of the broker's buffer budget is reserved first:
        with none left the dial is refused (503 "broker busy") before the
        agent hears of it."""
        assert self.conn is not None
        budget = self.conn.budget
        was_busy = budget is not None and budget.exhausted
        grant = budget.open() if budget is not None else None
        if budget is not None and grant is None:
            if not was_busy:
                log.warning(
                    "buffer budget exhausted (%s): refusing new dials with 503",
                    budget.describe(),
                    extra=event(
                        "buffer_budget_exhausted",
                        reserved=budget.reserved,
                        limit=budget.limit,
                        streams=budget.streams,
                    ),
                )
            raise DialError(
                DialOutcome.BUSY, f"broker busy: {budget.describe()}", code="broker_busy"
            )
        pending = PendingDial(dial_id, addr, grant=grant, reroutable=not early)
        self.pending[dial_id] = pending
        self.metrics.pending_dials.inc()
        delivered = False
        try:
            try:
                self.conn.send_message(
                    messages.Dial(
                        id=dial_id,
                        addr=addr,
                        timeout_ms=max(1, int(timeout * 1000)),
                        early=early or None,
                    )
                )
            except TunnelClosed as exc:
                raise DialError(DialOutcome.AGENT_LOST, f"agent connection lost: {exc}") from None
            with trio.move_on_after(timeout):
                await pending.done.wait()
            if pending.rerouted and pending.stream is None and pending.error is None:
                raise Rerouted()
            if pending.error is not None:
                raise pending.error
            if pending.stream is None:
                raise DialError(DialOutcome.TIMEOUT, f"dial to {addr} timed out after {timeout:g}s")
            delivered = True
            return pending.stream
        finally:
            self.pending.pop(dial_id, None)
            self.metrics.pending_dials.dec()
            if not delivered:
                if pending.stream is not None:
                    pending.stream.reset()  # returns the grant with the stream
                else:
                    if not pending.done.is_set() or pending.rerouted:
                        self._send_cancel(dial_id)
                    if budget is not None and grant is not None:
                        budget.release(grant)

    def _send_cancel(self, dial_id: int) -> None:
        if self.conn is None:
            return
        try:
            self.conn.send_message(messages.Cancel(id=dial_id))
        except Exception as exc:  # the connection may be dying: TunnelClosed and worse
            log.debug("cancel for dial %d not sent: %s", dial_id, exc)

    # ------------------------------------------------ ConnectionHandler

    def on_control_requested(self, ev: events.ControlRequested) -> None:
        # Authentication may need a TokenReview round trip: answer from a task.
        assert self.nursery is not None
        self.nursery.start_soon(self._answer_control, ev)

    async def _answer_control(self, ev: events.ControlRequested) -> None:
        """Authenticate the agent from its certificate or token and headers."""
        assert self.conn is not None
        if self.shed_retry_ms is not None:
            refusal: handshake.Refusal | None = handshake.Refusal(
                503,
                handshake.RefusalReason.OVERLOADED.value,
                "overloaded: the broker is admitting a reconnect storm; "
                f"dial again in {self.shed_retry_ms} ms",
                retry_after_ms=self.shed_retry_ms,
            )
        else:
            refusal = await self._authenticate(ev.headers)
        if self.conn.closed_reason is not None:
            return
        if refusal is None and self.server.server_id in self._held:
            # HA: the balancer sent an agent back to a replica it already
            # holds. Refuse before registering, so its live link stays.
            refusal = handshake.Refusal(
                409,
                handshake.RefusalReason.DUPLICATE.value,
                f"duplicate: agent already holds a connection to server {self.server.server_id}",
            )
        if refusal is None:
            refusal = await self.roster.join(self)
            if self.conn.closed_reason is not None:
                return  # the handshake deadline passed while the roster decided
            if refusal is None:
                # Before any checkpoint, so no dial is routed by unchecked claims.
                self.identifiers = self._restrict(self._claimed)
                self.roster.refresh(self)
        if refusal is not None:
            status, reason, error = refusal.status, refusal.token, refusal.text
            self.metrics.agent_rejected.labels(reason).inc()
            # A 409 duplicate is routine with several replicas behind a balancer;
            # a live agent defending its id against another credential is not.
            level = logging.INFO if reason == "duplicate" else logging.WARNING
            fields = event(
                "auth_rejected",
                remote=self.remote,
                status=status,
                reason=reason,
                agent_id=self.agent_id or None,
                cert_serial=_serial(self.peer_der),
            )
            line = ("agent connection from %s rejected (%d): %s", self.remote, status, error)
            if reason == handshake.RefusalReason.OVERLOADED.value:
                log.debug(*line, extra=fields)  # counted; thousands in a storm
            elif reason == "duplicate":
                log.log(level, *line, extra=fields)
            else:  # junk credentials in a loop: a budget per source address
                # each reason its own budget: 401s in a loop must not hide a 429
                limited(
                    log,
                    level,
                    self.remote.rpartition(":")[0] or "?",
                    *line,
                    extra=fields,
                    key=f"auth_rejected/{reason}",
                )
            self.conn.session.reject_control(status, error, refusal.to_headers())
            self.conn.wake_writer()
            self.closed = True
            self.settled.set()
            return
        welcome = handshake.Welcome(
            self.server.server_id,
            self.server.server_count,
            # dial_fail codes beyond the first release's: an agent sends
            # them only to a broker that names them (older ones would
            # drop the connection on an unknown code).
            dial_fail_codes=frozenset({"busy"}),
        )
        self._keepalive(ev.headers)
        self.conn.session.accept_control(welcome.to_headers())
        self.conn.wake_writer()
        self.roster.joined(self)
        self._identifiers_changed(AgentIdentifiers(), self.identifiers, "register")
        log.info(
            "agent connected: id=%s cluster=%s from=%s identifiers=%s instance=%s",
            self.agent_id,
            self.cluster,
            self.remote,
            self.identifiers.render(),
            self.instance or "?",
            extra=event(
                "agent_connected",
                agent_id=self.agent_id,
                cluster=self.cluster,
                remote=self.remote,
                instance=self.instance or None,
                identifiers=self.identifiers.render(),
                auth=self.auth_method,
                cert_serial=_serial(self.peer_der),
            ),
        )
        self.registered.set()
        self.settled.set()

    def _keepalive(self, headers: dict[str, str]) -> None:
        """An agent that announces its keepalive interval drives the PINGs;
        the broker then only keeps a dead-link deadline (protocol/keepalive.py).
        A malformed announcement, or one longer than our own interval, leaves
        the broker driving, as for an older agent; an out-of-range one is
        clamped. Both are counted and logged."""
        assert self.conn is not None
        ann = keepalive.announced(headers)
        self.metrics.keepalive_announced.labels(ann.verdict.value).inc()
        if ann.verdict in (keepalive.Verdict.INVALID, keepalive.Verdict.CLAMPED):
            if ann.verdict is keepalive.Verdict.INVALID:
                self.metrics.bad_input.labels("agent", "bad_keepalive_ms").inc()
            limited(
                log,
                logging.WARNING,
                self.remote.rpartition(":")[0] or "?",
                "agent %s/%s announced %s %r: %s",
                self.cluster,
                self.agent_id,
                keepalive.HEADER,
                ann.raw,
                "not a positive integer; the broker sends the PINGs"
                if ann.interval is None
                else f"outside {keepalive.MIN_INTERVAL_MS}..{keepalive.MAX_INTERVAL_MS} ms; "
                f"using {ann.interval * 1000:.0f} ms",
                extra=event(
                    "keepalive_announced",
                    agent_id=self.agent_id,
                    cluster=self.cluster,
                    remote=self.remote,
                    verdict=ann.verdict.value,
                ),
                key="keepalive_announced",
            )
        interval = keepalive.peer_drives(ann, self.conn.keepalive.interval)
        if interval is not None:
            self.conn.answer_keepalive(interval)

    async def _authenticate(self, headers: dict[str, str]) -> handshake.Refusal | None:
        """None: authenticated; else why not."""
        source = self.remote.rsplit(":", 1)[0] if ":" in self.remote else self.remote
        try:
            identity = await self.authenticator.authenticate(self.peer_der, headers, source)
            hello = handshake.Hello.from_headers(headers)
            claimed = AgentIdentifiers.parse(hello.identifiers)
        except AuthError as exc:
            return handshake.Refusal(exc.status, exc.reason, str(exc))
        except handshake.HandshakeError as exc:
            return handshake.Refusal(403, exc.reason, str(exc))
        self._held = hello.connected_servers
        self.instance = hello.instance
        self.hedge = hello.hedge
        self.identity = identity
        self.agent_id = identity.agent_id
        self.cluster = identity.cluster
        self.auth_method = identity.method
        self.allowed = identity.allowed
        self._claimed = claimed
        return None

    def _restrict(self, claimed: AgentIdentifiers) -> AgentIdentifiers:
        """The part of ``claimed`` this agent's credential allows; the rest
        is dropped with a WARNING naming it (the agent keeps serving)."""
        if self.allowed is None:
            return claimed
        kept, refused = self.allowed.restrict(claimed)
        if refused:
            self.metrics.bad_input.labels("agent", "identifier_not_allowed").inc()
            self.refused_claims += 1
            # Every refusal is counted; a flood of them must not flood the log.
            if self.refused_claims > 10 and self.refused_claims % 1000:
                return kept
            warn_identifiers_not_allowed(self.cluster, self.agent_id, self.remote, refused)
        return kept

    def _identifiers_changed(self, old: AgentIdentifiers, new: AgentIdentifiers, when: str) -> None:
        if old == new and when != "register":
            return
        self.metrics.identifier_changes.labels(when).inc()
        log.info(
            "agent %s/%s identifiers_changed (%s): %r -> %r",
            self.cluster,
            self.agent_id,
            when,
            old.render(),
            new.render(),
            extra=event(
                "identifiers_changed",
                agent_id=self.agent_id,
                cluster=self.cluster,
                when=when,
                old=old.render(),
                new=new.render(),
            ),
        )

    def on_control_accepted(self, ev: events.ControlAccepted) -> None:
        raise AssertionError("brokers do not receive responses")

    def on_message(self, msg: messages.Message) -> None:
        if isinstance(msg, messages.DialFail):
            pending = self.pending.get(msg.id)
            if pending is not None and not pending.done.is_set():
                pending.error = DialError.from_agent(msg.code, msg.msg)
                pending.done.set()
        elif isinstance(msg, messages.Drain):
            log.info(
                "agent %s/%s is draining",
                self.cluster,
                self.agent_id,
                extra=event(
                    "drain", initiator="agent", agent_id=self.agent_id, cluster=self.cluster
                ),
            )
            self.draining = True
        elif isinstance(msg, messages.Identifiers):
            # The session's budget bounds how often and how large (entries);
            # an unchanged set is not even parsed again.
            if msg.value == self._identifiers_value:
                return
            self._identifiers_value = msg.value
            try:
                claimed = AgentIdentifiers.parse(msg.value)
            except ValueError as exc:
                self.metrics.bad_input.labels("agent", "identifiers").inc()
                log.warning("agent %s sent bad identifiers: %s", self.agent_id, exc)
            else:
                old, self.identifiers = self.identifiers, self._restrict(claimed)
                self.roster.refresh(self)
                self._identifiers_changed(old, self.identifiers, "update")
        else:
            self.metrics.bad_input.labels("agent", "unexpected_message").inc()
            log.warning("agent %s sent unexpected %s", self.agent_id, type(msg).__name__)

    def on_data_stream_requested(self, ev: events.DataStreamRequested) -> None:
        assert self.conn is not None
        pending = self.pending.get(ev.dial_id)
        if pending is None or pending.done.is_set():
            # A dial we gave up on (timeout, cancel) or never made.
            self.metrics.bad_input.labels("agent", "unknown_dial_id").inc()
            self.refused_streams += 1
            # A few per connection are races (dial timed out, cancelled);
            # a flood of them must not flood the log as well.
            if self.refused_streams <= 10 or self.refused_streams % 1000 == 0:
                log.info(
                    "agent %s: data stream for unknown dial %d refused (%d so far)",
                    self.agent_id,
                    ev.dial_id,
                    self.refused_streams,
                )
            self.conn.session.reset_stream(ev.stream_id)  # RST_STREAM(CANCEL)
            self.conn.wake_writer()
            return
        ts = self.conn.add_stream(ev.stream_id, ev.dial_id, pending.grant)
        window = pending.grant.window if pending.grant is not None else None
        self.conn.session.accept_data_stream(ev.stream_id, window=window)
        self.conn.wake_writer()
        pending.stream = ts
        pending.done.set()

    # -------------------------------------------------------- teardown

    def abort(self, reason: str) -> None:
        """Close this connection now (a newcomer replaced it): its pending
        dials fail at once and its streams are aborted."""
        self.fail_all(reason)
        if self.conn is not None:
            self.conn.abort(CloseReason.REPLACED, reason)

    def supersede(self) -> int:
        """A hedge of this agent took its place: dials the agent has not
        answered yet (and that carried no early bytes) end now, to be sent
        again on the new connection; the rest, and open streams, stay.
        Returns how many were rerouted."""
        self.superseded = True
        return self._reroute_unanswered()

    def _reroute_unanswered(self) -> int:
        """Dials the agent has not answered (and that carried no early bytes)
        end now, to be sent again on the connection that took this one's place."""
        moved = 0
        for pending in self.pending.values():
            if pending.reroutable and not pending.done.is_set():
                pending.rerouted = True
                pending.done.set()
                moved += 1
        return moved

    def replace(self, by: AgentConnection, *, same_process: bool = False) -> int:
        """``by`` took this connection's place: its pending dials fail at
        once; the agent is told why (a ``replaced`` message, docs/protocol.md,
        2. The control stream), then the connection closes. ``same_process``
        (``by`` is the same agent instance with the same credential: it
        reconnected): dials it has not answered go again on ``by`` instead,
        as after a hedge. Returns how many."""
        moved = self._reroute_unanswered() if same_process else 0
        self.fail_all("replaced by a new connection")
        conn = self.conn
        if conn is None or self.nursery is None:
            return moved
        try:
            # No GOAWAY: the agent must not close first, so the close reason
            # stays ours (replaced) for the disconnect metric.
            conn.send_message(messages.Replaced(instance=by.instance, remote=by.remote))
        except (TunnelClosed, ProtocolError) as exc:
            log.debug("replaced notice to %s not sent: %s", conn.name, exc)

        async def close() -> None:
            await conn.flush(0.5)
            conn.abort(CloseReason.REPLACED, f"replaced by a new connection from {by.remote}")

        self.nursery.start_soon(close)
        return moved

    def fail_all(self, reason: str) -> None:
        """The connection died: every pending dial fails at once."""
        self.closed = True
        fail_pending(self.pending.values(), reason)


def _serial(der: bytes | None) -> str | None:
    """The client certificate's serial (hex), so a rotation can be followed
    agent by agent in the logs."""
    if not der:
        return None
    try:
        return f"{x509.load_der_x509_certificate(der).serial_number:x}"
    except ValueError:
        return None


def warn_identifiers_not_allowed(
    cluster: str, agent_id: str, remote: str, refused: list[str]
) -> None:
    """The WARNING for identifiers an agent (either kind) declared that its
    credential does not allow; they are dropped and the agent keeps serving."""
    log.warning(
        "agent %s/%s declared identifiers its credential does not allow; dropped: %s",
        cluster,
        agent_id,
        "&".join(refused),
        extra=event(
            "identifier_not_allowed",
            agent_id=agent_id,
            cluster=cluster,
            remote=remote,
            refused="&".join(refused),
        ),
    )
