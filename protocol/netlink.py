"""rtnetlink address and route messages, sans-IO (the agent's mobility
watch, docs/operations.md "Moving devices").

:func:`parse` turns the bytes of one ``recv`` on a ``NETLINK_ROUTE``
socket into :class:`AddressChange` and :class:`RouteChange` values; other
message types are skipped, and anything that does not fit the layout
(truncated headers, lengths that overrun, attributes that do not add up)
raises :class:`NetlinkError` with a reason token, never anything else.
:func:`affects` says what one change means for a tunnel bound to a local
address. Only the layout of ``linux/netlink.h``, ``linux/rtnetlink.h`` and
``linux/if_addr.h`` is read; no socket is touched here (tether/netio/
netwatch.py owns the socket).
"""

from __future__ import annotations

import enum
import ipaddress
import struct

import attrs

from protocol.errors import ProtocolError

# Message types (linux/rtnetlink.h, linux/netlink.h).
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
# Multicast groups a listener binds to (the bit masks of the legacy API).
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
GROUPS = RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE
# Attributes.
IFA_ADDRESS = 1
IFA_LOCAL = 2
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PREFSRC = 7
RTA_TABLE = 15
RT_TABLE_MAIN = 254
AF_INET = 2
AF_INET6 = 10

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct(
    "=BBBBBBBBI"
)  # family, dst_len, src_len, tos, table, proto, scope, type, flags
_RTATTR = struct.Struct("=HH")  # len, type
_ADDR_LEN = {AF_INET: 4, AF_INET6: 16}


class NetlinkError(ProtocolError):
    """A netlink message that does not fit its layout; ``reason`` is
    ``netlink_truncated``, ``netlink_bad_length`` or ``netlink_bad_attr``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}", reason=reason)


@attrs.frozen
class AddressChange:
    added: bool
    family: int
    address: str
    prefixlen: int
    ifindex: int


@attrs.frozen
class RouteChange:
    added: bool
    family: int
    dst_len: int
    table: int
    gateway: str = ""
    oif: int = 0
    prefsrc: str = ""

    @property
    def is_default(self) -> bool:
        return self.dst_len == 0 and self.table == RT_TABLE_MAIN


Change = AddressChange | RouteChange


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attrs(body: memoryview) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    off = 0
    while off < len(body):
        if len(body) - off < _RTATTR.size:
            raise NetlinkError("netlink_bad_attr", "attribute header truncated")
        length, kind = _RTATTR.unpack_from(body, off)
        if length < _RTATTR.size or off + length > len(body):
            raise NetlinkError("netlink_bad_attr", f"attribute length {length} does not fit")
        out.setdefault(kind & 0x3FFF, bytes(body[off + _RTATTR.size : off + length]))
        off += _align(length)
    return out


def _address(family: int, raw: bytes | None) -> str:
    if raw is None:
        return ""
    size = _ADDR_LEN.get(family)
    if size is None or len(raw) != size:
        raise NetlinkError("netlink_bad_attr", f"address of {len(raw)} bytes for family {family}")
    return str(ipaddress.ip_address(raw))


def _u32(raw: bytes | None) -> int:
    if raw is None:
        return 0
    if len(raw) != 4:
        raise NetlinkError("netlink_bad_attr", f"u32 attribute of {len(raw)} bytes")
    value: int = struct.unpack("=I", raw)[0]
    return value


def _address_change(kind: int, body: memoryview) -> AddressChange | None:
    if len(body) < _IFADDRMSG.size:
        raise NetlinkError("netlink_truncated", "ifaddrmsg truncated")
    family, prefixlen, _flags, _scope, index = _IFADDRMSG.unpack_from(body)
    found = _attrs(body[_IFADDRMSG.size :])
    if family not in _ADDR_LEN:
        return None
    # IFA_LOCAL is the interface's own address where it differs (point-to-point).
    address = _address(family, found.get(IFA_LOCAL, found.get(IFA_ADDRESS)))
    if not address:
        return None
    return AddressChange(kind == RTM_NEWADDR, family, address, prefixlen, index)


def _route_change(kind: int, body: memoryview) -> RouteChange | None:
    if len(body) < _RTMSG.size:
        raise NetlinkError("netlink_truncated", "rtmsg truncated")
    family, dst_len, _src, _tos, table, _proto, _scope, _type, _flags = _RTMSG.unpack_from(body)
    found = _attrs(body[_RTMSG.size :])
    if family not in _ADDR_LEN:
        return None
    if RTA_TABLE in found:
        table = _u32(found[RTA_TABLE])
    return RouteChange(
        added=kind == RTM_NEWROUTE,
        family=family,
        dst_len=dst_len,
        table=table,
        gateway=_address(family, found.get(RTA_GATEWAY)),
        oif=_u32(found.get(RTA_OIF)),
        prefsrc=_address(family, found.get(RTA_PREFSRC)),
    )


def parse(data: bytes | memoryview) -> list[Change]:
    """The address and route changes in one datagram of netlink messages."""
    view = memoryview(data)
    changes: list[Change] = []
    off = 0
    while off < len(view):
        if len(view) - off < _NLMSGHDR.size:
            raise NetlinkError("netlink_truncated", f"{len(view) - off} bytes left, no header")
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(view, off)
        if length < _NLMSGHDR.size or off + length > len(view):
            raise NetlinkError("netlink_bad_length", f"message length {length} does not fit")
        body = view[off + _NLMSGHDR.size : off + length]
        change: Change | None = None
        if kind in (RTM_NEWADDR, RTM_DELADDR):
            change = _address_change(kind, body)
        elif kind in (RTM_NEWROUTE, RTM_DELROUTE):
            change = _route_change(kind, body)
        if change is not None:
            changes.append(change)
        off += _align(length)
    return changes


class Effect(enum.Enum):
    """What a change means for a tunnel bound to one local address."""

    #: The tunnel's own address went away: it cannot work any more.
    ADDRESS_GONE = "address_gone"
    #: The default route changed: the way to the broker may have moved.
    ROUTE_CHANGED = "route_changed"
    #: An address appeared: a waiting reconnect may succeed now.
    ADDRESS_ADDED = "address_added"


def affects(change: Change, local_address: str) -> Effect | None:
    """The effect of ``change`` on a tunnel whose socket is bound to
    ``local_address`` ("" when no tunnel is up), None when it has none."""
    if isinstance(change, AddressChange):
        if change.added:
            return Effect.ADDRESS_ADDED
        if local_address and _same(change.address, local_address):
            return Effect.ADDRESS_GONE
        return None
    if change.is_default:
        return Effect.ROUTE_CHANGED
    return None


def _same(a: str, b: str) -> bool:
    try:
        return _plain(a) == _plain(b)
    except ValueError:
        return False


def _plain(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """``text`` without a zone, an IPv4-mapped IPv6 address as IPv4."""
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
