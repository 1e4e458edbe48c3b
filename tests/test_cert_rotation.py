"""Certificate rotation without a restart, on SIGHUP or when the files change.

The broker's server certificate and an agent's client certificate are
re-issued by the same CA and copied over the files in use while a tunnel is
open. The open tunnel keeps working; the next connection presents the new
certificate, as a TLS peer sees it (``getpeercert(binary_form=True)``).
"""

from __future__ import annotations

import os
import shutil
import signal
import ssl
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
    frontend_ssl,
    serve_echo,
    serve_local,
    start_agent,
    start_broker,
    wait_for,
)

from tether.netio import tls
from tether.tools.certs import PkiPaths, init_pki

TRIGGERS = ["sighup", "file"]


def interval_flag(trigger: str) -> str:
    # SIGHUP runs with polling off, so only the signal can have done it.
    return "--cert-reload-interval=0" if trigger == "sighup" else "--cert-reload-interval=0.3"


def private_pki(source: PkiPaths, directory: Path) -> PkiPaths:
    """A copy of the session PKI that this test may rotate."""
    shutil.copytree(source.ca_cert.parent, directory)
    return PkiPaths.in_dir(directory)


def reissue(pki: PkiPaths, work: Path, agent: str | None = None) -> tuple[Path, Path]:
    """A new broker (or ``agent``) certificate and key from the same CA."""
    fresh = private_pki(pki, work)
    cert, key = fresh.agent(agent) if agent else (fresh.broker_cert, fresh.broker_key)
    cert.unlink()
    key.unlink()
    init_pki(work, agents=[agent] if agent else [])
    return cert, key


def install(src: Path, dst: Path) -> None:
    """Replace ``dst`` atomically, as rotation tools do."""
    tmp = dst.with_name(dst.name + ".new")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def serial_of_file(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def serial_of_der(der: bytes) -> int:
    return x509.load_der_x509_certificate(der).serial_number


async def served_serial(port: int, ctx: ssl.SSLContext) -> int:
    """The serial of the certificate a new connection to ``port`` sees."""
    with trio.fail_after(5):
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(tcp, ctx, server_hostname="127.0.0.1")
        try:
            await stream.do_handshake()
            der = stream.getpeercert(binary_form=True)
            assert der is not None
            return serial_of_der(der)
        finally:
            await trio.aclose_forcefully(stream)


async def wait_serial(port: int, ctx: ssl.SSLContext, want: int, timeout: float = 10) -> None:
    async def check() -> bool:
        return await served_serial(port, ctx) == want

    await wait_for(check, timeout, f"serial {want:x} on port {port}", interval=0.1)


async def echo_ok(tunnel: Tunnel, payload: bytes) -> None:
    with trio.fail_after(5):
        await tunnel.send_all(payload)
        got = b""
        while len(got) < len(payload):
            got += await tunnel.receive_some()
    assert got == payload


def metric_value(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


# ---------------------------------------------------------------------- broker


@pytest.mark.timeout(40)
@pytest.mark.parametrize("trigger", TRIGGERS)
async def test_broker_server_certificate_rotation(
    tmp_path: Path,
    pki: PkiPaths,
    procs_started: list[Proc],
    agent_factory: Callable[..., Proc],
    trigger: str,
) -> None:
    mine = private_pki(pki, tmp_path / "pki")
    broker = start_broker(tmp_path, mine, interval_flag(trigger))
    procs_started.append(broker.proc)
    agent = agent_factory(broker)
    await broker.ready(agents=1)

    agent_client = tls.client_context(mine.ca_cert, *mine.agent("agent-2"), alpn=["h2"])
    frontend_client = frontend_ssl(mine)
    old = serial_of_file(mine.broker_cert)
    assert await served_serial(broker.agent_port, agent_client) == old
    assert await served_serial(broker.server_port, frontend_client) == old

    async with trio.open_nursery() as nursery:
        echo = await serve_echo(nursery)
        tunnel = await connect_tunnel(broker, f"127.0.0.1:{echo}")
        assert tunnel.status == 200
        await echo_ok(tunnel, b"before rotation")

        cert, key = reissue(mine, tmp_path / "next")
        new = serial_of_file(cert)
        assert new != old
        install(key, mine.broker_key)
        install(cert, mine.broker_cert)
        if trigger == "sighup":
            broker.proc.signal(signal.SIGHUP)

        # New connections, on both listeners, present the new certificate.
        await wait_serial(broker.agent_port, agent_client, new)
        await wait_serial(broker.server_port, frontend_client, new)
        # The tunnel opened before the rotation, and the agent link under it, live on.
        await echo_ok(tunnel, b"after rotation")
        assert "disconnected from broker" not in agent.log()
        assert "agent disconnected" not in broker.proc.log()
        # A new agent connection verifies the new certificate.
        agent_factory(broker, agent_id="agent-2")
        await broker.ready(agents=2)

        metrics = await broker.metrics()
        assert metric_value(metrics, "tether_cert_reloads_total", cert="cluster", result="ok") >= 1
        assert metric_value(metrics, "tether_cert_reloads_total", cert="server", result="ok") >= 1
        expiry = x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc
        assert metric_value(
            metrics, "tether_certificate_expiry_timestamp_seconds", cert="cluster"
        ) == pytest.approx(expiry.timestamp())
        assert "event=cert_reloaded" in broker.proc.log()

        if trigger == "sighup":
            # A broken key is refused: the previous certificate stays in use.
            mine.broker_key.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n")
            broker.proc.signal(signal.SIGHUP)

            async def failed() -> bool:
                return "event=cert_reload_failed" in broker.proc.log()

            await wait_for(failed, 10, "cert_reload_failed")
            assert await served_serial(broker.agent_port, agent_client) == new
            await echo_ok(tunnel, b"after a failed reload")
            metrics = await broker.metrics()
            assert (
                metric_value(metrics, "tether_cert_reloads_total", cert="cluster", result="error")
                >= 1
            )
        await tunnel.aclose()
        nursery.cancel_scope.cancel()


# ----------------------------------------------------------------------- agent


class Recorder:
    """Stands where a second broker replica would be: the first connection is
    forwarded to the real broker, every later one is a TLS server that
    records the client certificate and hangs up. The broker announces two
    replicas, so the agent keeps dialing, each time with its current
    certificate, while its first link carries the tunnel."""

    def __init__(self, broker: BrokerHandle, pki: PkiPaths) -> None:
        self.broker = broker
        self.ctx = tls.server_context(pki.broker_cert, pki.broker_key, pki.ca_cert, alpn=["h2"])
        self.serials: list[int] = []
        self.connections = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        if self.connections == 1:
            await self._forward(stream)
            return
        tls_stream = trio.SSLStream(stream, self.ctx, server_side=True)
        try:
            with trio.fail_after(5):
                await tls_stream.do_handshake()
            der = tls_stream.getpeercert(binary_form=True)
            if der:
                self.serials.append(serial_of_der(der))
        except (trio.BrokenResourceError, trio.TooSlowError):
            pass
        finally:
            await trio.aclose_forcefully(tls_stream)

    async def _forward(self, client: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream("127.0.0.1", self.broker.agent_port)

        async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
            try:
                while data := await src.receive_some(65536):
                    await dst.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, upstream)
            nursery.start_soon(pump, upstream, client)
        await trio.aclose_forcefully(upstream)
        await trio.aclose_forcefully(client)


@pytest.mark.timeout(40)
@pytest.mark.parametrize("trigger", TRIGGERS)
async def test_agent_client_certificate_rotation(
    tmp_path: Path, pki: PkiPaths, procs_started: list[Proc], trigger: str
) -> None:
    mine = private_pki(pki, tmp_path / "pki")
    broker = start_broker(tmp_path, mine, "--server-count=2")
    procs_started.append(broker.proc)
    await broker.up()
    recorder = Recorder(broker, mine)
    async with trio.open_nursery() as nursery:
        port = await serve_local(nursery, recorder.handle)
        agent = start_agent(tmp_path, broker, interval_flag(trigger), port=port)
        procs_started.append(agent)
        await broker.ready(agents=1)

        echo = await serve_echo(nursery)
        tunnel = await connect_tunnel(broker, f"127.0.0.1:{echo}")
        assert tunnel.status == 200
        await echo_ok(tunnel, b"before rotation")
        old_cert, _ = mine.agent("agent-1")
        old = serial_of_file(old_cert)

        async def seen(serial: int) -> bool:
            return serial in recorder.serials

        await wait_for(lambda: seen(old), 10, "the agent's current certificate")

        cert, key = reissue(mine, tmp_path / "next", agent="agent-1")
        new = serial_of_file(cert)
        assert new != old
        cert_path, key_path = mine.agent("agent-1")
        install(key, key_path)
        install(cert, cert_path)
        if trigger == "sighup":
            agent.signal(signal.SIGHUP)

        await wait_for(lambda: seen(new), 15, "the new certificate on a new connection")
        # The link made with the old certificate still carries the tunnel.
        await echo_ok(tunnel, b"after rotation")
        assert "disconnected from broker" not in agent.log()
        assert "agent disconnected" not in broker.proc.log()
        assert "event=cert_reloaded" in agent.log()
        await tunnel.aclose()
        nursery.cancel_scope.cancel()
