"""The broker process: listeners, frontends, health, and graceful shutdown."""

from __future__ import annotations

import functools
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from broker import roles
from broker.agent_conn import ServerInfo
from broker.agent_server import AgentServer
from broker.auth import Authenticator, TokenStore
from broker.clusters import ClusterConfig, load_clusters, parse_allowed_identifiers, socket_spec
from broker.config import BrokerConfig, reviews_tokens
from broker.connect_frontend import ConnectSettings, handle_connect
from broker.leases import LeasePublisher
from broker.metrics import BrokerMetrics
from broker.registry import Registry
from protocol import leases
from protocol.admission import Admission, AdmissionConfig
from protocol.budget import BufferBudget
from protocol.session import SessionConfig
from tether.netio import kubeapi, sockopts, tickets, tls
from tether.netio.admission import AdmissionGate
from tether.netio.gc_tenure import Tenure
from tether.netio.http import serve_http, text
from tether.netio.kubeapi import KubeClient
from tether.netio.limits import PerPeerLimiter
from tether.netio.listeners import (
    BoundUnixSocket,
    UnixSocketError,
    bind_unix_socket,
    listener_port,
    open_tcp_listener,
)
from tether.netio.logs import event, limited, run_suppressed_reporter
from tether.netio.process import wait_for_stop_signal
from tether.netio.tunnel import Keepalive

if TYPE_CHECKING:
    # Imported only when used (issue 16): the gRPC frontend (protobuf) with
    # a cluster in --mode=grpc, the workers with --workers.
    from broker.grpc_frontend import GrpcFrontend
    from broker.workers import WorkerLink

log = logging.getLogger("tether.broker")

#: The agent port's listen backlog: a reconnect storm waits there for
#: accept pacing instead of in SYN retransmits (the kernel caps it at
#: net.core.somaxconn).
AGENT_BACKLOG = 4096
#: The share of --handshake-timeout an agent connection may wait for a
#: handshake slot; the rest is left for the handshake (the agent's own
#: connect deadline is as long by default).
QUEUE_WAIT_SHARE = 0.7

Handler = Callable[[trio.abc.Stream], Awaitable[None]]


class Broker:
    def __init__(
        self,
        cfg: BrokerConfig,
        make_registry: Callable[[BrokerMetrics, tuple[str, ...]], Registry] = Registry,
    ) -> None:
        self.cfg = cfg
        self.metrics = BrokerMetrics()
        self.registry = make_registry(self.metrics, cfg.proxy_strategies)
        self.registry.hold_for_return(cfg.agent_return_wait, cfg.agent_return_window)
        #: ``--workers``: this process is one of the host's workers.
        self.worker: WorkerLink | None = None
        self.server = ServerInfo(cfg.server_id, cfg.server_count)
        self.leases: LeasePublisher | None = None
        if cfg.enable_lease_controller:
            self.leases = LeasePublisher(
                KubeClient(kubeapi.load(cfg.kubeconfig)),  # KubeApiError: a start-up error
                cfg.lease_namespace,
                leases.parse_labels(cfg.lease_label),
                cfg.server_id,
                on_count=self._lease_count,
            )
        self.clusters = clusters_from(cfg)
        self.cluster_names = frozenset(c.name for c in self.clusters)
        frontend_subjects = roles.parse_subjects(cfg.frontend_allowed_subjects)
        self.authenticator = Authenticator(
            self.clusters,
            TokenStore(
                cfg.agent_token_file,
                lambda reason: self.metrics.bad_input.labels("token_file", reason).inc(),
            )
            if cfg.agent_token_file
            else None,
            frontend_subjects=frontend_subjects,
        )
        routes_by_claims = {"destHost", "defaultRoute"} & set(cfg.proxy_strategies)
        for c in self.clusters:
            if (
                routes_by_claims
                and c.agent_identifiers == "credential"
                and not c.allowed_identifiers
            ):
                log.warning(
                    "cluster %s: agents may declare only the identifiers their credential "
                    "allows (certificate SANs, token entry identifiers=); claims beyond are "
                    "dropped. List them with --agent-allowed-identifiers / allowed_identifiers, "
                    "or keep trusting every claim with --agent-identifiers-policy=any",
                    c.name,
                )
        # Certificates are reloaded on SIGHUP or file change (see _cert_reloaded):
        # every new connection takes the context current at that moment.
        self.agent_tls = tls.ReloadableContext(
            "cluster",
            self._agent_context,
            [
                cfg.cluster_cert,
                cfg.cluster_key,
                *self.authenticator.ca_files,
                cfg.agent_tls_ticket_key_file,
            ],
            cert_file=cfg.cluster_cert,
        )
        #: Buffered tunnel data of every agent connection together.
        self.budget = BufferBudget(cfg.max_buffered_bytes, window=cfg.stream_window)
        self.metrics.watch_budget(self.budget)
        self.agent_server = AgentServer(
            self.registry,
            self.server,
            self.authenticator,
            self.agent_tls.current,
            SessionConfig(stream_window=cfg.stream_window, connection_window=cfg.connection_window),
            Keepalive(cfg.keepalive_time, cfg.keepalive_timeout),
            cfg.handshake_timeout,
            sockopts.TunnelSocketOptions(
                user_timeout=cfg.keepalive_time + cfg.keepalive_timeout,
                keepalive_idle=cfg.keepalive_time,
                congestion=cfg.tcp_congestion or None,
                notsent_lowat=cfg.tcp_notsent_lowat or None,
            ),
            cfg.max_handshakes_per_ip,
            budget=self.budget,
            flood_penalty_after=cfg.flood_penalty_after,
        )
        #: New agent connections under admission control (a reconnect storm).
        self.admission = AdmissionGate(
            Admission(
                AdmissionConfig(
                    max_handshakes=cfg.max_concurrent_handshakes,
                    accept_rate=cfg.agent_accept_rate,
                    accept_burst=max(1, int(cfg.agent_accept_rate / 10)),
                    max_queue=cfg.agent_accept_queue,
                    max_wait=cfg.handshake_timeout * QUEUE_WAIT_SHARE,
                    max_shedding=max(1, cfg.max_concurrent_handshakes // 4),
                    max_per_source=cfg.max_handshakes_per_ip,
                    max_active_per_source=max(1, cfg.max_concurrent_handshakes // 4),
                ),
                0.0,  # built before trio runs: the bucket starts full
            ),
            on_verdict=lambda v: self.metrics.admission.labels(v.value).inc(),
            on_source_refused=self.agent_server.refuse_source,
        )
        #: Short collector pauses with many agents (tether/netio/gc_tenure.py).
        self.tenure: Tenure | None = None
        if cfg.gc_full_interval > 0:
            pauses = {g: self.metrics.gc_pause.labels(str(g)) for g in range(3)}
            tenure = self.tenure = Tenure(
                full_every=cfg.gc_full_interval,
                on_pause=lambda generation, seconds: pauses[generation].observe(seconds),
            )
            self.metrics.gc_tenured.set_function(lambda: tenure.tenured)
        for state, read in (
            ("handshaking", lambda: self.admission.admission.active),
            ("queued", lambda: self.admission.admission.queued),
            ("shedding", lambda: self.admission.admission.shedding),
        ):
            self.metrics.admission_state.labels(state).set_function(read)
        self.frontend_trust: roles.FrontendTrust | None = None
        self.frontend_tls: tls.ReloadableContext | None = None
        if cfg.server_port:
            try:
                self.frontend_trust = roles.FrontendTrust(
                    _frontend_sources(cfg, self.clusters), frontend_subjects
                )
            except (OSError, ValueError) as exc:
                raise tls.TLSConfigError(f"cannot load frontend CA bundle: {exc}") from None
            self.frontend_tls = tls.ReloadableContext(
                "server",
                self._frontend_context,
                [cfg.server_cert, cfg.server_key, *self._frontend_ca_files()],
                cert_file=cfg.server_cert,
            )
            for line in self.frontend_trust.migration_warnings(self.authenticator.ca_files):
                log.warning(line, extra=event("pki_migration_needed"))
        self.metrics.active_streams.set_function(self.agent_server.stream_count)
        for ctx in self._tls_contexts():
            self.metrics.watch_certificate(ctx)
        self.grpc_frontends = self._grpc_frontends()
        self._frontend_limit = trio.CapacityLimiter(cfg.max_frontend_connections)
        #: TCP frontend connections still in their TLS handshake, per address.
        self._frontend_handshakes = PerPeerLimiter(cfg.max_handshakes_per_ip)
        self._tunnels = 0
        self._tunnels_idle = trio.Event()
        self._tunnels_idle.set()
        self.stopping = False
        #: Frontend Unix sockets per cluster: what to create, then what was.
        self.socket_specs = {
            c.name: socket_spec(c, _socket_keys(cfg, c)) for c in self.clusters if c.frontend_uds
        }
        self.sockets: dict[str, BoundUnixSocket] = {}
        self._sockets_lost: set[str] = set()

    def _grpc_frontends(self) -> dict[str, GrpcFrontend]:
        """One gRPC frontend per cluster in ``--mode=grpc``; the module (and
        protobuf with it) is imported only when there is one."""
        grpc = [c for c in self.clusters if c.frontend_uds and c.frontend_mode == "grpc"]
        if not grpc:
            return {}
        from broker.grpc_frontend import GrpcFrontend, GrpcSettings

        cfg = self.cfg
        return {
            c.name: GrpcFrontend(
                self.registry,
                self.metrics,
                GrpcSettings(
                    cluster=c.name,
                    dial_timeout=cfg.backend_dial_timeout,
                    handshake_timeout=cfg.frontend_header_timeout,
                    max_message_size=cfg.max_grpc_message_size,
                    max_concurrent_streams=cfg.max_grpc_streams,
                ),
            )
            for c in grpc
        }

    # --------------------------------------------------------- certificates

    def _agent_context(self) -> ssl.SSLContext:
        ctx = tls.server_context(
            self.cfg.cluster_cert,
            self.cfg.cluster_key,
            self.authenticator.ca_files,
            alpn=["h2"],
            optional=self.authenticator.allows_tokens,
            min_version=self.cfg.agent_tls_min_version,
        )
        try:
            self.authenticator.load_cas()
        except (OSError, ValueError) as exc:
            raise tls.TLSConfigError(f"cannot load agent CA bundle: {exc}") from None
        if self.cfg.agent_tls_ticket_key_file:
            key = tickets.load_key(self.cfg.agent_tls_ticket_key_file)
            tickets.apply(ctx, key, tickets.session_context(self.authenticator.ca_files))
        return ctx

    def _frontend_ca_files(self) -> list[str]:
        assert self.frontend_trust is not None
        return list(dict.fromkeys([self.cfg.server_ca_cert, *self.frontend_trust.ca_files]))

    def _frontend_context(self) -> ssl.SSLContext:
        assert self.frontend_trust is not None
        ctx = tls.server_context(
            self.cfg.server_cert,
            self.cfg.server_key,
            self._frontend_ca_files(),
            alpn=["http/1.1"],
        )
        try:
            self.frontend_trust.load()
        except (OSError, ValueError) as exc:
            raise tls.TLSConfigError(f"cannot load frontend CA bundle: {exc}") from None
        return ctx

    def _tls_contexts(self) -> list[tls.ReloadableContext]:
        return [self.agent_tls] + ([self.frontend_tls] if self.frontend_tls else [])

    def _cert_reloaded(self, ctx: tls.ReloadableContext, ok: bool) -> None:
        self.metrics.cert_reloads.labels(ctx.name, "ok" if ok else "error").inc()
        if ctx is self.agent_tls:
            self.agent_server.ssl_context = ctx.current

    # ------------------------------------------------------- unix sockets

    def bind_sockets(self) -> None:
        """Create every frontend socket (before trio starts, so that a socket
        in use is a start-up error); on failure none is left behind."""
        if self.sockets:
            return
        try:
            for name, spec in self.socket_specs.items():
                self.sockets[name] = bind_unix_socket(spec)
        except UnixSocketError:
            self.remove_sockets()
            raise
        for name, bound in self.sockets.items():
            path = bound.spec.path
            if bound.replaced_stale:
                log.warning(
                    "replacing stale socket %s (nobody listened on it)",
                    path,
                    extra=event("stale_socket_replaced", cluster=name, path=path),
                )
            mode = f"{bound.spec.mode:04o}"
            log.info(
                "cluster %s: frontend socket %s owner %d group %d mode %s",
                name,
                path,
                bound.uid,
                bound.gid,
                mode,
                extra=event(
                    "frontend_socket",
                    cluster=name,
                    path=path,
                    uid=bound.uid,
                    gid=bound.gid,
                    mode=mode,
                ),
            )
            self.metrics.frontend_socket_info.labels(
                name, path, str(bound.uid), str(bound.gid), mode
            ).set(1)
            self.metrics.frontend_socket_owned.labels(name).set_function(
                functools.partial(_owned, bound)
            )

    def _bound_listeners(self) -> dict[str, trio.SocketListener]:
        self.bind_sockets()
        return {name: bound.listener() for name, bound in self.sockets.items()}

    def remove_sockets(self) -> None:
        """Unlink the frontend sockets that are still this broker's, then close them."""
        for bound in self.sockets.values():
            bound.remove_if_owned()
            bound.sock.close()
        self.sockets.clear()

    def lost_sockets(self) -> list[str]:
        """Clusters whose socket path no longer leads to our socket; logs changes."""
        lost = [name for name, bound in self.sockets.items() if not bound.owned()]
        for name in set(lost) - self._sockets_lost:
            path = self.sockets[name].spec.path
            log.warning(
                "frontend socket %s of cluster %s is gone or replaced by another file; "
                "not ready (restart the broker to create it again)",
                path,
                name,
                extra=event("frontend_socket_lost", cluster=name, path=path),
            )
        self._sockets_lost = set(lost)
        return lost

    async def _watch_sockets(self, interval: float = 1.0) -> None:
        while True:
            self.lost_sockets()
            await trio.sleep(interval)

    # ------------------------------------------------------------- health

    def routes(self) -> dict[str, Callable[[], tuple[int, str, bytes]]]:
        def healthz() -> tuple[int, str, bytes]:
            return text(200, "ok")

        def readyz() -> tuple[int, str, bytes]:
            if self.stopping:
                return text(503, "shutting down")
            lost = self.lost_sockets()
            if lost:
                return text(503, f"frontend socket lost: {', '.join(sorted(lost))}")
            n = self.registry.count()
            return text(200, f"ready: {n} agent(s)") if n else text(503, "no agent connected")

        return {"/healthz": healthz, "/readyz": readyz}

    def admin_routes(self) -> dict[str, Callable[[], tuple[int, str, bytes]]]:
        """The admin port (konnectivity's ``--admin-port``): ``/metrics``."""

        def metrics() -> tuple[int, str, bytes]:
            return 200, "text/plain; version=0.0.4; charset=utf-8", self.metrics.render()

        def agents() -> tuple[int, str, bytes]:
            # Which agents are connected, and of which kind (the migration
            # guide in docs/operations.md): one JSON object per agent.
            rows = [
                {
                    "cluster": a.cluster,
                    "agent_id": a.agent_id,
                    "kind": getattr(a, "kind", "tether"),
                    "identifiers": a.identifiers.render(),
                    "remote": getattr(a, "remote", ""),
                    "auth": getattr(a, "auth_method", ""),
                    "load": a.load,
                    "usable": a.usable,
                }
                for a in sorted(self.registry.agents(), key=lambda a: (a.cluster, a.agent_id))
            ]
            return 200, "application/json", json.dumps(rows, indent=1).encode() + b"\n"

        return {"/metrics": metrics, "/agents": agents}

    def _admin_bad_input(self, reason: str) -> None:
        self.metrics.bad_input.labels("admin", reason).inc()

    def _health_bad_input(self, reason: str) -> None:
        self.metrics.bad_input.labels("health", reason).inc()

    # ---------------------------------------------------------- frontends

    def _connect_settings(
        self, cluster: str, frontend: str, local_only: bool = False
    ) -> ConnectSettings:
        worker = self.worker
        return ConnectSettings(
            handover=worker.handover if worker and frontend == "uds" and not local_only else None,
            local_only=local_only,
            cluster=cluster,
            dial_timeout=self.cfg.backend_dial_timeout,
            header_timeout=self.cfg.frontend_header_timeout,
            frontend=frontend,
            optimistic=self.cfg.optimistic_connect,
            draining=lambda: self.stopping,
        )

    def _tcp_frontend_cluster(self, tls_stream: trio.SSLStream[trio.abc.Stream]) -> str:
        """The TCP frontend serves every cluster: the frontend CA that issued
        the client certificate names which one, and the certificate must be a
        frontend's (broker/roles.py); RoleError otherwise."""
        assert self.frontend_trust is not None
        return self.frontend_trust.identify(tls_stream.getpeercert(binary_form=True))

    def frontend_handler(
        self, frontend: str, cluster: str = "", local_only: bool = False
    ) -> Handler:

        async def handle(stream: trio.abc.Stream) -> None:
            if self.stopping and frontend == "grpc":
                await trio.aclose_forcefully(stream)  # told by GOAWAY already
                return
            try:
                self._frontend_limit.acquire_nowait()
            except trio.WouldBlock:
                self.metrics.bad_input.labels("frontend", "too_many_connections").inc()
                await trio.aclose_forcefully(stream)
                return
            self._tunnels += 1
            self._tunnels_idle = trio.Event()
            try:
                target_cluster = cluster
                if self.frontend_tls is not None and frontend == "tcp":
                    peer = _peer_host(stream)
                    tls_stream = await self._tls_accept(stream)
                    if tls_stream is None:
                        return
                    stream = tls_stream
                    try:
                        target_cluster = self._tcp_frontend_cluster(tls_stream)
                    except roles.RoleError as exc:
                        self.metrics.bad_input.labels("frontend", exc.reason).inc()
                        limited(
                            log,
                            logging.WARNING,
                            peer,
                            "frontend client certificate refused (403) from %s: %s",
                            peer,
                            exc,
                            extra=event("frontend_rejected", remote=peer, reason=exc.reason),
                        )
                        await _forbidden(stream, f"{exc.reason}: client certificate refused")
                        return
                if frontend == "grpc":
                    await self.grpc_frontends[target_cluster].handle(stream)
                else:
                    settings = self._connect_settings(target_cluster, frontend, local_only)
                    await handle_connect(stream, self.registry, self.metrics, settings)
            except Exception:
                log.exception("frontend handler failed")
            finally:
                self._frontend_limit.release()
                self._tunnels -= 1
                if self._tunnels == 0:
                    self._tunnels_idle.set()

        return handle

    async def _tls_accept(self, tcp: trio.abc.Stream) -> trio.SSLStream[trio.abc.Stream] | None:
        assert self.frontend_tls is not None
        peer = _peer_host(tcp)
        slot = self._frontend_handshakes.acquire(peer)
        if slot is None:
            self.metrics.bad_input.labels("frontend", "too_many_handshakes").inc()
            if self._frontend_handshakes.first_refusal(peer):
                log.warning(
                    "TCP frontend: %s holds %d TLS handshakes; refusing more",
                    peer,
                    self._frontend_handshakes.limit,
                )
            await trio.aclose_forcefully(tcp)
            return None
        try:
            return await self._tls_handshake(tcp)
        finally:
            slot.release()

    async def _tls_handshake(self, tcp: trio.abc.Stream) -> trio.SSLStream[trio.abc.Stream] | None:
        assert self.frontend_tls is not None
        tls_stream = trio.SSLStream(
            tcp, self.frontend_tls.current, server_side=True, https_compatible=True
        )
        try:
            with trio.fail_after(self.cfg.handshake_timeout):
                await tls_stream.do_handshake()
        except (trio.TooSlowError, trio.BrokenResourceError) as exc:
            reason = "tls_handshake_timeout" if isinstance(exc, trio.TooSlowError) else "tls"
            self.metrics.bad_input.labels("frontend", reason).inc()
            peer = _peer_host(tcp)
            limited(
                log,
                logging.WARNING,
                peer,
                "frontend TLS handshake failed: %s (from %s)",
                exc.__cause__ or exc,
                peer,
                extra=event(
                    "tls_handshake_failed", listener="frontend", remote=peer, reason=reason
                ),
                key="tls_handshake_failed/frontend",
            )
            await trio.aclose_forcefully(tcp)
            return None
        return tls_stream

    # ---------------------------------------------------------------- run

    def _quiet(self) -> bool:
        """No agent handshake in progress or queued: not in a reconnect
        storm, so a long collector pause may run (:class:`Tenure`)."""
        admission = self.admission.admission
        return admission.active == 0 and admission.queued == 0

    async def _run(self, *, task_status: trio.TaskStatus[dict[str, int]]) -> None:
        cfg = self.cfg
        async with trio.open_nursery() as nursery:
            await nursery.start(
                tls.watch_certificates,
                self._tls_contexts(),
                cfg.cert_reload_interval,
                self._cert_reloaded,
            )
            nursery.start_soon(run_suppressed_reporter)
            if self.tenure is not None:
                nursery.start_soon(self.tenure.run, self._quiet)
            if self.leases is not None:
                await nursery.start(self.leases.run)
            ports: dict[str, int] = {}
            open_tcp = self.worker.open_listener if self.worker else open_tcp_listener
            agent_l = await open_tcp(
                cfg.agent_bind_address,
                cfg.agent_port,
                backlog=AGENT_BACKLOG,
                what="the agent port (--agent-port)",
            )
            ports["agent"] = listener_port(agent_l)
            # Paced and bounded (tether/netio/admission.py); the listeners
            # below have their own accept loops and never wait on it.
            nursery.start_soon(self.admission.serve, agent_l, self.agent_server.handle)
            uds = self.worker.inherited if self.worker else self._bound_listeners()
            for c in self.clusters:
                if c.name in uds:
                    uds_l = uds[c.name]
                    frontend = "grpc" if c.frontend_mode == "grpc" else "uds"
                    nursery.start_soon(_serve, uds_l, self.frontend_handler(frontend, c.name))
            nursery.start_soon(self._watch_sockets)
            if cfg.server_port:
                tcp_l = await open_tcp(
                    cfg.server_bind_address,
                    cfg.server_port,
                    what="the TCP frontend (--server-port)",
                )
                ports["server"] = listener_port(tcp_l)
                nursery.start_soon(_serve, tcp_l, self.frontend_handler("tcp"))
            if cfg.health_port and not self.worker:  # the supervisor serves the host's
                health_l = await open_tcp_listener(
                    cfg.health_bind_address, cfg.health_port, what="the health port (--health-port)"
                )
                ports["health"] = listener_port(health_l)
                nursery.start_soon(
                    functools.partial(
                        serve_http,
                        health_l,
                        self.routes(),
                        header_timeout=cfg.frontend_header_timeout,
                        on_bad_input=self._health_bad_input,
                    )
                )
            admin = "off"
            if cfg.admin_port or self.worker:
                # A worker's admin port is loopback, any port: the supervisor
                # scrapes it for the host's /metrics and /agents.
                admin_l = await open_tcp_listener(
                    "127.0.0.1" if self.worker else cfg.admin_bind_address,
                    0 if self.worker else cfg.admin_port,
                    what="the admin port (--admin-port)",
                )
                ports["admin"] = listener_port(admin_l)
                admin = f"{cfg.admin_bind_address or '*'}:{ports['admin']}"
                nursery.start_soon(
                    functools.partial(
                        serve_http,
                        admin_l,
                        self.admin_routes(),
                        header_timeout=cfg.frontend_header_timeout,
                        on_bad_input=self._admin_bad_input,
                    )
                )
            log.info(
                "broker %s up: agent port %s, frontends %s, health port %s, admin port %s",
                cfg.server_id,
                ports.get("agent"),
                ", ".join(
                    [
                        f"{c.name}: {c.frontend_mode} on {c.frontend_uds}"
                        for c in self.clusters
                        if c.frontend_uds
                    ]
                    + [
                        f"CONNECT+mTLS on :{ports['server']}"
                        if "server" in ports
                        else "TCP CONNECT frontend off"
                    ]
                ),
                ports.get("health"),
                admin,
                extra=event("started", server_id=cfg.server_id, ports=ports),
            )
            if self.worker is not None:
                await nursery.start(self.worker.run, self, ports)
            task_status.started(ports)
            await wait_for_stop_signal(log)
            await self.shutdown()
            nursery.cancel_scope.cancel()

    async def run(
        self, *, task_status: trio.TaskStatus[dict[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            await self._run(task_status=task_status)
        finally:
            # self.sockets still holds the listening sockets, so their inodes
            # cannot be reused yet and "still ours" is exact: a socket another
            # process put at the path stays.
            self.remove_sockets()

    def _lease_count(self, live: int) -> None:
        """Live replica Leases: what agents are told from now on (never
        fewer than --server-count)."""
        count = max(self.cfg.server_count, live)
        if count != self.server.server_count:
            log.info("replica count from leases: %d (was %d)", count, self.server.server_count)
            self.server.server_count = count

    async def shutdown(self) -> None:
        """Drain: no new frontend work, agents told to move, tunnels finish."""
        self.stopping = True
        for grpc_frontend in self.grpc_frontends.values():
            grpc_frontend.drain()
        await self.agent_server.drain(int(self.cfg.drain_retry * 1000))
        with trio.move_on_after(self.cfg.drain_timeout):
            await self._tunnels_idle.wait()
        if self._tunnels:
            log.warning("drain timeout: closing %d open tunnel(s)", self._tunnels)
        await self.agent_server.close_all()
        if self.leases is not None:
            await self.leases.release()
        log.info("broker stopped", extra=event("stopped", server_id=self.cfg.server_id))


def clusters_from(cfg: BrokerConfig) -> list[ClusterConfig]:
    """The clusters this broker serves: the config file's, plus the implicit
    cluster of the single-cluster flags when they name a trust or a frontend."""
    clusters = load_clusters(cfg.config) if cfg.config else []
    reviews = reviews_tokens(cfg)
    flags_used = bool(cfg.cluster_ca_cert or cfg.uds_name or cfg.agent_token_file or reviews)
    if not clusters or (flags_used and cfg.cluster_name not in {c.name for c in clusters}):
        clusters.append(
            ClusterConfig(
                name=cfg.cluster_name,
                agent_ca=cfg.cluster_ca_cert,
                token_agents=bool(cfg.agent_token_file),
                frontend_ca=cfg.server_ca_cert,
                frontend_uds=cfg.uds_name,
                frontend_mode=cfg.mode,
                frontend_uds_owner=cfg.uds_owner,
                frontend_uds_group=cfg.uds_group,
                frontend_uds_mode=int(cfg.uds_mode, 8),
                tokenreview_kubeconfig=cfg.kubeconfig if reviews else "",
                tokenreview_audience=cfg.authentication_audience,
                allowed_service_accounts=(
                    (f"{cfg.agent_namespace}:{cfg.agent_service_account}",) if reviews else ()
                ),
                tokenreview_bind_node_name=cfg.tokenreview_bind_node_name,
                tokenreview_source_rate=cfg.tokenreview_source_rate,
                tokenreview_source_burst=cfg.tokenreview_source_burst,
                agent_identifiers=cfg.agent_identifiers_policy,
                allowed_identifiers=parse_allowed_identifiers(cfg.agent_allowed_identifiers),
            )
        )
    return clusters


def _owned(bound: BoundUnixSocket) -> float:
    return 1.0 if bound.owned() else 0.0


def _socket_keys(cfg: BrokerConfig, cluster: ClusterConfig) -> dict[str, str]:
    """How errors name a cluster's socket settings: flags for the implicit
    cluster, the config file's keys for the others."""
    if cluster.frontend_uds == cfg.uds_name and cluster.name == cfg.cluster_name:
        return {
            "frontend_uds_owner": "--uds-owner",
            "frontend_uds_group": "--uds-group",
            "frontend_uds_mode": "--uds-mode",
        }
    return {
        key: f"{cfg.config}: cluster {cluster.name}: {key}"
        for key in ("frontend_uds_owner", "frontend_uds_group", "frontend_uds_mode")
    }


def _peer_host(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    try:
        return str(sock.getpeername()[0]) if sock is not None else "?"
    except OSError:
        return "?"


def _frontend_sources(
    cfg: BrokerConfig, clusters: list[ClusterConfig]
) -> list[roles.FrontendSource]:
    """Each cluster's frontend CA, in cluster order (the config file's first,
    so the implicit cluster of --server-ca-cert never shadows one of them).

    A cluster without ``frontend_ca`` whose agent CA the operator bundled
    into --server-ca-cert (what a PKI from before the frontend CA needed) is
    mapped by that agent CA, for one release, with a startup warning."""
    bundled = {ca.fingerprint(roles.SHA256) for ca in roles.load_pem_bundle(cfg.server_ca_cert)}
    sources = []
    for c in clusters:
        if c.frontend_ca:
            sources.append(roles.FrontendSource(c.name, c.frontend_ca))
        elif c.agent_ca and any(
            ca.fingerprint(roles.SHA256) in bundled for ca in roles.load_pem_bundle(c.agent_ca)
        ):
            sources.append(roles.FrontendSource(c.name, c.agent_ca, legacy=True))
    return sources


async def _forbidden(stream: trio.abc.Stream, message: str) -> None:
    body = message.encode() + b"\n"
    head = (
        b"HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(body)
    )
    with trio.move_on_after(5):
        try:
            await stream.send_all(head + body)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def _serve(
    listener: trio.SocketListener, handler: Callable[[trio.SocketStream], Awaitable[None]]
) -> None:
    async def guarded(stream: trio.SocketStream) -> None:
        try:
            await handler(stream)
        except Exception:  # an exception here would kill serve_listeners
            log.exception("connection handler failed")

    await trio.serve_listeners(guarded, [listener])
