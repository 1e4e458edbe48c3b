"""Every CONNECT answer carries its standard reason phrase (issue 15 row 15:
``HTTP/1.1 502 Error`` and ``HTTP/1.1 400 `` with an empty reason)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
from procs import BrokerHandle, Proc

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
