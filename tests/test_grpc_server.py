"""The sans-IO gRPC server (protocol.grpc_server) in process: a real h2
client connection built here talks to it through bytes only."""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest

from protocol import grpc_events as ev
from protocol.errors import (
    LocalProtocolError,
    MalformedMessage,
    MessageTooLarge,
    RemoteProtocolError,
)
from protocol.grpc_framing import GrpcStatus, encode_message
from protocol.grpc_server import (
    CALL_TRANSITIONS,
    CallInput,
    CallState,
    GrpcServer,
    GrpcServerSettings,
    transition,
)
from protocol.h2base import H2Settings

pytestmark = [pytest.mark.timeout(30)]

METHOD = "/ProxyService/Proxy"


class Pair:
    """A GrpcServer and an h2 client wired back to back through bytes."""

    def __init__(
        self, *, client_window: int = 65535, window: int = 1 << 20, max_message: int = 1 << 20
    ) -> None:
        self.server = GrpcServer(
            GrpcServerSettings(H2Settings(initial_window=window), max_message_size=max_message),
            methods={METHOD},
            clock=lambda: 0.0,
        )
        self.server.initiate()
        self.client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.client.local_settings = h2.settings.Settings(
            client=True,
            initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: client_window},
        )
        self.client.initiate_connection()
        self.exchange()

    def to_server(self) -> list[Any]:
        events = self.server.receive_data(self.client.data_to_send())
        while self.server.backlog:
            events += self.server.receive_data(b"")
        return events

    def to_client(self) -> list[Any]:
        return list(self.client.receive_data(self.server.data_to_send()))

    def exchange(self) -> tuple[list[Any], list[Any]]:
        server_events = self.to_server()
        client_events = self.to_client()
        server_events += self.to_server()
        return server_events, client_events

    def request(self, sid: int, headers: dict[str, str] | None = None, end: bool = False) -> None:
        base = {
            ":method": "POST",
            ":scheme": "http",
            ":path": METHOD,
            ":authority": "localhost",
            "content-type": "application/grpc",
            "te": "trailers",
        }
        base.update(headers or {})
        self.client.send_headers(sid, list(base.items()), end_stream=end)


def of(kind: type, events: list[Any]) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


def test_a_call_messages_credit_response_and_trailers() -> None:
    p = Pair()
    p.request(1, {"grpc-timeout": "1500m", "x-trace": "abc"})
    p.client.send_data(1, encode_message(b"one") + encode_message(b"two") + b"\x00\x00")
    events = p.to_server()
    started, m1, m2 = events
    assert started == ev.CallStarted(
        1,
        METHOD,
        1.5,
        {
            "content-type": "application/grpc",
            "te": "trailers",
            "grpc-timeout": "1500m",
            "x-trace": "abc",
        },
    )
    # Each message carries its whole wire length; the 2 bytes of the next
    # one wait for it.
    assert (m1.message, m1.flow_len) == (b"one", 8)
    assert (m2.message, m2.flow_len) == (b"two", 8)
    assert p.server.call_state(1) is CallState.OPEN
    p.server.acknowledge(1, m1.flow_len)
    assert not [e for e in p.to_client() if isinstance(e, h2.events.WindowUpdated)]
    p.server.acknowledge(1, m2.flow_len)
    updates = of(h2.events.WindowUpdated, p.to_client())
    assert [(u.stream_id, u.delta) for u in updates] == [(1, 16)]

    p.server.send_message(1, b"reply")
    assert p.server.unsent(1) == 0
    p.server.end_call(1, GrpcStatus.OK)
    client = p.to_client()
    (resp,) = of(h2.events.ResponseReceived, client)
    assert dict(resp.headers)[":status"] == "200"
    assert b"".join(d.data for d in of(h2.events.DataReceived, client)) == encode_message(b"reply")
    (trailers,) = of(h2.events.TrailersReceived, client)
    assert dict(trailers.headers) == {"grpc-status": "0", "grpc-message": ""}
    # The client had not ended its side: it is told to stop (RST NO_ERROR).
    (reset,) = of(h2.events.StreamReset, client)
    assert reset.error_code == h2.errors.ErrorCodes.NO_ERROR
    assert p.server.call_state(1) is None


@pytest.mark.parametrize(
    ("headers", "reason", "status", "grpc_status", "text"),
    [
        ({":method": "GET"}, "http_405", "405", None, None),
        ({"content-type": "text/plain"}, "http_415", "415", None, None),
        (
            {":path": "/ProxyService/Nope"},
            "unknown_method",
            "200",
            "12",
            "unknown method Nope for service ProxyService",
        ),
        (
            {":path": "/kube.Other/Proxy"},
            "unknown_method",
            "200",
            "12",
            "unknown service kube.Other",
        ),
        ({"grpc-encoding": "gzip"}, "grpc_encoding", "200", "12", None),
        ({"grpc-timeout": "soon"}, "grpc_timeout", "200", "13", "malformed grpc-timeout: soon"),
    ],
)
def test_refused_requests_are_answered_by_the_server(
    headers: dict[str, str], reason: str, status: str, grpc_status: str | None, text: str | None
) -> None:
    p = Pair()
    p.request(1, headers)
    assert p.to_server() == [ev.CallRefused(1, reason)]
    assert p.server.call_state(1) is None
    client = p.to_client()
    (resp,) = of(h2.events.ResponseReceived, client)
    got = dict(resp.headers)
    assert got[":status"] == status
    if grpc_status is not None:
        assert got["grpc-status"] == grpc_status
    if text is not None:
        assert got["grpc-message"] == text
    if reason == "grpc_encoding":
        assert got["grpc-accept-encoding"] == "identity"
    assert of(h2.events.StreamEnded, client)


def test_a_response_waits_for_the_clients_window_and_trailers_wait_behind_it() -> None:
    p = Pair(client_window=100)
    p.request(1)
    p.to_server()
    p.server.send_message(1, b"x" * 1000)
    assert p.server.unsent(1) == 1005 - 100
    p.server.end_call(1, GrpcStatus.OK)
    assert p.server.call_state(1) is CallState.ENDING
    client = p.to_client()
    assert sum(len(d.data) for d in of(h2.events.DataReceived, client)) == 100
    assert not of(h2.events.TrailersReceived, client)
    with pytest.raises(LocalProtocolError):
        p.server.send_message(1, b"late")  # the call is ending
    p.client.increment_flow_control_window(2000, stream_id=1)
    assert p.to_server() == [ev.CallWritable(1)]
    client = p.to_client()
    assert sum(len(d.data) for d in of(h2.events.DataReceived, client)) == 905
    assert of(h2.events.TrailersReceived, client)
    assert p.server.call_state(1) is None


def test_calls_share_an_opened_connection_window_round_robin() -> None:
    p = Pair(client_window=1 << 20)
    for sid in (1, 3):
        p.request(sid)
    p.to_server()
    # The client's connection window (65535) is spent by the first call.
    p.server.send_message(1, b"a" * 70000)
    p.server.send_message(3, b"b" * 70000)
    p.to_client()
    assert p.server.unsent(1) == 70005 - 65535 and p.server.unsent(3) == 70005
    p.client.increment_flow_control_window(4 * 16384)
    p.to_server()
    data = of(h2.events.DataReceived, p.to_client())
    # One frame per call per turn: both calls move, neither starves.
    assert {d.stream_id for d in data} == {1, 3}
    assert p.server.unsent(3) < 70005


def test_half_close_and_truncated_body() -> None:
    p = Pair()
    p.request(1)
    p.request(3)
    p.client.send_data(1, encode_message(b"all"), end_stream=True)
    p.client.send_data(3, encode_message(b"cut")[:-1], end_stream=True)
    events = p.to_server()
    assert ev.CallHalfClosed(1) in events
    (bad,) = of(ev.BadMessage, events)
    assert bad.stream_id == 3 and isinstance(bad.error, MalformedMessage)
    assert bad.error.reason == "grpc_truncated"
    assert p.server.call_state(3) is CallState.REMOTE_ENDED
    # Still answerable: trailers-only, as nothing was sent.
    p.server.end_call(3, GrpcStatus.INTERNAL, "bad")
    (resp,) = of(h2.events.ResponseReceived, p.to_client())
    assert dict(resp.headers)["grpc-status"] == "13"


def test_compressed_and_oversized_messages() -> None:
    p = Pair(max_message=100)
    p.request(1)
    p.request(3)
    p.client.send_data(1, b"\x01\x00\x00\x00\x01x")
    p.client.send_data(3, encode_message(b"y" * 101))
    events = of(ev.BadMessage, p.to_server())
    assert {e.stream_id: e.error.reason for e in events} == {1: "grpc_compressed", 3: "too_large"}
    assert isinstance(events[1].error, MessageTooLarge)


def test_a_partial_message_is_credited_on_arrival() -> None:
    """A message larger than the stream window must not deadlock: the bytes
    of an incomplete message are credited as they come."""
    p = Pair(window=65536)
    p.request(1)
    message = encode_message(b"z" * 200_000)
    got: list[Any] = []
    sent = 0
    while sent < len(message):
        n = min(p.client.local_flow_control_window(1), len(message) - sent, 16384)
        assert n > 0, "the client ran out of window"
        p.client.send_data(1, message[sent : sent + n])
        sent += n
        got += of(ev.MessageReceived, p.to_server())
        p.to_client()
    assert [len(m.message) for m in got] == [200_000]


def test_unacknowledged_messages_hold_their_whole_length_of_window() -> None:
    """Messages split across frames keep all their credit until acknowledged:
    a caller that stops handling them stops the client within one window
    (crediting a message's first frames on arrival let a client queue
    window / last-frame-size messages: gigabytes)."""
    p = Pair(window=256 * 1024)
    p.request(1)
    message = encode_message(b"m" * 65543)  # 65548 bytes: 4 frames and 12 bytes
    queued = 0
    got: list[Any] = []
    for _ in range(100):
        room = p.client.local_flow_control_window(1)
        if room < len(message):
            break
        for off in range(0, len(message), 16384):
            p.client.send_data(1, message[off : off + 16384])
        queued += len(message)
        got += of(ev.MessageReceived, p.to_server())
        p.to_client()
    assert 0 < queued <= 256 * 1024, queued
    assert sum(m.flow_len for m in got) == queued
    for m in got:
        p.server.acknowledge(1, m.flow_len)
    p.to_client()
    assert p.client.local_flow_control_window(1) >= len(message)


def test_client_reset_cancels_and_later_calls_are_no_ops() -> None:
    p = Pair()
    p.request(1)
    p.to_server()
    p.client.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
    assert p.to_server() == [ev.CallCancelled(1, h2.errors.ErrorCodes.CANCEL)]
    assert p.server.call_state(1) is None
    p.server.end_call(1, GrpcStatus.OK)  # a race, not misuse
    p.server.reset_call(1)
    p.server.acknowledge(1, 10)
    with pytest.raises(LocalProtocolError):
        p.server.send_message(1, b"x")
    assert not of(h2.events.TrailersReceived, p.to_client())


def test_local_reset_and_double_end() -> None:
    p = Pair(client_window=10)
    p.request(1)
    p.request(3)
    p.to_server()
    p.server.send_message(1, b"q" * 100)
    p.server.reset_call(1)
    assert p.server.call_state(1) is None and p.server.unsent(1) == 0
    (reset,) = of(h2.events.StreamReset, p.to_client())
    assert reset.error_code == h2.errors.ErrorCodes.CANCEL
    p.server.send_message(3, b"w" * 100)
    p.server.end_call(3, GrpcStatus.OK)
    with pytest.raises(LocalProtocolError) as info:
        p.server.end_call(3, GrpcStatus.OK)
    assert info.value.reason == "call_end_in_ending"


def test_refusing_and_goaway() -> None:
    p = Pair()
    p.server.refuse_new_calls()
    p.request(1)
    assert p.to_server() == [ev.CallRefused(1, "refused")]
    (reset,) = of(h2.events.StreamReset, p.to_client())
    assert reset.error_code == h2.errors.ErrorCodes.REFUSED_STREAM

    q = Pair()
    q.request(1)
    q.to_server()
    q.server.goaway()
    assert q.server.goaway_sent
    assert of(h2.events.ConnectionTerminated, q.to_client())
    # The call already open may finish.
    q.server.end_call(1, GrpcStatus.OK)
    assert q.server.call_state(1) is None


def test_client_goaway_ends_every_call() -> None:
    p = Pair()
    p.request(1)
    p.to_server()
    p.client.close_connection()
    assert p.to_server() == [ev.ConnectionEnded(0)]
    assert p.server.calls == {}


def test_http2_violation_raises_remote_protocol_error() -> None:
    p = Pair()
    with pytest.raises(RemoteProtocolError):
        p.server.receive_data(b"\x00\x00\x04\x08\x00\x00\x00\x00\x01\x00\x00\x00\x01")
    assert p.server.closed


def test_the_transition_table() -> None:
    assert transition(CallState.OPEN, CallInput.END) is CallState.ENDING
    assert transition(CallState.RESET, CallInput.END) is CallState.RESET
    for state in CallState:
        assert (state, CallInput.RESET) in CALL_TRANSITIONS
    with pytest.raises(LocalProtocolError) as info:
        transition(CallState.CLOSED, CallInput.END)
    assert info.value.reason == "call_end_in_closed"
