"""TunnelSession: two in-memory sessions (agent and broker) wired back to back.

Nothing is mocked: bytes produced by one session's ``data_to_send()`` are fed to
the other's ``receive_data()`` until both are quiescent. Misbehaving peers are
built from the real h2 connection underneath (``sess._h2``) or from a bare h2
client, so that the broker sees exactly the bytes a hostile agent could send.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Iterator
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
from hyperframe.frame import DataFrame, Frame
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import session as S
from protocol.codes import CloseCode, DialFailCode
from protocol.errors import (
    LocalProtocolError,
    MalformedMessage,
    MessageTooLarge,
    ProtocolError,
    RemoteProtocolError,
)
from protocol.events import (
    ConnectionClosed,
    ControlAccepted,
    ControlRejected,
    ControlRequested,
    DataStreamAccepted,
    DataStreamRequested,
    Event,
    MessageReceived,
    PingAcked,
    StreamClosed,
    StreamData,
    StreamEnded,
    StreamReset,
    WindowOpened,
)
from protocol.flood import FloodDetected
from protocol.framing import bin_header
from protocol.messages import Cancel, Close, Dial, DialFail, Drain, Identifiers, encode
from protocol.session import Role, SessionConfig, TunnelSession

AUTHORITY = "broker.example:8443"
CANCEL = h2.errors.ErrorCodes.CANCEL
PROTOCOL_ERROR = h2.errors.ErrorCodes.PROTOCOL_ERROR
SMALL = SessionConfig(stream_window=64 * 1024, connection_window=128 * 1024)
AGENT_HEADERS = {
    "tether-agent-id": "agent-1",
    "tether-cluster": "edge-a",
    "tether-agent-identifiers": "host=n1&ipv4=10.0.0.5&default-route=true",
    "authorization": "Bearer s3cr3t",
}


# ------------------------------------------------------------------ harness


class Link:
    """An agent session and a broker session, connected in memory."""

    def __init__(
        self, config: SessionConfig | None = None, broker_config: SessionConfig | None = None
    ) -> None:
        self.agent = TunnelSession(Role.AGENT, config, clock=time.monotonic)
        self.broker = TunnelSession(Role.BROKER, broker_config or config, clock=time.monotonic)
        self.events: dict[TunnelSession, list[Event]] = {self.agent: [], self.broker: []}
        self.wire: dict[TunnelSession, list[bytes]] = {self.agent: [], self.broker: []}
        self.agent.initiate()
        self.broker.initiate()
        self.pump()

    def peer(self, sess: TunnelSession) -> TunnelSession:
        return self.broker if sess is self.agent else self.agent

    def pump(self, max_rounds: int = 10_000) -> None:
        """Shuttle bytes both ways until neither side has anything to send."""
        for _ in range(max_rounds):
            moved = False
            for src in (self.agent, self.broker):
                data = src.data_to_send()
                if data:
                    moved = True
                    self.wire[src].append(data)
                    dst = self.peer(src)
                    self.events[dst].extend(dst.receive_data(data))
            if not moved:
                return
        raise AssertionError("sessions never went quiet")

    def take(self, sess: TunnelSession, kind: type[Any] | None = None) -> list[Any]:
        """Remove and return ``sess``'s events (of one kind), keeping the others."""
        evs = self.events[sess]
        got = [e for e in evs if kind is None or isinstance(e, kind)]
        self.events[sess] = [e for e in evs if not (kind is None or isinstance(e, kind))]
        return got

    def interesting(self, sess: TunnelSession) -> list[Any]:
        return [e for e in self.events[sess] if not isinstance(e, WindowOpened)]

    def handshake(self, headers: dict[str, str] | None = None) -> None:
        self.agent.open_control(dict(AGENT_HEADERS if headers is None else headers), AUTHORITY)
        self.pump()
        (req,) = self.take(self.broker, ControlRequested)
        assert req.headers[":path"] == S.CONTROL_PATH
        self.broker.accept_control({"tether-server-id": "b-1", "tether-server-count": "2"})
        self.pump()
        (acc,) = self.take(self.agent, ControlAccepted)
        assert acc.headers["tether-server-id"] == "b-1"
        self.take(self.agent, WindowOpened)
        self.take(self.broker, WindowOpened)

    def open_stream(self, dial_id: int) -> int:
        sid = self.agent.open_data_stream(dial_id, AUTHORITY)
        self.pump()
        (req,) = self.take(self.broker, DataStreamRequested)
        assert req == DataStreamRequested(sid, dial_id)
        self.broker.accept_data_stream(sid)
        self.pump()
        assert self.take(self.agent, DataStreamAccepted) == [DataStreamAccepted(sid)]
        return sid

    def received(self, sess: TunnelSession, sid: int) -> list[StreamData]:
        return [e for e in self.events[sess] if isinstance(e, StreamData) and e.stream_id == sid]

    def send(self, src: TunnelSession, sid: int, data: bytes) -> int:
        """Send as much of ``data`` as the windows allow, pumping in between.

        Returns how many bytes went. The receiver acknowledges nothing here.
        """
        sent = 0
        while sent < len(data):
            n = src.send_data(sid, memoryview(data)[sent:])
            if n == 0:
                self.pump()
                n = src.send_data(sid, memoryview(data)[sent:])
                if n == 0:
                    break
            sent += n
        self.pump()
        return sent

    def transfer(self, src: TunnelSession, sid: int, data: bytes) -> bytes:
        """Send all of ``data``; the receiver acknowledges everything it gets."""
        dst = self.peer(src)
        got = bytearray()
        sent = 0
        for _ in range(100_000):
            for ev in self.take(dst, StreamData):
                assert ev.stream_id == sid
                got += ev.data
                dst.acknowledge(sid, ev.flow_len)
            if sent == len(data):
                self.pump()
                if not any(isinstance(e, StreamData) for e in self.events[dst]):
                    return bytes(got)
                continue
            n = src.send_data(sid, memoryview(data)[sent:])
            sent += n
            self.pump()
        raise AssertionError("transfer made no progress")


def stream_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def unacked_flow(evs: list[StreamData]) -> int:
    return sum(e.flow_len for e in evs)


@pytest.fixture
def link() -> Link:
    lk = Link()
    lk.handshake()
    return lk


@pytest.fixture
def small() -> Link:
    lk = Link(SMALL)
    lk.handshake()
    return lk


def raw_send(sess: TunnelSession, stream_id: int, data: bytes, end: bool = False) -> None:
    """Put bytes on a stream through h2 directly, bypassing the session's framing."""
    size = sess._h2.max_outbound_frame_size
    for i in range(0, len(data), size):
        sess._h2.send_data(stream_id, data[i : i + size])
    if end:
        sess._h2.end_stream(stream_id)


def data_frames(chunks: list[bytes]) -> Iterator[Frame]:
    """Parse the raw frames out of a captured byte stream (after the preface)."""
    buf = b"".join(chunks)
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    if buf.startswith(preface):
        buf = buf[len(preface) :]
    while buf:
        frame, length = Frame.parse_frame_header(memoryview(buf[:9]))
        frame.parse_body(memoryview(buf[9 : 9 + length]))
        yield frame
        buf = buf[9 + length :]


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stream_window": 64 * 1024 - 1},
        {"stream_window": 2**31},
        {"stream_window": 2 * 1024 * 1024, "connection_window": 1024 * 1024},
        {"connection_window": 2**31},
        {"max_frame_size": 16 * 1024 - 1},
        {"max_frame_size": 2**24},
    ],
)
def test_config_validation(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        SessionConfig(**kwargs)


# ------------------------------------------------------------------ control stream


def test_control_handshake() -> None:
    lk = Link()
    lk.agent.open_control(AGENT_HEADERS, AUTHORITY)
    lk.pump()
    (req,) = lk.take(lk.broker, ControlRequested)
    for name, value in AGENT_HEADERS.items():
        assert req.headers[name] == value
    assert req.headers[":method"] == "POST"
    assert req.headers[":path"] == "/tether.v1/connect"
    assert req.headers[":authority"] == AUTHORITY
    assert req.headers["content-type"] == "application/msgpack"
    assert not lk.broker.control_open and not lk.agent.control_open
    lk.broker.accept_control({"tether-server-id": "broker-7", "tether-server-count": "3"})
    lk.pump()
    (acc,) = lk.take(lk.agent, ControlAccepted)
    assert acc.headers[":status"] == "200"
    assert acc.headers["tether-server-id"] == "broker-7"
    assert acc.headers["tether-server-count"] == "3"
    assert lk.agent.control_open and lk.broker.control_open
    assert lk.interesting(lk.agent) == [] and lk.interesting(lk.broker) == []


def test_control_roles_are_enforced(link: Link) -> None:
    with pytest.raises(LocalProtocolError):
        link.broker.open_control({}, AUTHORITY)
    with pytest.raises(LocalProtocolError):
        link.agent.accept_control({})
    with pytest.raises(LocalProtocolError):
        link.broker.open_data_stream(1, AUTHORITY)
    with pytest.raises(LocalProtocolError):
        link.agent.open_control({}, AUTHORITY)  # already open


def test_broker_cannot_send_before_accepting() -> None:
    lk = Link()
    with pytest.raises(LocalProtocolError):
        lk.broker.send_message(Cancel(1))
    lk.agent.open_control({}, AUTHORITY)
    lk.pump()
    with pytest.raises(LocalProtocolError):
        lk.broker.send_message(Cancel(1))


@pytest.mark.parametrize("status", [401, 403, 409, 426])
def test_reject_control(status: int) -> None:
    lk = Link()
    lk.agent.open_control(AGENT_HEADERS, AUTHORITY)
    lk.pump()
    lk.broker.reject_control(status, f"no entry {status}")
    assert lk.broker.closed
    lk.pump()
    assert lk.take(lk.agent, ControlRejected) == [ControlRejected(status, "", f"no entry {status}")]
    assert lk.agent.closed and not lk.agent.control_open


def test_control_messages_both_ways(link: Link) -> None:
    to_agent = [
        Dial(id=1, addr="10.0.0.9:22", timeout_ms=5000),
        Dial(id=2**64 - 1, addr="[fd00::9]:443", timeout_ms=1, early=b"\x16\x03\x01" * 100),
        Cancel(1),
        Drain(retry_ms=15_000),
    ]
    to_broker = [
        DialFail(1, DialFailCode.REFUSED, "connection refused"),
        Identifiers("host=n1&ipv4=10.0.0.6"),
        Drain(),
    ]
    for m in to_agent:
        link.broker.send_message(m)
    for m in to_broker:
        link.agent.send_message(m)
    link.pump()
    assert [e.message for e in link.take(link.agent, MessageReceived)] == to_agent
    assert [e.message for e in link.take(link.broker, MessageReceived)] == to_broker
    assert link.interesting(link.agent) == [] and link.interesting(link.broker) == []


def test_many_control_messages_keep_the_control_window_open(small: Link) -> None:
    """Control credit is returned on receipt: far more than a window's worth flows."""
    total = 0
    sent = [Identifiers(f"host=n{i}&" + "x=" * 50) for i in range(3000)]
    for i, msg in enumerate(sent):
        small.broker.send_message(msg)
        total += len(encode(msg))
        if i % 100 == 0:
            small.pump()
    small.pump()
    assert total > 4 * SMALL.stream_window
    assert [e.message for e in small.take(small.agent, MessageReceived)] == sent


def test_control_window_exhausted_raises_remote_error(small: Link) -> None:
    """A peer that stops reading the control stream makes send_message refuse."""
    with pytest.raises(RemoteProtocolError):
        for i in range(100_000):
            small.broker.send_message(Identifiers("x" * 1000 + str(i)))
    small.pump()  # the agent reads it all and returns the credit
    small.broker.send_message(Cancel(1))
    small.pump()
    assert small.take(small.agent, MessageReceived)[-1].message == Cancel(1)


# ------------------------------------------------------------------ data streams


def test_data_stream_pairing_by_dial_id(link: Link) -> None:
    sids = {dial_id: link.agent.open_data_stream(dial_id, AUTHORITY) for dial_id in (5, 9, 2**63)}
    link.pump()
    reqs = link.take(link.broker, DataStreamRequested)
    assert {(r.stream_id, r.dial_id) for r in reqs} == {(s, d) for d, s in sids.items()}
    link.broker.accept_data_stream(sids[9])
    link.pump()
    assert link.take(link.agent, DataStreamAccepted) == [DataStreamAccepted(sids[9])]
    for d in (5, 2**63):
        link.broker.accept_data_stream(sids[d])
    link.pump()
    assert {e.stream_id for e in link.take(link.agent, DataStreamAccepted)} == {
        sids[5],
        sids[2**63],
    }
    assert link.agent.open_data_streams == 3 and link.broker.open_data_streams == 3


def test_broker_refuses_unknown_dial_id(link: Link) -> None:
    sid = link.agent.open_data_stream(404, AUTHORITY)
    link.pump()
    (req,) = link.take(link.broker, DataStreamRequested)
    link.broker.reset_stream(req.stream_id)  # default CANCEL: unknown or stale id
    link.pump()
    assert link.interesting(link.agent) == [StreamReset(sid, CANCEL, remote=True)]
    assert link.agent.open_data_streams == 0 and link.broker.open_data_streams == 0
    assert link.agent.send_capacity(sid) == 0
    assert link.agent.send_data(sid, b"late") == 0


def test_broker_cannot_accept_unknown_stream(link: Link) -> None:
    with pytest.raises(LocalProtocolError):
        link.broker.accept_data_stream(99)


def test_accepting_a_stream_reset_in_the_same_read_is_harmless(link: Link) -> None:
    """Regression: the agent opens a stream and resets it at once (a cancel
    race); the broker sees the request and the reset in one read, and its
    owner, reacting to DataStreamRequested, accepted a stream the session had
    already dropped: an error, which took the whole connection down."""
    sid = link.agent.open_data_stream(5, AUTHORITY)
    link.agent.reset_stream(sid)
    evs = link.broker.receive_data(link.agent.data_to_send())
    assert [e for e in evs if not isinstance(e, WindowOpened)] == [
        DataStreamRequested(sid, 5),
        StreamReset(sid, CANCEL, remote=True),
    ]
    link.broker.accept_data_stream(sid)  # no-op, no exception
    link.pump()
    assert link.broker.open_data_streams == 0 and not link.broker.closed
    other = link.open_stream(6)
    assert link.transfer(link.agent, other, b"fine") == b"fine"


def test_open_data_stream_needs_accepted_control() -> None:
    lk = Link()
    with pytest.raises(LocalProtocolError):
        lk.agent.open_data_stream(1, AUTHORITY)
    lk.agent.open_control({}, AUTHORITY)
    lk.pump()
    with pytest.raises(LocalProtocolError):
        lk.agent.open_data_stream(1, AUTHORITY)


@pytest.mark.parametrize("size", [0, 1, 255, 256, 65_535, 65_536, 3 * 1024 * 1024 + 17])
def test_payload_both_ways(link: Link, size: int) -> None:
    sid = link.open_stream(1)
    up, down = stream_bytes(size, 1), stream_bytes(size, 2)
    assert link.transfer(link.agent, sid, up) == up
    assert link.transfer(link.broker, sid, down) == down


def test_payload_byte_exact_over_many_streams(small: Link) -> None:
    sids = [small.open_stream(i) for i in range(5)]
    for i, sid in enumerate(sids):
        data = stream_bytes(200_000 + i, i)
        got = small.transfer(small.agent if i % 2 else small.broker, sid, data)
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


def test_data_before_accept_is_buffered(link: Link) -> None:
    """The agent may send right after opening; the broker decodes it at once."""
    sid = link.agent.open_data_stream(3, AUTHORITY)
    assert link.agent.send_data(sid, b"early bird") == 10
    link.pump()
    assert [e.data for e in link.received(link.broker, sid)] == [b"early bird"]


def test_half_close(link: Link) -> None:
    sid = link.open_stream(1)
    assert link.transfer(link.agent, sid, b"request") == b"request"
    assert link.agent.end_stream(sid)
    assert not link.agent.end_stream(sid)  # only once
    link.pump()
    assert link.take(link.broker, StreamEnded) == [StreamEnded(sid)]
    assert link.agent.send_capacity(sid) == 0
    assert link.agent.send_data(sid, b"more") == 0
    # the other direction still flows, and still flow-controlled
    reply = stream_bytes(500_000, 3)
    assert link.transfer(link.broker, sid, reply) == reply
    assert link.agent.open_data_streams == 1
    assert link.broker.end_stream(sid)
    link.pump()
    assert link.take(link.agent, StreamEnded) == [StreamEnded(sid)]
    assert link.agent.open_data_streams == 0 and link.broker.open_data_streams == 0


@pytest.mark.parametrize("who", ["agent", "broker"])
def test_reset(link: Link, who: str) -> None:
    sid = link.open_stream(1)
    other = link.open_stream(2)
    src = link.agent if who == "agent" else link.broker
    link.send(src, sid, b"x" * 1000)
    src.reset_stream(sid)
    assert src.send_capacity(sid) == 0
    link.pump()
    dst = link.peer(src)
    assert link.take(dst, StreamReset) == [StreamReset(sid, CANCEL, remote=True)]
    assert dst.send_capacity(sid) == 0
    assert dst.send_data(sid, b"late") == 0
    src.reset_stream(sid)  # idempotent
    link.pump()
    assert b"".join(e.data for e in link.take(dst, StreamData)) == b"x" * 1000
    assert link.transfer(link.agent, other, b"still fine") == b"still fine"


def test_send_close(link: Link) -> None:
    sid = link.open_stream(1)
    link.send(link.agent, sid, b"partial")
    assert link.agent.send_close(sid, Close(CloseCode.RESET, "target reset the connection"))
    assert not link.agent.send_close(sid, Close(CloseCode.ERROR, "twice"))
    link.pump()
    evs = [e for e in link.interesting(link.broker) if not isinstance(e, StreamData)]
    assert evs == [
        StreamClosed(sid, Close(CloseCode.RESET, "target reset the connection")),
        StreamEnded(sid),
    ]
    assert b"".join(e.data for e in link.received(link.broker, sid)) == b"partial"


def test_send_close_without_window_reports_false(small: Link) -> None:
    sid = small.open_stream(1)
    small.send(small.agent, sid, b"z" * SMALL.stream_window)
    assert small.agent.send_capacity(sid) == 0
    assert not small.agent.send_close(sid, Close(CloseCode.ERROR, "no room"))
    small.agent.reset_stream(sid)  # what the caller does instead
    small.pump()
    assert small.take(small.broker, StreamReset) == [StreamReset(sid, CANCEL, remote=True)]


def test_data_stream_ending_mid_object_is_reset(link: Link) -> None:
    sid = link.open_stream(1)
    link.agent._h2.send_data(sid, bin_header(100) + b"only ten..", end_stream=True)
    link.pump()
    (reset,) = link.take(link.broker, StreamReset)
    assert reset.stream_id == sid and reset.error_code == PROTOCOL_ERROR and not reset.remote
    assert not link.take(link.broker, StreamEnded)


def test_malformed_data_body_resets_only_that_stream(link: Link) -> None:
    bad = link.open_stream(1)
    good = link.open_stream(2)
    link.send(link.agent, good, b"before")
    link.agent._h2.send_data(bad, b"\xa5hello")  # a str object: not payload
    link.agent._h2.send_data(bad, b"\xc1" * 50_000)  # lands after the reset
    link.pump()
    assert [e.data for e in link.take(link.broker, StreamData)] == [b"before"]
    (reset,) = link.take(link.broker, StreamReset)
    assert reset.stream_id == bad and reset.error_code == PROTOCOL_ERROR and not reset.remote
    assert link.take(link.agent, StreamReset) == [StreamReset(bad, PROTOCOL_ERROR, remote=True)]
    # garbage that keeps arriving on the reset stream is ignored, not fatal
    assert not link.broker.closed
    # the other stream and the control stream keep working, both ways
    for src in (link.agent, link.broker):
        data = stream_bytes(300_000, 7)
        assert link.transfer(src, good, data) == data
    link.broker.send_message(Cancel(2))
    link.agent.send_message(DialFail(2, DialFailCode.TIMEOUT))
    link.pump()
    assert link.take(link.agent, MessageReceived) == [MessageReceived(Cancel(2))]
    assert link.take(link.broker, MessageReceived) == [
        MessageReceived(DialFail(2, DialFailCode.TIMEOUT))
    ]


def test_control_map_on_data_stream_resets_it(link: Link) -> None:
    sid = link.open_stream(1)
    link.agent._h2.send_data(sid, encode(Cancel(1)))
    link.pump()
    (reset,) = link.take(link.broker, StreamReset)
    assert reset.stream_id == sid and reset.error_code == PROTOCOL_ERROR


@pytest.mark.parametrize(
    "garbage,exc",
    [
        (b"\xc1", MalformedMessage),
        (b"\x93\x01\x02\x03", ProtocolError),  # not a map
        (encode(Close(CloseCode.RESET, "x")), RemoteProtocolError),  # close map on control
        (b"\xc6\x00\x01\x00\x00" + b"x" * 65536, ProtocolError),  # over 64 KiB
    ],
)
def test_control_garbage_is_a_connection_error(link: Link, garbage: bytes, exc: type) -> None:
    control_id = link.agent._control_id
    assert control_id is not None
    raw_send(link.agent, control_id, garbage)
    data = link.agent.data_to_send()
    with pytest.raises(exc) as info:
        link.broker.receive_data(data)
    # the broker tells the agent why, with a GOAWAY
    assert link.broker.closed
    evs = link.agent.receive_data(link.broker.data_to_send())
    closed = [e for e in evs if isinstance(e, ConnectionClosed)]
    assert closed == [ConnectionClosed(PROTOCOL_ERROR, info.value.reason)]


def test_control_message_over_64k_is_too_large(link: Link) -> None:
    control_id = link.agent._control_id
    assert control_id is not None
    body = b"\x82\xa1t\xa6future\xa1l\xdc\x02\xbc" + (b"\xc4\x64" + b"x" * 100) * 700
    link.agent._h2.send_data(control_id, body[:60_000])
    link.pump()
    link.agent._h2.send_data(control_id, body[60_000:])
    with pytest.raises(MessageTooLarge):
        link.pump()


def test_stream_ends_when_the_control_stream_ends(link: Link) -> None:
    control_id = link.agent._control_id
    assert control_id is not None
    link.agent._h2.end_stream(control_id)
    link.pump()
    (closed,) = link.take(link.broker, ConnectionClosed)
    assert closed.reason == "control stream ended"
    assert link.broker.closed


def test_goaway_is_reported(link: Link) -> None:
    link.broker.close(0, "shutting down")
    link.pump()
    assert link.take(link.agent, ConnectionClosed) == [ConnectionClosed(0, "shutting down")]
    assert link.agent.closed and link.broker.closed


# ------------------------------------------------------------------ hostile peers


class RawClient:
    """A bare h2 client, for requests the agent session would never make."""

    def __init__(self, broker: TunnelSession) -> None:
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.h2.initiate_connection()
        self.broker = broker
        self.events: list[h2.events.Event] = []
        self.broker_events: list[Event] = []
        broker.initiate()
        self.pump()

    def pump(self) -> None:
        for _ in range(1000):
            a, b = self.h2.data_to_send(), self.broker.data_to_send()
            if not a and not b:
                return
            if a:
                self.broker_events.extend(self.broker.receive_data(a))
            if b:
                self.events.extend(self.h2.receive_data(b))
        raise AssertionError("never went quiet")

    def request(self, path: str, extra: list[tuple[str, str]] | None = None) -> int:
        sid = self.h2.get_next_available_stream_id()
        headers = [(":method", "POST"), (":scheme", "https"), (":authority", "b"), (":path", path)]
        self.h2.send_headers(sid, headers + (extra or []))
        self.pump()
        return sid

    def resets(self) -> dict[int, int]:
        return {
            e.stream_id: e.error_code for e in self.events if isinstance(e, h2.events.StreamReset)
        }

    def requested(self) -> list[Any]:
        return [
            e for e in self.broker_events if isinstance(e, (ControlRequested, DataStreamRequested))
        ]


def test_data_stream_before_control_is_refused() -> None:
    raw = RawClient(TunnelSession(Role.BROKER, clock=time.monotonic))
    sid = raw.request(S.STREAM_PATH, [(S.DIAL_ID_HEADER, "1")])
    assert raw.resets() == {sid: CANCEL}
    assert raw.requested() == []


def test_data_stream_before_control_accepted_is_refused() -> None:
    broker = TunnelSession(Role.BROKER, clock=time.monotonic)
    raw = RawClient(broker)
    control = raw.request(S.CONTROL_PATH)
    sid = raw.request(S.STREAM_PATH, [(S.DIAL_ID_HEADER, "1")])
    assert raw.resets() == {sid: CANCEL}
    assert [type(e) for e in raw.requested()] == [ControlRequested]
    broker.accept_control({})
    sid2 = raw.request(S.STREAM_PATH, [(S.DIAL_ID_HEADER, "1")])
    assert raw.requested()[-1] == DataStreamRequested(sid2, 1)
    assert control not in raw.resets()


def test_second_control_stream_is_refused() -> None:
    broker = TunnelSession(Role.BROKER, clock=time.monotonic)
    raw = RawClient(broker)
    first = raw.request(S.CONTROL_PATH)
    second = raw.request(S.CONTROL_PATH)
    broker.accept_control({})
    raw.pump()
    third = raw.request(S.CONTROL_PATH)
    assert raw.resets() == {second: PROTOCOL_ERROR, third: PROTOCOL_ERROR}
    assert raw.requested() == [ControlRequested(first, raw.requested()[0].headers)]
    assert broker.control_open and not broker.closed


@pytest.mark.parametrize("dial_id", ["", "x", "-1", "1.5", str(2**64), "²", "١٢", "\uff11"])
def test_bad_dial_id_is_refused(dial_id: str) -> None:
    """Regression: '²' passed isdigit() and then int() raised a bare ValueError."""
    broker = TunnelSession(Role.BROKER, clock=time.monotonic)
    raw = RawClient(broker)
    raw.request(S.CONTROL_PATH)
    broker.accept_control({})
    extra = [(S.DIAL_ID_HEADER, dial_id)] if dial_id else []
    sid = raw.request(S.STREAM_PATH, extra)
    assert raw.resets() == {sid: CANCEL}
    assert [type(e) for e in raw.requested()] == [ControlRequested]


def test_largest_dial_id_is_accepted() -> None:
    broker = TunnelSession(Role.BROKER, clock=time.monotonic)
    raw = RawClient(broker)
    raw.request(S.CONTROL_PATH)
    broker.accept_control({})
    sid = raw.request(S.STREAM_PATH, [(S.DIAL_ID_HEADER, str(2**64 - 1))])
    assert raw.requested()[-1] == DataStreamRequested(sid, 2**64 - 1)


@pytest.mark.parametrize(
    "method,path", [("GET", S.CONTROL_PATH), ("POST", "/"), ("POST", "/tether.v2/connect")]
)
def test_unknown_request_gets_404(method: str, path: str) -> None:
    raw = RawClient(TunnelSession(Role.BROKER, clock=time.monotonic))
    sid = raw.h2.get_next_available_stream_id()
    raw.h2.send_headers(
        sid, [(":method", method), (":scheme", "https"), (":authority", "b"), (":path", path)]
    )
    raw.pump()
    (resp,) = [e for e in raw.events if isinstance(e, h2.events.ResponseReceived)]
    assert dict(resp.headers)[":status"] == "404"
    assert raw.requested() == []


def test_odd_rejection_status_is_not_a_crash() -> None:
    """Regression: a non-ASCII digit in :status escaped as a bare ValueError."""
    lk = Link()
    lk.agent.open_control({}, AUTHORITY)
    lk.pump()
    control_id = lk.agent._control_id
    assert control_id is not None
    lk.broker._h2.send_headers(control_id, [(":status", "4²")])
    lk.pump()
    lk.broker._h2.send_data(control_id, b"\x81\xa5error\xa3bad", end_stream=True)
    lk.pump()
    assert lk.take(lk.agent, ControlRejected) == [ControlRejected(0, "", "bad")]


# ------------------------------------------------------------------ flow control


@pytest.mark.parametrize("direction", ["up", "down"])
def test_stalled_stream_does_not_block_another(small: Link, direction: str) -> None:
    src = small.agent if direction == "up" else small.broker
    dst = small.peer(src)
    stalled, busy = small.open_stream(1), small.open_stream(2)
    # (a) fill the stalled stream until the sender has no capacity left
    small.send(src, stalled, b"s" * (4 * SMALL.stream_window))
    assert src.send_capacity(stalled) == 0
    assert src.send_data(stalled, b"more") == 0
    # (b) what the stalled receiver holds is bounded by one stream window
    held = small.received(dst, stalled)
    assert sum(len(e.data) for e in held) <= unacked_flow(held) <= SMALL.stream_window
    assert unacked_flow(held) > SMALL.stream_window - 16
    # the other stream still moves many windows' worth
    data = stream_bytes(5 * SMALL.stream_window + 123, 9)
    small.take(dst, StreamData)
    assert small.transfer(src, busy, data) == data
    assert src.send_capacity(stalled) == 0
    # (c) once the destination takes the stalled bytes, capacity comes back in full
    for e in held:
        dst.acknowledge(stalled, e.flow_len)
    small.pump()
    assert src.send_capacity(stalled) == SMALL.stream_window - 5
    assert any(isinstance(e, WindowOpened) for e in small.events[src])
    rest = stream_bytes(3 * SMALL.stream_window, 4)
    assert small.transfer(src, stalled, rest) == rest


@pytest.mark.parametrize("stalled_count", [2, 3, 8])
def test_connection_credit_is_not_held_hostage(stalled_count: int) -> None:
    """(d) Stalled streams together hold >= the whole connection window, yet a
    third stream still transfers many windows' worth."""
    lk = Link(SMALL)
    lk.handshake()
    stalled = [lk.open_stream(i) for i in range(stalled_count)]
    for sid in stalled:
        lk.send(lk.agent, sid, b"h" * SMALL.stream_window)
        assert lk.agent.send_capacity(sid) == 0
    held = sum(unacked_flow(lk.received(lk.broker, sid)) for sid in stalled)
    assert held >= SMALL.connection_window - 16 * stalled_count
    for sid in stalled:
        assert unacked_flow(lk.received(lk.broker, sid)) <= SMALL.stream_window
    lk.take(lk.broker, StreamData)
    live = lk.open_stream(99)
    data = stream_bytes(20 * SMALL.stream_window, 5)
    assert lk.transfer(lk.agent, live, data) == data
    # and the reverse direction on the same connection
    assert lk.transfer(lk.broker, live, data[::-1]) == data[::-1]
    for sid in stalled:
        assert lk.agent.send_capacity(sid) == 0


def test_capacity_never_exceeds_the_window() -> None:
    """(f) For every small remaining window, send_data stays within it (h2 would
    raise FlowControlError otherwise) and each send is a whole bin object."""
    for remaining in range(2, 14):
        lk = Link(SMALL)
        lk.handshake()
        sid = lk.open_stream(1)
        first = SMALL.stream_window - remaining - 3  # bin16 header: 3 bytes
        assert lk.agent.send_data(sid, b"a" * first) == first
        cap = lk.agent.send_capacity(sid)
        assert cap == max(remaining - 5, 0)
        n = lk.agent.send_data(sid, b"b" * 100)
        assert n == cap
        left = remaining - n - 2 if n else remaining
        assert lk.agent.send_capacity(sid) == max(left - 5, 0)
        lk.pump()
        got = b"".join(e.data for e in lk.received(lk.broker, sid))
        assert got == b"a" * first + b"b" * n
        assert unacked_flow(lk.received(lk.broker, sid)) <= SMALL.stream_window


def test_negative_window_is_treated_as_blocked(small: Link) -> None:
    """A SETTINGS change can push a stream window below zero (RFC 9113 6.9.2)."""
    sid = small.open_stream(1)
    small.send(small.agent, sid, b"n" * 40_000)
    setting = h2.settings.SettingCodes.INITIAL_WINDOW_SIZE
    small.broker._h2.update_settings({setting: 16 * 1024})
    small.pump()
    assert small.agent._h2.local_flow_control_window(sid) < 0
    assert small.agent.send_capacity(sid) == 0
    assert small.agent.send_data(sid, b"x" * 100) == 0
    # the receiver takes the bytes and restores the setting: the sender resumes
    for ev in small.take(small.broker, StreamData):
        small.broker.acknowledge(sid, ev.flow_len)
    small.broker._h2.update_settings({setting: SMALL.stream_window})
    small.take(small.agent)
    small.pump()
    assert WindowOpened(None) in small.events[small.agent]
    assert small.agent.send_capacity(sid) > 0
    data = stream_bytes(300_000, 8)
    assert small.transfer(small.agent, sid, data) == data


def test_padding_is_credited(small: Link) -> None:
    """Padding counts against flow control; the receiver hands it back at once,
    and acknowledging every StreamData returns the rest, byte-exactly."""
    sid = small.open_stream(1)
    h2c = small.agent._h2
    sent = bytearray()
    frames = 0
    frame = 1000 + 3 + 1 + 200  # payload, bin16 header, pad length byte, padding
    while h2c.local_flow_control_window(sid) >= frame:
        piece = stream_bytes(1000, len(sent))
        h2c.send_data(sid, bin_header(1000) + piece, pad_length=200)
        sent += piece
        frames += 1
        small.pump()
    # more flow-controlled bytes went than one window: the padding came back
    # unasked, while the payload credit waits for the destination
    assert frames * frame > SMALL.stream_window + 10 * frame
    held = small.take(small.broker, StreamData)
    assert b"".join(e.data for e in held) == bytes(sent)
    assert unacked_flow(held) <= SMALL.stream_window
    assert unacked_flow(held) == frames * (1000 + 3)
    for ev in held:
        small.broker.acknowledge(sid, ev.flow_len)
    small.pump()
    # byte-exact: what is not yet back is a WINDOW_UPDATE batch still being
    # gathered (under a quarter window), never lost credit
    batch = small.broker._streams[sid].unacked
    assert 0 <= batch < SMALL.stream_window // 4
    assert h2c.local_flow_control_window(sid) + batch == SMALL.stream_window


def test_send_capacity_respects_send_chunk() -> None:
    cfg = SessionConfig(send_chunk=1000)
    lk = Link(cfg)
    lk.handshake()
    sid = lk.open_stream(1)
    assert lk.agent.send_capacity(sid) == 1000
    assert lk.agent.send_data(sid, b"c" * 5000) == 1000


def test_window_update_after_settings_change_wakes_senders(link: Link) -> None:
    """A window that grows through SETTINGS fires WindowOpened(None)."""
    sid = link.open_stream(1)
    before = link.agent.send_capacity(sid)
    link.broker._h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**21})
    link.pump()
    assert WindowOpened(None) in link.events[link.agent]
    assert link.agent.send_capacity(sid) >= before


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["send", "deliver_up", "deliver_down", "ack", "ack_all"]),
            st.integers(0, 2),
            st.integers(0, 200_000),
        ),
        max_size=60,
    ),
    st.booleans(),
)
def test_random_interleavings(ops: list[tuple[str, int, int]], upward: bool) -> None:
    """(e) Random sends, partial deliveries and acknowledgements on 3 streams:
    every stream's bytes arrive intact and in order, a receiver never holds
    more than one stream window unacknowledged, and h2 never objects."""
    lk = Link(SMALL)
    lk.handshake()
    sids = [lk.open_stream(i) for i in range(3)]
    src = lk.agent if upward else lk.broker
    dst = lk.peer(src)
    payload = {sid: stream_bytes(2_000_000, sid) for sid in sids}
    sent = dict.fromkeys(sids, 0)
    got = {sid: bytearray() for sid in sids}
    unacked: dict[int, list[StreamData]] = {sid: [] for sid in sids}
    to_dst, to_src = bytearray(), bytearray()

    def collect() -> None:
        for ev in lk.take(dst, StreamData):
            got[ev.stream_id] += ev.data
            unacked[ev.stream_id].append(ev)
        lk.take(dst)
        lk.take(src)

    def check() -> None:
        for sid in sids:
            assert bytes(got[sid]) == payload[sid][: len(got[sid])]
            assert len(got[sid]) <= sent[sid]
            assert unacked_flow(unacked[sid]) <= SMALL.stream_window

    def deliver_dst(k: int) -> None:
        piece = bytes(to_dst[:k])
        del to_dst[:k]
        if piece:
            lk.events[dst].extend(dst.receive_data(piece))
        to_src.extend(dst.data_to_send())
        collect()

    def deliver_src(k: int) -> None:
        piece = bytes(to_src[:k])
        del to_src[:k]
        if piece:
            lk.events[src].extend(src.receive_data(piece))
        to_dst.extend(src.data_to_send())
        collect()

    def ack(sid: int, n: int) -> None:
        while unacked[sid] and n > 0:
            ev = unacked[sid].pop(0)
            dst.acknowledge(sid, ev.flow_len)
            n -= ev.flow_len
        to_src.extend(dst.data_to_send())

    for op, idx, n in ops:
        sid = sids[idx]
        if op == "send":
            cap = src.send_capacity(sid)
            k = src.send_data(sid, memoryview(payload[sid])[sent[sid] : sent[sid] + n])
            assert k <= cap and k <= n
            sent[sid] += k
            to_dst.extend(src.data_to_send())
        elif op == "deliver_up":
            deliver_dst(n)
        elif op == "deliver_down":
            deliver_src(n)
        elif op == "ack":
            ack(sid, n)
        else:
            ack(sid, 10**9)
        check()

    # drain: deliver everything, acknowledge everything, then finish every stream
    deliver_dst(len(to_dst))
    for sid in sids:
        ack(sid, 10**9)
    deliver_src(len(to_src))
    check()
    for sid in sids:
        target = sent[sid] + 150_000
        for _ in range(10_000):
            if sent[sid] >= target and not to_dst and not to_src:
                break
            k = src.send_data(sid, memoryview(payload[sid])[sent[sid] : target])
            sent[sid] += k
            to_dst.extend(src.data_to_send())
            deliver_dst(len(to_dst))
            check()
            ack(sid, 10**9)
            deliver_src(len(to_src))
        assert bytes(got[sid]) == payload[sid][: sent[sid]]
        assert sent[sid] == target


# ------------------------------------------------------------------ settings, ping


def test_a_stream_alone_sends_one_bin_per_frame_of_the_peers_max_size(link: Link) -> None:
    # Both sides announce 64 KiB: every frame is full, one bin each, and the
    # bin header never pushes a few bytes into a frame of their own.
    sid = link.open_stream(1)
    data = stream_bytes(256 * 1024, 11)
    link.wire[link.agent].clear()
    assert link.agent.send_data(sid, data) == 256 * 1024
    link.pump()
    assert b"".join(e.data for e in link.received(link.broker, sid)) == data
    sizes = [
        len(f.data)
        for f in data_frames(link.wire[link.agent])
        if isinstance(f, DataFrame) and f.stream_id == sid
    ]
    # 65,533 payload bytes behind a 3-byte bin 16 header fill each frame.
    assert sizes == [64 * 1024] * 4 + [256 * 1024 - 4 * 65_533 + 2]  # and a bin 8
    assert link.agent._h2.max_outbound_frame_size == 64 * 1024


def test_more_to_follow_holds_back_a_partial_frame(link: Link) -> None:
    sid = link.open_stream(1)
    data = stream_bytes(256 * 1024, 13)
    link.wire[link.agent].clear()
    assert link.agent.send_data(sid, data, more=True) == 4 * 65_533
    rest = memoryview(data)[4 * 65_533 :]
    # Nothing else fits a frame: a partial one goes, even with more to follow.
    assert link.agent.send_data(sid, rest, more=True) == len(rest)
    link.pump()
    assert b"".join(e.data for e in link.received(link.broker, sid)) == data
    sizes = [len(f.data) for f in data_frames(link.wire[link.agent]) if f.stream_id == sid]
    assert sizes == [64 * 1024] * 4 + [len(rest) + 2]


def test_a_peers_larger_frames_are_used_and_a_smaller_max_respected() -> None:
    # The agent announces 256 KiB (a newer peer, say): the broker's frames
    # grow to it; the broker's own 64 KiB bounds the agent's frames.
    lk = Link(SessionConfig(max_frame_size=256 * 1024), SessionConfig())
    lk.handshake()
    sid = lk.open_stream(1)
    for src, dst, limit in ((lk.broker, lk.agent, 256 * 1024), (lk.agent, lk.broker, 64 * 1024)):
        data = stream_bytes(512 * 1024, 14)
        lk.wire[src].clear()
        sent = 0
        while sent < len(data):
            rest = memoryview(data)[sent:]
            sent += src.send_data(sid, rest, more=len(rest) > 256 * 1024)
            lk.pump()
            for ev in lk.received(dst, sid):
                dst.acknowledge(sid, ev.flow_len)
        sizes = [len(f.data) for f in data_frames(lk.wire[src]) if isinstance(f, DataFrame)]
        assert max(sizes) == limit
        # Every frame but the last is full: one bin per frame, none straddling.
        assert all(size == limit for size in sizes[:-1]), sizes


def test_max_frame_size_follows_the_peer() -> None:
    lk = Link(SessionConfig(max_frame_size=16 * 1024), SessionConfig())
    lk.handshake()
    sid = lk.open_stream(1)
    data = stream_bytes(200_000, 12)
    lk.wire[lk.broker].clear()
    assert lk.transfer(lk.broker, sid, data) == data
    sizes = [len(f.data) for f in data_frames(lk.wire[lk.broker]) if isinstance(f, DataFrame)]
    assert max(sizes) == 16 * 1024


@pytest.mark.parametrize("who", ["agent", "broker"])
def test_ping(link: Link, who: str) -> None:
    sess = link.agent if who == "agent" else link.broker
    payload = sess.send_ping(os.urandom(8))
    assert len(payload) == 8
    link.pump()
    assert link.take(sess, PingAcked) == [PingAcked(payload)]
    assert link.take(link.peer(sess), PingAcked) == []


def test_ping_before_control() -> None:
    lk = Link()
    p = lk.broker.send_ping(os.urandom(8))
    lk.pump()
    assert lk.take(lk.broker, PingAcked) == [PingAcked(p)]


# ------------------------------------------------------------------ drain


@pytest.mark.parametrize("closer_role", ["agent", "broker"])
@pytest.mark.parametrize("ended", [False, True], ids=["open", "ended"])
def test_frames_in_flight_when_we_send_goaway_are_no_violation(
    closer_role: str, ended: bool
) -> None:
    """A clean drain: what the peer sent before it saw our graceful GOAWAY
    (connection and stream WINDOW_UPDATEs, payload on an open stream) is
    taken as usual, not a 'RECV_WINDOW_UPDATE in state CLOSED' violation."""
    lk = Link(SMALL)
    lk.handshake()
    sid = lk.open_stream(1)
    closer = lk.agent if closer_role == "agent" else lk.broker
    peer = lk.peer(closer)
    payload = stream_bytes(40 * 1024)
    assert closer.send_data(sid, payload) == len(payload)
    if ended:
        assert closer.end_stream(sid)
    in_flight = closer.data_to_send()
    closer.close(0, "shutdown")
    goaway = closer.data_to_send()
    assert goaway  # the GOAWAY is queued
    # The peer has not seen the GOAWAY yet: it takes the payload, returns the
    # credit (connection and stream) and sends on its own direction.
    evs = peer.receive_data(in_flight)
    for ev in evs:
        if isinstance(ev, StreamData):
            peer.acknowledge(sid, ev.flow_len)
    assert peer.send_data(sid, b"late") == 4
    reply = peer.data_to_send()
    assert any(f.type == 0x8 for f in data_frames([reply]))  # WINDOW_UPDATE among them
    got = closer.receive_data(reply)  # must not raise
    assert [e.data for e in got if isinstance(e, StreamData)] == [b"late"]
    assert not any(isinstance(e, ConnectionClosed) for e in got)
    evs = peer.receive_data(goaway)
    assert [e for e in evs if isinstance(e, ConnectionClosed)] == [ConnectionClosed(0, "shutdown")]


def test_new_stream_after_our_goaway_is_refused(link: Link) -> None:
    """A stream the peer opens after our graceful GOAWAY (it had not seen it)
    is refused with REFUSED_STREAM; the connection carries on for the rest."""
    link.broker.close(0, "shutdown")
    goaway = link.broker.data_to_send()
    sid = link.agent.open_data_stream(9, AUTHORITY)
    evs = link.broker.receive_data(link.agent.data_to_send())
    assert not any(isinstance(e, DataStreamRequested) for e in evs)
    resets = [f for f in data_frames([link.broker.data_to_send()]) if f.type == 0x3]
    assert [(f.stream_id, f.error_code) for f in resets] == [  # type: ignore[attr-defined]
        (sid, h2.errors.ErrorCodes.REFUSED_STREAM)
    ]
    evs = link.agent.receive_data(goaway)
    assert any(isinstance(e, ConnectionClosed) for e in evs)


@pytest.mark.parametrize("closer_role", ["agent", "broker"])
def test_frames_after_the_peers_goaway_in_one_read_are_no_violation(closer_role: str) -> None:
    """After its graceful GOAWAY a side may still return credit (and reset
    streams) for streams that finish; h2 refuses every frame after a GOAWAY
    it received, so a read holding [GOAWAY, WINDOW_UPDATE] must end in
    ConnectionClosed, not in a protocol violation."""
    lk = Link(SMALL)
    lk.handshake()
    sid = lk.open_stream(1)
    closer = lk.agent if closer_role == "agent" else lk.broker
    peer = lk.peer(closer)
    payload = stream_bytes(40 * 1024)
    assert peer.send_data(sid, payload) == len(payload)
    evs = closer.receive_data(peer.data_to_send())
    closer.close(0, "shutdown")
    for ev in evs:
        if isinstance(ev, StreamData):
            closer.acknowledge(sid, ev.flow_len)  # credit after our GOAWAY
    wire = closer.data_to_send()
    kinds = [f.type for f in data_frames([wire])]
    assert 0x7 in kinds and kinds.index(0x7) < len(kinds) - 1  # frames follow the GOAWAY
    got = peer.receive_data(wire)  # must not raise
    assert [e for e in got if isinstance(e, ConnectionClosed)] == [ConnectionClosed(0, "shutdown")]
    assert peer.receive_data(b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x10\x00") == []


# ------------------------------------------------------- a lone PING's fast path


def test_a_lone_ping_is_answered_past_h2_and_only_then(link: Link) -> None:
    """quick_ping answers exactly one PING between frames, byte for byte the
    ACK h2 would send; anything else (an ACK, two frames, part of a frame,
    a PING after half a frame) goes through receive_data."""
    payload = os.urandom(8)
    link.agent.send_ping(payload)
    ping = link.agent.data_to_send()
    ack = link.broker.quick_ping(ping)
    # what h2 itself answers to the same bytes
    assert ack is not None and link.broker.receive_data(ping) == []
    assert link.broker.data_to_send() == ack
    assert link.agent.receive_data(ack) == [PingAcked(payload)]
    assert link.agent.quick_ping(ack) is None  # an ACK is not a PING
    assert link.broker.quick_ping(ping + ping) is None
    assert link.broker.quick_ping(ping[:9]) is None
    # half a frame already buffered: the PING bytes would be its rest
    link.agent.send_message(Drain())
    message = link.agent.data_to_send()
    link.broker.receive_data(message[:5])
    assert link.broker.quick_ping(ping) is None
    link.broker.receive_data(message[5:])
    assert link.broker.quick_ping(ping) is not None


def test_the_fast_path_spends_the_ping_budget(link: Link) -> None:
    ping = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"12345678"
    answered = 0
    while link.broker.quick_ping(ping) is not None:
        answered += 1
        assert answered <= 2000, "no budget"
    assert answered >= 900  # the burst, less what a slow machine refilled meanwhile
    with pytest.raises(FloodDetected):
        link.broker.receive_data(ping)
