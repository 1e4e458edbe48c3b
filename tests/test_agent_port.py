"""The agent port's first-request sniffer (protocol/agent_port.py), sans-IO:
real HTTP/2 client bytes from h2, fed whole, byte by byte and broken."""

from __future__ import annotations

import h2.config
import h2.connection
import pytest

from protocol import handshake
from protocol.agent_port import (
    KONNECTIVITY_CONNECT_PATH,
    MAX_SNIFF,
    PREFACE,
    FirstRequest,
    Kind,
    method_path,
)


def client_bytes(path: str) -> bytes:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.increment_flow_control_window(1 << 20)
    headers = [
        (":method", "POST"),
        (":scheme", "https"),
        (":authority", "localhost"),
        (":path", path),
        ("content-type", "application/grpc"),
    ]
    conn.send_headers(1, headers)
    return conn.data_to_send()


def test_the_schema_names_konnectivitys_path() -> None:
    assert KONNECTIVITY_CONNECT_PATH == "/AgentService/Connect"
    assert method_path("AgentService", "Connect") == KONNECTIVITY_CONNECT_PATH


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        (KONNECTIVITY_CONNECT_PATH, Kind.KONNECTIVITY),
        (handshake.CONTROL_PATH, Kind.TETHER),
        ("/agent.AgentService/Connect", Kind.TETHER),
        ("/somewhere", Kind.TETHER),
    ],
)
def test_the_first_requests_path_decides(path: str, kind: Kind) -> None:
    data = client_bytes(path)
    whole = FirstRequest()
    assert whole.feed(data) is kind
    assert whole.path == path and bytes(whole.buffer) == data
    drip = FirstRequest()
    results = [drip.feed(data[i : i + 1]) for i in range(len(data))]
    assert results[-1] is kind and all(r is None for r in results[:-1])
    assert bytes(drip.buffer) == data


def _split_headers(data: bytes) -> bytes:
    """The same bytes with the first HEADERS frame's block cut into a
    HEADERS frame and two CONTINUATIONs (as some clients send it)."""
    pos = len(PREFACE)
    while True:
        length = int.from_bytes(data[pos : pos + 3], "big")
        ftype, flags = data[pos + 3], data[pos + 4]
        if ftype == 0x1:
            break
        pos += 9 + length
    sid = data[pos + 5 : pos + 9]
    block = data[pos + 9 : pos + 9 + length]
    assert not flags & 0x28  # neither padded nor with priority: the block is the payload
    a, b, c = block[:3], block[3:7], block[7:]

    def frame(kind: int, fl: int, payload: bytes) -> bytes:
        return len(payload).to_bytes(3, "big") + bytes([kind, fl]) + sid + payload

    split = frame(0x1, flags & ~0x4, a) + frame(0x9, 0, b) + frame(0x9, 0x4, c)
    return data[:pos] + split + data[pos + 9 + length :]


def test_continuation_frames_are_read() -> None:
    data = _split_headers(client_bytes(KONNECTIVITY_CONNECT_PATH))
    first = FirstRequest()
    results = [first.feed(data[i : i + 7]) for i in range(0, len(data), 7)]
    assert Kind.KONNECTIVITY in results
    assert first.path == KONNECTIVITY_CONNECT_PATH
    # Another frame between HEADERS and its CONTINUATION is a violation:
    # Tether's session refuses it.
    broken = data.replace(b"\x00\x00\x04\x09", b"\x00\x00\x04\x08", 1)
    assert FirstRequest().feed(broken) is Kind.TETHER


def test_garbage_falls_back_to_tether_at_once() -> None:
    for junk in (b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01", PREFACE[:5] + b"X"):
        first = FirstRequest()
        assert first.feed(junk) is Kind.TETHER
        assert first.fallback and bytes(first.buffer) == junk


def test_an_oversized_early_frame_or_endless_frames_are_bounded() -> None:
    big = PREFACE + (100_000).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x00"
    assert FirstRequest().feed(big) is Kind.TETHER
    # SETTINGS frames forever, never a request: decided within the bound.
    first = FirstRequest()
    kind = first.feed(PREFACE)
    settings = (0).to_bytes(3, "big") + b"\x04\x00\x00\x00\x00\x00"
    fed = len(PREFACE)
    while kind is None:
        kind = first.feed(settings * 100)
        fed += len(settings) * 100
    assert kind is Kind.TETHER and fed <= MAX_SNIFF + len(settings) * 100


def test_an_undecodable_header_block_falls_back() -> None:
    block = b"\xff\xff\xff\xff\xff"
    frame = len(block).to_bytes(3, "big") + b"\x01\x04\x00\x00\x00\x01" + block
    first = FirstRequest()
    assert first.feed(PREFACE + frame) is Kind.TETHER
    assert first.path is None and first.fallback


def test_drip_feeding_is_linear() -> None:
    """Each byte is scanned once: 64 KiB of 9-byte frames fed a byte at a
    time look at each frame header about once per byte fed, not the whole
    buffer again on every read (which would be quadratic)."""
    settings = (0).to_bytes(3, "big") + b"\x04\x00\x00\x00\x00\x00"
    data = PREFACE + settings * (MAX_SNIFF // len(settings))
    first = FirstRequest()
    kinds = [first.feed(data[i : i + 1]) for i in range(len(data))]
    assert kinds[-1] is None or kinds[-1] is Kind.TETHER
    assert first.work <= 2 * len(data), first.work
