"""The sans-IO CONNECT request parser (protocol/connect_request.py): one
decision per request, whatever the client sends, and the error responses."""

from __future__ import annotations

import h11
import pytest

from protocol.connect_request import (
    MAX_REQUEST_HEADER_BYTES,
    ConnectRefusal,
    ConnectRequestParser,
    ConnectTarget,
    parse_connect_request,
    render_response,
)

pytestmark = pytest.mark.timeout(30)

REQUEST = b"CONNECT 10.0.0.5:10250 HTTP/1.1\r\nHost: 10.0.0.5:10250\r\n\r\n"


def test_a_connect_request_names_its_target_and_keeps_early_bytes() -> None:
    assert parse_connect_request(REQUEST) == ConnectTarget("10.0.0.5:10250", b"")
    early = parse_connect_request(REQUEST + b"\x16\x03\x01 client hello")
    assert early == ConnectTarget("10.0.0.5:10250", b"\x16\x03\x01 client hello")
    v6 = parse_connect_request(b"CONNECT [fd00::1]:443 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert v6 == ConnectTarget("[fd00::1]:443", b"")


def test_bytes_may_arrive_one_at_a_time() -> None:
    parser = ConnectRequestParser()
    for byte in REQUEST[:-1]:
        assert parser.feed(bytes([byte])) is None
    assert parser.feed(REQUEST[-1:] + b"early") == ConnectTarget("10.0.0.5:10250", b"early")


@pytest.mark.parametrize(
    ("data", "status", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 405, "not_connect"),
        (b"CONNECT 10.0.0.5 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "addr_syntax"),
        (b"CONNECT 10.0.0.5:0 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "addr_port"),
        (b"CONNECT bad..name:80 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "addr_empty_label"),
        (b"\x00\x01\x02 nonsense\r\n\r\n", 400, "malformed_request"),
        (b"CONNECT 10.0.0.5:1 HTTP/1.1\r\nno colon here\r\n\r\n", 400, "malformed_request"),
        (b"", 0, "closed"),
        # Closed mid-header: a truncated request, answered (if the client still reads).
        (b"CONNECT 10.0.0.5:1 HTTP/1.1\r\n", 400, "malformed_request"),
    ],
)
def test_refusals(data: bytes, status: int, reason: str) -> None:
    result = parse_connect_request(data)
    assert isinstance(result, ConnectRefusal)
    assert (result.status, result.reason) == (status, reason), result.message


def test_oversized_headers_are_refused_without_waiting_for_the_end() -> None:
    parser = ConnectRequestParser()
    header = b"CONNECT 10.0.0.5:1 HTTP/1.1\r\nX-Pad: " + b"a" * (MAX_REQUEST_HEADER_BYTES + 1)
    result = parser.feed(header)
    assert isinstance(result, ConnectRefusal) and result.status == 431


def test_the_parser_never_raises() -> None:
    """Whatever follows a decision, feeding more returns a value."""
    for data in (REQUEST, b"GET / HTTP/1.1\r\n\r\n", b"\xff" * 100):
        parser = ConnectRequestParser()
        parser.feed(data)
        parser.feed(b"more")
        parser.feed(b"")


def _response(data: bytes) -> tuple[h11.Response, bytes]:
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="CONNECT", target="x:1", headers=[("host", "x")]))
    client.receive_data(data)
    head = client.next_event()
    assert isinstance(head, h11.Response)
    body = b""
    while isinstance(event := client.next_event(), h11.Data):
        body += event.data
    return head, body


def test_error_responses_are_one_line_and_close() -> None:
    parser = ConnectRequestParser()
    parser.feed(b"CONNECT 10.0.0.5:1 HTTP/1.1\r\nHost: x\r\n\r\n")
    head, body = _response(render_response(parser.conn, 502, "dial failed:\nrefused\r"))
    assert head.status_code == 502 and head.reason == b"Bad Gateway"
    assert dict(head.headers)[b"connection"] == b"close"
    assert body == b"dial failed: refused \n"


def test_an_error_response_after_h11_gave_up_is_written_by_hand() -> None:
    parser = ConnectRequestParser()
    refusal = parser.feed(b"\x00 garbage\r\n\r\n")
    assert isinstance(refusal, ConnectRefusal)
    data = render_response(parser.conn, refusal.status, refusal.message)
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"content-length: " in data and data.endswith(b"\n")
    unknown = render_response(ConnectRequestParser().conn, 599, "odd")
    assert unknown.startswith(b"HTTP/1.1 599 Error\r\n")
