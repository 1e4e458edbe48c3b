"""Every CONNECT answer carries its standard reason phrase (issue 15 row 15:
``HTTP/1.1 502 Error`` and ``HTTP/1.1 400 `` with an empty reason)."""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest
import trio
from procs import BrokerHandle, Proc, connect_tunnel, serve_echo

pytestmark = [pytest.mark.e2e]


async def _status_line(uds: str, request: bytes) -> str:
    with trio.fail_after(10):
        stream = await trio.open_unix_socket(uds)
        async with stream:
            await stream.send_all(request)
            data = b""
            while b"\r\n" not in data:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                data += chunk
    return data.split(b"\r\n", 1)[0].decode("latin-1")


@pytest.mark.timeout(60)
async def test_reason_phrases(
    broker_factory: Callable[..., BrokerHandle], agent_factory: Callable[..., Proc]
) -> None:
    broker = broker_factory(tcp=False)
    await broker.up()
    # no agent yet: 503
    assert await _status_line(broker.uds, b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: x\r\n\r\n") == (
        "HTTP/1.1 503 Service Unavailable"
    )
    agent_factory(broker)
    await broker.ready(agents=1)
    cases = [
        (b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 502 Bad Gateway"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 405 Method Not Allowed"),
        (b"NONSENSE\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (b"CONNECT no-port-here HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (
            b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nX-Junk: " + b"a" * 100_000 + b"\r\n\r\n",
            "HTTP/1.1 431 Request Header Fields Too Large",
        ),
    ]
    for request, expected in cases:
        assert await _status_line(broker.uds, request) == expected, request[:40]


@pytest.mark.timeout(60)
async def test_connect_during_drain_is_a_503_with_a_body(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    """A CONNECT that arrives while the broker drains used to get an empty
    close (issue 15 row 15); it gets 503 with a one-line reason now."""
    broker = broker_factory("--drain-timeout=5", tcp=False)
    agent_factory(broker)
    await broker.ready(agents=1)
    # a held tunnel keeps the drain going while the next request arrives
    held = await connect_tunnel(broker, f"127.0.0.1:{await serve_echo(nursery)}", via="uds")
    assert held.status == 200
    broker.proc.popen.send_signal(signal.SIGTERM)
    with trio.fail_after(10):
        while "draining" not in broker.proc.log():
            await trio.sleep(0.05)
    stream = await trio.open_unix_socket(broker.uds)
    async with stream:
        await stream.send_all(b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(4096):
                data += chunk
    assert data.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), data
    assert data.endswith(b"broker is draining: retry on another replica\n"), data
    await held.aclose()
