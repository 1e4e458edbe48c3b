"""Agent metrics, served on the health port with ``--metrics``.

This module imports prometheus_client, and :mod:`edge_agent.app` imports
this module only when ``--metrics`` is on: most devices are never scraped,
and on a small device the import costs start-up time and resident memory.

Names follow konnectivity-agent where the meaning is the same
(``konnectivity_network_proxy_agent_*``), so its dashboards and alerts keep
working; extras use ``tether_``, as on the broker.

The gauges read what the agent supplies (:class:`AgentGauges`), so this
module knows nothing of the agent's links or connections.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import prometheus_client as prom

from tether.netio.metrics import TunnelMetrics

NS = "konnectivity_network_proxy_agent"


@attrs.frozen
class AgentGauges:
    """What the agent's gauges read, supplied by their owner (the agent)."""

    #: Broker connections that are up (accepted).
    open_links: Callable[[], int]
    #: Broker replicas the agent tries to hold a connection to.
    server_count: Callable[[], int]
    #: Dial tasks on broker connections: connecting or relaying.
    pending_dials: Callable[[], int]
    #: Connections to targets currently relaying.
    open_endpoints: Callable[[], int]
    #: Data streams open on every broker connection.
    tunnel_streams: Callable[[], int]


class AgentMetrics(TunnelMetrics):
    def __init__(self, gauges: AgentGauges) -> None:
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
        ).set_function(gauges.open_links)
        prom.Gauge(
            f"{NS}_known_server_count",
            "Broker replicas this agent tries to hold a connection to.",
            registry=r,
        ).set_function(gauges.server_count)
        prom.Gauge(
            "tether_pending_dials",
            "Dial tasks on broker connections: connecting to a target or relaying.",
            registry=r,
        ).set_function(gauges.pending_dials)
        prom.Gauge(
            f"{NS}_open_endpoint_connections",
            "Connections to targets currently relaying.",
            registry=r,
        ).set_function(gauges.open_endpoints)
        self.active_streams.set_function(gauges.tunnel_streams)
        self.reconnects = prom.Counter(
            "tether_agent_reconnects",
            "Reconnect attempts scheduled (with backoff), by the cause of the previous failure.",
            ["cause"],
            registry=r,
        )
        self.hedges = prom.Counter(
            "tether_agent_hedges",
            "Hedged reconnects: fresh connections raced beside a quiet link, by outcome "
            "(won, recovered, failed, late, gave_up).",
            ["outcome"],
            registry=r,
        )
        self.netwatch_errors = prom.Counter(
            "tether_agent_netwatch_errors",
            "Address and route watch problems (unreadable netlink messages, overruns), by reason.",
            ["reason"],
            registry=r,
        )
        self.network_changes = prom.Counter(
            "tether_agent_network_changes",
            "Local address and route changes that moved a tunnel, by effect "
            "(address_gone, route_changed).",
            ["effect"],
            registry=r,
        )
        self.lease_lists = prom.Counter(
            f"{NS}_lease_lists",
            "Lease list calls to the apiserver (--count-server-leases), by HTTP status "
            "(0: no answer) and reason (ok, error, unreachable).",
            ["http_response_code", "reason"],
            registry=r,
        )
        self.lease_list_latency = prom.Histogram(
            f"{NS}_lease_list_latency_seconds",
            "Time of one lease list call, by HTTP status.",
            ["http_response_code"],
            registry=r,
            buckets=(0.005, 0.025, 0.1, 0.5, 2.5, 10, 30),
        )
        self._up = self.bytes_relayed.labels("up")
        self._down = self.bytes_relayed.labels("down")

    def lease_listed(self, status: int, reason: str, seconds: float) -> None:
        """``LeaseCounter`` callback."""
        self.lease_lists.labels(str(status), reason).inc()
        self.lease_list_latency.labels(str(status)).observe(seconds)

    def count_relayed(self, direction: str, n: int) -> None:
        """``relay`` callback. On the agent the socket is the target, so the
        relay's "up" (socket to tunnel) is the broker's "down"."""
        (self._down if direction == "up" else self._up).inc(n)
