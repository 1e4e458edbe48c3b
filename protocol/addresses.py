"""Dial addresses: ``host:port`` or ``[v6]:port``, validated once for both ends.

The broker checks every address a frontend sends before routing it (400 on
CONNECT, an error DIAL_RSP on gRPC), and the agent checks every ``dial`` it
receives before resolving it, because a hostile broker, an older broker or a
future frontend may send anything. Both use :func:`parse_address`, so an
address one end accepts the other accepts too.

What is accepted:

- the port is 1 to 5 ASCII decimal digits with a value 1-65535;
- ``[...]`` holds an IPv6 literal, optionally with a zone (``%eth0``);
- otherwise the host is a dotted-quad IPv4 literal or a DNS name: ASCII
  letters, digits, ``-`` and ``_``; labels of 1-63 characters that do not
  start or end with ``-``; at most 253 characters (one trailing dot, the
  root, allowed); a name whose last label is numeric (``127.1``, ``0x7f.1``,
  ``010.0.0.1``) must be a canonical IPv4 literal, so the C resolver's
  inet_aton readings cannot make a name mean another address.

Non-ASCII names are refused: send the ``xn--`` (punycode) form. This keeps
every accepted name away from the IDNA codecs, whose errors
(``UnicodeError`` for ``..`` or a 64-character label) once ended the agent.

Every refusal is an :class:`BadAddress` (an :class:`InvalidMessage`, so a
:class:`~protocol.errors.ProtocolError`) whose ``reason`` is one of
:data:`REASONS`, a bounded set fit for a metric label.
"""

from __future__ import annotations

import ipaddress
import re

import attrs

from protocol.errors import InvalidMessage

#: Longest address text accepted (``host:port`` as sent).
MAX_ADDR_LEN = 1024
#: Longest DNS name without its trailing dot (RFC 1035 section 2.3.4).
MAX_NAME_LEN = 253
MAX_LABEL_LEN = 63

#: Every ``reason`` a :class:`BadAddress` can carry.
REASONS = frozenset(
    {
        "addr_length",  # empty, or longer than MAX_ADDR_LEN
        "addr_syntax",  # not host:port / [v6]:port
        "addr_port",  # port not 1-65535 in ASCII decimal
        "addr_host_empty",
        "addr_ipv6",  # [...] does not hold an IPv6 literal
        "addr_non_ascii",  # a non-ASCII host (use the xn-- form)
        "addr_char",  # a character no host name may hold (space, control, /, @ ...)
        "addr_empty_label",  # "..", ".", a leading dot
        "addr_label_length",  # a label over 63 characters
        "addr_name_length",  # a name over 253 characters
        "addr_label_hyphen",  # a label that starts or ends with "-"
        "addr_numeric",  # numeric-looking but not a dotted-quad IPv4 literal
    }
)


class BadAddress(InvalidMessage):
    """A dial address that cannot be dialled; ``reason`` is in :data:`REASONS`."""

    reason = "addr_syntax"


@attrs.frozen
class Address:
    host: str  # without brackets; an IPv6 literal keeps its zone
    port: int
    kind: str  # "ipv4", "ipv6" or "name"


_LABEL_CHARS = re.compile(r"[A-Za-z0-9_-]+")
_NUMERIC_LABEL = re.compile(r"(?i)[0-9]+|0x[0-9a-f]*")
_ZONE = re.compile(r"[A-Za-z0-9_.\-]{1,16}")


def _short(addr: str) -> str:
    """The address for an error message: bounded, control characters escaped."""
    text = addr if len(addr) <= 80 else addr[:77] + "..."
    return ascii(text)


def _bad(reason: str, addr: str, what: str) -> BadAddress:
    return BadAddress(f"bad address {_short(addr)}: {what}", reason=reason)


def parse_port(text: str, addr: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 5:
        raise _bad("addr_port", addr, "port must be 1-65535 in decimal")
    port = int(text)
    if not 0 < port < 65536:
        raise _bad("addr_port", addr, "port must be 1-65535 in decimal")
    return port


def _check_name(host: str, addr: str) -> str:
    """Return the kind ("ipv4" or "name") of a host outside brackets."""
    if not host.isascii():
        raise _bad("addr_non_ascii", addr, "host is not ASCII (use the xn-- form)")
    name = host[:-1] if host.endswith(".") else host
    if not name:
        raise _bad("addr_empty_label", addr, "empty host name")
    labels = name.split(".")
    for label in labels:
        if not label:
            raise _bad("addr_empty_label", addr, "empty label in host name")
        if not _LABEL_CHARS.fullmatch(label):
            raise _bad("addr_char", addr, "host holds a character a name cannot")
        if len(label) > MAX_LABEL_LEN:
            raise _bad("addr_label_length", addr, f"label over {MAX_LABEL_LEN} characters")
        if label[0] == "-" or label[-1] == "-":
            raise _bad("addr_label_hyphen", addr, "label starts or ends with '-'")
    if len(name) > MAX_NAME_LEN:
        raise _bad("addr_name_length", addr, f"host name over {MAX_NAME_LEN} characters")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        if name != host:  # "10.0.0.1." is no IPv4 literal either
            raise _bad("addr_numeric", addr, "not a dotted-quad IPv4 address")
        try:
            ipaddress.IPv4Address(name)
        except ValueError:
            raise _bad("addr_numeric", addr, "not a dotted-quad IPv4 address") from None
        return "ipv4"
    return "name"


def check_host_name(host: str) -> str:
    """A host name or IPv4 literal as a dial address would carry it (the
    same rules); its kind ("ipv4" or "name"), or BadAddress."""
    return _check_name(host, host)


def parse_address(addr: str) -> Address:
    """Validate ``host:port`` or ``[v6]:port``; raise :class:`BadAddress`."""
    if not isinstance(addr, str) or not addr or len(addr) > MAX_ADDR_LEN:
        size = len(addr) if isinstance(addr, str) else 0
        raise BadAddress(f"bad address: length {size} out of range", reason="addr_length")
    if addr.startswith("["):
        end = addr.find("]")
        if end < 0 or addr[end + 1 : end + 2] != ":":
            raise _bad("addr_syntax", addr, "want [v6]:port")
        host, port_text = addr[1:end], addr[end + 2 :]
        port = parse_port(port_text, addr)
        if not host:
            raise _bad("addr_host_empty", addr, "empty host")
        literal, _, zone = host.partition("%")
        if "%" in host and not _ZONE.fullmatch(zone):
            raise _bad("addr_ipv6", addr, "bad IPv6 zone")
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            raise _bad("addr_ipv6", addr, "not an IPv6 address in brackets") from None
        return Address(host, port, "ipv6")
    host, sep, port_text = addr.rpartition(":")
    if not sep:
        raise _bad("addr_syntax", addr, "want host:port")
    if ":" in host:
        raise _bad("addr_syntax", addr, "want host:port ([v6]:port for IPv6)")
    port = parse_port(port_text, addr)
    if not host:
        raise _bad("addr_host_empty", addr, "empty host")
    return Address(host, port, _check_name(host, addr))
