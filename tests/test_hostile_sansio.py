"""The hostile-peer defences at unit level: flood budgets and the frame size
guard on ``TunnelSession`` (a fake clock, no sockets), and the TLS stream's
behaviour when both ends send without reading (real sockets).

The end-to-end versions against the broker process are in
``test_hostile_agent_port.py`` and ``test_hostile_frontends.py``.
"""

from __future__ import annotations

import ssl
import struct

import h2.config
import h2.connection
import h2.errors
import h2.events
import msgpack
import pytest
import trio
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import events as E
from protocol import messages, session
from protocol.codes import DialFailCode
from protocol.errors import ProtocolError, RemoteProtocolError
from protocol.flood import (
    MAX_IDENTIFIER_ENTRIES,
    Budget,
    ControlBudget,
    ControlGuard,
    ControlLimits,
    FloodDetected,
    FloodGuard,
    FloodLimits,
    FrameSizeGuard,
    FrameTooLarge,
)
from tether.netio.tls_stream import TLSStream

GOAWAY = 7


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _broker(clock: Clock, limits: FloodLimits | None = None) -> session.TunnelSession:
    config = session.SessionConfig(flood=limits or FloodLimits())
    sess = session.TunnelSession(session.Role.BROKER, config, clock=clock)
    sess.initiate()
    sess.data_to_send()
    return sess


def _agent() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    return conn


def _control(agent: h2.connection.H2Connection) -> None:
    agent.send_headers(
        1,
        [
            (":method", "POST"),
            (":scheme", "https"),
            (":authority", "b"),
            (":path", session.CONTROL_PATH),
            ("content-type", session.CONTENT_TYPE),
            ("tether-agent-id", "a"),
        ],
    )


def _frames(data: bytes) -> list[tuple[int, int, bytes]]:
    out, pos = [], 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        out.append(
            (
                data[pos + 3],
                int.from_bytes(data[pos + 5 : pos + 9], "big"),
                data[pos + 9 : pos + 9 + length],
            )
        )
        pos += 9 + length
    return out


def _accepted(
    clock: Clock, limits: FloodLimits | None = None
) -> tuple[session.TunnelSession, h2.connection.H2Connection]:
    sess, agent = _broker(clock, limits), _agent()
    _control(agent)
    events = sess.receive_data(agent.data_to_send())
    assert any(isinstance(e, E.ControlRequested) for e in events)
    sess.accept_control({})
    agent.receive_data(sess.data_to_send())
    return sess, agent


def _goaway_code(sess: session.TunnelSession) -> int:
    goaways = [p for kind, _, p in _frames(sess.data_to_send()) if kind == GOAWAY]
    assert goaways, "no GOAWAY queued"
    return int(struct.unpack(">I", goaways[-1][4:8])[0])


# ----------------------------------------------------------------- budgets


def test_budget_refills_with_time() -> None:
    guard = FloodGuard(FloodLimits(pings=Budget(rate=10, burst=5)), now=0.0)
    assert all(guard.spend("pings", 0.0) for _ in range(5))
    assert not guard.spend("pings", 0.0)
    guard = FloodGuard(FloodLimits(pings=Budget(rate=10, burst=5)), now=0.0)
    # Ten per second for a minute, at the rate: never over budget.
    assert all(guard.spend("pings", t / 10) for t in range(600))
    guard.check()


@pytest.mark.parametrize("kind", ["resets", "pings", "settings"])
def test_legitimate_rates_never_trip(kind: str) -> None:
    limits = FloodLimits()
    budget: Budget = getattr(limits, kind)
    guard = FloodGuard(limits, now=0.0)
    steps = int(budget.rate * 30)
    for i in range(steps):  # 30 s at 90 % of the rate
        guard.spend(kind, i / (budget.rate * 0.9))
    guard.check()


def test_rapid_reset_gets_enhance_your_calm() -> None:
    clock = Clock()
    sess, agent = _accepted(clock, FloodLimits(resets=Budget(rate=10, burst=100)))
    wire = b""
    for sid in range(3, 3 + 2 * 200, 2):
        agent.send_headers(
            sid,
            [
                (":method", "POST"),
                (":scheme", "https"),
                (":authority", "b"),
                (":path", session.STREAM_PATH),
                ("content-type", session.CONTENT_TYPE),
                (session.DIAL_ID_HEADER, "9"),
            ],
        )
        agent.reset_stream(sid)
        wire += agent.data_to_send()
    fed = 0
    with pytest.raises(FloodDetected) as info:
        sess.receive_data(wire)
        while sess.backlog:  # as TunnelConnection drains a burst
            fed += 1
            sess.receive_data(b"")
    assert info.value.reason == "flood_resets"
    assert _goaway_code(sess) == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    # The burst was taken 64 streams at a time; the budget ran out on the way.
    assert 1 <= fed < 200 // 64


def test_a_burst_of_streams_is_taken_in_parts() -> None:
    """h2 counts open streams in O(n) per new stream: 12,000 HEADERS in one
    read cost 12 s. The session feeds h2 64 at a time, and the owner refuses
    each part's streams before the next part opens more."""
    clock = Clock()
    sess, agent = _accepted(clock, FloodLimits(resets=Budget(rate=1e9, burst=1e9)))
    for sid in range(3, 3 + 2 * 1000, 2):
        agent.send_headers(
            sid,
            [
                (":method", "POST"),
                (":scheme", "https"),
                (":authority", "b"),
                (":path", session.STREAM_PATH),
                ("content-type", session.CONTENT_TYPE),
                (session.DIAL_ID_HEADER, str(sid)),
            ],
        )
    events = sess.receive_data(agent.data_to_send())
    parts, requested = 1, []
    while True:
        for ev in events:
            if isinstance(ev, E.DataStreamRequested):
                requested.append(ev.dial_id)
                sess.reset_stream(ev.stream_id)
        if not sess.backlog:
            break
        events = sess.receive_data(b"")
        parts += 1
    assert requested == list(range(3, 3 + 2 * 1000, 2))
    assert parts == -(-1000 // 64)


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"pingpong", "flood_pings"),
        (b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", "flood_settings"),
    ],
    ids=["ping", "settings"],
)
def test_ping_and_settings_floods_get_only_a_goaway(frame: bytes, reason: str) -> None:
    clock = Clock()
    sess, _ = _accepted(clock)
    with pytest.raises(FloodDetected) as info:
        sess.receive_data(frame * 5000)
    assert info.value.reason == reason
    frames = _frames(sess.data_to_send())
    # None of the flood is answered: no ACK, just the GOAWAY.
    assert [kind for kind, _, _ in frames] == [GOAWAY]
    assert struct.unpack(">I", frames[0][2][4:8])[0] == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


def test_pings_at_a_steady_rate_are_answered() -> None:
    clock = Clock()
    sess, _ = _accepted(clock)
    ping = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"pingpong"
    for _ in range(300):  # 100 a second for 3 s: keepalive and BDP probes
        clock.now += 0.01
        sess.receive_data(ping)
        sess.data_to_send()


def test_unread_replies_are_bounded() -> None:
    """Frames on a refused stream make h2 answer RST_STREAM each time; with
    nothing flushed (the peer does not read), the session gives up."""
    clock = Clock()
    limits = FloodLimits(max_unread_replies=64 * 1024)
    sess, agent = _accepted(clock, limits)
    agent.send_headers(
        3,
        [
            (":method", "POST"),
            (":scheme", "https"),
            (":authority", "b"),
            (":path", session.STREAM_PATH),
            ("content-type", session.CONTENT_TYPE),
            (session.DIAL_ID_HEADER, "9"),
        ],
    )
    events = sess.receive_data(agent.data_to_send())
    sess.reset_stream(3)  # unknown dial id: refused, as the broker does
    assert any(isinstance(e, E.DataStreamRequested) for e in events)
    empty_data = b"\x00\x00\x00\x00\x00\x00\x00\x00\x03"
    with pytest.raises(FloodDetected) as info:
        for _ in range(100):
            sess.receive_data(empty_data * 1000)  # never flushed
    assert info.value.reason == "flood_unread_replies"


# ------------------------------------------------- control-message budgets


def _opened(
    clock: Clock, limits: FloodLimits | None = None
) -> tuple[session.TunnelSession, h2.connection.H2Connection]:
    """Like :func:`_accepted`, with the broker's settings and window
    updates delivered, so the agent may send megabytes of control messages."""
    config = session.SessionConfig(flood=limits or FloodLimits())
    sess = session.TunnelSession(session.Role.BROKER, config, clock=clock)
    sess.initiate()
    agent = _agent()
    agent.receive_data(sess.data_to_send())
    _control(agent)
    events = sess.receive_data(agent.data_to_send())
    assert any(isinstance(e, E.ControlRequested) for e in events)
    sess.accept_control({})
    _roundtrip(sess, agent, b"")
    return sess, agent


def _roundtrip(
    sess: session.TunnelSession, agent: h2.connection.H2Connection, wire: bytes
) -> list[E.Event]:
    """Feed the broker; hand its answer (credit, dials) back to the agent."""
    events = sess.receive_data(wire)
    for ev in agent.receive_data(sess.data_to_send()):
        if isinstance(ev, h2.events.DataReceived):
            agent.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
    return events


def _send(
    sess: session.TunnelSession, agent: h2.connection.H2Connection, *msgs: object
) -> list[messages.Message]:
    """Control messages from the agent (encoded, or already msgpack bytes),
    16 KB at a time; returns the messages the broker handed out."""
    body = b"".join(
        m if isinstance(m, bytes) else messages.encode(m)  # type: ignore[arg-type]
        for m in msgs
    )
    out: list[messages.Message] = []
    for i in range(0, len(body), 16 * 1024):
        agent.send_data(1, body[i : i + 16 * 1024])
        events = _roundtrip(sess, agent, agent.data_to_send())
        out += [e.message for e in events if isinstance(e, E.MessageReceived)]
    return out


#: One message of each budgeted kind, as large as its budget allows.
_LARGEST = {
    "identifiers": messages.Identifiers(
        "&".join(f"cidr=10.0.{i}.0/24" for i in range(MAX_IDENTIFIER_ENTRIES))
    ),
    "drain": messages.Drain(),
    "dial_fail": messages.DialFail(
        id=12345, code=DialFailCode.REFUSED, msg="\U0001f600" * messages.MAX_TEXT_LEN
    ),
    "other": msgpack.packb({"t": "tether.future", "pad": "x" * 1000}),
}


@pytest.mark.parametrize("kind", ControlGuard.TYPES)
def test_legitimate_control_rates_never_trip(kind: str) -> None:
    """30 s at 90 % of each control budget's refill rate, after its whole
    burst at once, each message as large as allowed: handed out, no flood."""
    budget: ControlBudget = getattr(FloodLimits().control, kind)
    clock = Clock()
    sess, agent = _opened(clock)
    msg = _LARGEST[kind]
    known = kind != "other"  # unknown types are dropped once budgeted
    burst = int(budget.burst)
    assert len(_send(sess, agent, *[msg] * burst)) == burst * known
    steps = int(budget.rate * 30)
    for _ in range(steps):
        clock.now += 1 / (budget.rate * 0.9)
        assert len(_send(sess, agent, msg)) == known


@pytest.mark.parametrize("kind", ControlGuard.TYPES)
def test_control_flood_gets_enhance_your_calm(kind: str) -> None:
    clock = Clock()
    sess, agent = _opened(clock)
    budget: ControlBudget = getattr(FloodLimits().control, kind)
    with pytest.raises(FloodDetected) as info:
        _send(sess, agent, *[_LARGEST[kind]] * (int(budget.burst) + 1))
    assert info.value.reason == f"flood_control_{kind}"
    assert _goaway_code(sess) == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


def test_dial_answers_are_budgeted_by_the_dials_sent() -> None:
    """The broker sent 4,000 dials in one second: 4,000 dial_fail answers
    are fine (far above the unsolicited budget); one more is unsolicited,
    and a burst of unsolicited ones is a flood."""
    clock = Clock()
    sess, agent = _opened(clock)
    for i in range(4000):
        sess.send_message(messages.Dial(id=i, addr="10.0.0.1:80", timeout_ms=1000))
        if i % 500 == 499:  # the agent reads them, then returns the credit
            _roundtrip(sess, agent, b"")
            _roundtrip(sess, agent, agent.data_to_send())
    answers = [messages.DialFail(id=i, code=DialFailCode.TIMEOUT) for i in range(4000)]
    for i in range(0, 4000, 250):
        assert len(_send(sess, agent, *answers[i : i + 250])) == 250
    # Each dial is answered once: the same answers again are unsolicited.
    burst = int(FloodLimits().control.dial_fail.burst)
    with pytest.raises(FloodDetected) as info:
        _send(sess, agent, *answers[: burst + 1])
    assert info.value.reason == "flood_control_dial_fail"


def test_a_data_stream_answers_its_dial() -> None:
    """A dial answered by a data stream is no longer owed a dial_fail."""
    clock = Clock()
    limits = FloodLimits(control=ControlLimits(dial_fail=ControlBudget(1, 1, 1024)))
    sess, agent = _opened(clock, limits)
    sess.send_message(messages.Dial(id=7, addr="10.0.0.1:80", timeout_ms=1000))
    sess.send_message(messages.Dial(id=8, addr="10.0.0.1:80", timeout_ms=1000))
    _roundtrip(sess, agent, b"")
    agent.send_headers(
        3,
        [
            (":method", "POST"),
            (":scheme", "https"),
            (":authority", "b"),
            (":path", session.STREAM_PATH),
            ("content-type", session.CONTENT_TYPE),
            (session.DIAL_ID_HEADER, "7"),
        ],
    )
    _roundtrip(sess, agent, agent.data_to_send())
    fail_8 = messages.DialFail(id=8, code=DialFailCode.REFUSED)
    fail_7 = messages.DialFail(id=7, code=DialFailCode.REFUSED)
    assert _send(sess, agent, fail_8) == [fail_8]
    assert _send(sess, agent, fail_7) == [fail_7]  # burst 1
    with pytest.raises(FloodDetected):
        _send(sess, agent, fail_7)


def test_remembered_dials_are_bounded() -> None:
    guard = ControlGuard(FloodGuard(FloodLimits(control=ControlLimits(remembered_dials=10)), 0.0))
    for i in range(1000):
        guard.dial_sent(i)
    assert guard.open_dials == 10
    assert guard.dial_answered(999) and not guard.dial_answered(0)


@pytest.mark.parametrize(
    ("msg", "reason"),
    [
        (
            messages.Identifiers(
                "&".join(f"ipv4=10.0.0.{i}" for i in range(MAX_IDENTIFIER_ENTRIES + 1))
            ),
            "flood_control_identifiers_entries",
        ),
        # Within the 4,096-character field limit, but not 4 KiB of ASCII.
        (messages.Identifiers("host=" + "\u00e9" * 3000), "flood_control_identifiers_size"),
        (msgpack.packb({"t": "drain", "pad": "x" * 1000}), "flood_control_drain_size"),
        (msgpack.packb({"t": "tether.future", "pad": b"x" * 60000}), "flood_control_other_size"),
    ],
    ids=["entries", "identifiers-size", "drain-size", "other-size"],
)
def test_oversized_control_messages_get_enhance_your_calm(msg: object, reason: str) -> None:
    """One message over its type's size (or entry) cap is enough."""
    clock = Clock()
    sess, agent = _opened(clock)
    with pytest.raises(FloodDetected) as info:
        _send(sess, agent, msg)
    assert info.value.reason == reason
    assert _goaway_code(sess) == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


def test_the_agent_side_does_not_budget_the_broker() -> None:
    """Dials from the broker come at the rate of the clients: the agent's
    session hands out every message (the broker is the party protected)."""
    clock = Clock()
    agent = session.TunnelSession(session.Role.AGENT, clock=clock)
    broker = session.TunnelSession(session.Role.BROKER, clock=clock)
    agent.initiate()
    broker.initiate()
    agent.open_control({"tether-agent-id": "a"}, "b")
    broker.receive_data(agent.data_to_send())
    broker.accept_control({})
    agent.receive_data(broker.data_to_send())
    for i in range(1000):
        broker.send_message(messages.Dial(id=i, addr="10.0.0.1:80", timeout_ms=1000))
        broker.send_message(messages.Drain(retry_ms=1000))  # 1,000 drains: over any budget
    events = agent.receive_data(broker.data_to_send())
    assert len([e for e in events if isinstance(e, E.MessageReceived)]) == 2000


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 10**6), st.floats(0, 0.01)), max_size=3000))
def test_answers_to_sent_dials_never_trip(steps: list[tuple[bool, int, float]]) -> None:
    """Any interleaving of dials sent and their answers (each dial answered
    at most once, by a dial_fail or a data stream, at any time) is admitted,
    however fast: only unsolicited answers spend tokens."""
    guard = ControlGuard(FloodGuard(FloodLimits(), 0.0))
    owed: list[int] = []
    now, next_id = 0.0, 0
    for send, pick, dt in steps:
        now += dt
        if send or not owed:
            guard.dial_sent(next_id)
            owed.append(next_id)
            next_id += 1
            continue
        dial_id = owed.pop(pick % len(owed))
        if pick % 3 == 0:
            assert guard.dial_answered(dial_id)  # a data stream
        else:
            answer = messages.DialFail(id=dial_id, code=DialFailCode.REFUSED, msg="x" * 100)
            assert guard.admit(answer, len(messages.encode(answer)), now)
    assert guard.flood.exhausted is None


# ------------------------------------------------------------- frame sizes


def test_oversized_frame_refused_at_its_header() -> None:
    clock = Clock()
    sess, _ = _accepted(clock)
    header = b"\xff\xff\xff\x00\x00\x00\x00\x00\x01"  # DATA, 16 MiB, stream 1
    with pytest.raises(RemoteProtocolError) as info:
        sess.receive_data(header + b"x" * 10)
    assert "overlong frame" in str(info.value)
    assert _goaway_code(sess) == h2.errors.ErrorCodes.FRAME_SIZE_ERROR


def test_frame_size_guard_follows_frame_boundaries_in_any_chunking() -> None:
    frames = b"".join(
        len(p).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01" + p
        for p in (b"a" * 100, b"", b"b" * 65536, b"c")
    )
    data = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frames
    for size in (1, 7, 9, 1000):
        guard = FrameSizeGuard(65536, preface=24)
        for i in range(0, len(data), size):
            guard.check(data[i : i + size])
    guard = FrameSizeGuard(65536, preface=24)
    with pytest.raises(FrameTooLarge):
        guard.check(data + (65537).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01")


def test_control_stream_window_overflow_is_a_protocol_error() -> None:
    clock = Clock()
    sess, _ = _accepted(clock)
    overflow = b"\x00\x00\x04\x08\x00\x00\x00\x00\x01" + struct.pack(">I", 2**31 - 1)
    with pytest.raises(ProtocolError):
        sess.receive_data(overflow)


# -------------------------------------------------------------- TLS stream


async def tls_pair() -> tuple[TLSStream, TLSStream]:
    """A server and a client TLSStream over a socketpair, handshakes done."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    a, b = trio.socket.socketpair()
    server = TLSStream(trio.SocketStream(a), server_ctx, server_side=True)
    client = TLSStream(
        trio.SocketStream(b), client_ctx, server_side=False, server_hostname="localhost"
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)
    return server, client


@pytest.mark.timeout(30)
async def test_tls_stream_both_ends_sending_without_deadlock() -> None:
    """Both ends send 32 MiB at once while reading. The reader used to wait
    for the send lock to flush, so with both senders blocked on full socket
    buffers neither end read again: a deadlock."""
    server, client = await tls_pair()
    total, chunk = 32 * 1024 * 1024, b"x" * (256 * 1024)

    async def send(stream: TLSStream) -> None:
        for _ in range(total // len(chunk)):
            await stream.send_all(chunk)

    async def receive(stream: TLSStream) -> None:
        got = 0
        while got < total:
            got += len(await stream.receive_some(256 * 1024))

    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            for stream in (server, client):
                nursery.start_soon(send, stream)
                nursery.start_soon(receive, stream)
    await server.aclose()
    await client.aclose()


@pytest.mark.timeout(30)
async def test_tls_stream_closed_forcefully_closes_its_socket() -> None:
    """aclose_forcefully (a cancelled aclose) on a healthy TLS stream still
    closes the socket underneath: a sender blocked in a shielded write on a
    peer that stopped reading (write-through) is woken by that close, and
    the socket is not left open."""
    server, client = await tls_pair()
    assert isinstance(client.transport, trio.SocketStream)
    sock = client.transport.socket
    blocked: list[BaseException] = []

    async def stuck_sender() -> None:
        # The peer never reads: this fills the socket buffers and blocks.
        with trio.CancelScope(shield=True):
            try:
                while True:
                    await client.send_all(b"x" * (256 * 1024))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                blocked.append(exc)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stuck_sender)
            await trio.sleep(0.2)
            await trio.aclose_forcefully(client)
    assert blocked, "the blocked sender was not woken"
    assert sock.fileno() == -1  # the socket itself is closed
    await server.aclose()
