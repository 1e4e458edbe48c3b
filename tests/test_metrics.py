"""Prometheus metrics on the broker and (with --metrics) the agent, scraped
and parsed with prometheus_client's own parser while real traffic flows."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from cryptography import x509
from procs import (
    BrokerHandle,
    Proc,
    Tunnel,
    connect_tunnel,
    free_port,
    http_get,
    serve_echo,
    status_of,
    wait_for,
)
from prometheus_client.parser import text_string_to_metric_families

from tether.tools.certs import PkiPaths, init_pki

ROOT = Path(__file__).resolve().parent.parent
BULK = 2 * 1024 * 1024
AG = "konnectivity_network_proxy_agent"
SRV = "konnectivity_network_proxy_server"


def value(text: str, name: str, **labels: str) -> float:
    """One sample's value (0 when absent: a labelled child not yet created)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def scrape(port: int) -> str:
    code, body = await http_get(port, "/metrics")
    assert code == 200
    return body.decode()


@pytest.mark.timeout(20)
def test_agent_import_path_stays_light() -> None:
    # Loaded on first use only: tomllib and difflib with a config file,
    # logging.handlers (and the pickle it imports) with --log-file, the
    # Kubernetes client with --count-server-leases (issue 16).
    heavy = (
        "tether.netio.kubeapi",
        "prometheus_client",
        "edge_agent.metrics",
        "cryptography",
        "google.protobuf",
        "yaml",
        "tomllib",
        "difflib",
        "logging.handlers",
        "pickle",
    )
    code = (
        f"import sys, edge_agent.app, edge_agent.cli; print(*[m in sys.modules for m in {heavy!r}])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=20, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False"] * len(heavy), dict(
        zip(heavy, out.stdout.split(), strict=False)
    )


#: What a broker serving CONNECT alone, with one worker and no token review,
#: never imports (issue 16): each is imported where it is first needed.
BROKER_LAZY = (
    "google.protobuf",
    "protocol.konnectivity_pb2",
    "protocol.agent_pb2",
    "protocol.grpc_server",
    "broker.grpc_frontend",  # a cluster in --mode=grpc
    "broker.konnectivity_agent",  # the first stock konnectivity agent
    "broker.workers",  # --workers
    "protocol.workers",
    "yaml",
    "tomllib",  # --config
)


def _broker_modules(tmp_path: Path, *flags: str) -> dict[str, bool]:
    """Which of BROKER_LAZY a broker built from ``flags`` (its listeners not
    yet open) has imported, in a fresh interpreter."""
    pki = init_pki(tmp_path / "pki")
    argv = [
        f"--uds-name={tmp_path / 'broker.sock'}",
        "--server-port=0",
        f"--cluster-cert={pki.broker_cert}",
        f"--cluster-key={pki.broker_key}",
        f"--cluster-ca-cert={pki.ca_cert}",
        *flags,
    ]
    code = (
        "import sys\n"
        "from broker.app import Broker\n"
        "from broker.config import from_args\n"
        f"Broker(from_args({argv!r}))\n"
        f"print(*[m in sys.modules for m in {BROKER_LAZY!r}])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=20, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    return dict(zip(BROKER_LAZY, [w == "True" for w in out.stdout.split()], strict=True))


def test_broker_import_path_stays_light(tmp_path: Path) -> None:
    # About 6 MiB of idle RSS (issue 16); tests/test_grpc_frontend.py,
    # test_konnectivity_agent.py and test_e2e_workers.py run the lazy paths.
    loaded = _broker_modules(tmp_path, "--mode=http-connect")
    assert not any(loaded.values()), loaded
    # The check sees imports: in gRPC mode the frontend and protobuf are there.
    grpc = _broker_modules(tmp_path, "--mode=grpc")
    assert grpc["broker.grpc_frontend"] and grpc["google.protobuf"], grpc


@pytest.mark.timeout(30)
async def test_agent_without_metrics_and_broker_keepalive_rtt(
    broker_factory: Callable[..., BrokerHandle], agent_factory: Callable[..., Proc]
) -> None:
    # Whichever side's keepalive interval is shorter sends the PINGs (a PING
    # received counts as traffic for the other side): here the broker.
    broker = broker_factory("--keepalive-time=0.2")
    port, admin = free_port(), free_port()
    agent_factory(broker, f"--health-server-port={port}", f"--admin-server-port={admin}")
    await broker.ready(agents=1)
    code, _ = await http_get(port, "/metrics")
    assert code == 404
    assert await status_of(admin, "/metrics") == 0  # no admin port without --metrics

    async def measured() -> bool:
        return value(await broker.metrics(), "tether_keepalive_rtt_seconds_count") >= 2

    await wait_for(measured, 10, "keepalive RTT samples on the broker")


async def bulk_echo(tunnel: Tunnel, size: int) -> None:
    """Send ``size`` bytes and read them all back, both at once."""
    chunk = b"x" * 65536

    async def send() -> None:
        for _ in range(size // len(chunk)):
            await tunnel.send_all(chunk)

    got = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        while got < size:
            got += len(await tunnel.receive_some())


@pytest.mark.timeout(40)
async def test_metrics_move_with_real_traffic(
    pki: PkiPaths,
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    small_windows = "--stream-window=65536"
    broker = broker_factory(small_windows)
    agent_health = free_port()
    agent = agent_factory(
        broker,
        small_windows,
        "--keepalive-time=0.2",  # the agent sends the PINGs, so it measures RTT
        "--metrics",
        f"--admin-server-port={agent_health}",
        "--allow=127.0.0.0/8:*",
    )
    await broker.ready(agents=1)
    b0, a0 = await broker.metrics(), await scrape(agent_health)
    assert value(b0, f"{SRV}_ready_backend_connections") == 1
    assert value(a0, f"{AG}_open_server_connections") == 1
    assert value(a0, f"{AG}_known_server_count") == 1
    assert value(a0, f"{AG}_open_endpoint_connections") == 0

    # A tunnel carrying bulk data both ways through 64 KiB windows.
    echo = await serve_echo(nursery)
    tunnel = await connect_tunnel(broker, f"127.0.0.1:{echo}")
    assert tunnel.status == 200
    await bulk_echo(tunnel, BULK)
    b1, a1 = await broker.metrics(), await scrape(agent_health)
    assert value(b1, f"{SRV}_established_connections", frontend="tcp") == 1
    assert value(b1, f"{SRV}_http_connections") == 1
    assert value(b1, "tether_active_streams") == 1
    assert value(a1, "tether_active_streams") == 1
    assert value(a1, f"{AG}_open_endpoint_connections") == 1
    await tunnel.aclose()

    # Two dials that fail at the agent: nothing listens; outside the allowlist.
    for target, status in (("127.0.0.1:1", 502), ("10.255.255.1:80", 403)):
        failed = await connect_tunnel(broker, target)
        assert failed.status == status
        await failed.aclose()

    async def settled() -> bool:
        return (
            value(await scrape(agent_health), f"{AG}_open_endpoint_connections") == 0
            and value(await broker.metrics(), f"{SRV}_http_connections") == 0
        )

    await wait_for(settled, 10, "the tunnel to close at the agent")
    b2, a2 = await broker.metrics(), await scrape(agent_health)

    for text in (b2, a2):
        assert value(text, "tether_bytes_relayed_total", direction="up") >= BULK
        assert value(text, "tether_bytes_relayed_total", direction="down") >= BULK
        assert value(text, "tether_stream_window_stalls_total") > 0
        assert value(text, "tether_active_streams") == 0
    assert value(b2, f"{SRV}_dial_duration_seconds_count") == 1
    # Every metric either command exports is in docs/operations.md (issue 15 item 12).
    docs = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    for text in (b2, a2):
        families = re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE)
        assert len(families) > 10
        exported = [name for name in families if not name.endswith("_created")]
        undocumented = [name for name in exported if f"`{name}" not in docs]
        assert not undocumented, undocumented
    assert value(b2, f"{SRV}_dial_failure_count_total", reason="refused") == 1
    assert value(b2, f"{SRV}_dial_failure_count_total", reason="forbidden") == 1
    assert value(b2, f"{SRV}_established_connections", frontend="tcp") == 0
    assert value(b2, f"{SRV}_http_connections") == 0
    assert value(a2, f"{AG}_dial_duration_seconds_count") == 1
    assert value(a2, f"{AG}_endpoint_dial_failure_total", reason="refused") == 1
    assert value(a2, f"{AG}_endpoint_dial_failure_total", reason="forbidden") == 1
    cert, _ = pki.agent("agent-1")
    expiry = x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc.timestamp()
    assert value(a2, "tether_certificate_expiry_timestamp_seconds", cert="agent") == pytest.approx(
        expiry
    )
    assert value(
        b2, "tether_certificate_expiry_timestamp_seconds", cert="cluster"
    ) == pytest.approx(
        x509.load_pem_x509_certificate(pki.broker_cert.read_bytes()).not_valid_after_utc.timestamp()
    )

    async def measured() -> bool:
        return value(await scrape(agent_health), "tether_keepalive_rtt_seconds_count") >= 1

    await wait_for(measured, 10, "keepalive RTT samples on the agent")

    # The broker goes away: the agent counts the reconnect and its cause.
    assert broker.proc.stop(timeout=10) == 0

    async def reconnecting() -> bool:
        text = await scrape(agent_health)
        return (
            value(text, "tether_agent_reconnects_total", cause="drain") >= 1
            and value(text, f"{AG}_open_server_connections") == 0
        )

    await wait_for(reconnecting, 15, "a reconnect with cause drain")
    assert agent.alive()
