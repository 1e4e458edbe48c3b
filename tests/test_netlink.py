"""The rtnetlink parser (protocol/netlink.py): real layouts, and malformed
input that only ever raises NetlinkError with a reason token."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import netlink
from protocol.netlink import AddressChange, Effect, NetlinkError, RouteChange


def attr(kind: int, value: bytes) -> bytes:
    length = 4 + len(value)
    return struct.pack("=HH", length, kind) + value + b"\0" * ((-length) % 4)


def message(kind: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body


def addr_msg(kind: int, address: str, prefixlen: int = 24, index: int = 3) -> bytes:
    ip = ipaddress.ip_address(address)
    family = netlink.AF_INET if ip.version == 4 else netlink.AF_INET6
    body = struct.pack("=BBBBI", family, prefixlen, 0, 0, index)
    body += attr(netlink.IFA_ADDRESS, ip.packed) + attr(netlink.IFA_LOCAL, ip.packed)
    return message(kind, body)


def route_msg(kind: int, gateway: str, oif: int = 3, dst_len: int = 0) -> bytes:
    body = struct.pack("=BBBBBBBBI", netlink.AF_INET, dst_len, 0, 0, 254, 4, 0, 1, 0)
    body += attr(netlink.RTA_GATEWAY, ipaddress.ip_address(gateway).packed)
    body += attr(netlink.RTA_OIF, struct.pack("=I", oif))
    body += attr(netlink.RTA_TABLE, struct.pack("=I", 254))
    return message(kind, body)


@pytest.mark.timeout(10)
def test_address_and_route_changes_in_one_datagram() -> None:
    data = (
        addr_msg(netlink.RTM_DELADDR, "198.18.0.2")
        + addr_msg(netlink.RTM_NEWADDR, "2001:db8::7", 64)
        + message(netlink.NLMSG_NOOP, b"")
        + route_msg(netlink.RTM_NEWROUTE, "198.18.1.1")
    )
    changes = netlink.parse(data)
    assert changes == [
        AddressChange(False, netlink.AF_INET, "198.18.0.2", 24, 3),
        AddressChange(True, netlink.AF_INET6, "2001:db8::7", 64, 3),
        RouteChange(True, netlink.AF_INET, 0, 254, "198.18.1.1", 3),
    ]
    assert changes[2].is_default  # type: ignore[union-attr]


@pytest.mark.timeout(10)
def test_what_a_change_means_for_a_tunnel() -> None:
    gone = AddressChange(False, netlink.AF_INET, "198.18.0.2", 24, 3)
    assert netlink.affects(gone, "198.18.0.2") is Effect.ADDRESS_GONE
    assert netlink.affects(gone, "::ffff:198.18.0.2") is Effect.ADDRESS_GONE
    assert netlink.affects(gone, "198.18.0.9") is None
    assert netlink.affects(gone, "") is None
    added = AddressChange(True, netlink.AF_INET, "198.18.0.9", 24, 3)
    assert netlink.affects(added, "198.18.0.2") is Effect.ADDRESS_ADDED
    default = RouteChange(False, netlink.AF_INET, 0, 254)
    assert netlink.affects(default, "198.18.0.2") is Effect.ROUTE_CHANGED
    other = RouteChange(True, netlink.AF_INET, 24, 254)
    assert netlink.affects(other, "198.18.0.2") is None
    local_table = RouteChange(True, netlink.AF_INET, 0, 255)
    assert netlink.affects(local_table, "198.18.0.2") is None


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x01\x02", "netlink_truncated"),
        (struct.pack("=IHHII", 8, 20, 0, 0, 0), "netlink_bad_length"),
        (struct.pack("=IHHII", 400, 20, 0, 0, 0), "netlink_bad_length"),
        (message(netlink.RTM_NEWADDR, b"\x02\x18"), "netlink_truncated"),
        (message(netlink.RTM_NEWROUTE, b"\x02" * 5), "netlink_truncated"),
        (
            message(netlink.RTM_NEWADDR, struct.pack("=BBBBI", 2, 24, 0, 0, 1) + b"\x50\x00\x01"),
            "netlink_bad_attr",
        ),
        (
            message(
                netlink.RTM_NEWADDR,
                struct.pack("=BBBBI", 2, 24, 0, 0, 1) + attr(netlink.IFA_LOCAL, b"\x01\x02"),
            ),
            "netlink_bad_attr",
        ),
        (
            message(
                netlink.RTM_NEWROUTE,
                struct.pack("=BBBBBBBBI", 2, 0, 0, 0, 254, 0, 0, 1, 0)
                + attr(netlink.RTA_OIF, b"\x01"),
            ),
            "netlink_bad_attr",
        ),
    ],
)
def test_malformed_messages_name_their_reason(data: bytes, reason: str) -> None:
    with pytest.raises(NetlinkError) as info:
        netlink.parse(data)
    assert info.value.reason == reason


@pytest.mark.timeout(120)
@given(st.binary(max_size=600))
@settings(max_examples=1500, deadline=None)
def test_arbitrary_bytes_parse_or_raise_netlink_error(data: bytes) -> None:
    try:
        changes = netlink.parse(data)
    except NetlinkError as exc:
        assert exc.reason.startswith("netlink_")
    else:
        assert all(isinstance(c, AddressChange | RouteChange) for c in changes)


@pytest.mark.timeout(120)
@given(
    st.lists(
        st.one_of(
            st.builds(addr_msg, st.sampled_from([20, 21]), st.ip_addresses().map(str)),
            st.builds(route_msg, st.sampled_from([24, 25]), st.ip_addresses(v=4).map(str)),
        ),
        min_size=1,
        max_size=8,
    ),
    st.integers(0, 10_000),
    st.integers(0, 255),
)
@settings(max_examples=500, deadline=None)
def test_corrupted_real_messages_never_escape(msgs: list[bytes], where: int, byte: int) -> None:
    """Valid datagrams, then one byte changed or the tail cut: the parser
    returns changes or raises NetlinkError, nothing else."""
    data = bytearray(b"".join(msgs))
    assert len(netlink.parse(bytes(data))) == len(msgs)
    data[where % len(data)] = byte
    for candidate in (bytes(data), bytes(data[: where % len(data)])):
        try:
            netlink.parse(candidate)
        except NetlinkError:
            pass
