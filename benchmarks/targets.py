"""Benchmark targets, run as their own process so that they never share a
GIL with the client being measured.

``python -m benchmarks.targets PORTFILE [--host HOST]`` serves on HOST
(default 127.0.0.1; the harness uses 0.0.0.0 in the edge namespace so that
direct TCP reaches it on the link address and the tunnels on 127.0.0.1):

- an echo server;
- a source: the client sends an 8-byte big-endian length, the server sends
  that many bytes and half-closes. ``ENDLESS`` (2**64 - 1) streams until the
  client goes away, which the time-boxed goodput scenarios use.

It writes ``echo_port source_port`` to PORTFILE once listening.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import trio

BLOCK = b"\xa5" * (1 << 20)
ENDLESS = (1 << 64) - 1


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


async def main(portfile: Path, host: str) -> None:
    async with trio.open_nursery() as nursery:
        ports = []
        for handler in (echo, source):
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, handler, 0, host=host)
            )
            ports.append(listeners[0].socket.getsockname()[1])
        tmp = portfile.with_suffix(".tmp")
        tmp.write_text(" ".join(map(str, ports)))
        tmp.rename(portfile)  # atomic: readers never see half a line


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("portfile", type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    trio.run(main, args.portfile, args.host)
