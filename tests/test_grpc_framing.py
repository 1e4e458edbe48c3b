from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import (
    InvalidMessage,
    MalformedMessage,
    MessageTooLarge,
    ProtocolError,
    RemoteProtocolError,
)
from protocol.grpc_framing import (
    REASON_BAD_FLAG,
    REASON_COMPRESSED,
    REASON_TRUNCATED,
    GrpcMessageDecoder,
    GrpcStatus,
    decode_grpc_message,
    encode_grpc_message,
    encode_message,
    grpc_trailers,
    parse_timeout,
    status_for_error,
)

payloads = st.lists(st.binary(max_size=300), max_size=12)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, prev = [], 0
    for p in [*points, len(data)]:
        chunks.append(data[prev:p])
        prev = p
    return chunks


def test_encode_message_layout() -> None:
    assert encode_message(b"") == b"\x00\x00\x00\x00\x00"
    assert encode_message(b"abc") == b"\x00\x00\x00\x00\x03abc"
    assert encode_message(b"x" * 0x10203) == b"\x00\x00\x01\x02\x03" + b"x" * 0x10203


@given(payloads, st.lists(st.integers(min_value=0), max_size=20))
def test_round_trip_any_chunking(msgs: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(encode_message(m) for m in msgs)
    dec = GrpcMessageDecoder()
    out: list[bytes] = []
    for chunk in split_at(wire, cuts):
        out.extend(dec.feed(chunk))
    assert out == msgs
    assert dec.buffered == 0
    dec.end_of_stream_check()


@given(payloads)
def test_round_trip_byte_at_a_time(msgs: list[bytes]) -> None:
    wire = b"".join(encode_message(m) for m in msgs)
    dec = GrpcMessageDecoder()
    out: list[bytes] = []
    for i in range(len(wire)):
        out.extend(dec.feed(wire[i : i + 1]))
        # Everything received and not yet handed out is accounted for.
        assert dec.buffered == i + 1 - sum(len(m) + 5 for m in out)
    assert out == msgs


def test_buffered_counts_partial_header_and_body() -> None:
    dec = GrpcMessageDecoder()
    assert dec.feed(b"\x00\x00\x00") == []
    assert dec.buffered == 3
    assert dec.feed(b"\x00\x04ab") == []
    assert dec.buffered == 7
    assert dec.feed(b"cd\x00") == [b"abcd"]
    assert dec.buffered == 1


def test_max_size_is_inclusive() -> None:
    dec = GrpcMessageDecoder(max_message_size=10)
    assert dec.feed(encode_message(b"0123456789")) == [b"0123456789"]
    with pytest.raises(MessageTooLarge):
        dec.feed(encode_message(b"0123456789a"))


def test_oversize_detected_from_header_alone() -> None:
    dec = GrpcMessageDecoder(max_message_size=1024)
    assert dec.feed(b"\x00\x00\x00") == []
    # The header completes; no body byte has arrived, and none is waited for.
    with pytest.raises(MessageTooLarge) as info:
        dec.feed(b"\x04\x01")
    assert "larger than max (1025 vs. 1024)" in str(info.value)
    assert dec.buffered == 0


def test_oversize_huge_declared_length_with_some_body() -> None:
    dec = GrpcMessageDecoder()
    with pytest.raises(MessageTooLarge):
        dec.feed(b"\x00\xff\xff\xff\xff" + b"x" * 100)
    assert dec.buffered == 0


def test_oversize_after_valid_messages_in_same_chunk() -> None:
    dec = GrpcMessageDecoder(max_message_size=4)
    with pytest.raises(MessageTooLarge):
        dec.feed(encode_message(b"ok") + b"\x00\x00\x00\x00\x05")


def test_decoder_is_poisoned_after_error() -> None:
    dec = GrpcMessageDecoder(max_message_size=4)
    with pytest.raises(MessageTooLarge):
        dec.feed(b"\x00\x00\x00\x00\x05")
    with pytest.raises(MessageTooLarge):
        dec.feed(encode_message(b"ok"))
    with pytest.raises(MessageTooLarge):
        dec.end_of_stream_check()


def test_compressed_flag_rejected() -> None:
    dec = GrpcMessageDecoder()
    with pytest.raises(MalformedMessage) as info:
        dec.feed(b"\x01\x00\x00\x00\x01x")
    assert info.value.reason == REASON_COMPRESSED
    assert status_for_error(info.value) == (
        GrpcStatus.INTERNAL,
        "grpc: compressed flag set with identity or empty encoding",
    )


@pytest.mark.parametrize("flag", [2, 0x80, 0xFF])
def test_unknown_flag_rejected(flag: int) -> None:
    dec = GrpcMessageDecoder()
    with pytest.raises(MalformedMessage) as info:
        dec.feed(bytes([flag]) + b"\x00\x00\x00\x00")
    assert info.value.reason == REASON_BAD_FLAG
    assert status_for_error(info.value) == (
        GrpcStatus.INTERNAL,
        f"grpc: received unexpected payload format {flag}",
    )


def test_oversize_wins_over_bad_flag() -> None:
    # grpc-go checks the length before the flag.
    with pytest.raises(MessageTooLarge):
        GrpcMessageDecoder(max_message_size=1).feed(b"\x01\x00\x00\x00\x02")


@pytest.mark.parametrize("tail", [b"\x00", b"\x00\x00\x00\x00", b"\x00\x00\x00\x00\x03ab"])
def test_end_of_stream_inside_message(tail: bytes) -> None:
    dec = GrpcMessageDecoder()
    assert dec.feed(encode_message(b"full") + tail) == [b"full"]
    with pytest.raises(MalformedMessage) as info:
        dec.end_of_stream_check()
    assert info.value.reason == REASON_TRUNCATED
    assert status_for_error(info.value)[0] == GrpcStatus.INTERNAL


@given(st.lists(st.binary(max_size=64), max_size=10), st.integers(min_value=0, max_value=64))
def test_arbitrary_bytes_raise_only_protocol_errors(chunks: list[bytes], limit: int) -> None:
    dec = GrpcMessageDecoder(max_message_size=limit)
    try:
        for chunk in chunks:
            for msg in dec.feed(chunk):
                assert len(msg) <= limit
        dec.end_of_stream_check()
    except ProtocolError:
        pass


def test_status_for_error_mapping() -> None:
    too_large = MessageTooLarge("grpc: received message larger than max (9 vs. 4)")
    assert status_for_error(too_large) == (GrpcStatus.RESOURCE_EXHAUSTED, str(too_large))
    bad_pb = MalformedMessage("grpc: failed to unmarshal the received message: x")
    assert status_for_error(bad_pb) == (GrpcStatus.INTERNAL, str(bad_pb))
    assert status_for_error(InvalidMessage("mismatch"))[0] == GrpcStatus.INVALID_ARGUMENT
    assert status_for_error(RemoteProtocolError("x"))[0] == GrpcStatus.INTERNAL


def test_status_codes() -> None:
    assert GrpcStatus.OK == 0
    assert GrpcStatus.RESOURCE_EXHAUSTED == 8
    assert GrpcStatus.UNIMPLEMENTED == 12
    assert GrpcStatus.INTERNAL == 13
    assert GrpcStatus.UNAVAILABLE == 14
    assert GrpcStatus.UNAUTHENTICATED == 16
    assert [s.value for s in GrpcStatus] == list(range(17))


def test_trailers() -> None:
    assert grpc_trailers(GrpcStatus.OK) == [("grpc-status", "0"), ("grpc-message", "")]
    assert grpc_trailers(GrpcStatus.UNAVAILABLE, "no agent") == [
        ("grpc-status", "14"),
        ("grpc-message", "no agent"),
    ]


@pytest.mark.parametrize(
    ("message", "encoded"),
    [
        ("plain ASCII: ok ~!", "plain ASCII: ok ~!"),
        ("100% done", "100%25 done"),
        ("%25", "%2525"),
        ("caf\u00e9", "caf%C3%A9"),
        ("\u2603 snow", "%E2%98%83 snow"),
        ("line\nbreak\ttab", "line%0Abreak%09tab"),
        ("\x7f", "%7F"),
    ],
)
def test_grpc_message_percent_encoding(message: str, encoded: str) -> None:
    assert encode_grpc_message(message) == encoded
    assert grpc_trailers(GrpcStatus.INTERNAL, message)[1] == ("grpc-message", encoded)
    assert decode_grpc_message(encoded) == message


@given(st.text())
def test_grpc_message_round_trip(message: str) -> None:
    encoded = encode_grpc_message(message)
    assert all(0x20 <= ord(c) <= 0x7E for c in encoded)
    if all(not 0xD800 <= ord(c) <= 0xDFFF for c in message):
        assert decode_grpc_message(encoded) == message


def test_decode_grpc_message_is_lenient() -> None:
    assert decode_grpc_message("50%") == "50%"
    assert decode_grpc_message("%zz%4") == "%zz%4"
    assert decode_grpc_message("%FF") == "\ufffd"


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("10S", 10.0),
        ("500m", 0.5),
        ("100u", 100e-6),
        ("250n", 250e-9),
        ("1H", 3600.0),
        ("2M", 120.0),
        ("0S", 0.0),
        ("99999999S", 99999999.0),
    ],
)
def test_parse_timeout(value: str, seconds: float) -> None:
    assert parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    ["", "S", "10", "10s", "10 S", " 10S", "10S ", "-1S", "+1S", "1.5S", "123456789S", "\u0661S"],
)
def test_parse_timeout_rejects(value: str) -> None:
    assert parse_timeout(value) is None


@given(st.text(max_size=12))
def test_parse_timeout_never_raises(value: str) -> None:
    result = parse_timeout(value)
    assert result is None or result >= 0
