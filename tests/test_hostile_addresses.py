"""Any dial address, however malformed, is a clean dial failure (issue 11,
item 2 / row 3).

Through real processes: arbitrary address strings through both frontends
(CONNECT over the TCP mTLS frontend, gRPC DIAL_REQ over the Unix socket) into
one real agent, the row-3 regressions with and without ``--allow``, and a
hostile broker stand-in that sends the agent malformed dials directly (the
broker's own check bypassed).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import trio
from grpc_client import Call, close_req, data_pkt
from hostile import DATA, bad_input, frame, metric, open_peer, tunnel_roundtrip
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from procs import BrokerHandle, Proc, Tunnel, connect_tunnel, free_port, http_get, serve_echo

from protocol import konnectivity_pb2 as pb
from protocol import messages
from protocol.addresses import REASONS, BadAddress, parse_address
from protocol.codes import DialFailCode
from protocol.events import ControlAccepted, ControlRequested, DataStreamRequested
from protocol.session import Role, TunnelSession
from tether.netio import tls
from tether.netio.tls_stream import TLSStream
from tether.netio.tunnel import Keepalive, TunnelConnection, TunnelStream
from tether.tools.certs import PkiPaths
from tether.tools.launch import frontend_ssl, start_agent, start_broker

pytestmark = [pytest.mark.e2e]

ROW3 = ["..:80", ".:80", "x..y:443", "a" * 64 + ":443", "b." + "c" * 64 + ".d:443"]
#: Loopback only: names become ``localhost`` (never a DNS query), the agent
#: refuses every other address itself.
ALLOW = "--allow=127.0.0.0/8:*,::1/128:*"
CLEAN_STATUSES = {200, 400, 403, 502, 503, 504}


# ------------------------------------------------------------------ clients


def _connect_request(addr: str) -> bytes:
    target = addr.encode("utf-8", "surrogatepass")
    return b"CONNECT " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n"


def connect_once(broker: BrokerHandle, addr: str, ctx: ssl.SSLContext) -> tuple[int, bytes]:
    """One CONNECT over the TCP mTLS frontend (blocking): status and body."""
    raw = socket.create_connection(("127.0.0.1", broker.server_port), timeout=15)
    with raw, ctx.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(_connect_request(addr))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 "), (addr, data[:200])
        status = int(head.split()[1])
        if status != 200:
            with contextlib.suppress(OSError, ssl.SSLError):
                while chunk := s.recv(65536):
                    body += chunk
        return status, body


def grpc_dial_once(channel: grpc.Channel, addr: str, random: int) -> pb.DialResponse:
    call = Call(channel)
    try:
        rsp = call.dial(addr, random=random, timeout=15)
        if rsp.connectID:
            call.send(close_req(rsp.connectID))
        return rsp
    finally:
        call.finish()


def grpc_echo(channel: grpc.Channel, echo: int) -> None:
    payload = os.urandom(4096)
    call = Call(channel)
    try:
        rsp = call.dial(f"127.0.0.1:{echo}", random=7, timeout=15)
        assert not rsp.error and rsp.connectID, rsp
        call.send(data_pkt(rsp.connectID, payload))
        got = b""
        while len(got) < len(payload):
            pkt = call.recv(15)
            assert pkt is not None and pkt.type == pb.DATA, pkt
            got += pkt.data.data
        assert got == payload
        call.send(close_req(rsp.connectID))
    finally:
        call.finish()


def _channel(broker: BrokerHandle) -> grpc.Channel:
    return grpc.insecure_channel(f"unix:{broker.uds}")


def _one_line(body: bytes) -> None:
    text = body.decode("utf-8", "replace")
    assert text.endswith("\n") and text.count("\n") == 1 and text[:-1].isprintable(), body


def _safe(addr: str) -> str:
    """Keep the test on loopback: a name the broker would route becomes
    ``localhost``; addresses the broker refuses are sent as they are."""
    try:
        parsed = parse_address(addr)
    except BadAddress:
        return addr
    return f"localhost:{parsed.port}" if parsed.kind == "name" else addr


# ---------------------------------------------------------- the shared stack


class Stack:
    def __init__(self, broker: BrokerHandle, agent: Proc, echo: int) -> None:
        self.broker = broker
        self.agent = agent
        self.echo = echo
        self.ctx = frontend_ssl(broker.pki)
        self.channel = _channel(broker)
        self.random = 100
        self.seen: dict[str, int] = {}


@contextlib.contextmanager
def _echo_thread() -> Iterator[int]:
    """A threaded echo server (sync tests cannot use a trio nursery)."""
    import threading

    srv = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield int(srv.getsockname()[1])
    finally:
        srv.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pki: PkiPaths) -> Iterator[Stack]:
    """One broker (gRPC on the Unix socket, CONNECT on TCP mTLS) and ONE
    agent with a loopback allowlist, for every example of the property test."""
    tmp: Path = tmp_path_factory.mktemp("addresses")
    broker = start_broker(tmp, pki, "--backend-dial-timeout=3", mode="grpc")
    agent = start_agent(tmp, broker, ALLOW)
    try:
        with _echo_thread() as echo:
            trio.run(broker.ready)
            yield Stack(broker, agent, echo)
    finally:
        agent.stop(timeout=5)
        broker.proc.stop(timeout=5)


_HOSTILE = list(".:[]%-_0123456789aZx \t\r\n\x00\x1b\x7f\x85\u00e9\u200d\u2028\u0661\ufffd²")
hostile_text = st.text(alphabet=st.sampled_from(_HOSTILE), max_size=30)
labels = st.one_of(
    st.text(alphabet="ab-_", min_size=0, max_size=3),
    st.integers(60, 70).map(lambda n: "a" * n),
    hostile_text,
)
hosts = st.one_of(
    st.lists(labels, max_size=5).map(".".join),
    st.sampled_from(["", ".", "..", "[::1]", "[", "]", "[x]", "127.1", "0x7f.1", "\u0661"]),
    hostile_text,
    st.text(max_size=40),
)
port_texts = st.one_of(
    st.integers(-10, 70000).map(str),
    st.sampled_from(["", "0", "65536", "²", "١٢", "+80", " 80", "80 ", "0x50", "9" * 30]),
    hostile_text,
)
addresses = st.one_of(
    st.builds(lambda h, p: f"{h}:{p}", hosts, port_texts),
    st.text(max_size=80),
    hostile_text,
)


@given(addr=addresses)
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@pytest.mark.timeout(240)
def test_arbitrary_addresses_through_both_frontends_into_one_agent(stack: Stack, addr: str) -> None:
    """Each address gets a clean answer on CONNECT (an HTTP status and a
    one-line body: 400 for a malformed address, a normal dial failure
    otherwise) and on gRPC (a DIAL_RSP with an error, or a connectID), and
    the one agent keeps running."""
    addr = _safe(addr)
    status, body = connect_once(stack.broker, addr, stack.ctx)
    assert status in CLEAN_STATUSES, (addr, status, body)
    if status != 200:
        _one_line(body)
    try:
        parse_address(addr)
        valid = True
    except BadAddress:
        valid = False
    if not valid:
        # Validated before routing: bad request line or bad target, never an agent.
        assert status == 400, (addr, status, body)
    try:
        addr.encode("utf-8")
    except UnicodeEncodeError:
        pass  # a protobuf string cannot carry a lone surrogate
    else:
        stack.random += 1
        rsp = grpc_dial_once(stack.channel, addr, stack.random)
        assert bool(rsp.error) != bool(rsp.connectID), (addr, rsp)
        if not valid:
            assert rsp.error.startswith("bad address"), (addr, rsp.error)
        assert "\n" not in rsp.error
    stack.seen[str(status)] = stack.seen.get(str(status), 0) + 1
    assert stack.agent.alive(), f"agent exited on {addr!r}: {stack.agent.log()[-2000:]}"


@pytest.mark.timeout(60)
async def test_after_the_property_test_the_agent_still_serves(stack: Stack) -> None:
    """Runs after the property test (same module, same processes): the agent
    is alive, still registered, and real echo tunnels work on both frontends;
    each refusal was counted under its reason."""
    assert stack.agent.alive()
    await stack.broker.ready(agents=1)
    # One malformed address more on each frontend, so this test stands alone too.
    assert (await trio.to_thread.run_sync(connect_once, stack.broker, "..:80", stack.ctx))[0] == 400
    rsp = await trio.to_thread.run_sync(grpc_dial_once, stack.channel, "..:80", 99)
    assert rsp.error.startswith("bad address")
    assert stack.agent.alive()
    await tunnel_roundtrip(stack.broker, stack.echo, via="tcp")
    await trio.to_thread.run_sync(grpc_echo, stack.channel, stack.echo)
    text = await stack.broker.metrics()
    for source in ("frontend", "grpc"):
        refused = sum(
            metric(text, "tether_bad_input_total", source=source, reason=r) for r in REASONS
        )
        assert refused > 0, source
    assert "Traceback" not in stack.agent.log()
    assert "Traceback" not in stack.broker.proc.log()


# ----------------------------------------------------------------- row 3


@pytest.mark.timeout(90)
@pytest.mark.parametrize("allow", [False, True], ids=["open", "allowlist"])
async def test_row3_addresses_are_a_400_and_the_agent_lives(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
    allow: bool,
) -> None:
    """``..:80``, ``.:80``, ``x..y:443`` and 64-character labels once made
    the agent exit with an idna UnicodeError. Now: 400 on CONNECT (both the
    TCP mTLS frontend and, in CONNECT mode, the Unix socket), an error
    DIAL_RSP on gRPC, a metric and a log line per refusal, and the agent
    keeps serving, with and without ``--allow``."""
    echo = await serve_echo(nursery)
    grpc_broker = broker_factory(mode="grpc")
    connect_broker = broker_factory()
    extra = [ALLOW] if allow else []
    agents = [
        agent_factory(grpc_broker, *extra),
        agent_factory(connect_broker, *extra),
    ]
    await grpc_broker.ready(agents=1)
    await connect_broker.ready(agents=1)
    channel = _channel(grpc_broker)
    for addr in ROW3:
        reason = "addr_empty_label" if addr.startswith((".", "x")) else "addr_label_length"
        for broker, via in ((grpc_broker, "tcp"), (connect_broker, "uds")):
            before = await bad_input(broker, "frontend", reason)
            with trio.fail_after(15):
                tunnel = await connect_tunnel(broker, addr, via=via)
            assert tunnel.status == 400, (addr, via, tunnel.status, tunnel.body)
            _one_line(tunnel.body)
            assert b"bad CONNECT target" in tunnel.body and b"bad address" in tunnel.body
            await tunnel.aclose()
            assert await bad_input(broker, "frontend", reason) == before + 1
        before = await bad_input(grpc_broker, "grpc", reason)
        rsp = await trio.to_thread.run_sync(grpc_dial_once, channel, addr, 5)
        assert rsp.error.startswith("bad address") and not rsp.connectID, rsp
        assert await bad_input(grpc_broker, "grpc", reason) == before + 1
    assert "frontend: request refused (400): bad CONNECT target" in connect_broker.proc.log()
    assert "DIAL_REQ refused: bad address" in grpc_broker.proc.log()
    for agent in agents:
        assert agent.alive(), agent.log()[-2000:]
    await tunnel_roundtrip(grpc_broker, echo, via="tcp")
    await tunnel_roundtrip(connect_broker, echo, via="uds")
    await trio.to_thread.run_sync(grpc_echo, channel, echo)
    channel.close()


# --------------------------------------------- the broker's check bypassed


class HostileBroker:
    """A broker stand-in: accepts the agent's control stream, then sends
    whatever dials the test asks for, unvalidated."""

    def __init__(self) -> None:
        self.conn: TunnelConnection | None = None
        self.connections = 0
        self.accepted = trio.Event()
        self.fails: dict[int, messages.DialFail] = {}
        self.streams: dict[int, TunnelStream] = {}
        self.changed = trio.Event()

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def on_control_requested(self, ev: ControlRequested) -> None:
        assert self.conn is not None
        self.conn.session.accept_control({"tether-server-id": "hostile-broker"})
        self.conn.wake_writer()
        self.accepted.set()

    def on_control_accepted(self, ev: ControlAccepted) -> None:
        raise AssertionError("a broker is never accepted")

    def on_message(self, msg: messages.Message) -> None:
        if isinstance(msg, messages.DialFail):
            self.fails[msg.id] = msg
            self._changed()

    def on_data_stream_requested(self, ev: DataStreamRequested) -> None:
        assert self.conn is not None
        ts = self.conn.add_stream(ev.stream_id, ev.dial_id)
        self.conn.session.accept_data_stream(ev.stream_id)
        self.conn.wake_writer()
        self.streams[ev.dial_id] = ts
        self._changed()

    async def serve(self, pki: PkiPaths, task_status: trio.TaskStatus[int]) -> None:
        ctx = tls.server_context(pki.broker_cert, pki.broker_key, str(pki.ca_cert), alpn=["h2"])

        async def handle(tcp: trio.SocketStream) -> None:
            if self.conn is not None:
                await trio.aclose_forcefully(tcp)  # one link is enough
                return
            self.connections += 1
            stream = TLSStream(tcp, ctx, server_side=True)
            await stream.do_handshake()
            sess = TunnelSession(Role.BROKER, clock=trio.current_time)
            sess.initiate()
            self.conn = TunnelConnection(
                stream, sess, self, keepalive=Keepalive(interval=math.inf), name="agent"
            )
            await self.conn.run()

        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(int(listeners[0].socket.getsockname()[1]))
        await trio.serve_listeners(handle, listeners)

    async def dial(self, dial_id: int, addr: str) -> messages.DialFail | TunnelStream:
        assert self.conn is not None
        self.conn.send_message(messages.Dial(id=dial_id, addr=addr, timeout_ms=3000))
        with trio.fail_after(10):
            while dial_id not in self.fails and dial_id not in self.streams:
                await self.changed.wait()
        return self.fails.get(dial_id) or self.streams[dial_id]


@pytest.mark.timeout(90)
async def test_agent_answers_malformed_dials_from_a_hostile_broker(
    tmp_path: Path, pki: PkiPaths, procs_started: list[Proc], nursery: trio.Nursery
) -> None:
    """The broker's validation bypassed: a stand-in broker sends the real
    agent dials with malformed addresses (row 3, NUL, newlines, non-ASCII,
    bad ports, 2,000 characters). Each is answered with ``dial_fail``
    ``bad_address`` on the same connection (no reconnect, no exit), logged
    once with ``event=dial_failed``, counted in the agent's
    ``..._endpoint_dial_failure{reason="bad_address"}``, and a valid dial on
    the same link then relays bytes."""
    hostile = HostileBroker()
    port = await nursery.start(hostile.serve, pki)
    echo = await serve_echo(nursery)
    health = free_port()
    fake = cast(Any, BrokerHandle)(None, port, 0, 0, "", pki)
    agent = start_agent(
        tmp_path,
        fake,
        "--metrics",
        f"--admin-server-port={health}",  # /metrics lives on the agent's admin port
    )
    procs_started.append(agent)
    with trio.fail_after(20):
        await hostile.accepted.wait()
    bad = [
        *ROW3,
        "h:²",
        "a\x00b:80",
        "evil\nFORGED:80",
        "\u200d:80",
        "bücher.example:443",
        "\u0661:80",
        "[foo]:80",
        "127.1:80",
        "h:0",
        "h:65536",
        "noport",
        "",
        "x" * 2000 + ":1",
    ]
    for i, addr in enumerate(bad, start=1):
        answer = await hostile.dial(i, addr)
        assert isinstance(answer, messages.DialFail), (addr, answer)
        assert answer.code is DialFailCode.BAD_ADDRESS, (addr, answer)
        assert "\n" not in answer.msg
        assert agent.alive(), agent.log()[-2000:]
    # Same link, and a real dial still works on it.
    assert hostile.connections == 1
    answer = await hostile.dial(1000, f"127.0.0.1:{echo}")
    assert isinstance(answer, TunnelStream), answer
    await answer.send_all(b"ping")
    with trio.fail_after(10):
        chunk = await answer.receive()
    assert chunk is not None and chunk.data == b"ping"
    answer.reset()
    code, body = await http_get(health, "/metrics")
    assert code == 200
    counted = metric(
        body.decode(),
        "konnectivity_network_proxy_agent_endpoint_dial_failure_total",
        reason="bad_address",
    )
    assert counted == len(bad)
    log = agent.log()
    assert sum("event=dial_failed" in line for line in log.splitlines()) >= len(bad)
    assert "FORGED:80" in log and "\nFORGED" not in log
    assert "Traceback" not in log
    assert agent.alive()


@pytest.mark.timeout(60)
async def test_agent_bad_address_verdict_is_a_400_on_connect(
    broker_factory: Callable[..., BrokerHandle], nursery: trio.Nursery
) -> None:
    """An agent that answers ``dial_fail`` ``bad_address`` (a newer agent
    stricter than its broker, say): the CONNECT client gets 400, not 502,
    and the failure is counted under ``bad_address``."""
    broker = broker_factory(
        "--proxy-strategies=destHost", "--agent-allowed-identifiers=agent-2:host=evil.example"
    )
    await broker.up()
    peer = await open_peer(broker, agent_id="agent-2", identifiers="host=evil.example")
    await broker.ready(agents=1)
    results: list[Tunnel] = []

    async def client() -> None:
        with trio.fail_after(15):
            results.append(await connect_tunnel(broker, "evil.example:443", via="uds"))

    nursery.start_soon(client)
    dial = await peer.wait_message(messages.Dial, timeout=10)
    assert dial is not None
    reply = messages.DialFail(id=dial.id, code=DialFailCode.BAD_ADDRESS, msg="addr_char: nope")
    await peer.send(frame(DATA, 0, 1, messages.encode(reply)))
    with trio.fail_after(15):
        while not results:
            await trio.sleep(0.05)
    assert results[0].status == 400, (results[0].status, results[0].body)
    assert results[0].body == b"bad address: addr_char: nope\n"
    await results[0].aclose()
    text = await broker.metrics()
    name = "konnectivity_network_proxy_server_dial_failure_count_total"
    assert metric(text, name, reason="bad_address") == 1
    await peer.aclose()
