"""The pump between a local trio stream (client or target socket) and a
tunnel stream. Broker frontends and the agent both use it; it is the only
place bytes are copied between the two worlds.

Backpressure both ways: we read from the socket at most what the tunnel
stream's send window allows, and acknowledge tunnel bytes only after the
socket has taken them, so each direction buffers at most one window.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs
import trio

from protocol.codes import CloseCode
from tether.netio.sockopts import set_linger_zero
from tether.netio.tunnel import StreamAborted, Tunnel, TunnelClosed

log = logging.getLogger(__name__)


@attrs.define
class RelayResult:
    bytes_up: int = 0  # socket -> tunnel
    bytes_down: int = 0  # tunnel -> socket
    error: str | None = None


async def _socket_to_tunnel(
    sock: trio.abc.Stream,
    ts: Tunnel,
    result: RelayResult,
    count: Callable[[str, int], None] | None,
) -> None:
    while True:
        cap = await ts.wait_writable()
        try:
            data = await sock.receive_some(cap)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            ts.send_close(CloseCode.RESET, f"connection reset: {exc}")
            raise _Broken(f"socket read failed: {exc!r}") from None
        if not data:
            ts.send_eof()
            return
        await ts.send_all(bytes(data))
        result.bytes_up += len(data)
        if count is not None:
            count("up", len(data))


async def _tunnel_to_socket(
    sock: trio.abc.Stream,
    ts: Tunnel,
    result: RelayResult,
    count: Callable[[str, int], None] | None,
) -> None:
    while True:
        chunk = await ts.receive()
        if chunk is None:
            if isinstance(sock, trio.abc.HalfCloseableStream):
                try:
                    await sock.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                return
            # TLS cannot half-close: the peer finished, so finish the socket.
            raise _Finished()
        try:
            await sock.send_all(chunk.data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            ts.send_close(CloseCode.RESET, f"connection reset: {exc}")
            raise _Broken(f"socket write failed: {exc!r}") from None
        ts.acknowledge(chunk.flow_len)
        result.bytes_down += len(chunk.data)
        if count is not None:
            count("down", len(chunk.data))


class _Broken(Exception):
    pass


class _Finished(Exception):
    pass


async def relay(
    sock: trio.abc.Stream,
    ts: Tunnel,
    *,
    count: Callable[[str, int], None] | None = None,
) -> RelayResult:
    """Copy both ways until both directions end or either side aborts.

    Never raises for network trouble; the outcome is in the result. The
    socket is closed on return, abortively when the tunnel was reset.
    """
    result = RelayResult()
    clean = False
    try:
        async with trio.open_nursery() as nursery:

            async def guarded(fn: Callable[..., object]) -> None:
                try:
                    await fn(sock, ts, result, count)  # type: ignore[misc]
                except (_Broken, StreamAborted, TunnelClosed) as exc:
                    result.error = result.error or str(exc)
                    nursery.cancel_scope.cancel()
                except _Finished:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(guarded, _socket_to_tunnel)
            nursery.start_soon(guarded, _tunnel_to_socket)
        clean = result.error is None
    finally:
        if clean:
            ts.send_eof()  # no-op when our direction already ended
        else:
            if not ts.aborted:
                ts.reset()
            set_linger_zero(sock)
        ts.forget()
        await trio.aclose_forcefully(sock)
    return result
