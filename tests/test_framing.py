"""Incremental decoders: control stream (msgpack maps) and data stream (bins + close)."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import messages
from protocol.codes import CloseCode, DialFailCode
from protocol.errors import MalformedMessage, MessageTooLarge, ProtocolError, RemoteProtocolError
from protocol.framing import (
    MAX_PAYLOAD_OBJECT,
    CloseReceived,
    ControlDecoder,
    DataStreamDecoder,
    Payload,
    bin_header,
    bin_header_size,
    check_clean_end,
)
from protocol.messages import MAX_MESSAGE_SIZE, Cancel, Close, Dial, DialFail, Drain, Identifiers

# ------------------------------------------------------------------ helpers

control_messages = st.one_of(
    st.builds(Cancel, id=st.integers(0, 2**64 - 1)),
    st.builds(Drain, retry_ms=st.none() | st.integers(0, 60_000)),
    st.builds(
        DialFail,
        id=st.integers(0, 2**64 - 1),
        code=st.sampled_from(DialFailCode),
        msg=st.text(max_size=50),
    ),
    st.builds(Identifiers, value=st.text(max_size=50)),
    st.builds(
        Dial,
        id=st.integers(0, 2**64 - 1),
        addr=st.sampled_from(["a:1", "10.0.0.1:443", "[fd00::1]:22"]),
        timeout_ms=st.integers(1, 60_000),
        early=st.none() | st.binary(min_size=1, max_size=3000),
    ),
)


def packed(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """Cut ``data`` at the given offsets (taken modulo its length, deduplicated)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in [*points, len(data)]:
        pieces.append(data[last:p])
        last = p
    return pieces


cut_lists = st.lists(st.integers(min_value=0, max_value=10**7), max_size=40)


def feed_control(chunks: list[bytes]) -> list[messages.Message]:
    dec = ControlDecoder()
    out: list[messages.Message] = []
    for c in chunks:
        out.extend(dec.feed(c))
    return out


def feed_data(dec: DataStreamDecoder, chunks: list[bytes]) -> list[Any]:
    """Feed chunks; check that every feed accounts for exactly its own bytes."""
    out: list[Any] = []
    for c in chunks:
        items = dec.feed(c)
        assert sum(i.wire_len for i in items) == len(c), "credit must be byte-exact per feed"
        assert all(i.wire_len >= 0 for i in items)
        out.extend(items)
    return out


def raises_only_protocol_errors(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except ProtocolError:
        pass


# ------------------------------------------------------------------ control stream


@given(st.lists(control_messages, max_size=20), cut_lists)
@settings(max_examples=200)
def test_control_any_chunking(msgs: list[messages.Message], cuts: list[int]) -> None:
    wire = b"".join(messages.encode(m) for m in msgs)
    assert feed_control(split_at(wire, cuts)) == msgs


@given(st.lists(control_messages, min_size=1, max_size=10))
@settings(max_examples=50)
def test_control_byte_by_byte(msgs: list[messages.Message]) -> None:
    wire = b"".join(messages.encode(m) for m in msgs)
    assert feed_control([wire[i : i + 1] for i in range(len(wire))]) == msgs


@given(st.lists(control_messages, min_size=1, max_size=10), st.data())
@settings(max_examples=100)
def test_control_truncated_yields_only_whole_messages(
    msgs: list[messages.Message], data: st.DataObject
) -> None:
    encoded = [messages.encode(m) for m in msgs]
    wire = b"".join(encoded)
    cut = data.draw(st.integers(0, len(wire) - 1))
    dec = ControlDecoder()
    got = dec.feed(wire[:cut])
    # exactly the messages that fit entirely in the prefix
    complete, total = 0, 0
    for e in encoded:
        if total + len(e) > cut:
            break
        total += len(e)
        complete += 1
    assert got == msgs[:complete]
    assert dec.buffered == cut - total
    assert dec.feed(wire[cut:]) == msgs[complete:]
    assert dec.buffered == 0


@given(st.binary(max_size=2000))
@settings(max_examples=500)
def test_control_arbitrary_bytes_raise_only_protocol_errors(data: bytes) -> None:
    raises_only_protocol_errors(ControlDecoder().feed, data)


@given(st.lists(st.binary(max_size=200), max_size=10))
@settings(max_examples=200)
def test_control_arbitrary_chunks_raise_only_protocol_errors(chunks: list[bytes]) -> None:
    dec = ControlDecoder()
    try:
        for c in chunks:
            dec.feed(c)
    except ProtocolError:
        pass


@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats()
        | st.text(max_size=10)
        | st.binary(max_size=10),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.text(max_size=5) | st.just("t"), inner, max_size=4)
        ),
        max_leaves=20,
    )
)
@settings(max_examples=300)
def test_control_arbitrary_msgpack_raises_only_protocol_errors(obj: Any) -> None:
    raises_only_protocol_errors(ControlDecoder().feed, packed(obj))


@pytest.mark.parametrize(
    "body",
    [
        {"t": "future", "blob": b"x" * 70_000},  # one big bin
        {"t": "future", "s": "x" * 70_000},  # one big str
        {"t": "future", "l": [b"x" * 1000] * 70},  # many small parts (parsed incrementally)
        {"t": "future", "l": [b"x" * 100] * 700},
        {"t": "future", "a": b"x" * 65_000, "b": b"y" * 1000},
        {"t": "identifiers", "value": "v" * (MAX_MESSAGE_SIZE + 1)},
    ],
    ids=["bin", "str", "list-1000", "list-100", "two-bins", "identifiers"],
)
@pytest.mark.parametrize("chunk", [None, 1000, 7])
def test_control_message_over_64k_raises(body: dict[str, Any], chunk: int | None) -> None:
    """Regression: msgpack's C unpacker consumes a partial object's bytes into its
    parse state (tell() advances), so a large map made of many small parts used
    to slip past the size check unnoticed."""
    wire = packed(body)
    assert len(wire) > MAX_MESSAGE_SIZE
    chunks = [wire] if chunk is None else [wire[i : i + chunk] for i in range(0, len(wire), chunk)]
    dec = ControlDecoder()
    with pytest.raises(MessageTooLarge):
        for c in chunks:
            dec.feed(c)


def test_control_oversize_detected_without_waiting_for_the_rest() -> None:
    wire = packed({"t": "future", "l": [b"x" * 100] * 1000})
    dec = ControlDecoder()
    with pytest.raises(MessageTooLarge):
        dec.feed(wire[:MAX_MESSAGE_SIZE])
    dec = ControlDecoder()
    dec.feed(wire[: MAX_MESSAGE_SIZE - 1])
    with pytest.raises(MessageTooLarge):
        dec.feed(wire[MAX_MESSAGE_SIZE - 1 : MAX_MESSAGE_SIZE + 200])


def test_control_message_of_exactly_64k_is_fine() -> None:
    def body(n: int) -> bytes:
        return packed({"t": "future", "pad": b"p" * n})

    n = MAX_MESSAGE_SIZE - len(body(1000)) + 1000
    big = body(n)
    assert len(big) == MAX_MESSAGE_SIZE
    tail = messages.encode(Cancel(1))
    for chunks in ([big + tail], [big[:1], big[1:] + tail], [big, tail], [tail + big[:9], big[9:]]):
        assert feed_control(chunks) == [Cancel(1)]
    with pytest.raises(MessageTooLarge):
        ControlDecoder().feed(body(n + 1))


def test_control_burst_of_small_messages_over_64k_in_total() -> None:
    msgs = [Cancel(i) for i in range(20_000)]
    wire = b"".join(messages.encode(m) for m in msgs)
    assert len(wire) > 2 * MAX_MESSAGE_SIZE
    dec = ControlDecoder()
    assert dec.feed(wire) == msgs
    assert dec.buffered == 0
    # and straddling chunk boundaries at an odd stride
    assert feed_control([wire[i : i + 65_537] for i in range(0, len(wire), 65_537)]) == msgs


def test_control_rejects_close_map() -> None:
    with pytest.raises(RemoteProtocolError):
        ControlDecoder().feed(messages.encode(Close(CloseCode.RESET, "x")))


@pytest.mark.parametrize(
    "data,exc",
    [
        (b"\xc1", MalformedMessage),  # never-used msgpack byte
        (packed([1, 2]), ProtocolError),  # not a map
        (packed({1: 2}), MalformedMessage),  # non-str key (strict_map_key)
        (packed({"t": "cancel", "id": True}), ProtocolError),
        (b"\xd4\x01\x00", MalformedMessage),  # ext types are refused
    ],
)
def test_control_bad_input(data: bytes, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        ControlDecoder().feed(data)


# ------------------------------------------------------------------ data stream

payload_lists = st.lists(
    st.one_of(
        st.binary(max_size=300),
        st.sampled_from([0, 1, 255, 256, 65_535, 65_536, 70_000]).map(lambda n: b"\xab" * n),
    ),
    max_size=8,
)
close_or_none = st.none() | st.builds(Close, code=st.sampled_from(CloseCode), msg=st.text())


def data_wire(payloads: list[bytes], close: Close | None) -> bytes:
    wire = b"".join(bin_header(len(p)) + p for p in payloads)
    if close is not None:
        wire += messages.encode(close)
    return wire


def test_bin_header_matches_msgpack() -> None:
    for n in (0, 1, 255, 256, 65_535, 65_536, MAX_PAYLOAD_OBJECT):
        assert bin_header(n) + b"x" * n == packed(b"x" * n)
        assert len(bin_header(n)) == bin_header_size(n)


@given(payload_lists, close_or_none, cut_lists)
@settings(max_examples=200)
def test_data_any_chunking(payloads: list[bytes], close: Close | None, cuts: list[int]) -> None:
    wire = data_wire(payloads, close)
    dec = DataStreamDecoder()
    items = feed_data(dec, split_at(wire, cuts))
    assert b"".join(i.data for i in items if isinstance(i, Payload)) == b"".join(payloads)
    # credit accounting: every wire byte is accounted for exactly once
    assert sum(i.wire_len for i in items) == len(wire)
    closes = [i for i in items if isinstance(i, CloseReceived)]
    if close is None:
        assert closes == []
    else:
        assert [c.close for c in closes] == [close]
        assert items[-1] == closes[0]
    assert not dec.mid_object
    check_clean_end(dec)


@given(payload_lists, close_or_none)
@settings(max_examples=30)
def test_data_byte_by_byte(payloads: list[bytes], close: Close | None) -> None:
    wire = data_wire([p[:500] for p in payloads], close)
    items = feed_data(DataStreamDecoder(), [wire[i : i + 1] for i in range(len(wire))])
    got = b"".join(i.data for i in items if isinstance(i, Payload))
    assert got == b"".join(p[:500] for p in payloads)


def test_data_msgpack_encoded_bins_are_accepted() -> None:
    payloads = [b"", b"a", b"b" * 300, b"c" * 70_000]
    wire = b"".join(packed(p) for p in payloads)
    items = feed_data(DataStreamDecoder(), [wire])
    assert b"".join(i.data for i in items) == b"".join(payloads)


def test_data_empty_bin_is_credited() -> None:
    assert DataStreamDecoder().feed(b"\xc4\x00") == [Payload(b"", 2)]


def test_data_header_credit_with_payload() -> None:
    dec = DataStreamDecoder()
    assert dec.feed(b"\xc5\x01") == [Payload(b"", 2)]
    assert dec.mid_object
    assert dec.feed(b"\x00" + b"z" * 10) == [Payload(b"z" * 10, 11)]
    assert dec.feed(b"z" * 246) == [Payload(b"z" * 246, 246)]
    assert not dec.mid_object


@pytest.mark.parametrize("header", [b"\xc4", b"\xc5", b"\xc6"])
def test_data_oversized_bin_raises_from_the_header(header: bytes) -> None:
    size = {b"\xc4": 1, b"\xc5": 2, b"\xc6": 4}[header]
    limit = {1: 100, 2: 1000, 4: MAX_PAYLOAD_OBJECT}[size]
    length = (limit + 1).to_bytes(size, "big")
    dec = DataStreamDecoder() if size == 4 else DataStreamDecoder(max_payload_object=limit)
    # header only, no payload at all: the decoder must refuse right away
    with pytest.raises(MessageTooLarge):
        dec.feed(header + length)
    dec = DataStreamDecoder() if size == 4 else DataStreamDecoder(max_payload_object=limit)
    dec.feed(header)
    with pytest.raises(MessageTooLarge):
        for b in length:
            dec.feed(bytes([b]))


def test_data_bin_at_the_limit_is_fine() -> None:
    dec = DataStreamDecoder(max_payload_object=1000)
    items = feed_data(dec, [bin_header(1000) + b"q" * 1000])
    assert b"".join(i.data for i in items) == b"q" * 1000


@pytest.mark.parametrize(
    "data",
    [
        b"\x00",  # positive fixint
        b"\xff",  # negative fixint
        b"\xa3abc",  # fixstr
        b"\xd9\x01a",  # str8
        b"\x91\x01",  # fixarray
        b"\xc0",  # nil
        b"\xc3",  # true
        b"\xca\x00\x00\x00\x00",  # float32
        b"\xd4\x01\x00",  # fixext
        b"\xc1",  # never used
    ],
)
def test_data_non_bin_non_map_is_malformed(data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        DataStreamDecoder().feed(data)
    dec = DataStreamDecoder()
    dec.feed(bin_header(3) + b"abc")
    with pytest.raises(MalformedMessage):
        dec.feed(data)


@pytest.mark.parametrize(
    "body,exc",
    [
        ({"t": "cancel", "id": 1}, RemoteProtocolError),  # a control message is not a close
        ({"t": "future"}, RemoteProtocolError),  # unknown type: still not a close
        ({"t": "close", "code": "bogus"}, ProtocolError),
        ({"t": "close", "code": 1}, ProtocolError),
        ({}, ProtocolError),
    ],
)
def test_data_bad_map(body: dict[str, Any], exc: type[Exception]) -> None:
    with pytest.raises(exc):
        DataStreamDecoder().feed(packed(body))


def test_data_close_map_over_the_limit() -> None:
    body = packed({"t": "close", "code": "reset", "pad": [b"x" * 100] * 700})
    dec = DataStreamDecoder()
    with pytest.raises(MessageTooLarge):
        for i in range(0, len(body), 1000):
            dec.feed(body[i : i + 1000])


@pytest.mark.parametrize(
    "after",
    [
        bin_header(1) + b"x",
        bin_header(0),
        messages.encode(Close(CloseCode.ERROR, "again")),
        b"\x00",
    ],
)
def test_data_after_close_is_a_session_error(after: bytes) -> None:
    close = messages.encode(Close(CloseCode.RESET, "bye"))
    with pytest.raises(RemoteProtocolError):
        DataStreamDecoder().feed(close + after)
    dec = DataStreamDecoder()
    items = dec.feed(close)
    assert items == [CloseReceived(Close(CloseCode.RESET, "bye"), len(close))]
    with pytest.raises(RemoteProtocolError):
        dec.feed(after)


def test_data_close_split_credits_exactly() -> None:
    close = messages.encode(Close(CloseCode.SHUTDOWN, "m" * 100))
    dec = DataStreamDecoder()
    items = feed_data(dec, [close[:1], close[1:50]])
    assert dec.mid_object
    with pytest.raises(MalformedMessage):
        check_clean_end(dec)
    items += feed_data(dec, [close[50:]])
    assert isinstance(items[-1], CloseReceived)
    assert sum(i.wire_len for i in items) == len(close)
    assert not dec.mid_object


@given(st.binary(max_size=2000))
@settings(max_examples=500)
def test_data_arbitrary_bytes_raise_only_protocol_errors(data: bytes) -> None:
    raises_only_protocol_errors(DataStreamDecoder().feed, data)


@given(st.lists(st.binary(max_size=100), max_size=10))
@settings(max_examples=200)
def test_data_arbitrary_chunks_raise_only_protocol_errors(chunks: list[bytes]) -> None:
    dec = DataStreamDecoder(max_payload_object=500)
    try:
        for c in chunks:
            feed_data(dec, [c])
        check_clean_end(dec)
    except ProtocolError:
        pass


@given(payload_lists, close_or_none, st.data())
@settings(max_examples=100)
def test_data_mid_object_tracks_boundaries(
    payloads: list[bytes], close: Close | None, data: st.DataObject
) -> None:
    objects = [bin_header(len(p)) + p for p in payloads]
    if close is not None:
        objects.append(messages.encode(close))
    wire = b"".join(objects)
    boundaries, pos = {0}, 0
    for o in objects:
        pos += len(o)
        boundaries.add(pos)
    cut = data.draw(st.integers(0, len(wire)))
    dec = DataStreamDecoder()
    feed_data(dec, [wire[:cut]])
    assert dec.mid_object == (cut not in boundaries)
    if cut in boundaries:
        check_clean_end(dec)
    else:
        with pytest.raises(MalformedMessage):
            check_clean_end(dec)


def test_fresh_decoder_is_clean() -> None:
    dec = DataStreamDecoder()
    assert not dec.mid_object
    check_clean_end(dec)
    assert dec.feed(b"") == []
