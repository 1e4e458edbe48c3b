"""The agent process: keep one tunnel to the broker, serve its dials."""

from __future__ import annotations

import logging
import os
import random
import secrets
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
import trio

from edge_agent import sdnotify
from edge_agent.config import AgentConfig, tls_server_name
from edge_agent.dialer import DialFailed, dial_target
from edge_agent.policy import Policy
from protocol import events, handshake, keepalive, messages, netlink
from protocol.budget import BufferBudget, Grant
from protocol.codes import DialFailCode
from protocol.errors import ProtocolError
from protocol.hedge import Action, HedgePolicy, Outcome, State
from protocol.outcomes import CloseReason
from protocol.reconnect import Cause, Decision, Kind, LinkOutcome, ReconnectPolicy, Schedule
from protocol.session import Role, SessionConfig, TunnelSession
from tether.netio import netwatch, sockopts, tls
from tether.netio.http import serve_http, text
from tether.netio.listeners import listener_port, open_tcp_listener
from tether.netio.logs import event, run_suppressed_reporter
from tether.netio.process import wait_for_stop_signal
from tether.netio.relay import relay
from tether.netio.tls_stream import TLSStream
from tether.netio.tunnel import Keepalive, TunnelClosed, TunnelConnection

if TYPE_CHECKING:
    from edge_agent.metrics import AgentMetrics

log = logging.getLogger("tether.agent")


def connect_error_text(exc: OSError, host: str, port: int) -> str:
    """``127.0.0.1:8099: connection refused``: the address and the system's
    reason, where trio says only "all attempts to connect ... failed"."""
    reasons: list[str] = []

    def walk(error: BaseException | None) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                walk(inner)
        elif isinstance(error, OSError):
            text = (os.strerror(error.errno) if error.errno else str(error)).lower()
            if text not in reasons:
                reasons.append(text)

    walk(exc.__cause__ or exc.__context__)
    if not reasons and exc.strerror:
        reasons.append(exc.strerror.lower())
    return f"{host}:{port}: {', '.join(reasons) or str(exc)}"


#: The cause of a link that ``TunnelConnection`` closed, by its close reason.
_CLOSE_CAUSES = {
    CloseReason.KEEPALIVE_TIMEOUT: Cause.KEEPALIVE_TIMEOUT,
    CloseReason.PROTOCOL_ERROR: Cause.PROTOCOL_ERROR,
    CloseReason.FLOOD: Cause.PROTOCOL_ERROR,
    CloseReason.CONTROL_UNUSABLE: Cause.PROTOCOL_ERROR,
    CloseReason.PEER_CLOSED: Cause.BROKER_CLOSED,
    CloseReason.GOAWAY: Cause.BROKER_CLOSED,
    CloseReason.CONTROL_CLOSED: Cause.BROKER_CLOSED,
    CloseReason.TRANSPORT_ERROR: Cause.TRANSPORT_ERROR,
    CloseReason.ADDRESS_GONE: Cause.ADDRESS_GONE,
}


def cause_of_close(reason: CloseReason | None) -> Cause:
    """The cause of a link that ``TunnelConnection`` closed, from its typed
    ``close_reason`` (tether/netio/tunnel.py)."""
    return _CLOSE_CAUSES.get(reason, Cause.OTHER) if reason is not None else Cause.OTHER


#: TEST ONLY (tests/test_e2e_drain_race.py): seconds the drain waits between
#: its GOAWAYs and stopping the connection loop, as a slow device's event
#: loop does. Unset (the default, and in production) it has no effect.
TEST_ONLY_DRAIN_PAUSE_ENV = "TETHER_TEST_ONLY_DRAIN_PAUSE_S"


def drain_pause_test_only() -> float:
    """The test-only drain pause (see ``TEST_ONLY_DRAIN_PAUSE_ENV``); 0 unless set."""
    raw = os.environ.get(TEST_ONLY_DRAIN_PAUSE_ENV, "")
    try:
        return max(0.0, min(float(raw), 30.0)) if raw else 0.0
    except ValueError:
        return 0.0


async def _set_then_cancel(ev: trio.Event, scope: trio.CancelScope) -> None:
    await ev.wait()
    scope.cancel()


class Race:
    """A hedged reconnect in progress for one link (protocol/hedge.py decides)."""

    def __init__(self, old: BrokerLink, policy: HedgePolicy) -> None:
        self.old = old
        self.policy = policy
        self._changed = trio.Event()
        #: Attempts not yet settled, each with the scope that cancels it.
        self.attempts: dict[Attempt, trio.CancelScope] = {}

    def poke(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self, seconds: float, heard: trio.Event | None = None) -> None:
        """Until ``seconds`` pass, :meth:`poke` is called or ``heard`` is set."""
        with trio.move_on_after(seconds):
            if heard is None:
                await self._changed.wait()
                return
            async with trio.open_nursery() as nursery:
                for ev in (self._changed, heard):
                    nursery.start_soon(_set_then_cancel, ev, nursery.cancel_scope)

    def cancel_attempts(self) -> None:
        for scope in self.attempts.values():
            scope.cancel()


class Attempt:
    """One fresh connection of a race; settled exactly once."""

    def __init__(self, race: Race) -> None:
        self.race = race
        self.settled = False

    def settle(self, connected: bool | None) -> tuple[bool, Outcome | None]:
        """``connected``: it reached the welcome (True), failed (False) or was
        cancelled (None, not counted). Returns whether it takes over, and the
        outcome to count."""
        if self.settled:
            return False, None
        self.settled = True
        self.race.attempts.pop(self, None)
        if connected is None:
            self.race.policy.attempt_cancelled()
            return False, None
        return self.race.policy.attempt_ended(connected)


class BrokerLink:
    """Handler for one broker connection: answers dials, tracks readiness."""

    def __init__(self, agent: Agent, nursery: trio.Nursery) -> None:
        self.agent = agent
        self.nursery = nursery
        self.conn: TunnelConnection | None = None
        #: The tunnel socket's local and broker addresses (the mobility watch).
        self.local_addr = ""
        self.remote_addr = ""
        #: The last keepalive round trip, seconds.
        self.rtt: float | None = None
        #: This link's hedging (None: off, or not registered yet).
        self.race: Race | None = None
        #: This link is an attempt of another link's race.
        self.attempt: Attempt | None = None
        #: A hedged connection took this link's place; it ends once its streams do.
        self.superseded = False
        #: Set (and renewed) whenever a dial of this link ends.
        self.dial_ended = trio.Event()
        self.accepted = trio.Event()
        self.server_id = ""
        self.server_count = 1
        self.drain_hint: float | None = None
        #: Set when this agent ends the link itself, with the cause to report.
        self.ended_by: Cause | None = None
        #: We closed it: the balancer chose a replica we already hold.
        self.duplicate = False
        #: The broker said another connection with our id took this one's place.
        self.replaced: messages.Replaced | None = None
        self.dials: dict[int, trio.CancelScope] = {}
        #: The broker knows the ``busy`` dial_fail code (older ones do not).
        self.broker_knows_busy = False

    def on_control_requested(self, ev: events.ControlRequested) -> None:
        raise AssertionError("agents do not receive requests")

    def on_data_stream_requested(self, ev: events.DataStreamRequested) -> None:
        raise AssertionError("agents do not receive requests")

    def on_control_accepted(self, ev: events.ControlAccepted) -> None:
        welcome = handshake.Welcome.from_headers(ev.headers, lenient=True)
        self.server_id = welcome.server_id
        self.server_count = welcome.server_count
        self.broker_knows_busy = "busy" in welcome.dial_fail_codes
        self.accepted.set()

    def on_message(self, msg: messages.Message) -> None:
        if isinstance(msg, messages.Dial):
            if msg.id in self.dials:
                log.warning("duplicate dial id %d ignored", msg.id)
                return
            grant = self.agent.reserve()
            if grant is None:
                why = self.agent.budget.describe()
                if self.broker_knows_busy:
                    self._fail(msg.id, DialFailCode.BUSY, why, msg.addr)
                else:
                    self._fail(msg.id, DialFailCode.ERROR, f"agent busy: {why}", msg.addr)
                return
            scope = trio.CancelScope()
            self.dials[msg.id] = scope
            self.nursery.start_soon(self._guarded_dial, msg, scope, grant)
        elif isinstance(msg, messages.Cancel):
            pending = self.dials.get(msg.id)
            if pending is not None:
                log.info(
                    "dial %d cancelled by the broker",
                    msg.id,
                    extra=event("dial_cancelled", dial_id=msg.id, server_id=self.server_id),
                )
                pending.cancel()
        elif isinstance(msg, messages.Drain):
            retry = (msg.retry_ms or 0) / 1000
            log.info(
                "broker %s is draining; reconnecting within %.1fs",
                self.server_id,
                retry,
                extra=event("drain", initiator="broker", server_id=self.server_id, retry_s=retry),
            )
            self.drain_hint = retry
        elif isinstance(msg, messages.Replaced):
            self.replaced = msg  # logged once the link has ended (_link_ended)
        else:
            log.debug("ignoring %s from broker", type(msg).__name__)

    def _fail(self, dial_id: int, code: DialFailCode, msg: str, addr: str = "") -> None:
        log.info(
            "dial %d failed: %s: %s",
            dial_id,
            code.value,
            msg,
            extra=event("dial_failed", dial_id=dial_id, addr=addr, code=code.value),
        )
        if self.agent.metrics is not None:
            self.agent.metrics.dial_failures.labels(code.value).inc()
        try:
            assert self.conn is not None
            self.conn.send_message(messages.DialFail(id=dial_id, code=code, msg=msg[:1024]))
        except (TunnelClosed, ProtocolError) as exc:
            log.debug("dial_fail %d not sent: %s", dial_id, exc)

    async def _guarded_dial(
        self, msg: messages.Dial, scope: trio.CancelScope, grant: Grant
    ) -> None:
        """The dial-task boundary: whatever one dial raises ends that dial
        (a ``dial_fail``, or a reset if its stream was open; a log line; a
        metric), never the link's nursery and with it the agent process."""
        try:
            await self._serve_dial(msg, scope, grant)
        except Exception as exc:
            log.error(
                "dial %d to %s ended by an unexpected error: %s: %s",
                msg.id,
                msg.addr,
                type(exc).__name__,
                exc,
                extra=event(
                    "dial_failed", dial_id=msg.id, addr=msg.addr, code="error", reason="internal"
                ),
            )
            conn = self.conn
            opened = (
                [] if conn is None else [ts for ts in conn.streams.values() if ts.dial_id == msg.id]
            )
            for ts in opened:
                ts.reset()
            if not opened:
                detail = f"agent error: {type(exc).__name__}: {exc}"
                self._fail(msg.id, DialFailCode.ERROR, detail, msg.addr)
            elif self.agent.metrics is not None:
                self.agent.metrics.dial_failures.labels("error").inc()
        finally:
            self.dials.pop(msg.id, None)

    async def _serve_dial(self, msg: messages.Dial, scope: trio.CancelScope, grant: Grant) -> None:
        """Dial and relay; ``grant`` is this tunnel's share of the buffer
        budget: the stream returns it when over, or we do if there is none."""
        conn = self.conn
        assert conn is not None
        ts = None
        try:
            with scope:
                if msg.proto != "tcp":
                    self._fail(
                        msg.id, DialFailCode.ERROR, f"unsupported protocol {msg.proto!r}", msg.addr
                    )
                    return
                started = trio.current_time()
                try:
                    target = await dial_target(msg.addr, msg.timeout_ms / 1000, self.agent.policy)
                except DialFailed as exc:
                    self._fail(msg.id, exc.code, exc.msg, msg.addr)
                    return
                elapsed = trio.current_time() - started
                try:
                    if msg.early:
                        await target.send_all(msg.early)
                    sid = conn.session.open_data_stream(
                        msg.id, self.agent.authority, window=grant.window
                    )
                except (trio.BrokenResourceError, ProtocolError, Exception) as exc:
                    await trio.aclose_forcefully(target)
                    self._fail(
                        msg.id, DialFailCode.ERROR, f"cannot start the tunnel: {exc}", msg.addr
                    )
                    return
                ts = conn.add_stream(sid, msg.id, grant)
                conn.wake_writer()
                log.debug(
                    "dial %d to %s ok (stream %d, %d early bytes)",
                    msg.id,
                    msg.addr,
                    sid,
                    len(msg.early or b""),
                    extra=event(
                        "dial_ok", dial_id=msg.id, addr=msg.addr, duration_s=round(elapsed, 6)
                    ),
                )
                metrics = self.agent.metrics
                if metrics is not None:
                    metrics.dial_duration.observe(elapsed)
                self.agent.active_streams += 1
                try:
                    await relay(
                        target, ts, count=metrics.count_relayed if metrics is not None else None
                    )
                finally:
                    self.agent.active_streams -= 1
                    self.agent.streams_changed()
            if scope.cancelled_caught:
                log.debug("dial %d aborted", msg.id)
        finally:
            self.dials.pop(msg.id, None)
            if ts is None:
                self.agent.budget.release(grant)
            else:
                conn.forget(ts.stream_id)  # a no-op after relay(); releases the grant
            self.dial_ended.set()
            self.dial_ended = trio.Event()


class Agent:
    """Keeps connections to ``server-count`` distinct broker replicas.

    The agent dials one address (a load balancer or DNS name). Each accepted
    connection tells the broker's server id and the replica count; the agent
    keeps dialing until it holds one connection per replica, closes
    duplicates, and re-syncs when a replica goes away or the count changes.
    """

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        #: Drawn once per process start and sent in every hello: the broker
        #: tells a reconnect of this process from another device with our id.
        self.instance = secrets.token_hex(8)
        self.authority = f"{cfg.proxy_server_host}:{cfg.proxy_server_port}"
        #: SNI and the name the broker's certificate must carry (checked at start).
        self.server_name = tls_server_name(cfg.server_name, cfg.cluster, cfg.proxy_server_host)
        # Rebuilt on SIGHUP or when the files change; each new broker
        # connection takes the current one, open connections keep theirs.
        self.tls = tls.ReloadableContext(
            "agent",
            lambda: tls.client_context(
                cfg.ca_cert, cfg.agent_cert or None, cfg.agent_key or None, alpn=["h2"]
            ),
            [cfg.ca_cert, cfg.agent_cert, cfg.agent_key],
            cert_file=cfg.agent_cert or None,
        )
        self.session_config = SessionConfig(
            stream_window=cfg.stream_window, connection_window=cfg.connection_window
        )
        self.policy = Policy.parse(cfg.allow)
        #: Buffered tunnel data of every broker connection together.
        self.budget = BufferBudget(
            cfg.max_buffered_bytes,
            window=cfg.stream_window,
            min_window=self.session_config.min_stream_window,
        )
        self.socket_options = sockopts.TunnelSocketOptions(
            user_timeout=cfg.keepalive_time + cfg.keepalive_timeout,
            keepalive_idle=cfg.keepalive_time,
            congestion=cfg.tcp_congestion or None,
            notsent_lowat=cfg.tcp_notsent_lowat or None,
        )
        #: When to dial again, and whether at all (protocol/reconnect.py).
        self.reconnect = ReconnectPolicy(
            base=cfg.sync_interval,
            cap=cfg.sync_interval_cap,
            stable_after=cfg.stable_after,
            probe_cap=cfg.probe_interval_cap,
            rng=random.Random(),
        )
        #: Accepted connections by broker server id.
        self.links: dict[str, BrokerLink] = {}
        self.server_count = 1
        #: Live broker Leases (--count-server-leases); 0: use the brokers' own count.
        self.lease_count = 0
        self._lease_api = None
        if cfg.count_server_leases:
            from tether.netio import kubeapi  # lazy: PyYAML and the client

            self._lease_api = kubeapi.load(cfg.kubeconfig)  # KubeApiError: a start-up error
        #: The last broker TLS session and the context it belongs to.
        self._tls_session: tuple[ssl.SSLContext | None, ssl.SSLSession | None] = (None, None)
        self.active_streams = 0
        self._idle = trio.Event()
        self._links_changed = trio.Event()
        self._lost: list[LinkOutcome] = []
        #: Set when an address or route appeared: a waiting reconnect dials now.
        self._net_event = trio.Event()
        self._links_nursery: trio.Nursery | None = None
        #: Netlink in use (True), polling (False), or not watching (None).
        self.netlink_watch: bool | None = None
        self.ever_connected = trio.Event()
        self.notifier = sdnotify.Notifier.from_environment()
        self.metrics: AgentMetrics | None = None
        if cfg.metrics:
            from edge_agent.metrics import AgentGauges, AgentMetrics  # lazy: see that module

            # The gauges read the agent's own state, supplied here.
            self.metrics = AgentMetrics(
                AgentGauges(
                    open_links=lambda: len(self.links),
                    server_count=lambda: self.server_count,
                    pending_dials=lambda: sum(len(link.dials) for link in self.links.values()),
                    open_endpoints=lambda: self.active_streams,
                    tunnel_streams=lambda: sum(
                        len(link.conn.streams)
                        for link in self.links.values()
                        if link.conn is not None
                    ),
                )
            )
            self.metrics.watch_certificate(self.tls)
            self.metrics.watch_budget(self.budget)

    # -------------------------------------------------------------- state

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """The context for the next broker connection (see ``self.tls``)."""
        return self.tls.current

    @property
    def stopping(self) -> bool:
        """Draining (SIGTERM): the policy never dials again."""
        return self.reconnect.stopping

    @property
    def ready(self) -> bool:
        return bool(self.links) and not self.stopping

    def readiness(self) -> tuple[int, str]:
        have, want = len(self.links), self.server_count
        if self.stopping:
            return 503, "draining"
        if not have:
            return 503, f"not connected to a broker (0/{want})"
        ids = ",".join(sorted(self.links))
        scope = "all" if have >= want else "some"
        return 200, f"connected to {scope} brokers ({have}/{want}): {ids}"

    def reserve(self) -> Grant | None:
        """A new tunnel's share of the buffer budget; None: refuse it (busy)."""
        was_busy = self.budget.exhausted
        grant = self.budget.open()
        if grant is None and not was_busy:
            log.warning(
                "buffer budget exhausted (%s): refusing new dials as busy",
                self.budget.describe(),
                extra=event(
                    "buffer_budget_exhausted",
                    reserved=self.budget.reserved,
                    limit=self.budget.limit,
                    streams=self.budget.streams,
                ),
            )
        elif grant is not None and was_busy:
            log.info("buffer budget has room again (%s)", self.budget.describe())
        return grant

    def streams_changed(self) -> None:
        if self.active_streams == 0:
            self._idle.set()

    def _changed(self) -> None:
        self._links_changed.set()
        self._links_changed = trio.Event()
        self.notifier.status(self.readiness()[1])

    def routes(self) -> dict[str, Callable[[], tuple[int, str, bytes]]]:
        def healthz() -> tuple[int, str, bytes]:
            return text(200, "ok")

        def readyz() -> tuple[int, str, bytes]:
            return text(*self.readiness())

        return {"/healthz": healthz, "/readyz": readyz}

    def admin_routes(self) -> dict[str, Callable[[], tuple[int, str, bytes]]]:
        """The admin port (``--admin-server-port``): ``/metrics`` with ``--metrics``."""
        metrics = self.metrics
        if metrics is None:
            return {}

        def render() -> tuple[int, str, bytes]:
            return 200, "text/plain; version=0.0.4; charset=utf-8", metrics.render()

        return {"/metrics": render}

    def _cert_reloaded(self, ctx: tls.ReloadableContext, ok: bool) -> None:
        if self.metrics is not None:
            self.metrics.cert_reloads.labels(ctx.name, "ok" if ok else "error").inc()

    # ---------------------------------------------------------------- run

    async def _count_leases(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        from edge_agent.leases import LeaseCounter  # lazy: PyYAML and the client
        from protocol import leases
        from tether.netio import kubeapi

        assert self._lease_api is not None
        counter = LeaseCounter(
            kubeapi.KubeClient(self._lease_api),
            self.cfg.lease_namespace,
            leases.parse_labels(self.cfg.lease_label),
            self._lease_count_changed,
            interval_s=min(leases.RENEW_S, self.cfg.sync_interval_cap),
            on_list=self.metrics.lease_listed if self.metrics is not None else None,
        )
        await counter.run(task_status=task_status)

    def _lease_count_changed(self, count: int) -> None:
        self.lease_count = count
        if count != self.server_count:
            log.info("broker leases say %d replica(s) (was %d)", count, self.server_count)
            self.server_count = count
            self._changed()

    async def run(
        self, *, task_status: trio.TaskStatus[dict[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                tls.watch_certificates,
                [self.tls],
                self.cfg.cert_reload_interval,
                self._cert_reloaded,
            )
            nursery.start_soon(sdnotify.run_watchdog, self.notifier)
            if self.cfg.count_server_leases:
                await nursery.start(self._count_leases)
            nursery.start_soon(run_suppressed_reporter)
            self.notifier.status(self.readiness()[1])
            ports: dict[str, int] = {}
            if self.cfg.health_server_port:
                health = await open_tcp_listener(
                    self.cfg.health_server_bind_address,
                    self.cfg.health_server_port,
                    what="the health port (--health-server-port)",
                )
                ports["health"] = listener_port(health)
                nursery.start_soon(serve_http, health, self.routes())
            if self.metrics is not None and self.cfg.admin_server_port:
                admin = await open_tcp_listener(
                    self.cfg.admin_bind_address,
                    self.cfg.admin_server_port,
                    what="the admin port (--admin-server-port)",
                )
                ports["admin"] = listener_port(admin)
                nursery.start_soon(serve_http, admin, self.admin_routes())
            loop_scope = trio.CancelScope()

            async def loop() -> None:
                with loop_scope:
                    await self._connection_loop()

            nursery.start_soon(loop)
            if self.cfg.watch_network != "off":
                self.netlink_watch = await nursery.start(self._watch_network)
            task_status.started(ports)
            await wait_for_stop_signal(log)
            await self.drain(loop_scope)
            nursery.cancel_scope.cancel()

    async def drain(self, loop_scope: trio.CancelScope) -> None:
        """SIGTERM: the agent's drain, all of it (docs/protocol.md, 7. Shutdown).

        The policy stops first, before any checkpoint, so that a link ending
        from here on (the broker closing after our GOAWAY, however slow this
        device) is never dialed again. Then every broker hears ``drain``, open
        tunnels get ``--drain-timeout`` to finish, GOAWAY goes out and the
        connection loop is cancelled."""
        self.reconnect.stop()
        self.notifier.stopping()
        self.notifier.status(self.readiness()[1])
        links = [link for link in self.links.values() if link.conn is not None]
        for link in links:
            try:
                assert link.conn is not None
                link.conn.send_message(messages.Drain())
            except (TunnelClosed, ProtocolError):
                pass
        if self.active_streams:
            log.info(
                "waiting up to %gs for %d open tunnel(s)",
                self.cfg.drain_timeout,
                self.active_streams,
            )
            self._idle = trio.Event()
            with trio.move_on_after(self.cfg.drain_timeout):
                await self._idle.wait()
        for link in links:
            assert link.conn is not None
            link.conn.goaway("agent shutting down")
            await link.conn.flush()
        pause = drain_pause_test_only()
        if pause:
            await trio.sleep(pause)
        loop_scope.cancel()
        log.info("agent stopped", extra=event("stopped", agent_id=self.cfg.agent_id))

    # ------------------------------------------------------------ connections

    async def _connection_loop(self) -> None:
        async with trio.open_nursery() as links_nursery:
            self._links_nursery = links_nursery
            while self.reconnect.may_dial:
                if self._lost:
                    # A working link died: back off before dialing again, so
                    # a broker that accepts and drops cannot make us spin.
                    await self._follow(self._lost.pop())
                    continue
                if self.links and len(self.links) >= self.server_count:
                    await self._links_changed.wait()
                    continue
                await self._follow(await links_nursery.start(self._run_link))
            # Stopping: never dial again; the drain cancels this loop when done.
            await trio.sleep_forever()

    async def _follow(self, outcome: LinkOutcome) -> None:
        """Do what the policy says after ``outcome``: log, count and wait."""
        decision = self.reconnect.after(outcome)
        if decision.logged:
            self._log_reconnect(outcome, decision)
        if decision.redial and decision.schedule is not Schedule.NOW:
            # An address or route that appears meanwhile ends the wait: the
            # device moved to a network that may work now.
            with trio.move_on_after(decision.delay):
                await self._net_event.wait()

    def _log_reconnect(self, outcome: LinkOutcome, decision: Decision) -> None:
        # One failure is the network's or the broker's business; a broker that
        # stays unreachable is the operator's: WARNING from the third attempt
        # on (every tenth after that), so a long outage is visible but not noisy.
        log.log(
            logging.WARNING if decision.loud else logging.INFO,
            "reconnecting in %.2fs (attempt %d, %s ceiling %.1fs, cause: %s)",
            decision.delay,
            decision.attempt,
            decision.schedule.value,
            decision.ceiling,
            outcome.detail,
            extra=event(
                "reconnect",
                delay_s=round(decision.delay, 3),
                attempt=decision.attempt,
                ceiling_s=decision.ceiling,
                cause=outcome.label,
                reason=outcome.detail,
                schedule=decision.schedule.value,
            ),
        )
        if self.metrics is not None:
            self.metrics.reconnects.labels(outcome.label).inc()

    async def _open_transport(self) -> TLSStream | LinkOutcome:
        cfg = self.cfg
        try:
            with trio.fail_after(cfg.connect_timeout):
                tcp = await trio.open_tcp_stream(cfg.proxy_server_host, cfg.proxy_server_port)
                sockopts.apply(tcp.socket, self.socket_options)  # type: ignore[arg-type]
                stream = self._tls_stream(tcp)
                try:
                    await stream.do_handshake()
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
        except trio.TooSlowError:
            return LinkOutcome.failed(Cause.CONNECT_TIMEOUT, "connect timed out")
        except OSError as exc:
            where = connect_error_text(exc, cfg.proxy_server_host, cfg.proxy_server_port)
            return LinkOutcome.failed(Cause.CONNECT_FAILED, f"connect failed: {where}")
        except trio.BrokenResourceError as exc:
            detail = str(exc.__cause__ or exc)
            diagnosis = tls.tls_diagnosis(detail)
            if diagnosis is not None:
                log.error(
                    "%s",
                    diagnosis,
                    extra=event("tls_handshake_failed", listener="broker", reason=diagnosis),
                )
            return LinkOutcome.failed(
                Cause.TLS_HANDSHAKE, f"TLS handshake failed: {diagnosis or detail}"
            )
        if stream.selected_alpn_protocol() != "h2":
            await trio.aclose_forcefully(stream)
            return LinkOutcome.failed(Cause.NO_H2, "broker did not negotiate h2")
        resumed = stream.session_reused
        log.debug("TLS handshake with the broker: %s", "resumed" if resumed else "full")
        if self.metrics is not None:
            self.metrics.tls_handshakes.labels("yes" if resumed else "no").inc()
        return stream

    def _tls_stream(self, tcp: trio.SocketStream) -> TLSStream:
        """A TLS client stream offering the last broker session for
        resumption (a ticket: a reconnect costs the broker less). A session
        belongs to the context it was made with, so a reloaded certificate
        never resumes a session of the old one."""
        ctx = self.ssl_context
        session = self._tls_session[1] if self._tls_session[0] is ctx else None
        try:
            return TLSStream(
                tcp, ctx, server_side=False, server_hostname=self.server_name, session=session
            )
        except ValueError:  # not this context's session after all
            self._tls_session = (None, None)
            return TLSStream(tcp, ctx, server_side=False, server_hostname=self.server_name)

    def _keep_session(self, stream: TLSStream) -> None:
        """Remember ``stream``'s session once the broker sent its ticket."""
        session = stream.session
        if session is not None and session.has_ticket:
            self._tls_session = (self.ssl_context, session)

    async def _run_link(
        self, attempt: Attempt | None = None, *, task_status: trio.TaskStatus[LinkOutcome]
    ) -> None:
        """One connection's life. Reports a :class:`LinkOutcome` (connected,
        duplicate, stopped or failed) through ``task_status`` as soon as that
        is known; a connected link then keeps running until it ends, and is
        handed to the loop as lost unless the agent is stopping."""
        cfg = self.cfg
        dialed_at = trio.current_time()

        def failed(outcome: LinkOutcome) -> LinkOutcome:
            return attrs.evolve(outcome, lasted=trio.current_time() - dialed_at)

        stream = await self._open_transport()
        if isinstance(stream, LinkOutcome):
            task_status.started(failed(stream))
            return
        local_addr, remote_addr = _socket_addresses(stream)
        sess = TunnelSession(Role.AGENT, self.session_config, clock=trio.current_time)
        sess.initiate()
        token = None
        if cfg.service_account_token_path:
            token = self._read_token()
            if token is None:
                await trio.aclose_forcefully(stream)
                unreadable = LinkOutcome.failed(
                    Cause.TOKEN_UNREADABLE, "token file unreadable or empty"
                )
                task_status.started(failed(unreadable))
                return
        held = tuple(self.links)
        if attempt is not None:  # a hedge of the link to this replica: not a duplicate
            held = tuple(sid for sid in held if sid != attempt.race.old.server_id)
        hello = handshake.Hello(
            agent_id=cfg.agent_id,
            identifiers=cfg.agent_identifiers,
            cluster=cfg.cluster,
            # Lets a replica we already hold refuse us (409) without touching
            # the live link.
            connected_servers=held,
            token=token,
            instance=self.instance,
            # We drive keepalive; the broker then only answers.
            keepalive_ms=keepalive.header_value(cfg.keepalive_time),
            hedge=attempt is not None,
        )
        sess.open_control(hello.to_headers(), self.authority)
        reported = False
        started_at = trio.current_time()
        async with trio.open_nursery() as nursery:
            link = BrokerLink(self, nursery)
            link.local_addr, link.remote_addr, link.attempt = local_addr, remote_addr, attempt
            conn = TunnelConnection(
                stream,
                sess,
                link,
                keepalive=Keepalive(cfg.keepalive_time, cfg.keepalive_timeout),
                name="broker",
                budget=self.budget,
                auto_lowat=self.socket_options.auto_notsent_lowat,
            )
            link.conn = conn
            metrics = self.metrics

            def rtt_seen(rtt: float) -> None:
                link.rtt = rtt
                if metrics is not None:
                    metrics.keepalive_rtt.observe(rtt)

            conn.set_rtt_observer(rtt_seen)
            if metrics is not None:
                conn.set_stall_observer(metrics.window_stalls.inc)

            async def await_welcome() -> None:
                nonlocal reported
                with trio.move_on_after(cfg.connect_timeout):
                    await link.accepted.wait()
                if not link.accepted.is_set():
                    link.ended_by = Cause.CONTROL_TIMEOUT
                    conn.abort(CloseReason.HANDSHAKE_TIMEOUT, "control stream not accepted in time")
                    return
                reported = True
                self._keep_session(stream)
                if self.stopping:
                    # The drain began while this link was being set up: it
                    # never registers, so the drain's GOAWAYs missed it.
                    task_status.started(LinkOutcome(Kind.STOPPED))
                    conn.goaway("agent shutting down")
                    await conn.flush()
                    conn.abort(CloseReason.DRAIN, "agent shutting down")
                    return
                outcome = self._register(link, stream.session_reused)
                task_status.started(outcome)
                if outcome.kind is Kind.DUPLICATE:
                    link.duplicate = True
                    conn.goaway("duplicate connection")
                    await conn.flush()
                    conn.abort(
                        CloseReason.DUPLICATE, f"duplicate connection to broker {link.server_id}"
                    )

            nursery.start_soon(await_welcome)
            await conn.run()
            nursery.cancel_scope.cancel()
        was_registered = self.links.get(link.server_id) is link
        if was_registered:
            del self.links[link.server_id]
            self._changed()
        outcome = self._link_ended(link, conn)
        racing = link.race is not None and link.race.policy.link_died()
        if link.race is not None:
            link.race.poke()
        if not reported:
            task_status.started(failed(outcome))
        elif was_registered and not self.stopping and not racing:
            # A working link died: the loop reconnects after a backoff.
            lost = attrs.evolve(outcome, kind=Kind.LOST, lasted=trio.current_time() - started_at)
            self._lost.append(lost)
            self._changed()

    def _read_token(self) -> str | None:
        """Read the token afresh on every connect, so a rotated token is used."""
        try:
            with open(self.cfg.service_account_token_path, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            log.error("cannot read token file: %s", exc)
            return None
        return token or None

    def _register(self, link: BrokerLink, tls_resumed: bool = False) -> LinkOutcome:
        attempt = link.attempt
        if attempt is not None:
            race = attempt.race
            same = link.server_id == race.old.server_id
            takes, counted = attempt.settle(same)
            self._count_hedge(counted)
            if same and not takes:
                return LinkOutcome.duplicate(f"late hedge to broker {link.server_id}")
            if takes:
                race.cancel_attempts()
                race.poke()
                return self._hedge_won(link, race)
        if link.server_id in self.links:
            log.info("already connected to broker %s; closing the duplicate", link.server_id)
            return LinkOutcome.duplicate(f"already connected to broker {link.server_id}")
        if not self.lease_count and link.server_count != self.server_count:
            log.info("broker reports %d replica(s) (was %d)", link.server_count, self.server_count)
            self.server_count = link.server_count
        self.links[link.server_id] = link
        self._start_hedging(link)
        if not self.ever_connected.is_set():
            self.notifier.ready()
        self.ever_connected.set()
        self._changed()
        log.info(
            "connected to broker %s (%d/%d replicas; TLS %s)",
            link.server_id,
            len(self.links),
            self.server_count,
            "resumed" if tls_resumed else "full handshake",
            extra=event(
                "agent_connected",
                agent_id=self.cfg.agent_id,
                server_id=link.server_id,
                connected=len(self.links),
                expected=self.server_count,
                tls_resumed=tls_resumed,
            ),
        )
        return LinkOutcome.connected()

    # ------------------------------------------------------------- hedging

    def _count_hedge(self, outcome: Outcome | None) -> None:
        if outcome is not None and self.metrics is not None:
            self.metrics.hedges.labels(outcome.value).inc()

    def _hedge_won(self, link: BrokerLink, race: Race) -> LinkOutcome:
        """``link`` takes new dials in place of ``race.old`` (if that still
        runs, its streams finish or die with it)."""
        old = race.old
        if self.links.get(old.server_id) is old:
            old.superseded = True
            old.nursery.start_soon(self._retire, old)
        self.links[link.server_id] = link
        self._changed()
        self._start_hedging(link)
        log.info(
            "hedged reconnect to broker %s won; the old connection keeps %d stream(s)",
            link.server_id,
            len(old.conn.streams) if old.conn is not None else 0,
            extra=event(
                "hedge_won",
                agent_id=self.cfg.agent_id,
                server_id=link.server_id,
                old_streams=len(old.conn.streams) if old.conn is not None else 0,
            ),
        )
        return LinkOutcome.connected()

    async def _retire(self, link: BrokerLink) -> None:
        """A superseded link: once its streams and dials are done, close it."""
        conn = link.conn
        assert conn is not None
        while conn.streams or link.dials:
            log.debug(
                "superseded link to broker %s: waiting for %d stream(s), %d dial(s)",
                link.server_id,
                len(conn.streams),
                len(link.dials),
            )
            # A forgotten stream leaves once its queued bytes are sent: look again.
            with trio.move_on_after(0.5):
                await link.dial_ended.wait()
        conn.goaway("superseded by a hedged connection")
        with trio.move_on_after(1.0):
            await conn.flush()
        conn.abort(CloseReason.SUPERSEDED, "superseded by a hedged connection")

    def _start_hedging(self, link: BrokerLink) -> None:
        cfg = self.cfg
        if cfg.hedge_after <= 0 or self._links_nursery is None or self.stopping:
            return
        budget = cfg.keepalive_time + cfg.keepalive_timeout
        policy = HedgePolicy(
            after=cfg.hedge_after,
            clock=trio.current_time,
            retry=cfg.hedge_interval,
            attempt_timeout=cfg.connect_timeout,
            linger=2 * budget,
            max_parallel=16,
        )
        link.race = Race(link, policy)
        self._links_nursery.start_soon(self._hedge_watch, link.race)

    async def _hedge_watch(self, race: Race) -> None:
        """Ask the policy and do what it says until it is done."""
        link, policy = race.old, race.policy
        conn = link.conn
        assert conn is not None
        while policy.state is not State.DONE and not self.stopping:
            if policy.state is State.WATCHING and conn.closed_reason is not None:
                return
            # One attempt may take a few round trips, never the whole connect timeout.
            policy.attempt_timeout = min(self.cfg.connect_timeout, max(2.0, 8 * (link.rtt or 0)))
            policy.recover_after = 2 * policy.attempt_timeout
            step = policy.step(conn.last_rx, link.rtt)
            self._count_hedge(step.outcome)
            if step.outcome is Outcome.RECOVERED:
                race.cancel_attempts()
                log.info(
                    "broker %s answered again; hedged attempts stopped",
                    link.server_id,
                    extra=event("hedge_recovered", server_id=link.server_id),
                )
            if step.action is Action.PROBE:
                conn.send_probe()
            elif step.action is Action.ATTEMPT:
                if policy.in_flight == 1 and not race.attempts:
                    log.info(
                        "broker %s silent for %.1fs; racing fresh connections",
                        link.server_id,
                        trio.current_time() - conn.last_rx,
                        extra=event("hedge_started", server_id=link.server_id),
                    )
                attempt = Attempt(race)
                race.attempts[attempt] = trio.CancelScope()
                assert self._links_nursery is not None
                self._links_nursery.start_soon(self._hedge_attempt, attempt)
            if step.outcome is Outcome.GAVE_UP:
                race.cancel_attempts()
                # The ordinary reconnect takes over, as after any lost link.
                self._lost.append(
                    LinkOutcome(Kind.LOST, Cause.KEEPALIVE_TIMEOUT, "hedged reconnect gave up")
                )
                self._changed()
                return
            # Racing, the old link's next byte says the link is back (an attempt at once).
            await race.wait(step.wait, conn.next_rx() if policy.awaiting_answer else None)

    async def _hedge_attempt(self, attempt: Attempt) -> None:
        scope = attempt.race.attempts.get(attempt)
        assert scope is not None and self._links_nursery is not None
        outcome: LinkOutcome | None = None
        with scope:
            scope.deadline = trio.current_time() + attempt.race.policy.attempt_timeout
            outcome = await self._links_nursery.start(self._run_link, attempt)
        if outcome is None or outcome.kind is not Kind.CONNECTED:
            _, counted = attempt.settle(None if outcome is None else False)
            self._count_hedge(counted)
            if outcome is not None and outcome.kind is Kind.FAILED:
                log.debug("hedged attempt failed: %s", outcome.detail)
        attempt.race.poke()

    # ------------------------------------------------------------ mobility

    async def _watch_network(self, *, task_status: trio.TaskStatus[bool]) -> None:
        def bad(reason: str) -> None:
            if self.metrics is not None:
                self.metrics.netwatch_errors.labels(reason).inc()

        await netwatch.watch(
            self._network_changed,
            poll_interval=self.cfg.network_poll_interval,
            on_error=bad,
            use_netlink=self.cfg.watch_network == "netlink",
            task_status=task_status,
        )

    def _network_changed(self, changes: list[netlink.Change] | None) -> None:
        """Addresses or routes changed (None: check everything, polling)."""
        appeared = changes is None or any(
            netlink.affects(c, "") is netlink.Effect.ADDRESS_ADDED
            or (isinstance(c, netlink.RouteChange) and c.added and c.is_default)
            for c in changes
        )
        for link in list(self.links.values()):
            if link.conn is None or not link.local_addr or link.conn.closed_reason is not None:
                continue
            if changes is None:
                gone = not netwatch.address_present(link.local_addr)
                moved = not gone and netwatch.route_source(link.remote_addr) != link.local_addr
            else:
                effects = {netlink.affects(c, link.local_addr) for c in changes}
                gone = netlink.Effect.ADDRESS_GONE in effects
                moved = (
                    not gone
                    and netlink.Effect.ROUTE_CHANGED in effects
                    and netwatch.route_source(link.remote_addr) != link.local_addr
                )
            if gone or (moved and (link.race is None or link.race.policy.state is State.DONE)):
                self._moved(
                    link, netlink.Effect.ADDRESS_GONE if gone else netlink.Effect.ROUTE_CHANGED
                )
                link.ended_by = Cause.ADDRESS_GONE
                link.conn.abort(
                    CloseReason.ADDRESS_GONE,
                    f"local address {link.local_addr} "
                    + ("disappeared" if gone else "no longer routes to the broker"),
                )
            elif moved and link.race is not None:
                self._moved(link, netlink.Effect.ROUTE_CHANGED)
                link.race.policy.trigger()
                link.race.poke()
        if appeared:
            self._net_event.set()
            self._net_event = trio.Event()

    def _moved(self, link: BrokerLink, effect: netlink.Effect) -> None:
        log.info(
            "network change (%s): reconnecting to broker %s now",
            effect.value,
            link.server_id,
            extra=event(
                "network_changed",
                effect=effect.value,
                server_id=link.server_id,
                local=link.local_addr,
            ),
        )
        if self.metrics is not None:
            self.metrics.network_changes.labels(effect.value).inc()

    def _link_ended(self, link: BrokerLink, conn: TunnelConnection) -> LinkOutcome:
        if conn.rejection is not None:
            err = conn.rejection
            refused = handshake.Refusal.reason_of(err.reason_token)
            if refused is handshake.RefusalReason.DUPLICATE:
                if link.attempt is not None:
                    log.debug("hedged attempt not needed: %s", err.message)
                    return LinkOutcome.duplicate(err.message)
                log.info("balancer chose a replica we already hold: %s", err.message)
                return LinkOutcome.duplicate(err.message)
            if refused is handshake.RefusalReason.OVERLOADED:
                # A reconnect storm: the broker says when it expects room.
                log.info(
                    "broker overloaded (%d): %s; retry hint %s",
                    err.status,
                    err.message,
                    "none" if err.retry_after is None else f"{err.retry_after:.3f}s",
                    extra=event(
                        "broker_overloaded",
                        agent_id=self.cfg.agent_id,
                        status=err.status,
                        retry_after_s=err.retry_after,
                    ),
                )
                return LinkOutcome.failed(
                    Cause.OVERLOADED,
                    f"overloaded: {err.status} {err.message}",
                    refusal=err.reason_token,
                    retry_after=err.retry_after,
                )
            if refused is handshake.RefusalReason.AGENT_ID_LIVE:
                log.warning(
                    "broker refused this agent (409 agent_id_live): %s; if two devices share "
                    "this identity, give each its own --agent-id and certificate",
                    err.message,
                    extra=event(
                        "auth_rejected",
                        agent_id=self.cfg.agent_id,
                        status=err.status,
                        reason=err.reason_token,
                    ),
                )
                return LinkOutcome.failed(
                    Cause.REJECTED,
                    f"rejected: {err.status} {err.message}",
                    refusal=err.reason_token,
                )
            log.error(
                "broker rejected this agent (%d): %s",
                err.status,
                err.message,
                extra=event(
                    "auth_rejected",
                    agent_id=self.cfg.agent_id,
                    status=err.status,
                    # An older broker sends no token: its body text starts with one.
                    reason=err.reason_token or err.message.split(":", 1)[0],
                ),
            )
            return LinkOutcome.failed(
                Cause.REJECTED,
                f"rejected: {err.status} {err.message}",
                refusal=err.reason_token,
            )
        reason = conn.closed_reason or "closed"
        accepted = link.accepted.is_set()
        diagnosis = None if accepted else tls.tls_diagnosis(reason)
        if diagnosis is not None:  # a TLS 1.3 alert: it arrives with the first read
            log.error(
                "%s",
                diagnosis,
                extra=event("tls_handshake_failed", listener="broker", reason=diagnosis),
            )
            return LinkOutcome.failed(Cause.TLS_HANDSHAKE, f"TLS handshake failed: {diagnosis}")
        cause = link.ended_by or cause_of_close(conn.close_reason)
        if link.replaced is not None:
            by = link.replaced
            log.warning(
                "replaced by another connection with agent id %s (instance %s) from %s: if two "
                "devices share this identity, give each its own --agent-id and certificate",
                self.cfg.agent_id,
                by.instance or "?",
                by.remote or "?",
                extra=event(
                    "agent_replaced",
                    agent_id=self.cfg.agent_id,
                    server_id=link.server_id,
                    instance=by.instance or None,
                    remote=by.remote or None,
                ),
            )
            return LinkOutcome.failed(Cause.REPLACED, f"replaced: {reason}", accepted=accepted)
        drained = link.drain_hint is not None
        if link.superseded:
            log.info(
                "old connection to broker %s ended after a hedged reconnect: %s",
                link.server_id,
                reason,
                extra=event("hedge_retired", server_id=link.server_id, reason=reason),
            )
            return LinkOutcome.failed(Cause.OTHER, f"superseded: {reason}", accepted=accepted)
        if accepted and not link.duplicate:
            # While we drain, the broker closing after our GOAWAY is the plan.
            log.log(
                logging.INFO if self.stopping else logging.WARNING,
                "disconnected from broker %s: %s",
                link.server_id,
                reason,
                extra=event(
                    "agent_disconnected",
                    agent_id=self.cfg.agent_id,
                    server_id=link.server_id,
                    cause=Cause.DRAIN.value if drained else cause.value,
                    reason=reason,
                ),
            )
        if drained:
            return LinkOutcome.failed(
                Cause.DRAIN, f"drain: {reason}", accepted=accepted, drain_retry=link.drain_hint
            )
        return LinkOutcome.failed(cause, reason, accepted=accepted)


def _socket_addresses(stream: TLSStream) -> tuple[str, str]:
    """The tunnel socket's local and peer addresses ("" when unknown)."""
    sock = getattr(stream.transport, "socket", None)
    try:
        return str(sock.getsockname()[0]), str(sock.getpeername()[0])  # type: ignore[union-attr]
    except (OSError, AttributeError):
        return "", ""
