"""Stock konnectivity agents on tether-broker's agent port (issue 17).

A konnectivity-protocol agent written from the schema with grpcio
(tests/konn_agent.py) connects to the real ``tether-broker`` on the same
TLS listener Tether agents use; frontends are the real CONNECT (Unix
socket) and gRPC (grpcio as kube-apiserver) ones. Targets are threads on
127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from grpc_client import close_req, data_pkt, dial_cls, dial_req, open_call
from konn_agent import KonnAgent, close_rsp, data
from test_grpc_frontend import Target, wait_until

from protocol import konnectivity_pb2 as pb
from tether.tools.certs import PkiPaths
from tether.tools.launch import BrokerHandle, Proc, start_agent, start_broker

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

MiB = 1024 * 1024


# ------------------------------------------------------------------ helpers


def echo(conn: socket.socket) -> None:
    while data := conn.recv(64 * 1024):
        conn.sendall(data)


def metrics_text(broker: BrokerHandle) -> str:
    url = f"http://127.0.0.1:{broker.admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


def metric(broker: BrokerHandle, name: str, labels: str = "") -> float:
    pattern = re.escape(name + (("{" + labels + "}") if labels else "")) + r" (\S+)"
    match = re.search("^" + pattern + "$", metrics_text(broker), re.M)
    return float(match.group(1)) if match else 0.0


def connect(broker: BrokerHandle, target: str, timeout: float = 10) -> tuple[socket.socket, bytes]:
    """HTTP CONNECT through the broker's Unix socket; (socket, status line)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(broker.uds)
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)  # byte by byte: tunnel bytes may follow the head at once
        if not chunk:
            break
        head += chunk
    return s, head.split(b"\r\n", 1)[0]


def konn(broker: BrokerHandle, pki: PkiPaths, agent_id: str = "agent-1", **kw: Any) -> KonnAgent:
    """A konnectivity agent with the client certificate of ``agent_id``."""
    if "token" not in kw:
        cert, key = pki.agent(agent_id)
        kw.setdefault("cert", cert)
        kw.setdefault("key", key)
    return KonnAgent(broker.agent_port, agent_id, ca=pki.ca_cert, **kw)


def ready(broker: BrokerHandle, agents: int = 1) -> None:
    trio.run(broker.ready, agents)


def read_exactly(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(min(256 * 1024, n - len(buf)))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


@pytest.fixture
def broker_env(tmp_path: Path, pki: PkiPaths) -> Iterator[Callable[..., BrokerHandle]]:
    started: list[Proc] = []

    def make(*extra: str, mode: str = "http-connect") -> BrokerHandle:
        b = start_broker(tmp_path, pki, *extra, mode=mode)
        started.append(b.proc)
        trio.run(b.up)
        return b

    yield make
    for proc in reversed(started):
        proc.stop(timeout=5)


@pytest.fixture
def agents() -> Iterator[list[KonnAgent]]:
    made: list[KonnAgent] = []
    yield made
    for a in made:
        a.close()


# -------------------------------------------------------------------- tests


def test_certificate_agent_registers_and_relays_both_ways(
    broker_env: Callable[..., BrokerHandle], pki: PkiPaths, agents: list[KonnAgent]
) -> None:
    broker = broker_env("--server-count=3", "--server-id=broker-a")
    agent = konn(broker, pki)
    agents.append(agent)
    headers = agent.headers()
    assert headers.get("serverid") == "broker-a"
    assert headers.get("servercount") == "3"
    ready(broker)
    assert metric(broker, "tether_agents_connected", 'kind="konnectivity"') == 1
    target = Target(echo)
    try:
        s, status = connect(broker, target.address)
        assert status == b"HTTP/1.1 200 Connection established" or status.startswith(
            b"HTTP/1.1 200"
        )
        payload = os.urandom(3 * MiB)
        sender = threading.Thread(target=s.sendall, args=(payload,))
        sender.start()
        back = read_exactly(s, len(payload))
        sender.join(10)
        assert hashlib.sha256(back).hexdigest() == hashlib.sha256(payload).hexdigest()
        # Close from the client side: the agent gets CLOSE_REQ.
        s.close()
        wait_until(lambda: agent.close_reqs, 10, "CLOSE_REQ at the agent")
        wait_until(
            lambda: metric(broker, "tether_konnectivity_agent_tunnels") == 0, 10, "tunnel gone"
        )
    finally:
        target.close()
    log = broker.proc.log()
    assert "kind=konnectivity" in log and "agent connected: id=agent-1" in log


def test_target_close_reaches_the_client_and_dial_failure_is_a_clean_error(
    broker_env: Callable[..., BrokerHandle], pki: PkiPaths, agents: list[KonnAgent]
) -> None:
    broker = broker_env()
    agents.append(konn(broker, pki))
    ready(broker)

    def greet(conn: socket.socket) -> None:
        conn.sendall(b"hello and goodbye")

    target = Target(greet)
    try:
        s, status = connect(broker, target.address)
        assert status.startswith(b"HTTP/1.1 200")
        got = b""
        while chunk := s.recv(4096):
            got += chunk
        assert got == b"hello and goodbye"  # then EOF: the agent's CLOSE_RSP
        s.close()
    finally:
        target.close()
    # A refused dial: the agent answers DIAL_RSP with an error.
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    s, status = connect(broker, f"127.0.0.1:{port}")
    s.close()
    assert status.startswith(b"HTTP/1.1 502"), status


def test_token_agent_registers_through_tokenreview(
    tmp_path: Path,
    pki: PkiPaths,
    broker_env: Callable[..., BrokerHandle],
    agents: list[KonnAgent],
) -> None:
    from test_e2e_tokenreview import kubeconfig, serve_tokenreview

    seen: list[dict[str, Any]] = []
    port_box: list[int] = []
    stop = threading.Event()

    def run_standin() -> None:
        async def main() -> None:
            async with trio.open_nursery() as nursery:
                port_box.append(await serve_tokenreview(nursery, pki, seen))
                while not stop.is_set():
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()

        trio.run(main)

    standin = threading.Thread(target=run_standin, daemon=True)
    standin.start()
    try:
        wait_until(lambda: port_box, 10, "TokenReview stand-in")
        broker = broker_env(
            f"--kubeconfig={kubeconfig(tmp_path, pki, port_box[0])}",
            "--authentication-audience=tether",
            "--agent-namespace=kube-system",
            "--agent-service-account=tether-agent",
        )
        bad = KonnAgent(broker.agent_port, "node-9", ca=pki.ca_cert, token="other-sa")
        agents.append(bad)
        code, details = bad.wait_status()
        assert code is grpc.StatusCode.PERMISSION_DENIED, (code, details)
        good = KonnAgent(broker.agent_port, "node-1", ca=pki.ca_cert, token="good-token")
        agents.append(good)
        assert good.headers().get("serverid")
        ready(broker)
        target = Target(echo)
        try:
            s, status = connect(broker, target.address)
            assert status.startswith(b"HTTP/1.1 200")
            s.sendall(b"via tokenreview")
            assert read_exactly(s, 15) == b"via tokenreview"
            s.close()
        finally:
            target.close()
        assert seen and all(
            r["review"]["spec"]["token"] in ("good-token", "other-sa") for r in seen
        )
        assert "good-token" not in broker.proc.log()
        assert (
            metric(broker, "tether_agent_connections_rejected_total", 'reason="token_scope"') >= 1
        )
    finally:
        stop.set()
        standin.join(10)


def test_grpc_frontend_dial_data_close_and_dial_cls(
    broker_env: Callable[..., BrokerHandle], pki: PkiPaths, agents: list[KonnAgent]
) -> None:
    broker = broker_env(mode="grpc")
    agent = konn(broker, pki)
    agents.append(agent)
    ready(broker)
    target = Target(echo)
    channel = grpc.insecure_channel(f"unix:{broker.uds}")
    try:
        with open_call(channel) as call:
            rsp = call.dial(target.address, random=7)
            assert rsp.connectID and not rsp.error
            payload = os.urandom(2 * MiB)
            for off in range(0, len(payload), 64 * 1024):
                call.send(data_pkt(rsp.connectID, payload[off : off + 64 * 1024]))
            got = bytearray()
            while len(got) < len(payload):
                pkt = call.recv()
                assert pkt is not None and pkt.type == pb.DATA
                got += pkt.data.data
            assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
            call.send(close_req(rsp.connectID))
            pkt = call.recv()
            assert pkt is not None and pkt.type == pb.CLOSE_RSP
        wait_until(lambda: agent.close_reqs, 10, "CLOSE_REQ at the agent")
        # DIAL_CLS from the client while the agent holds the dial: the agent
        # is told with DIAL_CLS for the same dial.
        agent.hold_dials = True
        with open_call(channel) as call:
            call.send(dial_req(target.address, 99))
            held = agent.held.get(timeout=10)
            call.send(dial_cls(99))
            wait_until(lambda: held.dialRequest.random in agent.dial_closed, 10, "DIAL_CLS")
        # DIAL_CLS from the agent: the pending dial fails at once.
        with open_call(channel) as call:
            call.send(dial_req(target.address, 5))
            held = agent.held.get(timeout=10)
            started = time.monotonic()
            agent.send(
                pb.Packet(type=pb.DIAL_CLS, closeDial=pb.CloseDial(random=held.dialRequest.random))
            )
            pkt = call.recv()
            assert pkt is not None and pkt.type == pb.DIAL_RSP and pkt.dialResponse.error
            assert time.monotonic() - started < 5
    finally:
        channel.close()
        target.close()


def test_agent_dropping_fails_pending_dials_at_once(
    broker_env: Callable[..., BrokerHandle], pki: PkiPaths, agents: list[KonnAgent]
) -> None:
    broker = broker_env("--backend-dial-timeout=30")
    agent = konn(broker, pki, hold_dials=True)
    agents.append(agent)
    ready(broker)
    results: list[bytes] = []

    def dial() -> None:
        s, status = connect(broker, "127.0.0.1:9", timeout=40)
        results.append(status)
        s.close()

    threads = [threading.Thread(target=dial) for _ in range(3)]
    for t in threads:
        t.start()
    for _ in threads:
        agent.held.get(timeout=10)
    started = time.monotonic()
    agent.close()
    for t in threads:
        t.join(20)
    assert len(results) == 3 and all(r.startswith(b"HTTP/1.1 502") for r in results), results
    assert time.monotonic() - started < 5
    assert metric(broker, "tether_agents_connected", 'kind="konnectivity"') == 0


def test_drain_sends_goaway_and_ends_the_call(
    broker_env: Callable[..., BrokerHandle], pki: PkiPaths, agents: list[KonnAgent]
) -> None:
    """SIGTERM: the agent's open tunnel keeps flowing through the drain, a
    new agent is not taken, then the Connect call ends with UNAVAILABLE (the
    agent reconnects elsewhere) and the broker exits 0."""
    broker = broker_env("--drain-timeout=20")
    agent = konn(broker, pki)
    agents.append(agent)
    ready(broker)
    target = Target(echo)
    try:
        s, status = connect(broker, target.address)
        assert status.startswith(b"HTTP/1.1 200")
        broker.proc.signal(15)
        wait_until(lambda: "draining" in broker.proc.log(), 10, "the drain to start")
        for i in range(5):
            msg = f"during drain {i}".encode()
            s.sendall(msg)
            assert read_exactly(s, len(msg)) == msg
            time.sleep(0.1)
        assert not agent.ended.is_set()
        late = konn(broker, pki, agent_id="agent-2")
        agents.append(late)
        code, _ = late.wait_status()
        assert code is grpc.StatusCode.UNAVAILABLE, code
        s.close()  # the last tunnel ends: the drain is over
        code, details = agent.wait_status(20)
        assert code is grpc.StatusCode.UNAVAILABLE, (code, details)
        assert "shutting down" in details
        assert broker.proc.popen.wait(20) == 0
    finally:
        target.close()


def test_tether_and_konnectivity_agents_routed_by_identifiers(
    tmp_path: Path,
    broker_env: Callable[..., BrokerHandle],
    pki: PkiPaths,
    agents: list[KonnAgent],
) -> None:
    # The trust rules apply to both kinds: each agent may declare only what
    # it is allowed.
    broker = broker_env(
        "--proxy-strategies=destHost,default",
        "--agent-allowed-identifiers=agent-1:ipv4=127.0.0.2,agent-2:ipv4=127.0.0.3",
    )
    tether = start_agent(tmp_path, broker, "--agent-identifiers=ipv4=127.0.0.3", agent_id="agent-2")
    targets: list[socket.socket] = []
    try:
        agent = konn(broker, pki, identifiers="ipv4=127.0.0.2")
        agents.append(agent)
        ready(broker, 2)
        for host in ("127.0.0.2", "127.0.0.3"):
            srv = socket.create_server((host, 0))
            targets.append(srv)

            def serve(srv: socket.socket = srv, host: str = host) -> None:
                while True:
                    try:
                        c, _ = srv.accept()
                    except OSError:
                        return
                    c.sendall(host.encode())
                    c.close()

            threading.Thread(target=serve, daemon=True).start()
        for _ in range(3):
            for srv in targets:
                host, port = srv.getsockname()[:2]
                s, status = connect(broker, f"{host}:{port}")
                assert status.startswith(b"HTTP/1.1 200"), status
                assert read_exactly(s, len(host)) == host.encode()
                s.close()
        addrs = [p.dialRequest.address for p in list(agent.received.queue) if p.type == pb.DIAL_REQ]
        assert len(addrs) == 3 and all(a.startswith("127.0.0.2:") for a in addrs), addrs
        assert tether.log().count("127.0.0.3") >= 3 or "127.0.0.3" in broker.proc.log()
        assert metric(broker, "tether_agents_connected", 'kind="tether"') == 1
        assert metric(broker, "tether_agents_connected", 'kind="konnectivity"') == 1
        url = f"http://127.0.0.1:{broker.admin_port}/agents"
        with urllib.request.urlopen(url, timeout=5) as resp:
            listed = json.loads(resp.read())
        assert [(a["agent_id"], a["kind"], a["identifiers"]) for a in listed] == [
            ("agent-1", "konnectivity", "ipv4=127.0.0.2"),
            ("agent-2", "tether", "ipv4=127.0.0.3"),
        ]
    finally:
        for srv in targets:
            srv.close()
        tether.stop(timeout=5)


def _grpc_frame(body: bytes) -> bytes:
    return struct.pack(">?I", False, len(body)) + body


def test_hostile_packets_each_a_clean_error_and_a_metric(
    broker_env: Callable[..., BrokerHandle], pki: PkiPaths, agents: list[KonnAgent]
) -> None:
    broker = broker_env()
    target = Target(echo)
    try:
        # DATA for an unknown connectID: answered with CLOSE_REQ, counted.
        agent = konn(broker, pki)
        agents.append(agent)
        ready(broker)
        agent.send(data(4242, b"nobody"))
        wait_until(lambda: 4242 in agent.close_reqs, 10, "CLOSE_REQ for the unknown id")
        assert (
            metric(
                broker,
                "tether_bad_input_total",
                'reason="unknown_connect_id",source="konnectivity_agent"',
            )
            >= 1
        )
        # An unknown packet type and a type whose payload is missing: ignored.
        agent.send(b"\x08\x63")  # type=99
        agent.send(pb.Packet(type=pb.DATA))  # no payload
        agent.send(close_rsp(777))  # CLOSE_RSP nobody waits for
        wait_until(
            lambda: (
                metric(
                    broker, "tether_bad_input_total", 'reason="invalid",source="konnectivity_agent"'
                )
                >= 2
            ),
            10,
            "invalid packets counted",
        )
        # The agent keeps serving after all that.
        s, status = connect(broker, target.address)
        assert status.startswith(b"HTTP/1.1 200")
        s.sendall(b"still here")
        assert read_exactly(s, 10) == b"still here"
        s.close()
        agent.close()

        # Garbage protobuf: the call ends with INTERNAL, the broker goes on.
        garbage = konn(broker, pki, agent_id="agent-2")
        agents.append(garbage)
        garbage.headers()
        garbage.send(b"\xff\xff\xff\xff\xff")
        code, _ = garbage.wait_status()
        assert code is grpc.StatusCode.INTERNAL

        # An oversized packet: RESOURCE_EXHAUSTED.
        big = konn(broker, pki, agent_id="agent-3")
        agents.append(big)
        big.headers()
        big.send(data(1, b"x" * (20 * MiB)))
        code, _ = big.wait_status()
        assert code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL), code

        # The broker still serves a fresh agent.
        fresh = konn(broker, pki, agent_id="agent-1")
        agents.append(fresh)
        ready(broker)
        s, status = connect(broker, target.address)
        assert status.startswith(b"HTTP/1.1 200")
        s.sendall(b"ok")
        assert read_exactly(s, 2) == b"ok"
        s.close()
    finally:
        target.close()


def test_second_connect_call_and_stream_flood_are_refused(
    broker_env: Callable[..., BrokerHandle], pki: PkiPaths, agents: list[KonnAgent]
) -> None:
    broker = broker_env()
    agent = konn(broker, pki)
    agents.append(agent)
    ready(broker)
    # More Connect calls on the same channel (one connection): each refused.
    extra = [
        agent.channel.stream_stream(
            "/AgentService/Connect",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )(iter([]), metadata=[("agentid", "agent-1")], timeout=10)
        for _ in range(50)
    ]
    codes = []
    for call in extra:
        try:
            for _ in call:
                pass
            codes.append(call.code())
        except grpc.RpcError as exc:
            codes.append(exc.code())
    assert all(c is grpc.StatusCode.ALREADY_EXISTS for c in codes), set(codes)
    assert (
        metric(
            broker, "tether_bad_input_total", 'reason="second_connect",source="konnectivity_agent"'
        )
        == 50
    )
    target = Target(echo)
    try:
        s, status = connect(broker, target.address)
        assert status.startswith(b"HTTP/1.1 200")
        s.sendall(b"flood over")
        assert read_exactly(s, 10) == b"flood over"
        s.close()
    finally:
        target.close()


def source(total: int) -> Callable[[socket.socket], None]:
    """A target that sends ``total`` bytes (a fixed pattern) and closes."""
    block = bytes(range(256)) * 256

    def run(conn: socket.socket) -> None:
        left = total
        while left > 0:
            n = min(left, len(block))
            conn.sendall(block[:n])
            left -= n

    return run


def download(broker: BrokerHandle, address: str, total: int, timeout: float = 60) -> str:
    s, status = connect(broker, address, timeout=timeout)
    assert status.startswith(b"HTTP/1.1 200"), status
    h = hashlib.sha256()
    got = 0
    while got < total:
        chunk = s.recv(256 * 1024)
        if not chunk:
            break
        h.update(chunk)
        got += len(chunk)
    s.close()
    assert got == total, (address, got, total)
    return h.hexdigest()


def test_stalled_konnectivity_tunnel_does_not_stall_other_agents(
    tmp_path: Path,
    broker_env: Callable[..., BrokerHandle],
    pki: PkiPaths,
    agents: list[KonnAgent],
) -> None:
    """A client that stops reading fills its konnectivity tunnel's buffer and
    stalls that agent's stream (konnectivity's limit); a Tether agent and
    another konnectivity agent on the same broker keep streaming. Goodput is
    measured in benchmarks/konnectivity_isolation.py, not here."""
    broker = broker_env(
        "--proxy-strategies=destHost,default",
        "--agent-allowed-identifiers=agent-1:ipv4=127.0.0.2,agent-2:ipv4=127.0.0.3,"
        "agent-3:ipv4=127.0.0.4",
    )
    tether = start_agent(tmp_path, broker, "--agent-identifiers=ipv4=127.0.0.3", agent_id="agent-2")
    servers: list[socket.socket] = []
    opened: list[socket.socket] = []
    total = 16 * MiB
    try:
        stalled_agent = konn(broker, pki, identifiers="ipv4=127.0.0.2")
        other = konn(broker, pki, agent_id="agent-3", identifiers="ipv4=127.0.0.4")
        agents.extend([stalled_agent, other])
        ready(broker, 3)
        addrs = {}
        for host in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            srv = socket.create_server((host, 0))
            servers.append(srv)
            handler = source(1 << 40 if host == "127.0.0.2" else total)

            def serve(srv: socket.socket = srv, handler: Any = handler) -> None:
                while True:
                    try:
                        c, _ = srv.accept()
                    except OSError:
                        return
                    threading.Thread(target=_serve_one, args=(c, handler), daemon=True).start()

            threading.Thread(target=serve, daemon=True).start()
            addrs[host] = f"{host}:{srv.getsockname()[1]}"
        # Counted once per stall, so read before the client connects: the
        # buffer can fill before a count read after the 200 (a CI run timed out so).
        stalls = metric(broker, "tether_stream_window_stalls_total")
        # The stalled client: opens a download and never reads.
        stuck, status = connect(broker, addrs["127.0.0.2"])
        opened.append(stuck)
        assert status.startswith(b"HTTP/1.1 200")
        wait_until(
            lambda: metric(broker, "tether_stream_window_stalls_total") > stalls,
            20,
            "the konnectivity tunnel's buffer to fill",
        )
        expected = hashlib.sha256(
            (bytes(range(256)) * 256 * (total // 65536 + 1))[:total]
        ).hexdigest()
        assert download(broker, addrs["127.0.0.3"], total) == expected  # the Tether agent
        assert (
            download(broker, addrs["127.0.0.4"], total) == expected
        )  # the other konnectivity agent
        # The stalled tunnel is still held within its bound, not dropped.
        assert stalled_agent.status is None, stalled_agent.status
    finally:
        for s in opened:
            s.close()
        for srv in servers:
            srv.close()
        tether.stop(timeout=5)


def _serve_one(conn: socket.socket, handler: Callable[[socket.socket], None]) -> None:
    try:
        handler(conn)
    except OSError:
        pass
    finally:
        conn.close()


def test_a_silent_konnectivity_link_is_dropped_by_keepalive(
    broker_env: Callable[..., BrokerHandle], pki: PkiPaths
) -> None:
    """An agent whose link goes silent (no FIN, no PING ACK) is deregistered
    after keepalive time + timeout, so dials stop going to it."""
    import ssl

    import h2.config
    import h2.connection

    broker = broker_env("--keepalive-time=1", "--keepalive-timeout=1")
    cert, key = pki.agent("agent-1")
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    ctx.load_cert_chain(str(cert), str(key))
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", broker.agent_port), timeout=10)
    tls = ctx.wrap_socket(raw, server_hostname="localhost")
    try:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.send_headers(
            1,
            [
                (":method", "POST"),
                (":scheme", "https"),
                (":authority", "localhost"),
                (":path", "/AgentService/Connect"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                ("agentid", "agent-1"),
            ],
        )
        tls.sendall(conn.data_to_send())
        ready(broker)
        # From here on the agent neither reads nor writes: a dead link.
        wait_until(
            lambda: metric(broker, "tether_agents_connected", 'kind="konnectivity"') == 0,
            15,
            "the silent agent to be dropped",
        )
        assert metric(broker, "tether_agent_disconnects_total", 'cause="keepalive_timeout"') == 1
    finally:
        tls.close()


def test_konnectivity_tunnels_share_the_brokers_buffer_budget(
    broker_env: Callable[..., BrokerHandle], pki: PkiPaths, agents: list[KonnAgent]
) -> None:
    """Each konnectivity tunnel reserves its buffer from --max-buffered-bytes
    like a Tether tunnel: past the budget a dial is 503 (broker busy) and
    the reservation returns when the tunnel ends."""
    # Two tunnels at the floor window (64 KiB buffer + 16 KiB outbox) fit.
    broker = broker_env(f"--max-buffered-bytes={2 * 81920}")
    agents.append(konn(broker, pki))
    ready(broker)
    target = Target(echo)
    try:
        first, status = connect(broker, target.address)
        assert status.startswith(b"HTTP/1.1 200"), status
        second, status = connect(broker, target.address)
        assert status.startswith(b"HTTP/1.1 200"), status
        third, status = connect(broker, target.address)
        third.close()
        assert status.startswith(b"HTTP/1.1 503"), status
        assert metric(broker, "tether_buffered_bytes_reserved") == 2 * 81920
        first.close()
        wait_until(lambda: metric(broker, "tether_buffered_bytes_reserved") == 81920, 10, "release")
        again, status = connect(broker, target.address)
        assert status.startswith(b"HTTP/1.1 200"), status
        again.sendall(b"room again")
        assert read_exactly(again, 10) == b"room again"
        again.close()
        second.close()
    finally:
        target.close()


def test_konnectivity_encodes_identifiers_as_url_values() -> None:
    """konnectivity-agent sends url.Values.Encode(): sorted keys, ':' and '/'
    percent-encoded; they read as the same identifiers a Tether agent sends."""
    from broker.konnectivity_agent import _konn_identifiers
    from protocol.identifiers import AgentIdentifiers

    encoded = "cidr=10.0.0.0%2F24&default-route=true&host=node-1&ipv6=fd00%3A%3A1"
    plain = "host=node-1&ipv6=fd00::1&cidr=10.0.0.0/24&default-route=true"
    assert AgentIdentifiers.parse(_konn_identifiers(encoded)) == AgentIdentifiers.parse(plain)
    assert _konn_identifiers("host=a&ipv4=10.0.0.1") == "host=a&ipv4=10.0.0.1"
