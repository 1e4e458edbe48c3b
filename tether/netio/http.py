"""A tiny HTTP/1.1 server (h11) for health, readiness and metrics endpoints.

It serves GET/HEAD on a fixed route table, with header, idle and write
deadlines so a slow client cannot pin a task forever, and a cap on
connections (overall and per source address) so a flood cannot starve the
probes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import h11
import trio

from tether.netio.limits import PerPeerLimiter
from tether.netio.logs import limited

log = logging.getLogger(__name__)

#: A route returns (status, content type, body).
Route = Callable[[], tuple[int, str, bytes]]

HEADER_DEADLINE = 10.0
MAX_REQUEST_BYTES = 16 * 1024
MAX_CONNECTIONS = 256
MAX_CONNECTIONS_PER_PEER = 16


def text(status: int, body: str) -> tuple[int, str, bytes]:
    return status, "text/plain; charset=utf-8", (body + "\n").encode()


async def serve_http(
    listener: trio.SocketListener,
    routes: dict[str, Route],
    *,
    header_timeout: float = HEADER_DEADLINE,
    on_bad_input: Callable[[str], None] | None = None,
) -> None:
    """Serve ``routes`` on ``listener`` until cancelled.

    ``on_bad_input(reason)`` is told about every client dropped for
    misbehaving (a metric): ``header_timeout``, ``malformed_request``,
    ``too_many_connections``.
    """
    limit = trio.CapacityLimiter(MAX_CONNECTIONS)
    per_peer = PerPeerLimiter(MAX_CONNECTIONS_PER_PEER)

    def bad(reason: str) -> None:
        if on_bad_input is not None:
            on_bad_input(reason)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            peer = str(stream.socket.getpeername()[0])
        except OSError:
            peer = "?"
        slot = per_peer.acquire(peer)
        try:
            if slot is None:
                raise trio.WouldBlock
            limit.acquire_nowait()
        except trio.WouldBlock:
            bad("too_many_connections")
            if slot is not None:
                slot.release()
            elif per_peer.first_refusal(peer):
                limited(
                    log,
                    logging.WARNING,
                    peer,
                    "health endpoint: %s holds too many connections; refusing",
                    peer,
                )
            await trio.aclose_forcefully(stream)
            return
        try:
            await _handle(stream, routes, header_timeout, bad, peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except Exception:  # a bad client must never kill the listener
            log.exception("health endpoint: handler failed")
        finally:
            limit.release()
            assert slot is not None
            slot.release()
            await trio.aclose_forcefully(stream)

    await trio.serve_listeners(handle, [listener])


async def _handle(
    stream: trio.SocketStream,
    routes: dict[str, Route],
    header_timeout: float,
    bad: Callable[[str], None],
    peer: str = "?",
) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    while True:
        request: h11.Request | None = None
        with trio.move_on_after(header_timeout):
            while request is None:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    bad("malformed_request")
                    await _send(stream, conn, exc.error_status_hint, "text/plain", b"bad request\n")
                    return
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(4096)
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    return
        if request is None:
            if conn.their_state is not h11.IDLE or conn.trailing_data[0]:
                # Idle keep-alive connections just end; a started request is slowloris.
                bad("header_timeout")
                limited(
                    log,
                    logging.INFO,
                    peer,
                    "health endpoint: no complete request within %gs; closing",
                    header_timeout,
                )
            return
        path = request.target.decode("ascii", "replace").split("?", 1)[0]
        method = request.method.decode("ascii", "replace")
        route = routes.get(path)
        if method not in ("GET", "HEAD"):
            status, ctype, body = text(405, "method not allowed")
        elif route is None:
            status, ctype, body = text(404, "not found")
        else:
            status, ctype, body = route()
        with trio.move_on_after(header_timeout) as scope:
            await _send(stream, conn, status, ctype, b"" if method == "HEAD" else body)
        if scope.cancelled_caught:
            return  # the client does not read its responses
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            return


async def _send(
    stream: trio.SocketStream, conn: h11.Connection, status: int, ctype: str, body: bytes
) -> None:
    headers = [("content-type", ctype), ("content-length", str(len(body)))]
    try:
        data = conn.send(h11.Response(status_code=status, headers=headers))
        data = (data or b"") + (conn.send(h11.Data(data=body)) or b"") if body else data
        data = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
    except h11.LocalProtocolError:
        return
    await stream.send_all(data)
