"""Benchmark targets, run as their own process so that they never share a
GIL with the client being measured.

``python -m benchmarks.targets PORTFILE`` serves on 127.0.0.1:
- an echo server;
- a source: the client sends an 8-byte big-endian length, the server sends
  that many bytes and closes.
It writes ``echo_port source_port`` to PORTFILE once listening.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import trio

BLOCK = b"\xa5" * (1 << 20)


async def echo(stream: trio.SocketStream) -> None:
    try:
        while data := await stream.receive_some(1 << 16):
            await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def source(stream: trio.SocketStream) -> None:
    try:
        header = b""
        while len(header) < 8:
            chunk = await stream.receive_some(8 - len(header))
            if not chunk:
                return
            header += chunk
        left = int.from_bytes(header, "big")
        while left > 0:
            n = min(left, len(BLOCK))
            await stream.send_all(BLOCK[:n])
            left -= n
        await stream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def main(portfile: Path) -> None:
    async with trio.open_nursery() as nursery:
        ports = []
        for handler in (echo, source):
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
            )
            ports.append(listeners[0].socket.getsockname()[1])
        portfile.write_text(" ".join(map(str, ports)))


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1]))
