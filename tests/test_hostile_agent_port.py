"""Hostile peers on the agent port, against the real broker process.

Every test attacks for a few seconds and then checks that the broker:

- keeps serving: a normal CONNECT tunnel through the legitimate agent
  (``agent-1``, which owns 127.0.0.1 under ``destHost`` routing) works during
  or right after the attack, and ``/healthz`` answers;
- stays bounded: RSS growth and CPU seconds measured from ``/proc``;
- says what happened: a log line and a ``tether_bad_input_total`` sample.

The hostile agents present valid certificates (``agent-2``, ``agent-3``)
where the attack needs an authenticated connection, and own the host
``evil`` (or ``zero``) so that only dials meant for them reach them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import hpack
import msgpack
import pytest
import trio
import trio.lowlevel
from hostile import (
    ACK_FLOODS,
    CANCEL,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    HEADERS,
    PROTOCOL_ERROR,
    RST_STREAM,
    S_INITIAL_WINDOW_SIZE,
    Meter,
    MiB,
    bad_input,
    broker_with_agent,
    data_stream_block,
    dial_id_from,
    flood,
    frame,
    header_block,
    health_ok,
    idle_cpu,
    is_rst,
    is_status,
    metric,
    open_peer,
    request_headers,
    rst_stream,
    tunnel_roundtrip,
    wait_log,
    wait_metric,
    window_update,
)
from procs import serve_echo

from protocol import framing, messages, session
from tether.tools.certs import PkiPaths
from tether.tools.launch import (
    BrokerHandle,
    Tunnel,
    connect_tunnel,
)

pytestmark = [pytest.mark.e2e]

HANDSHAKE_TIMEOUT = 1.5
PER_IP = 32
#: RSS growth any single attack may cause.
RSS_BOUND_MIB = 64


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pki: PkiPaths) -> Iterator[BrokerHandle]:
    tmp: Path = tmp_path_factory.mktemp("hostile-agent")
    with broker_with_agent(
        tmp,
        pki,
        f"--handshake-timeout={HANDSHAKE_TIMEOUT}",
        "--frontend-header-timeout=1.5",
        "--proxy-strategies=destHost",
        "--agent-identifiers-policy=any",  # raw peers claim hosts; not what is tested here
        f"--max-handshakes-per-ip={PER_IP}",
        "--backend-dial-timeout=3",
        # the module's tests share this broker and flood it in turn from one
        # address; the flood penalty has its own test (test_hostile_control_flood)
        "--flood-penalty-after=0",
    ) as broker:
        yield broker


@pytest.fixture
async def echo(nursery: trio.Nursery) -> int:
    return await serve_echo(nursery)


async def _serving(broker: BrokerHandle, echo: int) -> None:
    """The broker still does its job: a tunnel through agent-1, /healthz."""
    await tunnel_roundtrip(broker, echo)
    await health_ok(broker)
    assert broker.proc.alive()
    assert "Traceback" not in broker.proc.log(), "an attack raised an unhandled exception"


async def _quiet(broker: BrokerHandle) -> None:
    """Once the attack is over nothing keeps the broker busy."""
    spent = await idle_cpu(broker.proc.pid, 1.0)
    assert spent < 0.3, f"broker still burns {spent:.2f}s CPU per second after the attack"


async def _established(broker: BrokerHandle, timeout: float = 5.0) -> float:
    """Open tunnels on the UDS frontend, once they settle (0 when all gone)."""
    deadline = trio.current_time() + timeout
    while True:
        text = await broker.metrics()
        value = metric(text, "konnectivity_network_proxy_server_established_connections")
        if value == 0 or trio.current_time() > deadline:
            return value
        await trio.sleep(0.05)


def _bounded(meter: Meter, *, cpu_ratio: float = 1.1) -> None:
    print(meter.report("attack"))
    assert meter.rss_growth_mib < RSS_BOUND_MIB, meter.report("RSS")
    # One trio thread: it cannot use more than one core; floods must not add
    # background work (threads) on top of it.
    assert meter.cpu <= meter.wall * cpu_ratio + 0.5, meter.report("CPU")


# ------------------------------------------------------------ slowloris


async def _stall_tcp(port: int, source: str, first: bytes) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
    if first:
        await stream.send_all(first)
    return stream


async def _admission_drops(broker: BrokerHandle) -> float:
    """Connections admission closed before TLS (tether_agent_admission_total)."""
    return metric(await broker.metrics(), "tether_agent_admission_total", verdict="drop")


async def _closed_by_broker(stream: trio.abc.Stream, within: float) -> bool:
    with trio.move_on_after(within):
        try:
            while await stream.receive_some(65536):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        return True
    return False


@pytest.mark.timeout(40)
async def test_slowloris_tls_and_control_stream_deadlines(stack: BrokerHandle, echo: int) -> None:
    """TLS handshakes that never finish, and authenticated connections that
    never open the control stream, are cut at ``--handshake-timeout``."""
    broker = stack
    tls_before = await bad_input(broker, "agent", "tls_handshake_timeout")
    dropped_before = await _admission_drops(broker)
    ctl_before = await bad_input(broker, "agent", "no_control_stream")
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"  # a ClientHello's first bytes
    async with Meter(broker.proc.pid) as meter:
        stalled = [
            await _stall_tcp(broker.agent_port, f"127.0.0.{3 + i % 2}", hello if i % 4 else b"")
            for i in range(40)
        ]
        silent = [await open_peer(broker, control=False) for _ in range(5)]
        await _serving(broker, echo)  # during the attack
        started = trio.current_time()
        results = [await _closed_by_broker(s, HANDSHAKE_TIMEOUT + 3) for s in stalled]
        results += [await silent_peer.closed(HANDSHAKE_TIMEOUT + 3) for silent_peer in silent]
        took = trio.current_time() - started
    assert all(results), f"{results.count(False)} slow connections still open"
    assert took < HANDSHAKE_TIMEOUT + 3
    _bounded(meter)
    assert meter.cpu < 1.0, meter.report("slowloris CPU")
    # Each stalled connection ends at the TLS deadline, or, if it waited in
    # admission's queue for a handshake slot (one address gets a quarter of
    # them) past the queue's wait, closed before TLS: every one is counted.
    deadline = trio.current_time() + 5
    while True:
        timed_out = await bad_input(broker, "agent", "tls_handshake_timeout") - tls_before
        dropped = await _admission_drops(broker) - dropped_before
        if timed_out + dropped >= 40 or trio.current_time() > deadline:
            break
        await trio.sleep(0.05)
    assert timed_out + dropped >= 40, (timed_out, dropped)
    assert timed_out >= 16, timed_out  # 8 slots per address were handshaking
    assert await wait_metric(broker, "agent", "no_control_stream", ctl_before + 5) >= ctl_before + 5
    assert await wait_log(broker, "TLS handshake timed out")
    assert await wait_log(broker, "no control stream within")
    await _serving(broker, echo)


# ----------------------------------------------------- connection flood


@pytest.mark.timeout(40)
async def test_connection_flood_is_limited_per_source_address(
    stack: BrokerHandle, echo: int
) -> None:
    """300 connections at once from one address: the broker holds at most
    ``--max-handshakes-per-ip`` of them in the handshake and closes the rest
    at once; other addresses (a new agent, frontends) are unaffected."""
    broker = stack
    before = await bad_input(broker, "agent", "too_many_handshakes")
    flood_conns: list[trio.SocketStream] = []
    async with Meter(broker.proc.pid) as meter:
        for _ in range(300):
            try:
                flood_conns.append(await _stall_tcp(broker.agent_port, "127.0.0.2", b""))
            except OSError:
                break  # the accept backlog is full: also a bounded outcome
        # A different address still gets a full TLS + HTTP/2 + control
        # stream handshake while the flood holds its slots.
        newcomer = await open_peer(broker, agent_id="agent-3", identifiers="host=newcomer")
        await _serving(broker, echo)
        open_after = 0
        for conn in flood_conns:
            if not await _closed_by_broker(conn, 0.01):
                open_after += 1
    assert len(flood_conns) >= 200
    # Connections beyond the per-address cap are closed right away.
    assert open_after <= PER_IP + 5, open_after
    refused = await wait_metric(broker, "agent", "too_many_handshakes", before + 200)
    assert refused - before >= len(flood_conns) - PER_IP - 5
    assert await wait_log(broker, f"127.0.0.2 holds {PER_IP} unauthenticated connections")
    _bounded(meter)
    for conn in flood_conns:
        await trio.aclose_forcefully(conn)
    await newcomer.aclose()
    await _serving(broker, echo)


# ---------------------------------------------------------- rapid reset


@pytest.mark.timeout(40)
async def test_rapid_reset_from_an_authenticated_agent(stack: BrokerHandle, echo: int) -> None:
    """HEADERS + RST_STREAM pairs on data-stream paths (CVE-2023-44487): the
    broker answers GOAWAY(ENHANCE_YOUR_CALM) once the reset budget is spent."""
    broker = stack
    before = await bad_input(broker, "agent", "flood_resets")
    peer = await open_peer(broker)
    block = data_stream_block(424242)
    async with Meter(broker.proc.pid) as meter:

        async def attack() -> int:
            sent, sid = 0, 3
            while sent < 40_000 and not peer.eof:
                burst = b"".join(
                    frame(HEADERS, END_HEADERS, s, block) + rst_stream(s)
                    for s in range(sid, sid + 1000, 2)
                )
                sid += 1000
                if not await peer.send(burst):
                    break
                sent += 500
                await trio.lowlevel.checkpoint()
            return sent

        async with trio.open_nursery() as nursery:
            sent: list[int] = []

            async def run_attack() -> None:
                sent.append(await attack())

            nursery.start_soon(run_attack)
            await _serving(broker, echo)  # during the attack
        goaway = await peer.goaway(5)
    assert goaway is not None, "no GOAWAY"
    assert goaway.error_code == ENHANCE_YOUR_CALM
    assert await peer.closed(5)
    print(f"rapid reset: {sent[0]} streams sent before the broker hung up")
    _bounded(meter)
    assert await wait_metric(broker, "agent", "flood_resets", before + 1) >= before + 1
    assert await wait_log(broker, "exceeded its resets budget")
    await _quiet(broker)
    await _serving(broker, echo)


# ----------------------------------------------- unknown and replayed ids


async def _connect_in_background(
    nursery: trio.Nursery, broker: BrokerHandle, target: str
) -> Callable[[], Tunnel | None]:
    box: list[Tunnel] = []

    async def run() -> None:
        box.append(await connect_tunnel(broker, target, via="uds"))

    nursery.start_soon(run)
    return lambda: box[0] if box else None


@pytest.mark.timeout(30)
async def test_unknown_and_replayed_dial_ids(
    stack: BrokerHandle, echo: int, nursery: trio.Nursery
) -> None:
    """A data stream for a dial id the broker never sent, or one already
    paired, is refused with RST_STREAM(CANCEL) and counted."""
    broker = stack
    before = await bad_input(broker, "agent", "unknown_dial_id")
    meter = Meter(broker.proc.pid).start_in(nursery)
    peer = await open_peer(broker)
    await peer.send(frame(HEADERS, END_HEADERS, 3, data_stream_block(987654321)))
    refused = await peer.wait_for(is_rst(3), 5)
    assert refused is not None and refused.error_code == CANCEL

    async with trio.open_nursery() as nursery:
        tunnel = await _connect_in_background(nursery, broker, "evil:80")
        dial = await peer.wait_message(messages.Dial, 5)
        assert dial is not None and dial.addr == "evil:80"
        await peer.send(frame(HEADERS, END_HEADERS, 5, data_stream_block(dial_id_from(dial))))
        accepted = await peer.wait_for(is_status(5), 5)
        assert accepted is not None and accepted.status == "200"
        # The same id again: a replay.
        await peer.send(frame(HEADERS, END_HEADERS, 7, data_stream_block(dial_id_from(dial))))
        replay = await peer.wait_for(is_rst(7), 5)
        assert replay is not None and replay.error_code == CANCEL
        # The paired stream works: payload reaches the client.
        await peer.send(frame(DATA, 0, 5, framing.bin_header(5) + b"hello"))
    client = tunnel()
    assert client is not None and client.status == 200
    with trio.fail_after(5):
        assert await client.receive_some() == b"hello"
    await client.aclose()
    await peer.send(rst_stream(5))
    assert await wait_metric(broker, "agent", "unknown_dial_id", before + 2) >= before + 2
    assert await wait_log(broker, "data stream for unknown dial 987654321 refused (1 so far)")
    await peer.aclose()
    await _serving(broker, echo)
    _bounded(await meter.stop())


# ------------------------------------------------------- flow control


@pytest.mark.timeout(40)
async def test_peer_that_never_opens_its_window(stack: BrokerHandle, echo: int) -> None:
    """An agent that sends no WINDOW_UPDATE: the client feeding its tunnel is
    pushed back (the broker buffers at most a window), other tunnels keep
    flowing, and the client's close still tears the stream down. An agent
    whose INITIAL_WINDOW_SIZE is 0 cannot even take a dial: that dial fails
    at once (502) instead of hanging, and the connection is dropped."""
    broker = stack
    stalls = metric(await broker.metrics(), "tether_stream_window_stalls_total")
    stalled_before = await bad_input(broker, "agent", "control_stream_stalled")
    peer = await open_peer(broker, settings={S_INITIAL_WINDOW_SIZE: 65535})
    async with trio.open_nursery() as nursery:
        tunnel = await _connect_in_background(nursery, broker, "evil:80")
        dial = await peer.wait_message(messages.Dial, 5)
        assert dial is not None
        await peer.send(frame(HEADERS, END_HEADERS, 3, data_stream_block(dial_id_from(dial))))
        assert await peer.wait_for(is_status(3), 5) is not None
    client = tunnel()
    assert client is not None and client.status == 200

    pushed = 0
    chunk = b"x" * 65536
    async with Meter(broker.proc.pid) as meter:
        with trio.move_on_after(3):
            while pushed < 256 * MiB:
                await client.send_all(chunk)
                pushed += len(chunk)
        await _serving(broker, echo)  # other tunnels are not stalled
    await peer.receive(0.5)
    got = sum(len(f.payload) for f in peer.frames if f.kind == DATA and f.sid == 3)
    print(f"never-open window: client pushed {pushed / MiB:.1f} MiB, agent got {got} bytes")
    assert 0 < got <= 65535, got
    assert pushed < 64 * MiB, "the client was never pushed back"
    _bounded(meter)
    assert meter.rss_growth_mib < 16, meter.report("window RSS")

    # The client leaves. The broker cannot see it (it reads the client only
    # as far as the window allows), so the stream stays until the agent acts:
    # here it disconnects, and everything behind it is released.
    await client.aclose()
    await peer.aclose()
    assert await _established(broker) == 0

    zero = await open_peer(
        broker, agent_id="agent-3", identifiers="host=zero", settings={S_INITIAL_WINDOW_SIZE: 0}
    )
    with trio.fail_after(5):
        refused = await connect_tunnel(broker, "zero:80", via="uds")
    assert refused.status == 502, (refused.status, refused.body)
    assert b"agent connection lost" in refused.body
    assert await zero.closed(5)
    assert await wait_log(broker, "control stream unusable")
    assert metric(await broker.metrics(), "tether_stream_window_stalls_total") > stalls
    assert await wait_metric(broker, "agent", "control_stream_stalled", stalled_before + 1) >= (
        stalled_before + 1
    )
    await _serving(broker, echo)


@pytest.mark.timeout(30)
async def test_window_update_overflow(
    stack: BrokerHandle, echo: int, nursery: trio.Nursery
) -> None:
    """WINDOW_UPDATE that takes a window past 2^31-1 is FLOW_CONTROL_ERROR:
    the connection ends (GOAWAY for the connection window; the control stream
    takes the connection with it)."""
    broker = stack
    before = await bad_input(broker, "agent", "h2")
    meter = Meter(broker.proc.pid).start_in(nursery)
    peer = await open_peer(broker)
    await peer.send(window_update(0, 2**31 - 1))
    goaway = await peer.goaway(5)
    assert goaway is not None and goaway.error_code == FLOW_CONTROL_ERROR
    assert await peer.closed(5)

    peer = await open_peer(broker, agent_id="agent-3")
    await peer.send(window_update(1, 2**31 - 1))
    ended = await peer.wait_for(lambda f: f.kind in (RST_STREAM, 7) and f.sid in (0, 1), 5)
    assert ended is not None and ended.error_code == FLOW_CONTROL_ERROR, ended
    assert await peer.closed(5), "control stream gone, connection kept"
    assert await wait_metric(broker, "agent", "h2", before + 1) >= before + 1
    assert await wait_log(broker, "May not increment flow control window past 2147483647")
    assert await wait_log(broker, "control stream violation (error code 3)")
    await _serving(broker, echo)
    _bounded(await meter.stop())


# -------------------------------------------- oversized frames, HPACK bombs


@pytest.mark.timeout(30)
async def test_oversized_frames(stack: BrokerHandle, echo: int, nursery: trio.Nursery) -> None:
    """A frame over MAX_FRAME_SIZE (64 KiB) is FRAME_SIZE_ERROR at once, even
    when only its header arrived: nothing is buffered for the claimed size."""
    broker = stack
    before = await bad_input(broker, "agent", "h2")
    whole = Meter(broker.proc.pid).start_in(nursery)
    peer = await open_peer(broker)
    await peer.send(frame(DATA, 0, 1, b"\x00" * 70_000))
    goaway = await peer.goaway(5)
    assert goaway is not None and goaway.error_code == FRAME_SIZE_ERROR
    assert await peer.closed(5)

    peer = await open_peer(broker, agent_id="agent-3")
    async with Meter(broker.proc.pid) as meter:
        await peer.send(b"\xff\xff\xff" + bytes([DATA, 0]) + struct.pack(">I", 1) + b"x" * 100)
        goaway = await peer.goaway(5)
    assert goaway is not None and goaway.error_code == FRAME_SIZE_ERROR
    assert meter.rss_growth_mib < 8, meter.report("16 MiB frame header")
    assert await wait_metric(broker, "agent", "h2", before + 2) >= before + 2
    assert await wait_log(broker, "Received overlong frame: length 16777215, max 65536")
    await _serving(broker, echo)
    _bounded(await whole.stop())


def _table_bomb(references: int) -> bytes:
    """One 4 KiB header put into the HPACK dynamic table, then referenced
    ``references`` times at one byte each."""
    encoder = hpack.Encoder()
    first = encoder.encode([("x-bomb", "b" * 4000)], huffman=False)  # incremental indexing
    return bytes(first) + bytes([0x80 | 62]) * references


@pytest.mark.timeout(40)
async def test_hpack_bombs_and_continuation_floods(stack: BrokerHandle, echo: int) -> None:
    """Header lists over MAX_HEADER_LIST_SIZE (16 KiB) end the connection
    before anything is allocated for them: a plain oversized header, a
    dynamic-table bomb (4 KiB entry referenced 2,000 times: 8 MB decoded
    from 6 KB on the wire), and an endless CONTINUATION chain."""
    broker = stack
    before = await bad_input(broker, "agent", "h2")
    control = request_headers(session.CONTROL_PATH, [("tether-agent-id", "agent-2")])
    attacks = {
        "big header": frame(
            HEADERS, END_HEADERS, 1, header_block([*control, ("x-big", "a" * 20_000)])
        ),
        "table bomb": frame(HEADERS, END_HEADERS, 1, header_block(control) + _table_bomb(2000)),
        "continuation flood": frame(HEADERS, 0, 1, header_block(control)[:10])
        + frame(CONTINUATION, 0, 1, b"\x00" * 16_000) * 200,
    }
    async with Meter(broker.proc.pid) as meter:
        for name, attack in attacks.items():
            peer = await open_peer(broker, control=False)
            await peer.send(attack)
            goaway = await peer.goaway(5)
            assert goaway is not None, name
            assert goaway.error_code in (PROTOCOL_ERROR, 0x9, ENHANCE_YOUR_CALM), (name, goaway)
            assert await peer.closed(5), name
        await _serving(broker, echo)
    _bounded(meter)
    assert meter.rss_growth_mib < 16, meter.report("HPACK bombs")
    assert await wait_metric(broker, "agent", "h2", before + 3) >= before + 3
    assert await wait_log(broker, "A header list larger than 16384 has been received")
    assert await wait_log(broker, "Too many continuation frames received")
    await _quiet(broker)


# --------------------------------------------------- PING/SETTINGS floods


@pytest.mark.timeout(40)
@ACK_FLOODS
async def test_ping_and_settings_floods(
    stack: BrokerHandle, echo: int, unit: bytes, reason: str
) -> None:
    """Frames the broker must acknowledge, sent by the thousand without
    reading the ACKs: the budget runs out, GOAWAY(ENHANCE_YOUR_CALM)."""
    broker = stack
    before = await bad_input(broker, "agent", reason)
    peer = await open_peer(broker)
    async with Meter(broker.proc.pid) as meter:
        sent = await flood(peer, unit, 50_000)
        goaway = await peer.goaway(5)
        await _serving(broker, echo)
    assert goaway is not None and goaway.error_code == ENHANCE_YOUR_CALM
    acks = sum(1 for f in peer.frames if f.kind == unit[3] and f.flags & 1)
    print(f"{reason}: {sent} sent, {acks} acknowledged before GOAWAY")
    assert acks <= 2000
    assert await peer.closed(5)
    _bounded(meter)
    assert await wait_metric(broker, "agent", reason, before + 1) >= before + 1
    assert await wait_log(broker, f"exceeded its {reason[6:]} budget")
    await _quiet(broker)


@pytest.mark.timeout(40)
async def test_reset_flood_without_reading(stack: BrokerHandle, echo: int) -> None:
    """Frames on a stream the broker refused make h2 answer RST_STREAM each
    time (CVE-2019-9514). A peer that never reads those answers cannot make
    the broker queue more than ``max_unread_replies`` of them."""
    broker = stack
    peer = await open_peer(broker)
    await peer.send(frame(HEADERS, END_HEADERS, 3, data_stream_block(5555555)))
    assert await peer.wait_for(is_rst(3), 5) is not None
    before = await bad_input(broker, "agent", "flood_unread_replies")
    sock = peer.stream.transport_stream.socket  # type: ignore[attr-defined]
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
    async with Meter(broker.proc.pid) as meter:
        with trio.move_on_after(15):
            await flood(peer, frame(DATA, 0, 3) * 2000, 100_000, batch=1)
    print(meter.report("reset flood"))
    assert peer.eof, "the broker kept answering a peer that does not read"
    _bounded(meter)
    assert await wait_metric(broker, "agent", "flood_unread_replies", before + 1) >= before + 1
    await _serving(broker, echo)


# ---------------------------------------------------- oversized messages


@pytest.mark.timeout(30)
async def test_control_message_over_64k(
    stack: BrokerHandle, echo: int, nursery: trio.Nursery
) -> None:
    """A control message over 64 KiB is a connection error: GOAWAY
    (PROTOCOL_ERROR), the connection closed, a metric and a log line."""
    broker = stack
    before = await bad_input(broker, "agent", "too_large")
    meter = Meter(broker.proc.pid).start_in(nursery)
    peer = await open_peer(broker)
    body = msgpack.packb({"t": "identifiers", "value": "h" * 70_000})
    await peer.send(frame(DATA, 0, 1, body[:60_000]) + frame(DATA, 0, 1, body[60_000:]))
    goaway = await peer.goaway(5)
    assert goaway is not None and goaway.error_code == PROTOCOL_ERROR
    assert await peer.closed(5)
    assert await wait_metric(broker, "agent", "too_large", before + 1) >= before + 1
    assert await wait_log(broker, "control message exceeds 65536 bytes")
    await _serving(broker, echo)
    _bounded(await meter.stop())


# ----------------------------------------------------------- stream flood


@pytest.mark.timeout(40)
async def test_stream_flood(stack: BrokerHandle, echo: int) -> None:
    """Twelve thousand requests that never end, past MAX_CONCURRENT_STREAMS
    (10,000): none stays open at the broker (unknown paths get 404 and a
    reset, unknown dial ids a reset), so none piles up, and the reset budget
    ends the connection."""
    broker = stack
    peer = await open_peer(broker)
    other = header_block(request_headers("/not/a/path"))
    unknown = data_stream_block(77)
    async with Meter(broker.proc.pid) as meter:
        burst = b"".join(
            frame(HEADERS, END_HEADERS, sid, other if sid % 4 == 1 else unknown)
            for sid in range(3, 3 + 2 * 12_000, 2)
        )
        await peer.send(burst)
        goaway = await peer.goaway(10)
        await _serving(broker, echo)
    assert goaway is not None and goaway.error_code == ENHANCE_YOUR_CALM
    _bounded(meter)
    assert meter.rss_growth_mib < 32, meter.report("stream flood")
    assert await peer.closed(5)
    await _quiet(broker)


# ------------------------------------------------------- garbage answers


GARBAGE: dict[str, bytes] = {
    "not msgpack": b"\xc1garbage",
    "2 GiB bin": b"\xc6\x80\x00\x00\x00" + b"x" * 10,
    "not a close map": msgpack.packb({"t": "dial", "id": 1}),
    "bad close code": msgpack.packb({"t": "close", "code": "boom", "msg": ""}),
    "data after close": msgpack.packb({"t": "close", "code": "reset", "msg": ""})
    + framing.bin_header(1)
    + b"x",
}


@pytest.mark.timeout(60)
async def test_agent_that_answers_every_dial_with_garbage(
    stack: BrokerHandle, echo: int, nursery: trio.Nursery
) -> None:
    """A valid agent whose data streams carry malformed bodies: each stream
    is reset (PROTOCOL_ERROR), its client is closed, the agent's other
    streams and every other agent keep working, and each one is counted."""
    broker = stack
    before = await bad_input(broker, "agent", "bad_data_stream")
    meter = Meter(broker.proc.pid).start_in(nursery)
    peer = await open_peer(broker)
    sid = 3
    cases = [*GARBAGE.items(), ("truncated at END_STREAM", b"\xc5\x01")]
    for name, body in cases:
        async with trio.open_nursery() as nursery:
            tunnel = await _connect_in_background(nursery, broker, "evil:80")
            dial = await peer.wait_message(messages.Dial, 5)
            assert dial is not None, name
            await peer.send(frame(HEADERS, END_HEADERS, sid, data_stream_block(dial_id_from(dial))))
            assert await peer.wait_for(is_status(sid), 5) is not None, name
        client = tunnel()
        assert client is not None and client.status == 200, name
        flags = END_STREAM if name.startswith("truncated") else 0
        await peer.send(frame(DATA, flags, sid, body))
        reset = await peer.wait_for(is_rst(sid), 5)
        assert reset is not None and reset.error_code == PROTOCOL_ERROR, name
        with trio.fail_after(5):
            leftover = await _read_until_closed(client)  # EOF or reset: the client is let go
        assert leftover == b"", name
        await client.aclose()
        sid += 2
    assert not peer.eof, "one bad stream must not cost the agent its connection"
    assert await wait_metric(broker, "agent", "bad_data_stream", before + len(cases)) >= (
        before + len(cases)
    )
    assert await wait_log(broker, "data stream 3 reset: data stream object must be bin or map")
    await peer.aclose()
    await _serving(broker, echo)
    _bounded(await meter.stop())


async def _read_until_closed(client: Tunnel) -> bytes:
    got = b""
    try:
        while chunk := await client.receive_some():
            got += chunk
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    return got
