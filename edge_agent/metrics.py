"""Agent metrics, served on the health port with ``--metrics``.

This module imports prometheus_client, and :mod:`edge_agent.app` imports
this module only when ``--metrics`` is on: most devices are never scraped,
and on a small device the import costs start-up time and resident memory.

Names follow konnectivity-agent where the meaning is the same
(``konnectivity_network_proxy_agent_*``), so its dashboards and alerts keep
working; extras use ``tether_``, as on the broker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import prometheus_client as prom

from tether.netio.metrics import TunnelMetrics

if TYPE_CHECKING:
    from edge_agent.app import Agent

NS = "konnectivity_network_proxy_agent"


class AgentMetrics(TunnelMetrics):
    def __init__(self, agent: Agent) -> None:
        super().__init__("agent", "broker connections")
        r = self.registry
        self.dial_duration = prom.Histogram(
            f"{NS}_dial_duration_seconds",
            "Time to connect to a target (successful dials).",
            registry=r,
            buckets=(0.005, 0.025, 0.1, 0.5, 2.5, 10, 30),
        )
        self.dial_failures = prom.Counter(
            f"{NS}_endpoint_dial_failure",
            "Failed target dials, by reason (refused, timeout, unreachable, dns, forbidden, "
            "bad_address, error).",
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
            "tether_pending_dials",
            "Dial tasks on broker connections: connecting to a target or relaying.",
            registry=r,
        ).set_function(lambda: sum(len(link.dials) for link in agent.links.values()))
        prom.Gauge(
            f"{NS}_open_endpoint_connections",
            "Connections to targets currently relaying.",
            registry=r,
        ).set_function(lambda: agent.active_streams)
        self.active_streams.set_function(
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
        self._up = self.bytes_relayed.labels("up")
        self._down = self.bytes_relayed.labels("down")

    def count_relayed(self, direction: str, n: int) -> None:
        """``relay`` callback. On the agent the socket is the target, so the
        relay's "up" (socket to tunnel) is the broker's "down"."""
        (self._down if direction == "up" else self._up).inc(n)
