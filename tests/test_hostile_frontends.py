"""Hostile clients on the kube-apiserver side and the health port, against
the real broker process.

Two brokers: one in ``http-connect`` mode (CONNECT on a Unix socket and on
TCP with mTLS), one in ``--mode grpc`` (h2c on a Unix socket, the TCP
CONNECT frontend beside it). Both have a real agent (``agent-1``), a health
port, and short deadlines. Every attack checks that a normal tunnel still
works, that the broker's CPU and RSS stay bounded, and that the log and
``tether_bad_input_total`` say what happened.
"""

from __future__ import annotations

import os
import queue
from collections.abc import Iterator
from pathlib import Path

import grpc
import hpack
import pytest
import trio
from grpc_stubs import proxy_service_stub
from hostile import (
    ACK_FLOODS,
    DATA,
    END_HEADERS,
    ENHANCE_YOUR_CALM,
    FRAME_SIZE_ERROR,
    HEADERS,
    PREFACE,
    PROTOCOL_ERROR,
    S_ENABLE_PUSH,
    Meter,
    RawPeer,
    bad_input,
    frame,
    header_block,
    health_ok,
    idle_cpu,
    metric,
    rst_stream,
    settings_frame,
    tunnel_roundtrip,
    wait_log,
    wait_metric,
)
from procs import serve_echo

from protocol import grpc_framing, packets
from protocol import konnectivity_pb2 as pb
from tether.tools.certs import PkiPaths
from tether.tools.launch import BrokerHandle, Proc, start_agent, start_broker

pytestmark = [pytest.mark.e2e]

TIMEOUT = 1.5  # --frontend-header-timeout and --handshake-timeout
PER_IP = 32
MAX_FRONTEND = 300
RSS_BOUND_MIB = 64


def _start(tmp: Path, pki: PkiPaths, mode: str) -> tuple[BrokerHandle, Proc]:
    broker = start_broker(
        tmp,
        pki,
        f"--frontend-header-timeout={TIMEOUT}",
        f"--handshake-timeout={TIMEOUT}",
        f"--max-handshakes-per-ip={PER_IP}",
        f"--max-frontend-connections={MAX_FRONTEND}",
        "--backend-dial-timeout=3",
        mode=mode,
    )
    try:
        agent = start_agent(tmp, broker)
        trio.run(broker.ready)
    except BaseException:
        broker.proc.stop(timeout=5)
        raise
    return broker, agent


@pytest.fixture(scope="module")
def connect_stack(
    tmp_path_factory: pytest.TempPathFactory, pki: PkiPaths
) -> Iterator[BrokerHandle]:
    broker, agent = _start(tmp_path_factory.mktemp("hostile-connect"), pki, "http-connect")
    try:
        yield broker
    finally:
        agent.stop(timeout=5)
        broker.proc.stop(timeout=5)


@pytest.fixture(scope="module")
def grpc_stack(tmp_path_factory: pytest.TempPathFactory, pki: PkiPaths) -> Iterator[BrokerHandle]:
    broker, agent = _start(tmp_path_factory.mktemp("hostile-grpc"), pki, "grpc")
    try:
        yield broker
    finally:
        agent.stop(timeout=5)
        broker.proc.stop(timeout=5)


@pytest.fixture
async def echo(nursery: trio.Nursery) -> int:
    return await serve_echo(nursery)


def _bounded(meter: Meter, rss_mib: float = RSS_BOUND_MIB) -> None:
    print(meter.report("attack"))
    assert meter.rss_growth_mib < rss_mib, meter.report("RSS")
    assert meter.cpu <= meter.wall * 1.1 + 0.5, meter.report("CPU")


async def _quiet(broker: BrokerHandle) -> None:
    spent = await idle_cpu(broker.proc.pid, 1.0)
    assert spent < 0.3, f"broker still burns {spent:.2f}s CPU per second after the attack"


async def _closed_by_broker(stream: trio.abc.Stream, within: float) -> bool:
    with trio.move_on_after(within):
        try:
            while await stream.receive_some(65536):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        return True
    return False


async def _tcp(port: int, source: str, first: bytes = b"") -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
    if first:
        await stream.send_all(first)
    return stream


async def _uds(path: str, first: bytes = b"") -> trio.SocketStream:
    stream = await trio.open_unix_socket(path)
    if first:
        await stream.send_all(first)
    return stream


# ------------------------------------------------------------------ gRPC client


def _grpc_roundtrip_blocking(uds: str, echo_port: int, size: int = 32 * 1024) -> None:
    """A konnectivity-client style call through grpcio: dial, echo, close."""
    payload = os.urandom(size)
    requests: queue.Queue[pb.Packet | None] = queue.Queue()

    def feed() -> Iterator[pb.Packet]:
        while (item := requests.get()) is not None:
            yield item

    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(f"unix:{uds}", options=options) as channel:
        responses = proxy_service_stub()(channel).Proxy(feed(), timeout=10)
        try:
            requests.put(
                pb.Packet(
                    type=pb.DIAL_REQ,
                    dialRequest=pb.DialRequest(
                        protocol="tcp", address=f"127.0.0.1:{echo_port}", random=7
                    ),
                )
            )
            rsp = next(responses)
            assert rsp.type == pb.DIAL_RSP and rsp.dialResponse.error == "", rsp
            cid = rsp.dialResponse.connectID
            requests.put(packets.data_packet(cid, payload))
            got = b""
            while len(got) < size:
                pkt = next(responses)
                assert pkt.type == pb.DATA, pkt
                got += pkt.data.data
            assert got == payload
            requests.put(pb.Packet(type=pb.CLOSE_REQ, closeRequest=pb.CloseRequest(connectID=cid)))
            assert next(responses).type == pb.CLOSE_RSP
        finally:
            requests.put(None)


async def _grpc_serving(broker: BrokerHandle, echo: int) -> None:
    with trio.fail_after(15):
        await trio.to_thread.run_sync(_grpc_roundtrip_blocking, broker.uds, echo)
    await tunnel_roundtrip(broker, echo, via="tcp")
    await health_ok(broker)
    assert broker.proc.alive()
    assert "Traceback" not in broker.proc.log(), "an attack raised an unhandled exception"


async def _connect_serving(broker: BrokerHandle, echo: int) -> None:
    await tunnel_roundtrip(broker, echo, via="uds")
    await tunnel_roundtrip(broker, echo, via="tcp")
    await health_ok(broker)
    assert broker.proc.alive()
    assert "Traceback" not in broker.proc.log(), "an attack raised an unhandled exception"


_GRPC_CALL = header_block(
    [
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", "localhost"),
        (":path", "/ProxyService/Proxy"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
)


async def _h2c(broker: BrokerHandle) -> RawPeer:
    peer = RawPeer(await trio.open_unix_socket(broker.uds))
    await peer.send(PREFACE + settings_frame({S_ENABLE_PUSH: 0}))
    return peer


# ------------------------------------------------------------------ slowloris


@pytest.mark.timeout(40)
async def test_slowloris_on_connect_frontends_and_health(
    connect_stack: BrokerHandle, echo: int
) -> None:
    """Clients that start a request and trickle it, TLS handshakes that never
    finish, half-sent health probes: all are cut at the header/handshake
    deadline while normal clients are served."""
    broker = connect_stack
    before = {
        ("frontend", "header_timeout"): await bad_input(broker, "frontend", "header_timeout"),
        ("frontend", "tls_handshake_timeout"): await bad_input(
            broker, "frontend", "tls_handshake_timeout"
        ),
        ("health", "header_timeout"): await bad_input(broker, "health", "header_timeout"),
    }
    async with Meter(broker.proc.pid) as meter:
        uds = [await _uds(broker.uds, b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n") for _ in range(30)]
        tcp = [await _tcp(broker.server_port, "127.0.0.3") for _ in range(20)]
        health = [
            await _tcp(broker.health_port, "127.0.0.3", b"GET /healthz HTTP/1.1\r\n")
            for _ in range(12)
        ]
        started = trio.current_time()

        async def trickle() -> None:
            # One more header line every 0.3 s: the deadline is for the whole
            # request, so trickling does not extend it.
            for _ in range(20):
                for s in uds + health:
                    try:
                        await s.send_all(b"x-slow: 1\r\n")
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                await trio.sleep(0.3)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            await _connect_serving(broker, echo)  # during the attack
            results = [await _closed_by_broker(s, TIMEOUT + 3) for s in uds + tcp + health]
            nursery.cancel_scope.cancel()
        took = trio.current_time() - started
    assert all(results), f"{results.count(False)} slow connections still open"
    assert took < TIMEOUT + 3
    _bounded(meter)
    assert meter.cpu < 1.0, meter.report("slowloris CPU")
    counts = {"header_timeout": 30, "tls_handshake_timeout": 20}
    for (source, reason), value in before.items():
        want = value + (12 if source == "health" else counts[reason])
        assert await wait_metric(broker, source, reason, want) >= want, (source, reason)
    assert await wait_log(broker, "no request within")
    assert await wait_log(broker, "frontend TLS handshake failed")
    assert await wait_log(broker, "health endpoint: no complete request")
    for s in uds + tcp + health:
        await trio.aclose_forcefully(s)
    await _connect_serving(broker, echo)


@pytest.mark.timeout(30)
async def test_slowloris_on_the_grpc_preface(grpc_stack: BrokerHandle, echo: int) -> None:
    """h2c connections that never finish the HTTP/2 preface are dropped at
    the deadline; calls on other connections go on."""
    broker = grpc_stack
    before = await bad_input(broker, "grpc", "handshake_timeout")
    async with Meter(broker.proc.pid) as meter:
        stalled = [await _uds(broker.uds, PREFACE[: i % 24]) for i in range(30)]
        await _grpc_serving(broker, echo)
        results = [await _closed_by_broker(s, TIMEOUT + 3) for s in stalled]
    assert all(results), f"{results.count(False)} connections still open"
    _bounded(meter)
    assert await wait_metric(broker, "grpc", "handshake_timeout", before + 30) >= before + 30
    assert await wait_log(broker, "no HTTP/2 preface within")
    await _grpc_serving(broker, echo)


# ---------------------------------------------------------- connection floods


@pytest.mark.timeout(40)
async def test_connection_floods(connect_stack: BrokerHandle, echo: int) -> None:
    """Idle connections by the hundred: below ``--max-frontend-connections``
    they just wait for their deadline while tunnels work; above it the excess
    is closed at once (counted). On TCP one address holds at most
    ``--max-handshakes-per-ip`` handshakes, the health port 16 connections per
    address; other addresses are served meanwhile."""
    broker = connect_stack
    too_many = await bad_input(broker, "frontend", "too_many_connections")
    per_ip = await bad_input(broker, "frontend", "too_many_handshakes")
    health_cap = await bad_input(broker, "health", "too_many_connections")
    async with Meter(broker.proc.pid) as meter:
        idle = [await _uds(broker.uds) for _ in range(MAX_FRONTEND - 60)]
        await _connect_serving(broker, echo)  # under the cap: still served
        extra = [await _uds(broker.uds) for _ in range(200)]
        refused_fast = [await _closed_by_broker(s, 0.2) for s in extra]
        health = [await _tcp(broker.health_port, "127.0.0.4") for _ in range(40)]
        await health_ok(broker)  # another address is not refused
        health_refused = [await _closed_by_broker(s, 0.05) for s in health]
        for s in idle + extra:
            await trio.aclose_forcefully(s)
        await trio.sleep(0.2)
        # One address, many TLS handshakes on the TCP frontend.
        tcp = [await _tcp(broker.server_port, "127.0.0.2") for _ in range(100)]
        await tunnel_roundtrip(broker, echo, via="tcp")  # from 127.0.0.1: served
        tcp_refused = [await _closed_by_broker(s, 0.05) for s in tcp]
    assert refused_fast.count(True) >= 100, refused_fast.count(True)
    assert tcp_refused.count(True) >= 100 - PER_IP - 5, tcp_refused.count(True)
    assert health_refused.count(True) >= 40 - 16 - 2, health_refused.count(True)
    _bounded(meter)
    assert await wait_metric(broker, "frontend", "too_many_connections", too_many + 100) >= (
        too_many + 100
    )
    assert await wait_metric(broker, "frontend", "too_many_handshakes", per_ip + 60) >= per_ip + 60
    assert await wait_metric(broker, "health", "too_many_connections", health_cap + 20) >= (
        health_cap + 20
    )
    assert await wait_log(broker, f"127.0.0.2 holds {PER_IP} TLS handshakes")
    for s in tcp + health:
        await trio.aclose_forcefully(s)
    # The flood gone, its slots are free again at once.
    await _connect_serving(broker, echo)


# ------------------------------------------------------------- request bombs


@pytest.mark.timeout(30)
async def test_connect_request_bombs(connect_stack: BrokerHandle, echo: int) -> None:
    """Oversized headers, endless request lines, garbage, the wrong method
    and a bad target each get a one-line HTTP error and a metric."""
    broker = connect_stack
    cases = [
        (
            b"CONNECT a:1 HTTP/1.1\r\n" + b"x-h: " + b"a" * 70_000 + b"\r\n\r\n",
            431,
            "malformed_request",
        ),
        (b"CONNECT " + b"a" * 40_000 + b":1 HTTP/1.1\r\n\r\n", 431, "malformed_request"),
        (b"\x16\x03\x01\x00\xff" + os.urandom(200) + b"\r\n\r\n", 400, "malformed_request"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 405, "not_connect"),
        (b"CONNECT nowhere HTTP/1.1\r\nHost: x\r\n\r\n", 400, "addr_syntax"),
    ]
    async with Meter(broker.proc.pid) as meter:
        for request, status, reason in cases:
            before = await bad_input(broker, "frontend", reason)
            stream = await _uds(broker.uds)
            try:
                await stream.send_all(request)
            except trio.BrokenResourceError:
                pass  # the broker answered and closed before we were done
            reply = b""
            with trio.fail_after(5):
                try:
                    while chunk := await stream.receive_some(65536):
                        reply += chunk
                except trio.BrokenResourceError:
                    pass
            await trio.aclose_forcefully(stream)
            assert reply.startswith(f"HTTP/1.1 {status} ".encode()), (status, reply[:100])
            assert b"connection: close" in reply.lower()
            assert await wait_metric(broker, "frontend", reason, before + 1) >= before + 1
        await _connect_serving(broker, echo)
    assert await wait_log(broker, "frontend: request refused (431)")
    _bounded(meter, 16)


# ----------------------------------------------------------- gRPC floods


@pytest.mark.timeout(40)
async def test_grpc_rapid_reset(grpc_stack: BrokerHandle, echo: int) -> None:
    """Calls opened, given a DIAL_REQ, and reset at once (CVE-2023-44487):
    GOAWAY(ENHANCE_YOUR_CALM) once the reset budget is spent, no dial is
    left behind, other clients are served throughout."""
    broker = grpc_stack
    before = await bad_input(broker, "grpc", "flood_resets")
    dial = grpc_framing.encode_message(
        packets.encode_packet(
            pb.Packet(
                type=pb.DIAL_REQ,
                dialRequest=pb.DialRequest(protocol="tcp", address=f"127.0.0.1:{echo}", random=1),
            )
        )
    )
    peer = await _h2c(broker)
    async with Meter(broker.proc.pid) as meter:
        sent: list[int] = []

        async def attack() -> None:
            sid, n = 1, 0
            while n < 40_000 and not peer.eof:
                burst = b"".join(
                    frame(HEADERS, END_HEADERS, s, _GRPC_CALL)
                    + frame(DATA, 0, s, dial)
                    + rst_stream(s)
                    for s in range(sid, sid + 1000, 2)
                )
                sid += 1000
                if not await peer.send(burst):
                    break
                n += 500
                await trio.lowlevel.checkpoint()
            sent.append(n)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(attack)
            await _grpc_serving(broker, echo)
        goaway = await peer.goaway(5)
    assert goaway is not None and goaway.error_code == ENHANCE_YOUR_CALM, goaway
    print(f"gRPC rapid reset: {sent[0]} calls sent before the broker hung up")
    _bounded(meter)
    assert await wait_metric(broker, "grpc", "flood_resets", before + 1) >= before + 1
    assert await wait_log(broker, "client flood (flood_resets)")
    text = await broker.metrics()
    for _ in range(50):  # dials started before the resets were seen wind down
        if metric(text, "konnectivity_network_proxy_server_pending_backend_dials") == 0:
            break
        await trio.sleep(0.1)
        text = await broker.metrics()
    assert metric(text, "konnectivity_network_proxy_server_pending_backend_dials") == 0
    await _quiet(broker)
    await _grpc_serving(broker, echo)


@pytest.mark.timeout(40)
async def test_grpc_stream_flood(grpc_stack: BrokerHandle, echo: int) -> None:
    """More open calls than MAX_CONCURRENT_STREAMS (``--max-grpc-streams``,
    1000): the connection ends with GOAWAY; memory and CPU stay small."""
    broker = grpc_stack
    before = await bad_input(broker, "grpc", "h2_protocol")
    peer = await _h2c(broker)
    async with Meter(broker.proc.pid) as meter:
        # 900 calls that stay open (each waits for its DIAL_REQ) ...
        await peer.send(
            b"".join(frame(HEADERS, END_HEADERS, s, _GRPC_CALL) for s in range(1, 1801, 2))
        )
        await trio.sleep(0.5)
        await _grpc_serving(broker, echo)
        # ... then past the limit.
        await peer.send(
            b"".join(frame(HEADERS, END_HEADERS, s, _GRPC_CALL) for s in range(1801, 1801 + 400, 2))
        )
        goaway = await peer.goaway(5)
    assert goaway is not None and goaway.error_code == PROTOCOL_ERROR, goaway
    assert await peer.closed(5)
    _bounded(meter, 32)
    assert await wait_metric(broker, "grpc", "h2_protocol", before + 1) >= before + 1
    assert await wait_log(broker, "Max inbound streams is 1000")
    await _quiet(broker)
    await _grpc_serving(broker, echo)


@pytest.mark.timeout(40)
@ACK_FLOODS
async def test_grpc_ping_and_settings_floods(
    grpc_stack: BrokerHandle, echo: int, unit: bytes, reason: str
) -> None:
    broker = grpc_stack
    before = await bad_input(broker, "grpc", reason)
    peer = await _h2c(broker)
    async with Meter(broker.proc.pid) as meter:
        sent = 0
        while sent < 50_000 and await peer.send(unit * 1000):
            sent += 1000
        goaway = await peer.goaway(5)
    assert goaway is not None and goaway.error_code == ENHANCE_YOUR_CALM, goaway
    acks = sum(1 for f in peer.frames if f.kind == unit[3] and f.flags & 1)
    print(f"gRPC {reason}: {sent} sent, {acks} acknowledged before GOAWAY")
    assert acks <= 2000
    _bounded(meter)
    assert await wait_metric(broker, "grpc", reason, before + 1) >= before + 1
    assert await wait_log(broker, f"client flood ({reason})")
    await _grpc_serving(broker, echo)


@pytest.mark.timeout(40)
async def test_grpc_oversized_frames_and_header_bombs(grpc_stack: BrokerHandle, echo: int) -> None:
    """A frame header claiming 16 MiB, an HPACK table bomb, and a header that
    is not UTF-8: each ends its connection with GOAWAY at once, with nothing
    buffered for it, and is counted."""
    broker = grpc_stack
    encoder = hpack.Encoder()
    bomb = bytes(encoder.encode([("x-bomb", "b" * 4000)], huffman=False)) + bytes([0xBE]) * 2000
    not_utf8 = header_block(
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":authority", b"localhost"),
            (b":path", b"/ProxyService/Proxy"),
            (b"content-type", b"application/grpc"),
            (b"x-bytes", b"\xff\xfe\xfd"),
        ]
    )
    cases = [
        (
            "16 MiB frame",
            b"\xff\xff\xff" + bytes([DATA, 0]) + b"\x00\x00\x00\x01" + b"x" * 100,
            FRAME_SIZE_ERROR,
            "h2_protocol",
        ),
        ("table bomb", frame(HEADERS, END_HEADERS, 1, _GRPC_CALL + bomb), None, "h2_protocol"),
        ("not UTF-8", frame(HEADERS, END_HEADERS, 1, not_utf8), PROTOCOL_ERROR, "header_encoding"),
    ]
    async with Meter(broker.proc.pid) as meter:
        for name, attack, code, reason in cases:
            before = await bad_input(broker, "grpc", reason)
            peer = await _h2c(broker)
            await peer.send(attack)
            goaway = await peer.goaway(5)
            assert goaway is not None, name
            if code is not None:
                assert goaway.error_code == code, (name, goaway)
            assert await peer.closed(5), name
            assert await wait_metric(broker, "grpc", reason, before + 1) >= before + 1, name
        await _grpc_serving(broker, echo)
    _bounded(meter, 16)
    assert await wait_log(broker, "Received overlong frame")
    assert await wait_log(broker, "header field is not UTF-8")
    assert "Traceback" not in broker.proc.log()
