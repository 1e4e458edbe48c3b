"""Control messages and the data-stream close map: round trips and strict validation."""

from __future__ import annotations

import ipaddress
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.codes import CloseCode, DialFailCode
from protocol.errors import InvalidMessage, MessageTooLarge, ProtocolError
from protocol.framing import ControlDecoder
from protocol.messages import (
    MAX_EARLY_DATA,
    MAX_MESSAGE_SIZE,
    MAX_TEXT_LEN,
    MAX_TIMEOUT_MS,
    MAX_U64,
    Cancel,
    Close,
    Dial,
    DialFail,
    Drain,
    Identifiers,
    decode,
    encode,
    split_host_port,
)

# ------------------------------------------------------------------ strategies

u64 = st.integers(min_value=0, max_value=MAX_U64)
timeouts = st.integers(min_value=1, max_value=MAX_TIMEOUT_MS)
ports = st.integers(min_value=1, max_value=65535)
texts = st.text(max_size=200)
label = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,20}[A-Za-z0-9])?", fullmatch=True)
dns_names = st.lists(label, min_size=1, max_size=4).map(".".join)
ipv4_hosts = st.ip_addresses(v=4).map(str)
ipv6_hosts = st.ip_addresses(v=6).map(lambda a: f"[{a}]")
addresses = st.builds(
    lambda host, port: f"{host}:{port}", st.one_of(dns_names, ipv4_hosts, ipv6_hosts), ports
)

dials = st.builds(
    Dial,
    id=u64,
    addr=addresses,
    timeout_ms=timeouts,
    proto=st.sampled_from(["tcp", "udp", "x"]) | st.text(max_size=20),
    early=st.none() | st.binary(min_size=1, max_size=MAX_EARLY_DATA),
)
cancels = st.builds(Cancel, id=u64)
drains = st.builds(Drain, retry_ms=st.none() | st.integers(0, MAX_TIMEOUT_MS))
dial_fails = st.builds(DialFail, id=u64, code=st.sampled_from(DialFailCode), msg=texts)
identifiers = st.builds(Identifiers, value=texts)
closes = st.builds(Close, code=st.sampled_from(CloseCode), msg=texts)
control_messages = st.one_of(dials, cancels, drains, dial_fails, identifiers)
all_messages = control_messages | closes


def wire(msg: object) -> object:
    """What the peer's msgpack decoder sees."""
    return msgpack.unpackb(encode(msg), raw=False)  # type: ignore[arg-type]


def packed(body: dict[str, Any]) -> bytes:
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


# ------------------------------------------------------------------ round trips


@given(all_messages)
@settings(max_examples=300)
def test_round_trip(msg: Any) -> None:
    data = encode(msg)
    assert len(data) <= MAX_MESSAGE_SIZE
    assert decode(msgpack.unpackb(data, raw=False)) == msg


@given(control_messages)
@settings(max_examples=100)
def test_round_trip_through_control_decoder(msg: Any) -> None:
    assert ControlDecoder().feed(encode(msg)) == [msg]


@given(dials)
@settings(max_examples=100)
def test_dial_wire_form(msg: Dial) -> None:
    body = wire(msg)
    assert isinstance(body, dict)
    assert body["t"] == "dial"
    assert body["id"] == msg.id and body["addr"] == msg.addr
    assert body["timeout_ms"] == msg.timeout_ms and body["proto"] == msg.proto
    if msg.early is None:
        assert "early" not in body
    else:
        assert isinstance(body["early"], bytes) and body["early"] == msg.early


@pytest.mark.parametrize("size", [1, 1000, MAX_EARLY_DATA])
def test_dial_early_data_round_trips(size: int) -> None:
    early = bytes(range(256)) * (size // 256) + bytes(size % 256)
    msg = Dial(id=1, addr="[fd00::1]:8443", timeout_ms=5000, early=early)
    assert decode(wire(msg)) == msg


@pytest.mark.parametrize(
    "addr,host,port",
    [
        ("example.com:443", "example.com", 443),
        ("10.0.0.5:22", "10.0.0.5", 22),
        ("[::1]:80", "::1", 80),
        ("[fd00::5]:65535", "fd00::5", 65535),
        ("[fe80::1%eth0]:1", "fe80::1%eth0", 1),
        ("node-1.cluster.local:10250", "node-1.cluster.local", 10250),
    ],
)
def test_split_host_port(addr: str, host: str, port: int) -> None:
    assert split_host_port(addr) == (host, port)
    assert decode(wire(Dial(id=3, addr=addr, timeout_ms=1))) == Dial(3, addr, 1)


@given(st.ip_addresses(v=6), ports)
def test_split_host_port_ipv6(addr: ipaddress.IPv6Address, port: int) -> None:
    assert split_host_port(f"[{addr}]:{port}") == (str(addr), port)


def test_drain_with_and_without_retry() -> None:
    assert wire(Drain()) == {"t": "drain"}
    assert wire(Drain(retry_ms=0)) == {"t": "drain", "retry_ms": 0}
    assert decode({"t": "drain"}) == Drain(None)
    assert decode({"t": "drain", "retry_ms": 30_000}) == Drain(30_000)


@pytest.mark.parametrize("code", list(DialFailCode))
def test_dial_fail_every_code(code: DialFailCode) -> None:
    msg = DialFail(id=MAX_U64, code=code, msg="why")
    assert wire(msg) == {"t": "dial_fail", "id": MAX_U64, "code": code.value, "msg": "why"}
    assert decode(wire(msg)) == msg


@pytest.mark.parametrize("code", list(CloseCode))
def test_close_every_code(code: CloseCode) -> None:
    assert decode(wire(Close(code, "m"))) == Close(code, "m")


def test_optional_msg_defaults_to_empty() -> None:
    assert decode({"t": "dial_fail", "id": 1, "code": "dns"}) == DialFail(1, DialFailCode.DNS, "")
    assert decode({"t": "close", "code": "reset"}) == Close(CloseCode.RESET, "")


def test_unknown_fields_are_ignored() -> None:
    assert decode({"t": "cancel", "id": 5, "future": [1, 2]}) == Cancel(5)


def test_empty_early_is_absent() -> None:
    body = {"t": "dial", "id": 1, "proto": "tcp", "addr": "h:1", "timeout_ms": 1, "early": b""}
    assert decode(body) == Dial(1, "h:1", 1, early=None)


# ------------------------------------------------------------------ unknown types


@pytest.mark.parametrize("kind", ["", "Dial", "dial2", "ping", "x" * 100])
def test_unknown_type_is_none(kind: str) -> None:
    assert decode({"t": kind, "id": 1}) is None


def test_unknown_type_is_skipped_by_control_decoder() -> None:
    data = packed({"t": "future", "x": 1}) + encode(Cancel(9)) + packed({"t": "later"})
    assert ControlDecoder().feed(data) == [Cancel(9)]


# ------------------------------------------------------------------ strict validation

DIAL = {"t": "dial", "id": 1, "proto": "tcp", "addr": "h:1", "timeout_ms": 1000}


def _with(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        if value is _DROP:
            out.pop(key)
        else:
            out[key] = value
    return out


_DROP = object()

INVALID = [
    # wrong types: bool where int, str where bytes, bytes where str, floats
    _with(DIAL, id=True),
    _with(DIAL, id=False),
    _with(DIAL, id=1.0),
    _with(DIAL, id="1"),
    _with(DIAL, timeout_ms=True),
    _with(DIAL, timeout_ms=1000.0),
    _with(DIAL, early="text"),
    _with(DIAL, early=[1, 2]),
    _with(DIAL, addr=b"h:1"),
    _with(DIAL, proto=b"tcp"),
    _with(DIAL, proto=None),
    # out of range
    _with(DIAL, id=-1),
    _with(DIAL, id=MAX_U64 + 1),
    _with(DIAL, timeout_ms=0),
    _with(DIAL, timeout_ms=-5),
    _with(DIAL, timeout_ms=MAX_TIMEOUT_MS + 1),
    # missing fields
    _with(DIAL, id=_DROP),
    _with(DIAL, addr=_DROP),
    _with(DIAL, timeout_ms=_DROP),
    _with(DIAL, proto=_DROP),
    # text too long
    _with(DIAL, proto="x" * (MAX_TEXT_LEN + 1)),
    {"t": "cancel"},
    {"t": "cancel", "id": True},
    {"t": "cancel", "id": -1},
    {"t": "cancel", "id": MAX_U64 + 1},
    {"t": "cancel", "id": "7"},
    {"t": "drain", "retry_ms": True},
    {"t": "drain", "retry_ms": -1},
    {"t": "drain", "retry_ms": MAX_TIMEOUT_MS + 1},
    {"t": "drain", "retry_ms": 1.5},
    {"t": "drain", "retry_ms": None},
    {"t": "dial_fail", "id": 1, "code": "nope"},
    {"t": "dial_fail", "id": 1, "code": "REFUSED"},
    {"t": "dial_fail", "id": 1, "code": b"refused"},
    {"t": "dial_fail", "id": 1},
    {"t": "dial_fail", "id": True, "code": "dns"},
    {"t": "dial_fail", "id": 1, "code": "dns", "msg": b"bytes"},
    {"t": "dial_fail", "id": 1, "code": "dns", "msg": "x" * (MAX_TEXT_LEN + 1)},
    {"t": "identifiers"},
    {"t": "identifiers", "value": b"host=a"},
    {"t": "identifiers", "value": 1},
    {"t": "close", "code": "nope"},
    {"t": "close", "code": "refused"},  # a dial-fail code is not a close code
    {"t": "close"},
    {"t": "close", "code": "reset", "msg": 5},
    # the envelope itself
    {"id": 1},
    {"t": 1},
    {"t": b"dial"},
    {"t": None},
]


@pytest.mark.parametrize("body", INVALID, ids=[repr(b)[:60] for b in INVALID])
def test_invalid_fields_raise(body: dict[str, Any]) -> None:
    with pytest.raises(InvalidMessage):
        decode(body)


@pytest.mark.parametrize("body", [[], "dial", 1, None, b"\x80", [("t", "dial")]])
def test_non_map_raises(body: object) -> None:
    with pytest.raises(InvalidMessage):
        decode(body)


BAD_ADDRESSES = [
    "",
    "host",
    "host:",
    ":80",
    "host:0",
    "host:65536",
    "host:99999999999999999999",
    "host:-1",
    "host:+80",
    "host: 80",
    "host:80 ",
    "host:8a",
    "::1:80",
    "fd00::1",
    "[::1]",
    "[::1]80",
    "[::1]:",
    "[::1:80",
    "[]:80",
    "a b:80",
    "a/b:80",
    "a?b:80",
    "a#b:80",
    "user@host:80",
    "h\t:80",
    "h:²",  # non-ASCII digits: isdigit() is true, int() raises ValueError
    "h:١٢",  # Arabic-Indic digits: int() would accept them
    "h:\uff18\uff10",  # fullwidth digits
    "x" * 1020 + ":8080",
]


@pytest.mark.parametrize("addr", BAD_ADDRESSES)
def test_bad_addresses(addr: str) -> None:
    """Malformed addresses are refused by split_host_port (the frontends'
    check), but a dial carrying one still decodes: the agent answers it with
    ``dial_fail`` ``bad_address`` instead of closing the whole connection."""
    with pytest.raises(InvalidMessage):
        split_host_port(addr)
    assert decode(_with(DIAL, addr=addr)) == Dial(id=1, addr=addr, timeout_ms=1000)


def test_non_ascii_port_in_control_stream_decodes_as_a_dial() -> None:
    """Regression: a '²' port used to escape as a bare ValueError; now the
    message decodes and only the address check refuses it."""
    (msg,) = ControlDecoder().feed(packed(_with(DIAL, addr="h:²")))
    assert isinstance(msg, Dial) and msg.addr == "h:²"
    with pytest.raises(InvalidMessage):
        split_host_port(msg.addr)


def test_oversized_dial_address_is_still_a_message_error() -> None:
    with pytest.raises(InvalidMessage):
        decode(_with(DIAL, addr="x" * (MAX_TEXT_LEN + 1)))


@given(st.text(max_size=40) | st.text(alphabet=":[]0123456789a ²١\uff18%/", max_size=12))
@settings(max_examples=300)
def test_split_host_port_raises_only_invalid_message(addr: str) -> None:
    try:
        host, port = split_host_port(addr)
    except InvalidMessage:
        return
    assert 0 < port < 65536 and host
    port_text = addr.rpartition(":")[2]
    assert port_text.isascii() and int(port_text) == port


@given(
    st.dictionaries(
        st.sampled_from(["t", "id", "addr", "timeout_ms", "proto", "early", "code", "msg", "x"]),
        st.one_of(
            st.sampled_from(["dial", "cancel", "drain", "dial_fail", "identifiers", "close"]),
            st.integers(min_value=-(2**64), max_value=2**65),
            st.booleans(),
            st.none(),
            st.floats(allow_nan=True),
            st.text(max_size=20),
            st.binary(max_size=20),
            st.lists(st.integers(), max_size=2),
        ),
    )
)
@settings(max_examples=500)
def test_decode_raises_only_protocol_errors(body: dict[str, Any]) -> None:
    try:
        msg = decode(body)
    except ProtocolError:
        return
    if msg is not None:
        assert decode(wire(msg)) == msg


# ------------------------------------------------------------------ sizes


def test_encode_oversize_raises() -> None:
    with pytest.raises(MessageTooLarge):
        encode(Identifiers("x" * (MAX_MESSAGE_SIZE + 1)))
    with pytest.raises(MessageTooLarge):
        encode(DialFail(1, DialFailCode.ERROR, "é" * MAX_MESSAGE_SIZE))


def test_encode_at_the_limit() -> None:
    overhead = len(encode(Identifiers("")))
    # a str of n ASCII chars costs n bytes plus a 3-byte (str16) or 5-byte (str32) header
    value = "x" * (MAX_MESSAGE_SIZE - overhead - 2)
    data = encode(Identifiers(value))
    assert len(data) == MAX_MESSAGE_SIZE
    with pytest.raises(MessageTooLarge):
        encode(Identifiers(value + "x"))


def test_oversize_early_data_raises() -> None:
    body = _with(DIAL, early=b"\0" * (MAX_EARLY_DATA + 1))
    with pytest.raises(MessageTooLarge):
        decode(body)
    with pytest.raises(MessageTooLarge):
        ControlDecoder().feed(packed(body))
