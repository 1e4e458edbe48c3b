"""Broker metrics. Names follow konnectivity-server where the meaning is the
same, so existing dashboards and alerts keep working; extras use ``tether_``.
"""

from __future__ import annotations

import prometheus_client as prom

from tether.netio.metrics import IdleCollector, TunnelMetrics

NS = "konnectivity_network_proxy_server"


class BrokerMetrics(TunnelMetrics):
    def __init__(self) -> None:
        super().__init__("broker", "agent connections")
        r = self.registry
        r.register(IdleCollector())
        self.gc_pause = prom.Histogram(
            "tether_gc_pause_seconds",
            "Garbage collection pauses, by generation (with --gc-full-interval; "
            "every connection waits while one runs).",
            ["generation"],
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.gc_tenured = prom.Gauge(
            "tether_gc_tenured_objects",
            "Objects tenured after a full collection: not scanned until the next full "
            "collection of everything (--gc-full-interval).",
            registry=r,
        )
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
        self.http_connections = prom.Gauge(
            f"{NS}_http_connections",
            "HTTP CONNECT frontend connections open now (UDS and TCP).",
            registry=r,
        )
        self.grpc_connections = prom.Gauge(
            f"{NS}_grpc_connections",
            "gRPC frontend calls open now, by method (Proxy).",
            ["service_method"],
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
        self.hedges_accepted = prom.Counter(
            "tether_agent_hedges_accepted_total",
            "Hedged agent connections that took new dials while the agent's previous "
            "connection kept its open streams.",
            registry=r,
        )
        self.dials_rerouted = prom.Counter(
            "tether_dials_rerouted_total",
            "Dials sent again on an agent's hedged connection because the connection "
            "they were sent on was superseded before the agent answered.",
            registry=r,
        )
        self.dials_held = prom.Counter(
            "tether_dials_held_total",
            "Dials that found no agent but matched one that left within "
            "--agent-return-window, held up to --agent-return-wait: by whether an agent "
            "came back (returned) or not (not_back, the dial then fails as no_agent).",
            ["outcome"],
            registry=r,
        )
        self.agent_disconnects = prom.Counter(
            "tether_agent_disconnects_total",
            "Agent connections that ended, by cause.",
            ["cause"],
            registry=r,
        )
        self.keepalive_announced = prom.Counter(
            "tether_agent_keepalive_announced_total",
            "Agents' announced keepalive intervals (tether-keepalive-ms) at registration: "
            "accepted, clamped into 1 s .. 10 min, invalid (the broker drives PINGs) "
            "or absent (an older agent: the broker drives PINGs).",
            ["verdict"],
            registry=r,
        )
        self.identifier_changes = prom.Counter(
            "tether_agent_identifiers_changes_total",
            "Changes of an agent's identifiers (at registration and on update).",
            ["when"],
            registry=r,
        )
        self.frontend_socket_info = prom.Gauge(
            "tether_frontend_socket_info",
            "Frontend Unix sockets this broker created, with their owner, group and mode.",
            ["cluster", "path", "owner", "group", "mode"],
            registry=r,
        )
        self.frontend_socket_owned = prom.Gauge(
            "tether_frontend_socket_owned",
            "1 while a cluster's frontend socket path still leads to this broker's socket "
            "(0: removed or replaced; /readyz then fails).",
            ["cluster"],
            registry=r,
        )
        self.agents_by_kind = prom.Gauge(
            "tether_agents_connected",
            "Registered agents by kind: tether (Tether's protocol) or konnectivity "
            "(a stock konnectivity agent on /AgentService/Connect).",
            ["kind"],
            registry=r,
        )
        self.admission = prom.Counter(
            "tether_agent_admission",
            "Agent-port connections by admission verdict (protocol/admission.py): admit "
            "(handshake at once), queue (waited for a handshake slot), shed (answered "
            "503 overloaded with a retry hint), drop (closed before TLS), abandoned (the "
            "client had closed it while it was queued: closed before TLS).",
            ["verdict"],
            registry=r,
        )
        self.admission_state = prom.Gauge(
            "tether_agent_admission_connections",
            "Agent-port connections in admission now: handshaking, queued or shedding.",
            ["state"],
            registry=r,
        )
        self.konnectivity_tunnels = prom.Gauge(
            "tether_konnectivity_agent_tunnels",
            "Tunnels open now on konnectivity agents' multiplexed streams.",
            registry=r,
        )
