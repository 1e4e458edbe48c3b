"""Broker metrics. Names follow konnectivity-server where the meaning is the
same, so existing dashboards and alerts keep working; extras use ``tether_``.
"""

from __future__ import annotations

import prometheus_client as prom

from tether.netio import introspect

NS = "konnectivity_network_proxy_server"


class BrokerMetrics:
    def __init__(self) -> None:
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.dial_duration = prom.Histogram(
            f"{NS}_dial_duration_seconds",
            "Time from dial request to the agent's data stream (successful dials).",
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.dial_failures = prom.Counter(
            f"{NS}_dial_failure_count",
            "Dials that failed, by reason.",
            ["reason"],
            registry=r,
        )
        self.ready_backends = prom.Gauge(
            f"{NS}_ready_backend_connections",
            "Connected agents (backends) ready to take dials.",
            registry=r,
        )
        self.pending_dials = prom.Gauge(
            f"{NS}_pending_backend_dials",
            "Dials sent to an agent and not yet answered.",
            registry=r,
        )
        self.established = prom.Gauge(
            f"{NS}_established_connections",
            "Tunneled connections currently relaying, by frontend.",
            ["frontend"],
            registry=r,
        )
        self.frontend_requests = prom.Counter(
            "tether_frontend_requests_total",
            "Frontend requests by frontend and outcome (HTTP-style status).",
            ["frontend", "status"],
            registry=r,
        )
        self.bad_input = prom.Counter(
            "tether_bad_input_total",
            "Rejected malformed or hostile input, by where it arrived and why.",
            ["source", "reason"],
            registry=r,
        )
        self.agent_rejected = prom.Counter(
            "tether_agent_connections_rejected_total",
            "Agent connections refused before or at the control stream.",
            ["reason"],
            registry=r,
        )
        self.agent_disconnects = prom.Counter(
            "tether_agent_disconnects_total",
            "Agent connections that ended, by cause.",
            ["cause"],
            registry=r,
        )
        self.bytes_relayed = prom.Counter(
            "tether_bytes_relayed_total",
            "Payload bytes relayed, by direction (up: client to target).",
            ["direction"],
            registry=r,
        )
        self.keepalive_rtt = prom.Histogram(
            "tether_keepalive_rtt_seconds",
            "HTTP/2 PING round-trip time on agent connections.",
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )

        self.active_streams = prom.Gauge(
            "tether_active_streams",
            "Tunneled connections (HTTP/2 data streams) open on agent connections.",
            registry=r,
        )
        self.window_stalls = prom.Counter(
            "tether_stream_window_stalls",
            "Times a tunneled connection had to wait for HTTP/2 flow-control window "
            "before sending (a slow reader at the far end, or a saturated link).",
            registry=r,
        )
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

        prom.Gauge(
            "tether_tasks", "Live trio tasks in the broker (leak check).", registry=r
        ).set_function(introspect.trio_task_count)
        prom.Gauge(
            "tether_open_fds", "Open file descriptors of the broker (leak check).", registry=r
        ).set_function(introspect.open_fd_count)

    def render(self) -> bytes:
        return bytes(prom.generate_latest(self.registry))
