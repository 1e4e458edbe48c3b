"""Regression tests for the crashes the fuzz targets found (``fuzz/``).

Each crash is kept twice:

- the input libFuzzer wrote, inline, replayed through the same target. Every
  one of them crashes the code before the fix it names (checked against the
  commit before the fixes, with the current harness) and runs clean now;
- a readable reproduction through the public API, which says what the bug
  was without the fuzzer's input format.

The crashes are all of one family: the broker's handlers called h2 after the
peer had, in the same read, reset the stream or closed the connection, and
h2's own exceptions escaped where only the protocol's documented errors may.
In the broker each of them ended the agent's connection with an internal
error and a traceback.
"""

from __future__ import annotations

import base64
import sys
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import pytest

from protocol import events as E
from protocol import messages, session
from protocol.codes import CloseCode
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.grpc_framing import decode_grpc_message

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fuzz"))
import fuzz_targets

#: name: (fuzz target, the crashing input as libFuzzer wrote it, base64)
CRASHES: dict[str, tuple[str, str]] = {
    # A header value that is not UTF-8: h2 (header_encoding='utf-8') let UnicodeDecodeError escape receive_data.
    "header_not_utf8": (
        "session",
        "AAABAgMEBQYHCAkKC4+QkZKTAwEEx3VzZWSjbXNnom5vgqF0q2lkZW50aWZpZXJzpXZhbHVl2SZob3N0PW4xJmlw"
        "djQ9MTAuMC4wLjUmY2lkcj0xMC4xLjAuMC8xNgAAIAEEAAAAA4OHwUSMYSVM5bF+4WEJsKOnwECKSVM5bFpDDoWN"
        "J4EPAAAGAAEAAAADxARwaW5nAAAEAwAAZKNtc2eibm+CoXSraWRlbnRpu7y9vr/AwcLDxMXGx8jNysvMAAAAAQDL"
        "zM3O+/z8AQAAAAD+/w==",
    ),
    # A request for an unknown path, reset or superseded in the same read: answering 404 raised an h2 error out of receive_data.
    "404_for_a_stream_reset_in_the_same_read": (
        "session",
        "AAABAgMEBQYHCAkKC4+QkZKTAwEEx8fHx8fHx8fHx8fHx5SVlpeYmZqbnD09PT09PT09PT09PT09PT09PT09PT09"
        "PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09"
        "PT09PT09PT09PT09PT09PT09PT09PT2dniefoKGio6Slpqeoqba3uLm6u7y9vr/AwcLDxMXGx8jNysvMAAAAAQDL"
        "zM3O+/z8AQAAAAD+/w==",
    ),
    # The control stream reset in the same read as its request: reject_control (and accept_control) raised StreamClosedError in the broker's handler.
    "control_stream_reset_in_the_same_read": (
        "session",
        "AADLyzw0NDTLy8vLy8vLy8vLy8vLy8vLy8vLy8vLAAAAAMvLy8vLy7CwsLCwsLCwsLCwsLCwsLCwsLCwsLCwsLCw"
        "sLCwsLCwsLCwsLCwsLCwsLCwsLCw/////////2ewsLCwsLCwsLCwsLCwsLCwsLCwsLCwsLCwsLCwsLCwsLCwsLCw"
        "sLCwsAAAsAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAACwsLCwsLCwsP///yT///9nsLCwsLCwsLCw6+zt"
        "7u8=",
    ),
    # A keepalive PING after the connection was closed (GOAWAY): h2 refused it with ProtocolError.
    "ping_after_goaway": (
        "session",
        "AB309fb3+D09PT09PT09PT09PT09PT09PT09ddBiDSY9TFKJq8vLy8vLysvLAgAAAAEABABA//8ABQAAQAAACAD/"
        "bKJpZAekY29kZadyZWZ1c2UAAAGEoXSpZGlhbF9mYWlsomlkB6RjbWRlp3JlZnVzZWSjbXNnP6Jub4KhdKtpfuFg"
        "h6qikT8Uy8vLywAAAP/+AAALAAAAAAAEAADOAABkMC4xLjAuMC9TOWxaQ2Vyc7o/FMvLy8sAAAD//gAACwAAAAAA"
        "BAAAzgAAZDAuMS4wLjAvUzl2YWxhKA==",
    ),
    # A control message (a dial) after the agent ended the control stream: StreamClosedError instead of a ProtocolError.
    "message_on_a_closed_control_stream": (
        "session",
        "IAAAAQD/////////////////////////////////////////////////////////////////////////////////"
        "/////wMdAFQFAvP/AAAAAAEBAAEDAQAA",
    ),
    # END_STREAM (and a close map) after GOAWAY: h2 refused it with ProtocolError.
    "end_stream_after_goaway": (
        "session",
        "AP0BAgPv7+/Hx8fHRG5ubm5ubm5ubm5ubm5ubm5ubm5ubm5ubm5u7m5ubm5ubm5ubm5M5bF+4WCHZmllcnOldmFs"
        "dWUAAAABAAEDAQQAAAgA7+//////////////////AAAAAAAAAH///////////2gBEADLy8vLy9/g4T09PT09PT09"
        "PT09PT09AAAAAAAAAH898/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/PzPT3u7u7u7u7u7u7u7u7uDQAdddBiDWdn"
        "ZyYay8tra2tra2tra9HR0dHR0dHR0dHR0dHX0dH/////0dHH0R0AVAUC8/cAAAAAAQEKVVVVVVVVVVVVVVUBA1VV"
        "VVVVVVVVVVVVVVVVVVJVVVVVVQEAAFVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVSVVVV"
        "VVVV/w==",
    ),
    # A data stream requested in the same read as a GOAWAY: accepting it raised in the broker's handler.
    "data_stream_accepted_after_goaway": (
        "session",
        "aGhoaGiYl5eXNDA0LMu3NDQ0NDQ0NDS0NLe3t7e3t7e3t7e3t7e3t7e3t7fBt7e3t7e3t7e3AAA=",
    ),
    # decode_grpc_message on a string with lone surrogates raised UnicodeEncodeError.
    "grpc_message_with_lone_surrogates": (
        "grpc",
        "3t7e3t7e3t7e3t7e3t7e3joAAADe3t7e3t7e3t7e3t7e3t7e3t7e3t7e3t7e3t7e3mIAAAAAAAAAADg4ODg4ODg4"
        "ODg4ODg4ODg4ODg4ODg4ODg4ODg4ODg4ODg4ODg4ODg4ODg4OA==",
    ),
    # Control-stream DATA, then its reset and a new stream, in one read: h2
    # purged the closed stream and increment_flow_control_window raised a
    # bare KeyError (found by the 300 s run of ``make fuzz``).
    "credit_for_a_purged_stream": (
        "session",
        (
            "AAAAAQABAUD//wIAAAEAADcAAAD/IwAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAD///////+8"
            "vLy8Aby8vLwBBPT0wcHBwcHBwcHBwcEAAAAAAAAAAAAAwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHDwcHB"
            "wcHBwfT0/////////////8HBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwfT0////////////////"
            "///////////////09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT0AAAA9PT09PQA9PT09PT09PT09PT0"
            "9PT09PT09P////////////////////////////T09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT/////////"
            "//////////////T09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09PQAAAD09PT09PT09PT09PT09PT09PT0"
            "9PT09PT0////////////////////////////9PQy9PT09PT09PT09PT09PT09PT09PT09PT09PT09AAAAPT09PT0"
            "9PT09PT09PT09Cf09PT09PT09PT/////Om1ldGhvZP////T09PT09PT0AAEBQP//AgAAAQAANwDEAP8jAAD09PT0"
            "9PT09PT09PT09PT09PT09PT09PT09AAAAPT09PT0jfT09PT09PT09PT09PT09PT09PT/////////////////////"
            "///////09PT09PT09PT09AAAAAEAAQEA//8CAAABAAA3AAAA/yMAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
            "AAAAAAAAAAAA//////////////T////09PT09PT09PT09PT09PT09PT09AAAAPT09PT09PT09PT09PT09PT09PT0"
            "9PT09PT/////////////////9PT09PT09PT0AAAA9PT09PT09PT09PT09PT09PT09PT09PT09P//////////////"
            "//////////////////////////////8u////////////////////////+//////////////09PT09PT09PT09PT0"
            "9PQAAAD09PQAAAD09PT09PT09PT0//////////////////T09AUAAP//////////////////////////////////"
            "////////9PT09PT09PQFAAD/"
        ),
    ),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", sorted(CRASHES))
def test_crashing_input_runs_clean(name: str) -> None:
    target, data = CRASHES[name]
    fuzz_targets.TARGETS[target](base64.b64decode(data))


# --------------------------------------------------------- readable versions


def _broker() -> session.TunnelSession:
    sess = session.TunnelSession(session.Role.BROKER, clock=time.monotonic)
    sess.initiate()
    sess.data_to_send()
    return sess


def _agent(**config: bool) -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, **config))
    conn.initiate_connection()
    return conn


def _request(path: str, extra: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "https"),
        (":authority", "b"),
        (":path", path),
        ("content-type", session.CONTENT_TYPE),
        *(extra or []),
    ]


def _accepted() -> tuple[session.TunnelSession, h2.connection.H2Connection]:
    sess, agent = _broker(), _agent()
    agent.send_headers(1, _request(session.CONTROL_PATH, [("tether-agent-id", "a")]))
    sess.receive_data(agent.data_to_send())
    sess.accept_control({})
    agent.receive_data(sess.data_to_send())
    return sess, agent


def test_header_not_utf8() -> None:
    sess = _broker()
    agent = _agent(validate_outbound_headers=False, normalize_outbound_headers=False)
    agent.send_headers(
        1,
        [
            (b":method", b"POST"),
            (b":scheme", b"https"),
            (b":authority", b"b"),
            (b":path", session.CONTROL_PATH.encode()),
            (b"tether-agent-id", b"a\xff\xfe"),
        ],
    )
    with pytest.raises(RemoteProtocolError) as info:
        sess.receive_data(agent.data_to_send())
    assert info.value.reason == "header_encoding"
    assert sess.data_to_send()  # the GOAWAY


@pytest.mark.parametrize("accept", [True, False], ids=["accept", "reject"])
def test_control_stream_reset_in_the_same_read(accept: bool) -> None:
    sess, agent = _broker(), _agent()
    agent.send_headers(1, _request(session.CONTROL_PATH, [("tether-agent-id", "a")]))
    agent.reset_stream(1)
    events = sess.receive_data(agent.data_to_send())
    assert isinstance(events[-1], E.ConnectionClosed)
    if accept:
        sess.accept_control({})
    else:
        sess.reject_control(403, "identity_mismatch: test")
    sess.data_to_send()


def test_404_for_a_stream_reset_in_the_same_read() -> None:
    sess, agent = _accepted()
    agent.send_headers(
        3, [(":method", "GET"), (":scheme", "https"), (":authority", "b"), (":path", "/x")]
    )
    agent.reset_stream(3)
    sess.receive_data(agent.data_to_send())
    sess.data_to_send()


def test_data_stream_accepted_after_goaway_in_the_same_read() -> None:
    sess, agent = _accepted()
    agent.send_headers(3, _request(session.STREAM_PATH, [(session.DIAL_ID_HEADER, "7")]))
    agent.close_connection()
    events = sess.receive_data(agent.data_to_send())
    (requested,) = [e for e in events if isinstance(e, E.DataStreamRequested)]
    sess.accept_data_stream(requested.stream_id)
    sess.data_to_send()


def test_message_on_a_closed_control_stream() -> None:
    sess, agent = _accepted()
    agent.end_stream(1)
    sess.receive_data(agent.data_to_send())
    with pytest.raises(LocalProtocolError):
        sess.send_message(messages.Dial(id=1, addr="a:1", timeout_ms=1000))


def test_sending_after_goaway() -> None:
    sess, agent = _accepted()
    agent.send_headers(3, _request(session.STREAM_PATH, [(session.DIAL_ID_HEADER, "7")]))
    sess.receive_data(agent.data_to_send())
    sess.accept_data_stream(3)
    sess.close(h2.errors.ErrorCodes.NO_ERROR, "shutdown")
    sess.send_ping(b"fuzzping")
    assert sess.send_close(3, messages.Close(CloseCode.RESET, "x")) is False
    assert sess.end_stream(3) is False
    assert sess.send_data(3, b"data") == 0
    with pytest.raises(LocalProtocolError):
        sess.send_message(messages.Cancel(id=7))
    sess.data_to_send()


def test_grpc_message_with_lone_surrogates() -> None:
    decoded = decode_grpc_message("\ud800%41")
    assert decoded.endswith("A") and "\ufffd" in decoded


def test_credit_for_a_stream_h2_already_purged() -> None:
    sess, agent = _accepted()
    agent.send_data(1, messages.encode(messages.Drain()))
    agent.reset_stream(1)
    agent.send_headers(3, _request(session.STREAM_PATH, [(session.DIAL_ID_HEADER, "1")]))
    events = sess.receive_data(agent.data_to_send())
    assert isinstance(events[0], E.MessageReceived)
    assert isinstance(events[1], E.ConnectionClosed)
