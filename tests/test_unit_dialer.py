"""The agent's target dialer (edge_agent/dialer.py) and destination policy
(edge_agent/policy.py), in process. Real dials go to a trio listener on
127.0.0.1 only; timeouts run on the autojump clock; what the resolver could
raise is put in its place with monkeypatch, so no test asks a DNS server."""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import pytest
import trio
import trio.testing

from edge_agent import dialer
from edge_agent.dialer import DialFailed, classify, dial_target
from edge_agent.policy import Policy
from protocol.codes import DialFailCode

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def listener() -> AsyncIterator[trio.SocketListener]:
    (lst,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    yield lst
    await lst.aclose()


def _port(lst: trio.SocketListener) -> int:
    return int(lst.socket.getsockname()[1])


async def _fails(addr: str, timeout: float = 5.0, policy: Policy | None = None) -> DialFailed:
    with pytest.raises(DialFailed) as failed:
        await dial_target(addr, timeout, policy)
    return failed.value


# --------------------------------------------------------------- dialing


async def test_a_dial_connects_and_carries_bytes(listener: trio.SocketListener) -> None:
    with trio.fail_after(10):
        stream = await dial_target(f"127.0.0.1:{_port(listener)}", 5.0)
        async with stream:
            server = await listener.accept()
            async with server:
                await stream.send_all(b"ping")
                assert await server.receive_some(4) == b"ping"


async def test_an_allowed_address_connects(listener: trio.SocketListener) -> None:
    port = _port(listener)
    with trio.fail_after(10):
        stream = await dial_target(f"127.0.0.1:{port}", 5.0, Policy.parse(f"127.0.0.0/8:{port}"))
        await stream.aclose()


async def test_refused() -> None:
    # Bound and never listening: the kernel answers the SYN with a RST.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with trio.fail_after(10):
            failed = await _fails(f"127.0.0.1:{port}")
    assert failed.code is DialFailCode.REFUSED
    assert failed.msg.startswith("connection refused: ")


async def test_a_dial_that_hangs_times_out(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def hang(*args: Any, **kw: Any) -> NoReturn:
        await trio.sleep_forever()

    monkeypatch.setattr(trio, "open_tcp_stream", hang)
    start = trio.current_time()
    failed = await _fails("127.0.0.1:9", timeout=7.5)
    assert failed.code is DialFailCode.TIMEOUT
    assert failed.msg == "connect to 127.0.0.1:9 timed out after 7.5s"
    assert trio.current_time() - start == pytest.approx(7.5)


async def test_a_slow_resolver_counts_against_the_timeout(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def slow(*args: Any, **kw: Any) -> NoReturn:
        await trio.sleep(60)
        raise AssertionError("the deadline passed first")

    monkeypatch.setattr(trio.socket, "getaddrinfo", slow)
    failed = await _fails("target.example:80", timeout=2, policy=Policy.parse("10.0.0.0/8:*"))
    assert failed.code is DialFailCode.TIMEOUT


@pytest.mark.parametrize(
    ("addr", "reason"),
    [
        ("no-port", "addr_syntax"),
        ("host:0", "addr_port"),
        ("host:65536", "addr_port"),
        ("[::1:80", "addr_syntax"),
        ("bad..name:80", "addr_empty_label"),
        ("h\u00e9llo:80", "addr_non_ascii"),
        ("", "addr_length"),
    ],
)
async def test_a_bad_address_is_refused_before_any_resolver(
    addr: str, reason: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def never(*args: Any, **kw: Any) -> NoReturn:
        raise AssertionError("no dial for a bad address")

    monkeypatch.setattr(trio, "open_tcp_stream", never)
    failed = await _fails(addr)
    assert failed.code is DialFailCode.BAD_ADDRESS
    assert failed.msg.startswith(f"{reason}: ")


async def test_the_policy_forbids_by_every_resolved_address(
    listener: trio.SocketListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = _port(listener)
    failed = await _fails(f"127.0.0.1:{port}", policy=Policy.parse("10.0.0.0/8:*"))
    assert failed.code is DialFailCode.FORBIDDEN
    assert "127.0.0.1" in failed.msg
    # A name that resolves to an allowed and a forbidden address is refused.

    async def two(host: str, port: int, **kw: Any) -> list[Any]:
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.168.0.1", port)),
        ]

    monkeypatch.setattr(trio.socket, "getaddrinfo", two)
    failed = await _fails("mixed.example:80", policy=Policy.parse("10.0.0.0/8:*"))
    assert failed.code is DialFailCode.FORBIDDEN and "192.168.0.1" in failed.msg


@pytest.mark.parametrize(
    ("raised", "code"),
    [
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), DialFailCode.DNS),
        (UnicodeError("label too long"), DialFailCode.DNS),
        (ValueError("embedded null character"), DialFailCode.DNS),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), DialFailCode.UNREACHABLE),
        (OSError(errno.ETIMEDOUT, "Connection timed out"), DialFailCode.TIMEOUT),
        (OSError(errno.EACCES, "Permission denied"), DialFailCode.ERROR),
        (RuntimeError("resolver bug"), DialFailCode.ERROR),
    ],
)
async def test_whatever_a_dial_raises_becomes_one_code(
    raised: Exception, code: DialFailCode, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def fail(*args: Any, **kw: Any) -> NoReturn:
        raise raised

    monkeypatch.setattr(trio, "open_tcp_stream", fail)
    assert (await _fails("target.example:80")).code is code


def test_happy_eyeballs_failures_are_classified_by_their_leaves() -> None:
    def group_of(*errnos: int) -> OSError:
        outer = OSError("all attempts to connect failed")
        outer.__cause__ = ExceptionGroup(
            "attempts", [OSError(e, f"attempt {i}") for i, e in enumerate(errnos)]
        )
        return outer

    assert classify(group_of(errno.ECONNREFUSED, errno.ENETUNREACH)).code is DialFailCode.REFUSED
    assert classify(group_of(errno.EHOSTUNREACH, errno.ETIMEDOUT)).code is DialFailCode.UNREACHABLE
    assert classify(group_of(errno.ETIMEDOUT)).code is DialFailCode.TIMEOUT
    refused = classify(group_of(errno.ECONNREFUSED))
    assert "attempt 0" in refused.msg
    assert dialer._leaf_errors(OSError(errno.EIO, "io")) != []


# ---------------------------------------------------------------- policy


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def test_an_empty_policy_allows_everything() -> None:
    for text in ("", " , ,", "  "):
        policy = Policy.parse(text)
        assert policy.open and policy.allows(_ip("203.0.113.9"), 1)


def test_policy_rules_match_network_and_port() -> None:
    policy = Policy.parse(" 10.0.0.0/8:10250, 192.168.1.7:* ,[fd00::/8]:443,172.16.0.1/12:22")
    assert not policy.open and len(policy.rules) == 4
    assert policy.allows(_ip("10.1.2.3"), 10250)
    assert not policy.allows(_ip("10.1.2.3"), 10251)
    assert not policy.allows(_ip("11.0.0.1"), 10250)
    assert policy.allows(_ip("192.168.1.7"), 1) and policy.allows(_ip("192.168.1.7"), 65535)
    assert not policy.allows(_ip("192.168.1.8"), 1)
    assert policy.allows(_ip("fd12::1"), 443) and not policy.allows(_ip("fe80::1"), 443)
    assert policy.allows(_ip("172.31.255.255"), 22)  # host bits are ignored (not strict)
    # An IPv4-mapped IPv6 address is judged as the IPv4 address it is.
    assert policy.allows(_ip("::ffff:10.0.0.1"), 10250)
    assert not policy.allows(_ip("::ffff:11.0.0.1"), 10250)
    # A rule of one family never matches the other.
    assert not Policy.parse("0.0.0.0/0:*").allows(_ip("fd00::1"), 80)
    assert not Policy.parse("::/0:*").allows(_ip("10.0.0.1"), 80)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("10.0.0.0/8", "want CIDR:PORT"),
        (":80", "want CIDR:PORT"),
        ("10.0.0.0/33:80", "does not appear to be an IPv4 or IPv6 network"),
        ("banana:80", "does not appear"),
        ("10.0.0.0/8:0", "port must be 1-65535 or \\*"),
        ("10.0.0.0/8:65536", "port must be"),
        ("10.0.0.0/8:http", "port must be"),
        ("10.0.0.0/8:-1", "port must be"),
        ("10.0.0.0/8:80,oops", "allow entry 'oops'"),
    ],
)
def test_policy_refuses_malformed_entries(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        Policy.parse(text)
