"""The broker process: listeners, frontends, health, and graceful shutdown."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Awaitable, Callable

import trio

from broker.agent_conn import ServerInfo
from broker.agent_server import AgentServer
from broker.config import BrokerConfig
from broker.connect_frontend import ConnectSettings, handle_connect
from broker.grpc_frontend import GrpcFrontend, GrpcSettings
from broker.metrics import BrokerMetrics
from broker.registry import Registry
from protocol.session import SessionConfig
from tether.netio import tls
from tether.netio.http import serve_http, text
from tether.netio.listeners import listener_port, open_tcp_listener, open_unix_listener
from tether.netio.tunnel import Keepalive

log = logging.getLogger("tether.broker")

Handler = Callable[[trio.abc.Stream], Awaitable[None]]


class Broker:
    def __init__(self, cfg: BrokerConfig) -> None:
        self.cfg = cfg
        self.metrics = BrokerMetrics()
        self.registry = Registry(self.metrics, cfg.proxy_strategies)
        self.server = ServerInfo(cfg.server_id, cfg.server_count, cfg.cluster_name)
        self.agent_server = AgentServer(
            self.registry,
            self.server,
            tls.server_context(cfg.cluster_cert, cfg.cluster_key, cfg.cluster_ca_cert, alpn=["h2"]),
            SessionConfig(stream_window=cfg.stream_window, connection_window=cfg.connection_window),
            Keepalive(cfg.keepalive_time, cfg.keepalive_timeout),
            cfg.handshake_timeout,
        )
        self.frontend_tls = (
            tls.server_context(
                cfg.server_cert, cfg.server_key, cfg.server_ca_cert, alpn=["http/1.1"]
            )
            if cfg.server_port
            else None
        )
        self.grpc_frontend = GrpcFrontend(
            self.registry,
            self.metrics,
            GrpcSettings(
                cluster=cfg.cluster_name,
                dial_timeout=cfg.backend_dial_timeout,
                handshake_timeout=cfg.frontend_header_timeout,
                max_message_size=cfg.max_grpc_message_size,
            ),
        )
        self._frontend_limit = trio.CapacityLimiter(cfg.max_frontend_connections)
        self._tunnels = 0
        self._tunnels_idle = trio.Event()
        self._tunnels_idle.set()
        self.stopping = False

    # ------------------------------------------------------------- health

    def routes(self) -> dict[str, Callable[[], tuple[int, str, bytes]]]:
        def healthz() -> tuple[int, str, bytes]:
            return text(200, "ok")

        def readyz() -> tuple[int, str, bytes]:
            if self.stopping:
                return text(503, "shutting down")
            n = self.registry.count()
            return text(200, f"ready: {n} agent(s)") if n else text(503, "no agent connected")

        def metrics() -> tuple[int, str, bytes]:
            return 200, "text/plain; version=0.0.4; charset=utf-8", self.metrics.render()

        return {"/healthz": healthz, "/readyz": readyz, "/metrics": metrics}

    # ---------------------------------------------------------- frontends

    def _frontend_handler(self, frontend: str) -> Handler:
        settings = ConnectSettings(
            cluster=self.cfg.cluster_name,
            dial_timeout=self.cfg.backend_dial_timeout,
            header_timeout=self.cfg.frontend_header_timeout,
            frontend=frontend,
        )

        async def handle(stream: trio.abc.Stream) -> None:
            if self.stopping:
                await trio.aclose_forcefully(stream)
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
                if self.frontend_tls is not None and frontend == "tcp":
                    tls_stream = await self._tls_accept(stream)
                    if tls_stream is None:
                        return
                    stream = tls_stream
                if frontend == "grpc":
                    await self.grpc_frontend.handle(stream)
                else:
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
        tls_stream = trio.SSLStream(tcp, self.frontend_tls, server_side=True, https_compatible=True)
        try:
            with trio.fail_after(self.cfg.handshake_timeout):
                await tls_stream.do_handshake()
        except (trio.TooSlowError, trio.BrokenResourceError) as exc:
            reason = "tls_handshake_timeout" if isinstance(exc, trio.TooSlowError) else "tls"
            self.metrics.bad_input.labels("frontend", reason).inc()
            log.warning("frontend TLS handshake failed: %s", exc.__cause__ or exc)
            await trio.aclose_forcefully(tcp)
            return None
        return tls_stream

    # ---------------------------------------------------------------- run

    async def run(
        self, *, task_status: trio.TaskStatus[dict[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        cfg = self.cfg
        async with trio.open_nursery() as nursery:
            ports: dict[str, int] = {}
            agent_l = await open_tcp_listener(cfg.agent_bind_address, cfg.agent_port)
            ports["agent"] = listener_port(agent_l)
            nursery.start_soon(_serve, agent_l, self.agent_server.handle)
            if cfg.uds_name:
                uds_l = open_unix_listener(cfg.uds_name)
                frontend = "grpc" if cfg.mode == "grpc" else "uds"
                nursery.start_soon(_serve, uds_l, self._frontend_handler(frontend))
            if cfg.server_port:
                tcp_l = await open_tcp_listener(cfg.server_bind_address, cfg.server_port)
                ports["server"] = listener_port(tcp_l)
                nursery.start_soon(_serve, tcp_l, self._frontend_handler("tcp"))
            if cfg.health_port:
                health_l = await open_tcp_listener(cfg.health_bind_address, cfg.health_port)
                ports["health"] = listener_port(health_l)
                nursery.start_soon(serve_http, health_l, self.routes())
            log.info(
                "broker %s up: agent port %s, frontends %s, health port %s",
                cfg.server_id,
                ports.get("agent"),
                ", ".join(
                    f
                    for f in (
                        cfg.uds_name and f"{cfg.mode} on {cfg.uds_name}",
                        ports.get("server") and f"CONNECT+mTLS on :{ports['server']}",
                    )
                    if f
                ),
                ports.get("health"),
            )
            task_status.started(ports)
            await self._wait_for_signal()
            await self.shutdown()
            nursery.cancel_scope.cancel()
        if cfg.uds_name:
            try:
                os.unlink(cfg.uds_name)
            except OSError:
                pass

    async def _wait_for_signal(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("received %s: draining", signal.Signals(signum).name)
                return

    async def shutdown(self) -> None:
        """Drain: no new frontend work, agents told to move, tunnels finish."""
        self.stopping = True
        self.grpc_frontend.drain()
        await self.agent_server.drain(int(self.cfg.drain_retry * 1000))
        with trio.move_on_after(self.cfg.drain_timeout):
            await self._tunnels_idle.wait()
        if self._tunnels:
            log.warning("drain timeout: closing %d open tunnel(s)", self._tunnels)
        await self.agent_server.close_all()
        log.info("broker stopped")


async def _serve(
    listener: trio.SocketListener, handler: Callable[[trio.SocketStream], Awaitable[None]]
) -> None:
    async def guarded(stream: trio.SocketStream) -> None:
        try:
            await handler(stream)
        except Exception:  # an exception here would kill serve_listeners
            log.exception("connection handler failed")

    await trio.serve_listeners(guarded, [listener])
