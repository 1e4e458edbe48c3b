"""The HTTP CONNECT frontend (egress ``proxyProtocol: HTTPConnect``).

kube-apiserver sends ``CONNECT host:port HTTP/1.1``. We dial through an
agent and answer ``200 Connection established`` only once the agent's data
stream exists, then relay raw bytes. Errors are one-line ``text/plain``
bodies with ``Connection: close`` (docs/protocol.md section 9).
The request parser is sans-IO, in :mod:`protocol.connect_request`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import attrs
import trio

from broker.dialing import DialError
from broker.metrics import BrokerMetrics
from broker.registry import Registry
from protocol.connect_request import (
    ConnectRefusal,
    ConnectRequestParser,
    ConnectTarget,
)
from protocol.messages import MAX_EARLY_DATA
from tether.netio.logs import event, limited
from tether.netio.relay import relay
from tether.netio.sockopts import set_linger_zero
from tether.netio.tunnel import Tunnel

log = logging.getLogger("tether.broker.connect")


@attrs.frozen
class ConnectSettings:
    cluster: str
    dial_timeout: float
    header_timeout: float
    frontend: str  # metric label: "uds" or "tcp"
    optimistic: bool = False
    optimistic_wait: float = 0.01
    #: True once the broker drains: requests get 503 and no dial starts.
    draining: Callable[[], bool] = lambda: False
    #: ``--workers``: offered every parsed request (stream, cluster, target,
    #: the bytes read so far); True when another worker took the connection.
    handover: Callable[[trio.abc.Stream, str, str, bytes], Awaitable[bool]] | None = None
    #: A connection another worker handed over: dial this worker's agents only.
    local_only: bool = False


class _ClientGone(Exception):
    pass


async def handle_connect(
    stream: trio.abc.Stream,
    registry: Registry,
    metrics: BrokerMetrics,
    settings: ConnectSettings,
) -> None:
    """Serve one frontend connection; never raises for client trouble."""
    metrics.http_connections.inc()
    try:
        await _serve(stream, registry, metrics, settings)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        log.debug("frontend client went away: %r", exc)
    finally:
        metrics.http_connections.dec()
        await trio.aclose_forcefully(stream)


async def _respond(
    stream: trio.abc.Stream,
    parser: ConnectRequestParser,
    metrics: BrokerMetrics,
    settings: ConnectSettings,
    status: int,
    message: str,
) -> None:
    metrics.frontend_requests.labels(settings.frontend, str(status)).inc()
    data = parser.error_response(status, message)
    with trio.move_on_after(5):
        await stream.send_all(data)


async def _serve(
    stream: trio.abc.Stream,
    registry: Registry,
    metrics: BrokerMetrics,
    settings: ConnectSettings,
) -> None:
    parser = ConnectRequestParser()
    parsed: ConnectTarget | ConnectRefusal | None = None
    raw = bytearray() if settings.handover is not None else None
    with trio.move_on_after(settings.header_timeout):
        while parsed is None:
            chunk = bytes(await stream.receive_some(16384))
            if raw is not None:
                raw += chunk
            parsed = parser.feed(chunk)
    if parsed is None:
        metrics.bad_input.labels("frontend", "header_timeout").inc()
        limited(
            log,
            logging.INFO,
            _source(stream),
            "frontend: no request within %gs; closing",
            settings.header_timeout,
        )
        return
    if isinstance(parsed, ConnectRefusal):
        if parsed.status == 0:
            return  # closed before a request
        metrics.bad_input.labels("frontend", parsed.reason).inc()
        source = _source(stream)
        limited(
            log,
            logging.INFO,
            source,
            "frontend: request refused (%d): %s (from %s)",
            parsed.status,
            parsed.message,
            source,
            extra=event("bad_input", source="frontend", remote=source, reason=parsed.reason),
        )
        await _respond(stream, parser, metrics, settings, parsed.status, parsed.message)
        return
    if settings.draining():
        await _respond(
            stream, parser, metrics, settings, 503, "broker is draining: retry on another replica"
        )
        return
    target = parsed.target
    handover = settings.handover
    if handover is not None and raw is not None:
        # The host's view picks the worker: a departed agent (it may come
        # back on any worker) is waited for first, within the dial's time.
        held = await registry.await_return(settings.cluster, target, settings.dial_timeout)
        if held:
            settings = attrs.evolve(settings, dial_timeout=max(0.001, settings.dial_timeout - held))
        if await handover(stream, settings.cluster, target, bytes(raw)):
            return  # the owner of the chosen agent serves it from here on
    # Bytes the client sent before the dial starts ride inside the dial
    # message (the agent writes them right after connecting); bytes that
    # arrive while it is under way are sent once the stream exists.
    early = parsed.early[:MAX_EARLY_DATA]
    later = bytearray(parsed.early[MAX_EARLY_DATA:])
    established_reply = parser.established_response()
    if settings.optimistic:
        # Answer at once so the client's first flight (a TLS ClientHello,
        # say) travels with the dial: one link round trip saved. A dial that
        # then fails can only be reported by aborting the connection.
        await stream.send_all(established_reply)
        metrics.frontend_requests.labels(settings.frontend, "200").inc()
        if not early:
            early = await _first_bytes(stream, settings.optimistic_wait)
    try:
        ts = await _dial_watching_client(stream, registry, settings, target, early, later)
    except DialError as exc:
        if settings.optimistic:
            metrics.frontend_requests.labels(settings.frontend, "aborted_after_200").inc()
            log.info("frontend: optimistic tunnel to %s aborted: %s", target, exc.message)
            set_linger_zero(stream)
            return
        await _respond(stream, parser, metrics, settings, exc.http_status, exc.message)
        return
    except _ClientGone:
        metrics.frontend_requests.labels(settings.frontend, "client_gone").inc()
        log.info("frontend: client left while dialing %s; dial cancelled", target)
        return

    established = metrics.established.labels(settings.frontend)
    established.inc()
    try:
        try:
            if not settings.optimistic:
                metrics.frontend_requests.labels(settings.frontend, "200").inc()
                await stream.send_all(established_reply)
            if later:
                await ts.send_all(bytes(later))
        except BaseException:
            ts.reset()
            raise
        result = await relay(stream, ts, count=_counter(metrics))
        log.debug(
            "tunnel %s done: up=%d down=%d err=%s",
            target,
            result.bytes_up,
            result.bytes_down,
            result.error,
        )
    finally:
        established.dec()


async def _first_bytes(stream: trio.abc.Stream, wait: float) -> bytes:
    """The client's first flight, if it comes within ``wait`` seconds."""
    with trio.move_on_after(wait):
        try:
            return bytes(await stream.receive_some(MAX_EARLY_DATA))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""
    return b""


async def _dial_watching_client(
    stream: trio.abc.Stream,
    registry: Registry,
    settings: ConnectSettings,
    target: str,
    early: bytes,
    later: bytearray,
) -> Tunnel:
    """Dial while reading the client, so a disconnect cancels the dial.

    ``early`` rides in the dial. Bytes the client sends meanwhile are kept in
    ``later`` and forwarded first; we stop reading once that buffer is full.
    """
    result: list[Tunnel] = []
    gone = False

    async def watch(cancel_scope: trio.CancelScope) -> None:
        nonlocal gone
        while len(later) < MAX_EARLY_DATA:
            try:
                data = await stream.receive_some(MAX_EARLY_DATA - len(later))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                gone = True
                cancel_scope.cancel()
                return
            later.extend(data)
        await trio.sleep_forever()

    error: DialError | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch, nursery.cancel_scope)
        try:
            ts, _agent = await registry.dial(
                settings.cluster,
                target,
                settings.dial_timeout,
                early or None,
                # A worker that kept the connection dials its own agents.
                local_only=settings.local_only or settings.handover is not None,
            )
            result.append(ts)
        except DialError as exc:  # raised out of the nursery it would be grouped
            error = exc
        finally:
            nursery.cancel_scope.cancel()
    if gone:
        if result:
            result[0].reset()
        raise _ClientGone()
    if error is not None:
        raise error
    return result[0]


def _source(stream: trio.abc.Stream) -> str:
    """The client's address (a log budget's key): IP for TCP, else the socket kind."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    sock = getattr(stream, "socket", None)
    try:
        peer = sock.getpeername() if sock is not None else None
    except OSError:
        peer = None
    if isinstance(peer, tuple):
        return str(peer[0])
    return "unix socket" if sock is not None else "?"


def _counter(metrics: BrokerMetrics):  # type: ignore[no-untyped-def]
    up = metrics.bytes_relayed.labels("up")
    down = metrics.bytes_relayed.labels("down")

    def count(direction: str, n: int) -> None:
        (up if direction == "up" else down).inc(n)

    return count
