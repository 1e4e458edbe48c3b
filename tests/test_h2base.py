"""protocol.h2base and protocol.states in process: a server-role and a
client-role H2Base back to back, bytes shuttled by hand."""

from __future__ import annotations

import h2.errors
import h2.events
import pytest

from protocol import h2base, states
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.flood import FloodDetected, FloodLimits, FrameSizeGuard

pytestmark = pytest.mark.timeout(30)


class Pair:
    def __init__(self, settings: h2base.H2Settings | None = None) -> None:
        self.now = 0.0
        s = settings or h2base.H2Settings()
        self.client = h2base.H2Base(s, client=True, now=self.now)
        self.server = h2base.H2Base(s, client=False, now=self.now)
        self.events: dict[h2base.H2Base, list[h2.events.Event]] = {
            self.client: [],
            self.server: [],
        }
        self.client.initiate()
        self.server.initiate()
        self.pump()

    def feed(self, dst: h2base.H2Base, data: bytes) -> None:
        dst.receive_data(data, self.now, self.events[dst].append)
        while dst.backlog:
            dst.receive_data(b"", self.now, self.events[dst].append)

    def pump(self) -> None:
        for _ in range(100):
            moved = False
            for src, dst in ((self.client, self.server), (self.server, self.client)):
                if data := src.data_to_send():
                    moved = True
                    self.feed(dst, data)
            if not moved:
                return
        raise AssertionError("never went quiet")

    def take(self, side: h2base.H2Base, kind: type) -> list:
        got = [e for e in self.events[side] if isinstance(e, kind)]
        self.events[side] = [e for e in self.events[side] if not isinstance(e, kind)]
        return got

    def request(self) -> int:
        sid = self.client.h2.get_next_available_stream_id()
        self.client.h2.send_headers(
            sid, [(":method", "POST"), (":scheme", "https"), (":authority", "x"), (":path", "/")]
        )
        return sid


def test_data_is_split_by_the_peers_frame_size() -> None:
    p = Pair(h2base.H2Settings(max_frame_size=16 * 1024))
    sid = p.request()
    p.pump()
    p.server.h2.send_headers(sid, [(":status", "200")])
    payload = b"p" * 60_000
    p.server.send_data(sid, payload)
    wire = p.server.data_to_send()
    p.feed(p.client, wire)
    got = p.take(p.client, h2.events.DataReceived)
    assert b"".join(e.data for e in got) == payload
    assert [len(e.data) for e in got] == [16_384] * 3 + [60_000 - 3 * 16_384]


def test_credit_for_a_stream_h2_already_forgot_is_a_no_op() -> None:
    p = Pair()
    p.server.credit_stream(99, 1000)  # never opened
    p.client.credit_stream(1, 0)
    assert p.server.send_window(99) == 0


def test_graceful_goaway_keeps_open_streams_and_refuses_new_ones() -> None:
    p = Pair()
    first = p.request()
    p.pump()
    assert [e.stream_id for e in p.take(p.server, h2.events.RequestReceived)] == [first]
    p.server.goaway("drain")
    goaway = p.server.data_to_send()
    assert p.server.goaway_sent and p.server.closed
    # Sent before the client saw the GOAWAY: a WINDOW_UPDATE, data on the
    # open stream, and a new stream.
    p.client.h2.increment_flow_control_window(1000)
    p.client.send_data(first, b"still mine")
    second = p.request()
    p.feed(p.server, p.client.data_to_send())
    assert [e.data for e in p.take(p.server, h2.events.DataReceived)] == [b"still mine"]
    assert [e.stream_id for e in p.take(p.server, h2.events.RequestReceived)] == []
    p.feed(p.client, p.server.data_to_send() + goaway)
    (reset,) = p.take(p.client, h2.events.StreamReset)
    assert (reset.stream_id, reset.error_code) == (second, h2.errors.ErrorCodes.REFUSED_STREAM)
    (term,) = p.take(p.client, h2.events.ConnectionTerminated)
    assert term.last_stream_id == first and term.additional_data == b"drain"


def test_error_close_sends_goaway_through_h2() -> None:
    p = Pair()
    p.server.close(h2.errors.ErrorCodes.PROTOCOL_ERROR, "bad")
    assert p.server.state is states.ConnState.CLOSED
    p.feed(p.client, p.server.data_to_send())
    (term,) = p.take(p.client, h2.events.ConnectionTerminated)
    assert term.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR


def test_h2_violation_is_a_remote_protocol_error_with_a_reason() -> None:
    p = Pair()
    bogus = b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00"  # WINDOW_UPDATE of 0
    with pytest.raises(RemoteProtocolError) as info:
        p.server.receive_data(bogus, 0.0, lambda ev: None)
    assert info.value.reason == "h2"
    assert p.server.state is states.ConnState.CLOSED
    assert p.server.data_to_send()  # h2's GOAWAY


def test_oversized_frame_is_refused_at_its_header() -> None:
    p = Pair()
    header = b"\xff\xff\xff\x00\x00\x00\x00\x00\x01"
    with pytest.raises(RemoteProtocolError, match="overlong frame"):
        p.server.receive_data(header, 0.0, lambda ev: None)


def test_ping_flood_is_detected_and_answered_with_calm_only() -> None:
    limits = FloodLimits(pings=FloodLimits().pings.__class__(rate=1.0, burst=5.0))
    p = Pair(h2base.H2Settings(flood=limits))
    for _ in range(10):
        p.client.h2.ping(b"12345678")
    with pytest.raises(FloodDetected) as info:
        p.server.receive_data(p.client.data_to_send(), 0.0, lambda ev: None)
    assert info.value.reason == "flood_pings"
    p.feed(p.client, p.server.data_to_send())
    assert p.take(p.client, h2.events.PingAckReceived) == []  # none of the flood answered
    (term,) = p.take(p.client, h2.events.ConnectionTerminated)
    assert term.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


def test_an_error_raised_by_the_handler_ends_the_connection() -> None:
    p = Pair()
    p.request()

    def handle(ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            raise RemoteProtocolError("no thanks", reason="test")

    with pytest.raises(RemoteProtocolError):
        p.server.receive_data(p.client.data_to_send(), 0.0, handle)
    assert p.server.state is states.ConnState.CLOSED


def test_transitions_blame_the_right_side() -> None:
    t, D = states.DATA_TRANSITIONS, states.DataState
    assert states.transition(t, D.OPEN, states.DataInput.END_LOCAL, states.Side.LOCAL) is (
        D.LOCAL_ENDED
    )
    with pytest.raises(LocalProtocolError) as local:
        states.transition(t, D.LOCAL_ENDED, states.DataInput.END_LOCAL, states.Side.LOCAL)
    assert local.value.reason == "end_local_in_local_ended"
    with pytest.raises(RemoteProtocolError):
        states.transition(t, D.REMOTE_ENDED, states.DataInput.END_REMOTE, states.Side.REMOTE)
    c = states.CONTROL_TRANSITIONS
    with pytest.raises(LocalProtocolError):
        states.transition(
            c, states.ControlState.OPEN, states.ControlInput.REQUEST, states.Side.LOCAL
        )


@pytest.mark.parametrize("cut", [1, 5, 9, 12, 17, 20, 25])
def test_the_guard_finds_where_a_goaway_ends_in_any_chunking(cut: int) -> None:
    ping = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"12345678"
    goaway = b"\x00\x00\x08\x07\x00\x00\x00\x00\x00" + b"\x00\x00\x00\x01\x00\x00\x00\x00"
    after = b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x01"
    wire = ping + goaway + after
    guard = FrameSizeGuard(64 * 1024)
    ends = []
    for start in range(0, len(wire), cut):
        guard.check(wire[start : start + cut])
        if guard.goaway_end is not None:
            ends.append(start + guard.goaway_end)
    assert ends == [len(ping) + len(goaway)]
