"""Test-side helpers: the launch tooling plus small target servers."""

from __future__ import annotations

import functools

import trio

from tether.tools.launch import (  # noqa: F401  (re-exported for the tests)
    BrokerHandle,
    Proc,
    Tunnel,
    connect_tunnel,
    free_port,
    frontend_ssl,
    http_get,
    start_agent,
    start_broker,
    status_of,
    wait_for,
)

# ---------------------------------------------------------------- targets


async def serve_local(nursery: trio.Nursery, handler) -> int:  # type: ignore[no-untyped-def]
    """Serve ``handler`` on 127.0.0.1 (a free port); returns the port."""
    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def serve_echo(nursery: trio.Nursery) -> int:
    """An echo server on 127.0.0.1; returns its port."""

    async def handler(stream: trio.SocketStream) -> None:
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
            await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    return await serve_local(nursery, handler)
