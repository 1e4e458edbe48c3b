"""Agent metrics, served on the health port with ``--metrics``.

This module imports prometheus_client, and :mod:`edge_agent.app` imports
this module only when ``--metrics`` is on: most devices are never scraped,
and on a small device the import costs start-up time and resident memory.

Names follow konnectivity-agent where the meaning is the same
(``konnectivity_network_proxy_agent_*``), so its dashboards and alerts keep
working; extras use ``tether_``, as on the broker.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import prometheus_client as prom

from tether.netio import introspect

if TYPE_CHECKING:
    from edge_agent.app import Agent
    from tether.netio.tls import ReloadableContext

NS = "konnectivity_network_proxy_agent"


class AgentMetrics:
    def __init__(self, agent: Agent) -> None:
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.dial_duration = prom.Histogram(
            f"{NS}_dial_duration_seconds",
            "Time to connect to a target (successful dials).",
            registry=r,
            buckets=(0.005, 0.025, 0.1, 0.5, 2.5, 10, 30),
        )
        self.dial_failures = prom.Counter(
            f"{NS}_endpoint_dial_failure",
            "Failed target dials, by reason (refused, timeout, unreachable, dns, forbidden, error).",
            ["reason"],
            registry=r,
        )
        prom.Gauge(
            f"{NS}_open_server_connections",
            "Broker connections that are up (accepted).",
            registry=r,
        ).set_function(lambda: len(agent.links))
        prom.Gauge(
            f"{NS}_known_server_count",
            "Broker replicas this agent tries to hold a connection to.",
            registry=r,
        ).set_function(lambda: agent.server_count)
        prom.Gauge(
            "tether_tasks", "Live trio tasks in the agent (leak check).", registry=r
        ).set_function(introspect.trio_task_count)
        prom.Gauge(
            "tether_open_fds", "Open file descriptors of the agent (leak check).", registry=r
        ).set_function(introspect.open_fd_count)
        prom.Gauge(
            "tether_pending_dials",
            "Dial tasks on broker connections: connecting to a target or relaying.",
            registry=r,
        ).set_function(lambda: sum(len(link.dials) for link in agent.links.values()))
        prom.Gauge(
            f"{NS}_open_endpoint_connections",
            "Connections to targets currently relaying.",
            registry=r,
        ).set_function(lambda: agent.active_streams)
        prom.Gauge(
            "tether_active_streams",
            "Tunneled connections (HTTP/2 data streams) open on broker connections.",
            registry=r,
        ).set_function(
            lambda: sum(
                len(link.conn.streams) for link in agent.links.values() if link.conn is not None
            )
        )
        self.reconnects = prom.Counter(
            "tether_agent_reconnects",
            "Reconnect attempts scheduled (with backoff), by the cause of the previous failure.",
            ["cause"],
            registry=r,
        )
        self.keepalive_rtt = prom.Histogram(
            "tether_keepalive_rtt_seconds",
            "HTTP/2 PING round-trip time on broker connections.",
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.window_stalls = prom.Counter(
            "tether_stream_window_stalls",
            "Times a tunneled connection had to wait for HTTP/2 flow-control window "
            "before sending (a slow reader at the far end, or a saturated link).",
            registry=r,
        )
        bytes_relayed = prom.Counter(
            "tether_bytes_relayed",
            "Payload bytes relayed, by direction (up: client to target).",
            ["direction"],
            registry=r,
        )
        self._up = bytes_relayed.labels("up")
        self._down = bytes_relayed.labels("down")
        self.cert_reloads = prom.Counter(
            "tether_cert_reloads",
            "Certificate reloads (SIGHUP or changed files), by certificate and result.",
            ["cert", "result"],
            registry=r,
        )
        self.cert_expiry = prom.Gauge(
            "tether_certificate_expiry_timestamp_seconds",
            "When the certificate in use expires (Unix time), by certificate.",
            ["cert"],
            registry=r,
        )

    def watch_certificate(self, ctx: ReloadableContext) -> None:
        self.cert_expiry.labels(ctx.name).set_function(_expiry_of(ctx))

    def count_relayed(self, direction: str, n: int) -> None:
        """``relay`` callback. On the agent the socket is the target, so the
        relay's "up" (socket to tunnel) is the broker's "down"."""
        (self._down if direction == "up" else self._up).inc(n)

    def render(self) -> bytes:
        return bytes(prom.generate_latest(self.registry))


def _expiry_of(ctx: ReloadableContext) -> Callable[[], float]:
    def expiry() -> float:
        info = ctx.cert_info()
        return info.not_after if info else float("nan")

    return expiry
