"""Dial address validation (protocol.addresses): what the broker refuses
before routing and the agent refuses before resolving."""

from __future__ import annotations

import ipaddress
import socket

import idna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.addresses import (
    MAX_LABEL_LEN,
    MAX_NAME_LEN,
    REASONS,
    Address,
    BadAddress,
    parse_address,
)
from protocol.errors import InvalidMessage, ProtocolError
from protocol.messages import split_host_port

ports = st.integers(min_value=1, max_value=65535)
label = st.from_regex(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?", fullmatch=True)
# A last label that is not numeric (else it must be an IPv4 literal).
tld = st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,20}[A-Za-z0-9_]", fullmatch=True)
names = st.builds(lambda ls, t: ".".join([*ls, t]), st.lists(label, max_size=3), tld).filter(
    lambda n: len(n) <= MAX_NAME_LEN
)


@pytest.mark.parametrize(
    ("addr", "host", "port", "kind"),
    [
        ("example.com:443", "example.com", 443, "name"),
        ("example.com.:443", "example.com.", 443, "name"),
        ("localhost:1", "localhost", 1, "name"),
        ("10.0.0.5:22", "10.0.0.5", 22, "ipv4"),
        ("[::1]:80", "::1", 80, "ipv6"),
        ("[::ffff:10.0.0.1]:80", "::ffff:10.0.0.1", 80, "ipv6"),
        ("[fe80::1%eth0]:1", "fe80::1%eth0", 1, "ipv6"),
        ("node-1.cluster.local:10250", "node-1.cluster.local", 10250, "name"),
        ("xn--bcher-kva.example:443", "xn--bcher-kva.example", 443, "name"),
        ("_svc.example:53", "_svc.example", 53, "name"),
        ("a" * 63 + ".b:1", "a" * 63 + ".b", 1, "name"),
        ("h:00080", "h", 80, "name"),
    ],
)
def test_good_addresses(addr: str, host: str, port: int, kind: str) -> None:
    assert parse_address(addr) == Address(host, port, kind)
    assert split_host_port(addr) == (host, port)


# Row 3 of issue 11 and its relatives: each ended the agent process once.
@pytest.mark.parametrize(
    ("addr", "reason"),
    [
        ("..:80", "addr_empty_label"),
        (".:80", "addr_empty_label"),
        ("x..y:443", "addr_empty_label"),
        (".x:443", "addr_empty_label"),
        ("x..:443", "addr_empty_label"),
        ("a" * 64 + ":443", "addr_label_length"),
        ("b." + "a" * 64 + ".c:443", "addr_label_length"),
        (".".join(["a" * 63] * 4) + ":1", "addr_name_length"),
        ("\u200d:80", "addr_non_ascii"),
        ("bücher.example:443", "addr_non_ascii"),
        ("\u0661:80", "addr_non_ascii"),
        ("\ud800:80", "addr_non_ascii"),
        ("a\x00b:80", "addr_char"),
        ("a b:80", "addr_char"),
        ("a\nb:80", "addr_char"),
        ("evil\r\nFORGED:80", "addr_char"),
        ("a/b:80", "addr_char"),
        ("user@host:80", "addr_char"),
        ("-a:80", "addr_label_hyphen"),
        ("a-.b:80", "addr_label_hyphen"),
        ("127.1:80", "addr_numeric"),
        ("0x7f.1:80", "addr_numeric"),
        ("010.0.0.1:80", "addr_numeric"),
        ("1.2.3.4.5:80", "addr_numeric"),
        ("256.1.1.1:80", "addr_numeric"),
        ("10.0.0.1.:80", "addr_numeric"),
        ("0x7f:80", "addr_numeric"),
        ("[1.2.3.4]:80", "addr_ipv6"),
        ("[foo]:80", "addr_ipv6"),
        ("[fe80::1%]:80", "addr_ipv6"),
        ("[fe80::1%a b]:80", "addr_ipv6"),
        ("[]:80", "addr_host_empty"),
        (":80", "addr_host_empty"),
        ("h:0", "addr_port"),
        ("h:65536", "addr_port"),
        ("h:000080", "addr_port"),
        ("h:-1", "addr_port"),
        ("h:²", "addr_port"),
        ("h: 80", "addr_port"),
        ("h", "addr_syntax"),
        ("::1:80", "addr_syntax"),
        ("[::1]80", "addr_syntax"),
        ("", "addr_length"),
        ("x" * 1020 + ":8080", "addr_length"),
    ],
)
def test_bad_addresses_carry_a_stable_reason(addr: str, reason: str) -> None:
    with pytest.raises(BadAddress) as caught:
        parse_address(addr)
    assert caught.value.reason == reason
    assert isinstance(caught.value, InvalidMessage)
    # The message is one printable line, whatever the address held.
    text = str(caught.value)
    assert text.isprintable() and len(text) < 200


@given(names, ports)
def test_every_ldh_name_is_accepted(name: str, port: int) -> None:
    assert parse_address(f"{name}:{port}") == Address(name, port, "name")


@given(st.ip_addresses(v=4), ports)
def test_every_ipv4_literal_is_accepted(ip: ipaddress.IPv4Address, port: int) -> None:
    assert parse_address(f"{ip}:{port}") == Address(str(ip), port, "ipv4")


@given(st.ip_addresses(v=6), ports)
def test_every_ipv6_literal_is_accepted(ip: ipaddress.IPv6Address, port: int) -> None:
    assert parse_address(f"[{ip}]:{port}") == Address(str(ip), port, "ipv6")


_ALPHABET = st.sampled_from(list(".:[]%-_0123456789aZx \t\n\x00\x1b\x7f\u00e9\u200d\u0661\ud800²"))


@given(
    st.text(max_size=80)
    | st.text(alphabet=_ALPHABET, max_size=24)
    | st.builds(
        lambda n, p: f"{n}:{p}",
        st.text(alphabet=_ALPHABET, max_size=300),
        st.integers(-5, 70000),
    )
)
@settings(max_examples=1000)
def test_anything_is_an_address_or_a_bad_address(addr: str) -> None:
    """Whatever the text, parse_address returns or raises BadAddress with a
    known reason; and what it accepts, the agent's resolver path can encode
    without an error (the stdlib IDNA codec of getaddrinfo, trio's IDNA 2008)."""
    try:
        parsed = parse_address(addr)
    except BadAddress as exc:
        assert exc.reason in REASONS
        assert isinstance(exc, ProtocolError)
        return
    assert 0 < parsed.port < 65536
    assert parsed.host.isascii() and parsed.host.isprintable()
    _encodable(parsed)


def _encodable(parsed: Address) -> None:
    if parsed.kind == "name":
        assert all(0 < len(x) <= MAX_LABEL_LEN for x in parsed.host.rstrip(".").split("."))
        parsed.host.encode("idna")  # what socket.getaddrinfo does with a str host
        parsed.host.encode("ascii")  # trio passes ASCII through unchanged
    else:
        ipaddress.ip_address(parsed.host.partition("%")[0])


@given(names, ports)
def test_accepted_names_never_make_the_resolver_raise_a_codec_error(name: str, port: int) -> None:
    parsed = parse_address(f"{name}:{port}")
    _encodable(parsed)
    try:
        socket.getaddrinfo(parsed.host, port, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
    except socket.gaierror:
        pass  # a name is not numeric: the fast path refuses it cleanly


def test_row3_names_did_break_the_codecs() -> None:
    """The inputs of issue 11 row 3 raise UnicodeError in the codecs the
    agent's resolver path uses: this is why they are refused up front."""
    for host in ("..", ".", "x..y", "a" * 64):
        with pytest.raises(UnicodeError):
            host.encode("idna")
    with pytest.raises(idna.IDNAError):
        idna.encode("\u0661", uts46=True)
