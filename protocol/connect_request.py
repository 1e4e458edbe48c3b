"""The CONNECT request, sans-IO: :class:`ConnectRequestParser` turns the
bytes a frontend client sends into one decision (a target to dial or a
refusal), and :func:`render_response` writes the error responses. The trio
adapter is :mod:`broker.connect_frontend`."""

from __future__ import annotations

from http import HTTPStatus

import attrs
import h11

from protocol.errors import InvalidMessage
from protocol.messages import split_host_port

MAX_REQUEST_HEADER_BYTES = 16 * 1024


def render_response(conn: h11.Connection, status: int, message: str) -> bytes:
    """An error response: a one-line ``text/plain`` body, ``Connection: close``."""
    body = (message.replace("\n", " ").replace("\r", " ") + "\n").encode()
    headers = [
        ("content-type", "text/plain; charset=utf-8"),
        ("content-length", str(len(body))),
        ("connection", "close"),
    ]
    try:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            data = (
                conn.send(h11.Response(status_code=status, headers=headers, reason=_reason(status)))
                or b""
            )
        else:  # h11 gave up on the request: write the response by hand
            data = _raw_response(status, headers)
        data += conn.send(h11.Data(data=body)) or b"" if conn.our_state is h11.SEND_BODY else body
    except h11.LocalProtocolError:
        data = _raw_response(status, headers) + body
    return data


def _reason(status: int) -> str:
    """The standard reason phrase (``502 Bad Gateway``), never an empty one."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _raw_response(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_reason(status)}"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@attrs.frozen
class ConnectTarget:
    """A well-formed ``CONNECT host:port`` request."""

    target: str
    #: Bytes the client sent after the request header (kept, sent first).
    early: bytes


@attrs.frozen
class ConnectRefusal:
    """A request we answer with an error; ``status`` 0: the client closed
    before sending one, nothing to answer."""

    status: int
    reason: str  # tether_bad_input_total label
    message: str


class ConnectRequestParser:
    """The request half of the CONNECT frontend, sans-IO: bytes in, one
    decision out. Never raises, whatever the client sends."""

    def __init__(self) -> None:
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEADER_BYTES)

    def error_response(self, status: int, message: str) -> bytes:
        """The bytes of an error answer to this request (see :func:`render_response`)."""
        return render_response(self.conn, status, message)

    def established_response(self) -> bytes:
        """``200 Connection established``: from here on the bytes are the tunnel's."""
        reply = h11.Response(status_code=200, headers=[], reason=b"Connection established")
        return self.conn.send(reply) or b""

    def feed(self, data: bytes) -> ConnectTarget | ConnectRefusal | None:
        """Add received bytes (``b""``: the client closed); None: need more."""
        conn = self.conn
        try:
            conn.receive_data(data)
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            return ConnectRefusal(status, "malformed_request", f"malformed request: {exc}")
        if event is h11.NEED_DATA:
            return None
        if not isinstance(event, h11.Request):
            return ConnectRefusal(0, "closed", "closed before a request")
        method = event.method.decode("ascii", "replace")
        target = event.target.decode("ascii", "replace")
        if method != "CONNECT":
            return ConnectRefusal(405, "not_connect", f"only CONNECT is served, not {method}")
        try:
            split_host_port(target)  # validated before routing: never reaches an agent
        except InvalidMessage as exc:
            return ConnectRefusal(400, exc.reason, f"bad CONNECT target: {exc}")
        return ConnectTarget(target, bytes(conn.trailing_data[0]))


def parse_connect_request(data: bytes) -> ConnectTarget | ConnectRefusal:
    """Parse a complete request (the client closes after ``data``)."""
    parser = ConnectRequestParser()
    result = parser.feed(data)
    if result is None:
        result = parser.feed(b"")
    return result or ConnectRefusal(0, "closed", "closed before a request")
