"""TLS session resumption on the agent port (issue 14 item 4):
``--agent-tls-ticket-key-file`` (tether/netio/tickets.py) and the agent
keeping its session across reconnects.

Real broker and agent processes. A reconnect after a broker crash resumes
(seen in the agent's log and both sides' ``tether_tls_handshakes_total``),
and resumption never replaces an identity check: a resumed session maps
to the agent of the certificate it was made with, a hello claiming another
agent or cluster over it is refused, another trust with the same key does
not resume, and a bad key file stops the broker with one line (exit 2).
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from hostile import (
    DATA,
    END_HEADERS,
    HEADERS,
    PREFACE,
    FrameReader,
    frame,
    header_block,
    metric,
    request_headers,
    settings_frame,
)
from procs import BrokerHandle, Proc, wait_for
from test_e2e_routing import dials_by, serve_whoami, whoami, write_config

from protocol import session
from tether.netio import tls
from tether.netio.tickets import KEY_SIZE
from tether.netio.tls_stream import TLSStream
from tether.tools.certs import PkiPaths, init_pki
from tether.tools.launch import start_broker

pytestmark = [pytest.mark.e2e]


def key_file(path: Path, data: bytes | None = None, mode: int = 0o600) -> Path:
    path.write_bytes(os.urandom(KEY_SIZE) if data is None else data)
    path.chmod(mode)
    return path


def restart(broker: BrokerHandle, procs_started: list[Proc]) -> BrokerHandle:
    """Crash the broker (SIGKILL) and start the same command on the same ports."""
    restarted = broker.crash_and_restart(broker.proc.log_path.with_suffix(".restarted.log"))
    procs_started.append(restarted.proc)
    return restarted


async def handshakes(broker: BrokerHandle, resumed: str) -> float:
    return metric(await broker.metrics(), "tether_tls_handshakes_total", resumed=resumed)


async def hello(
    port: int,
    ctx: ssl.SSLContext,
    agent_id: str,
    cluster: str = "",
    tls_session: ssl.SSLSession | None = None,
) -> tuple[str, str, ssl.SSLSession | None, bool]:
    """Open the control stream as a script would, offering ``tls_session``;
    (status, error text, the session to resume next, whether this one was
    resumed)."""
    with trio.fail_after(20):
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = TLSStream(
            tcp, ctx, server_side=False, server_hostname="localhost", session=tls_session
        )
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError:
            await trio.aclose_forcefully(stream)
            return "tls_failed", "", None, False
        try:
            extra = [("tether-agent-id", agent_id), ("tether-agent-identifiers", "")]
            if cluster:
                extra.append(("tether-cluster", cluster))
            headers = request_headers(session.CONTROL_PATH, extra)
            await stream.send_all(
                PREFACE + settings_frame() + frame(HEADERS, END_HEADERS, 1, header_block(headers))
            )
            reader = FrameReader()
            status, text = "none", ""
            while status in ("none",) or (status != "200" and not text):
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:  # a TLS 1.3 alert arrives with the first read
                    return "tls_failed", "", None, stream.session_reused
                if not data:
                    break
                for f in reader.feed(bytes(data)):
                    if f.kind == HEADERS and f.sid == 1 and f.status:
                        status = f.status
                    elif f.kind == DATA and f.sid == 1 and f.payload:
                        text += f.payload.decode(errors="replace")
            return status, text, stream.session, stream.session_reused
        finally:
            await trio.aclose_forcefully(stream)


@pytest.mark.timeout(120)
async def test_an_agent_resumes_its_session_after_a_broker_crash(
    tmp_path: Path,
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    procs_started: list[Proc],
    nursery: trio.Nursery,
) -> None:
    """The restarted broker reads the same key file: the agent's reconnect
    is a resumed handshake, it is still agent-1 of cluster default, and
    dials reach it."""
    key = key_file(tmp_path / "ticket.key")
    broker = broker_factory(f"--agent-tls-ticket-key-file={key}")
    agent = agent_factory(broker, "--metrics", "--admin-server-port=0")
    await broker.ready(agents=1)
    assert await handshakes(broker, "no") == 1
    assert await handshakes(broker, "yes") == 0
    assert re.search(r"connected to broker \S+ \(1/1 replicas; TLS full handshake\)", agent.log())

    broker = restart(broker, procs_started)
    await broker.ready(agents=1, timeout=30)
    await wait_for(
        lambda: _logged(agent, r"connected to broker \S+ \(1/1 replicas; TLS resumed\)"),
        20,
        "a resumed reconnect in the agent's log",
    )
    assert await handshakes(broker, "yes") == 1
    assert await handshakes(broker, "no") == 0
    # Still the same identity: the registry holds agent-1 of cluster default.
    code, body = await broker_agents(broker)
    assert code == 200 and '"agent_id": "agent-1"' in body and '"cluster": "default"' in body
    port = await serve_whoami(nursery, "127.0.0.1")
    assert await whoami(broker, f"127.0.0.1:{port}") == (200, b"127.0.0.1")
    assert len(dials_by(agent)) == 1


async def broker_agents(broker: BrokerHandle) -> tuple[int, str]:
    from procs import http_get

    code, body = await http_get(broker.admin_port, "/agents")
    return code, body.decode()


async def _logged(proc: Proc, pattern: str) -> bool:
    return re.search(pattern, proc.log()) is not None


@pytest.mark.timeout(120)
async def test_a_resumed_session_cannot_become_another_identity(
    tmp_path: Path, procs_started: list[Proc]
) -> None:
    """Two clusters on one broker with a ticket key. Cluster a's agent-1
    resumes its session; over that resumed session a hello as agent-2, or
    as cluster b, is refused (403 identity_mismatch): the identity comes
    from the certificate the session carries, checked again. Without the
    key file nothing resumes (per-process keys) and nothing changes."""
    pki_a = init_pki(tmp_path / "a", cluster="a", agents=("agent-1", "agent-2"))
    pki_b = init_pki(tmp_path / "b", cluster="b", agents=("agent-1",))
    config = write_config(
        tmp_path / "clusters.toml",
        f"""
[[clusters]]
name = "a"
agent_ca = "{pki_a.ca_cert}"
frontend_uds = "{tmp_path / "a.sock"}"

[[clusters]]
name = "b"
agent_ca = "{pki_b.ca_cert}"
frontend_uds = "{tmp_path / "b.sock"}"
""",
    )
    key = key_file(tmp_path / "ticket.key")
    broker = start_broker(
        tmp_path,
        pki_a,
        f"--config={config}",
        f"--agent-tls-ticket-key-file={key}",
        "--server-port=0",
    )
    procs_started.append(broker.proc)
    await broker.up()
    ctx_a = tls.client_context(pki_a.ca_cert, *pki_a.agent("agent-1"), alpn=["h2"])
    status, _, first, reused = await hello(broker.agent_port, ctx_a, "agent-1")
    assert (status, reused) == ("200", False)
    assert first is not None and first.has_ticket

    for agent_id, cluster in (("agent-2", ""), ("agent-1", "b")):
        status, text, _, reused = await hello(
            broker.agent_port, ctx_a, agent_id, cluster, tls_session=first
        )
        assert reused, "the ticket was not taken: this would test nothing"
        assert status == "403" and "identity_mismatch" in text, (status, text)
    assert metric(
        await broker.metrics(),
        "tether_agent_connections_rejected_total",
        reason="identity_mismatch",
    ) == pytest.approx(2)
    # The rightful hello over the resumed session is agent-1 of cluster a.
    status, _, _, reused = await hello(broker.agent_port, ctx_a, "agent-1", tls_session=first)
    assert (status, reused) == ("200", True)
    assert re.search(r"agent connected: id=agent-1 cluster=a ", broker.proc.log())
    assert await handshakes(broker, "yes") == 3


@pytest.mark.timeout(120)
async def test_a_ticket_does_not_carry_trust_to_a_broker_of_other_clusters(
    tmp_path: Path, pki: PkiPaths, procs_started: list[Proc]
) -> None:
    """Brokers of two clusters given the same key file by mistake: a
    session made at cluster a's broker does not resume at cluster b's
    (its session id context is a digest of the CA trust), so b verifies the
    certificate itself and refuses it."""
    pki_b = init_pki(tmp_path / "b", cluster="b", agents=("agent-1",))
    key = key_file(tmp_path / "ticket.key")
    broker_a = start_broker(tmp_path, pki, f"--agent-tls-ticket-key-file={key}")
    broker_b = start_broker(tmp_path, pki_b, f"--agent-tls-ticket-key-file={key}")
    procs_started.extend([broker_a.proc, broker_b.proc])
    await broker_a.up()
    await broker_b.up()
    # One client context trusting both brokers, with cluster a's certificate.
    ctx = tls.client_context(pki.ca_cert, *pki.agent("agent-1"), alpn=["h2"])
    ctx.load_verify_locations(cafile=str(pki_b.ca_cert))
    status, _, first, _ = await hello(broker_a.agent_port, ctx, "agent-1")
    assert status == "200" and first is not None and first.has_ticket
    status, _, _, reused = await hello(broker_a.agent_port, ctx, "agent-1", tls_session=first)
    assert reused  # the ticket is good where it was made
    status, _, _, reused = await hello(broker_b.agent_port, ctx, "agent-1", tls_session=first)
    assert not reused
    assert status == "tls_failed", status  # b's CA did not issue agent-1's certificate
    assert await handshakes(broker_b, "yes") == 0
    assert "agent connected" not in broker_b.proc.log()


@pytest.mark.parametrize(
    ("data", "mode", "message"),
    [
        (os.urandom(KEY_SIZE), 0o644, "readable or writable by group or others (mode 0644)"),
        (os.urandom(KEY_SIZE - 1), 0o600, f"must hold exactly {KEY_SIZE} random bytes"),
        (os.urandom(KEY_SIZE + 1), 0o600, f"not {KEY_SIZE + 1} or more"),
        (b"", 0o600, "not 0"),
    ],
)
@pytest.mark.timeout(60)
async def test_a_bad_ticket_key_file_stops_the_broker_with_one_line(
    tmp_path: Path, pki: PkiPaths, data: bytes, mode: int, message: str
) -> None:
    key = key_file(tmp_path / "ticket.key", data, mode)
    broker = start_broker(tmp_path, pki, f"--agent-tls-ticket-key-file={key}")
    try:
        rc = broker.proc.popen.wait(30)
    finally:
        broker.proc.stop()
    assert rc == 2
    lines = [
        line for line in broker.proc.log().splitlines() if "--agent-tls-ticket-key-file" in line
    ]
    assert len(lines) == 1 and message in lines[0], broker.proc.log()


@pytest.mark.timeout(60)
async def test_a_missing_ticket_key_file_stops_the_broker(tmp_path: Path, pki: PkiPaths) -> None:
    broker = start_broker(tmp_path, pki, f"--agent-tls-ticket-key-file={tmp_path / 'nope'}")
    try:
        rc = broker.proc.popen.wait(30)
    finally:
        broker.proc.stop()
    assert rc == 2
    assert "--agent-tls-ticket-key-file: cannot read" in broker.proc.log()
