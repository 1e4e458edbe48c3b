"""The Prometheus metrics both commands have, defined once.

Imported only where metrics are on: always in the broker, with
``--metrics`` in the agent (whose import path stays free of
prometheus_client otherwise).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import prometheus_client as prom
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from protocol.budget import BufferBudget
from tether.netio import idle, introspect
from tether.netio.tls import ReloadableContext


class TunnelMetrics:
    """Metrics of the agent-broker tunnel seen from one end.

    ``process`` names this end ("broker", "agent") and ``peer`` the
    connections it holds ("agent connections", "broker connections").
    """

    def __init__(self, process: str, peer: str) -> None:
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.bytes_relayed = prom.Counter(
            "tether_bytes_relayed",
            "Payload bytes relayed, by direction (up: client to target).",
            ["direction"],
            registry=r,
        )
        self.keepalive_rtt = prom.Histogram(
            "tether_keepalive_rtt_seconds",
            f"HTTP/2 PING round-trip time on {peer}.",
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.active_streams = prom.Gauge(
            "tether_active_streams",
            f"Tunneled connections (HTTP/2 data streams) open on {peer}.",
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
        self.tls_handshakes = prom.Counter(
            "tether_tls_handshakes",
            f"TLS handshakes completed on {peer}, by whether a session ticket "
            "resumed an earlier session (resumed: yes) or it was a full handshake (no).",
            ["resumed"],
            registry=r,
        )
        prom.Gauge(
            "tether_tasks", f"Live trio tasks in the {process} (leak check).", registry=r
        ).set_function(introspect.trio_task_count)
        prom.Gauge(
            "tether_open_fds", f"Open file descriptors of the {process} (leak check).", registry=r
        ).set_function(introspect.open_fd_count)

    def watch_budget(self, budget: BufferBudget) -> None:
        """Export the buffer budget (``--max-buffered-bytes``) and its use."""
        self.registry.register(_BudgetCollector(budget))

    def watch_certificate(self, ctx: ReloadableContext) -> None:
        """Export the expiry of whatever certificate ``ctx`` holds now."""
        self.cert_expiry.labels(ctx.name).set_function(_expiry_of(ctx))

    def render(self) -> bytes:
        return bytes(prom.generate_latest(self.registry))


class IdleCollector(Collector):
    """The idle poller's figures (:mod:`tether.netio.idle`)."""

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        t = idle.TOTALS
        yield GaugeMetricFamily(
            "tether_idle_parked_connections",
            "Agent connections parked with the idle poller: nothing but keepalive "
            "PINGs since their last other traffic.",
            value=t.parked,
        )
        yield CounterMetricFamily(
            "tether_idle_pings_answered",
            "Keepalive PINGs the idle poller answered without waking the connection.",
            value=t.answered,
        )
        yield CounterMetricFamily(
            "tether_idle_wakeups",
            "Parked connections woken because a read brought more than one PING.",
            value=t.woken,
        )


class _BudgetCollector(Collector):
    def __init__(self, budget: BufferBudget) -> None:
        self.budget = budget

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        b = self.budget
        yield GaugeMetricFamily(
            "tether_buffered_bytes_reserved",
            "Tunnel buffer bytes reserved (stream windows plus outboxes) of --max-buffered-bytes.",
            value=b.reserved,
        )
        yield GaugeMetricFamily(
            "tether_buffered_bytes_limit",
            "The buffer budget (--max-buffered-bytes).",
            value=b.limit,
        )
        yield GaugeMetricFamily(
            "tether_buffered_streams",
            "Tunnels holding a share of the buffer budget.",
            value=b.streams,
        )
        yield CounterMetricFamily(
            "tether_buffer_budget_shrunk",
            "Tunnels opened with the smallest window because the budget was past half full.",
            value=b.shrunk_total,
        )
        yield CounterMetricFamily(
            "tether_buffer_budget_refusals",
            "Dials refused because the buffer budget was exhausted (busy).",
            value=b.refused_total,
        )
        changes = CounterMetricFamily(
            "tether_stream_window_changes",
            "Receive windows tuned to the link: grown, shrunk back, or a growth the "
            "buffer budget refused (past its high-water mark).",
            labels=["change"],
        )
        changes.add_metric(["grown"], b.grown_total)
        changes.add_metric(["shrunk"], b.window_shrunk_total)
        changes.add_metric(["refused"], b.growth_refused_total)
        yield changes


def _expiry_of(ctx: ReloadableContext) -> Callable[[], float]:
    def expiry() -> float:
        info = ctx.cert_info()
        return info.not_after if info else float("nan")

    return expiry
