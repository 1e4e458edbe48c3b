"""``tether connect``: reach a node through the broker's Unix-socket frontend
from an operator's shell.

kube-apiserver speaks to the broker over a Unix socket; people and their
tools (curl, a browser, kubectl) speak TCP. This listens on a local TCP port
and carries every accepted connection through the broker, one dial per
connection, exactly as kube-apiserver would:

- ``--target HOST:PORT``: every local connection becomes a tunnel to that
  target (``curl -k https://127.0.0.1:10250/healthz`` then reaches the
  kubelet of the node behind the tunnel);
- no ``--target``: the local port is an HTTP CONNECT proxy, so the client
  names the target itself (``curl -p -x http://127.0.0.1:8080 http://10.0.0.5/``).

``--mode`` is the frontend's mode: ``http-connect`` (the request goes to the
broker as it is) or ``grpc`` (konnectivity's ``Proxy`` call over h2c, one
HTTP/2 connection per dial, as kube-apiserver does).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h11
import trio

from protocol import konnectivity_pb2 as pb
from protocol import packets
from protocol.errors import ProtocolError
from protocol.grpc_framing import GrpcMessageDecoder, encode_message

_PROG = "tether connect"
_CHUNK = 16 * 1024
_HEADER_LIMIT = 16 * 1024


class ConnectFailed(Exception):
    """The broker refused or failed the dial; the message is one line for the
    user, ``status`` what a local CONNECT client is answered."""

    def __init__(self, message: str, status: int = 502) -> None:
        super().__init__(message)
        self.status = status


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _split_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {text!r}")
    return host.strip("[]") or "127.0.0.1", number


def _target(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"want HOST:PORT, got {text!r}")
    return text


# ------------------------------------------------------------ http-connect


async def _read_head(stream: trio.abc.Stream, limit: int = _HEADER_LIMIT) -> tuple[bytes, bytes]:
    """Read an HTTP/1.1 head; return (head, bytes after it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > limit:
            raise ConnectFailed("response header too large")
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise ConnectFailed("the broker closed the connection without an answer")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


async def _http_connect(uds: str, target: str) -> tuple[trio.abc.Stream, bytes]:
    broker = await trio.open_unix_socket(uds)
    try:
        await broker.send_all(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head, rest = await _read_head(broker)
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or parts[1] != "200":
            body = rest.decode("utf-8", "replace").strip()
            status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 502
            raise ConnectFailed(
                f"{status_line.strip()}: {body}" if body else status_line.strip(),
                status if 400 <= status <= 599 else 502,
            )
        return broker, rest
    except BaseException:
        await trio.aclose_forcefully(broker)
        raise


async def _pump(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
    """Copy until EOF, then half-close ``sink`` where it can."""
    try:
        while data := await source.receive_some(_CHUNK * 4):
            await sink.send_all(data)
        if isinstance(sink, trio.SocketStream):
            await sink.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _splice(a: trio.abc.Stream, b: trio.abc.Stream) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_pump, a, b)
        nursery.start_soon(_pump, b, a)


# -------------------------------------------------------------------- grpc


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class GrpcTunnel:
    """One konnectivity ``Proxy`` call over h2c on the Unix socket."""

    def __init__(self, sock: trio.SocketStream) -> None:
        self.sock = sock
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.stream_id = 1
        self.connect_id = 0
        self.decoder = GrpcMessageDecoder()
        self.window_open = trio.Event()
        self.dialed = trio.Event()
        self.dial_error = ""
        self.ended = False
        self.end_reason = ""
        self._send_lock = trio.Lock()
        self._inbox_send, self.inbox = trio.open_memory_channel[bytes](8)

    async def flush(self) -> None:
        async with self._send_lock:
            data = self.h2.data_to_send()
            if data:
                await self.sock.send_all(data)

    async def open(self, target: str, random: int) -> None:
        self.h2.initiate_connection()
        self.h2.send_headers(
            self.stream_id,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/ProxyService/Proxy"),
                (":authority", "localhost"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ],
        )
        request = pb.Packet(
            type=pb.DIAL_REQ,
            dialRequest=pb.DialRequest(protocol="tcp", address=target, random=random),
        )
        await self.send_message(request)

    async def send_message(self, pkt: pb.Packet) -> None:
        data = memoryview(encode_message(packets.encode_packet(pkt)))
        while data:
            while self.h2.local_flow_control_window(self.stream_id) <= 0:
                if self.ended:
                    raise trio.BrokenResourceError(self.end_reason or "call ended")
                self.window_open = trio.Event()
                await self.window_open.wait()
            size = min(
                len(data),
                self.h2.local_flow_control_window(self.stream_id),
                self.h2.max_outbound_frame_size,
            )
            self.h2.send_data(self.stream_id, bytes(data[:size]))
            data = data[size:]
            await self.flush()

    async def end_request(self) -> None:
        if not self.ended:
            try:
                self.h2.end_stream(self.stream_id)
            except h2.exceptions.ProtocolError:
                return
            await self.flush()

    def _finish(self, reason: str) -> None:
        if not self.ended:
            self.ended, self.end_reason = True, reason
        self.window_open.set()
        self.dialed.set()
        self._inbox_send.close()

    async def read_loop(self) -> None:
        """Reads the broker until the call ends; DATA payload goes to ``inbox``."""
        try:
            while not self.ended:
                data = await self.sock.receive_some(65536)
                if not data:
                    self._finish(self.end_reason or "the broker closed the connection")
                    return
                try:
                    events = self.h2.receive_data(bytes(data))
                except h2.exceptions.ProtocolError as exc:
                    self._finish(f"HTTP/2 error from the broker: {exc}")
                    return
                for ev in events:
                    await self._on_event(ev)
                await self.flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._finish(f"connection to the broker lost: {exc}")
        finally:
            self._finish(self.end_reason or "call ended")

    async def _on_event(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.DataReceived):
            self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            try:
                bodies = self.decoder.feed(ev.data)
                for body in bodies:
                    await self._on_packet(packets.decode_packet(body))
            except ProtocolError as exc:
                self._finish(f"bad message from the broker: {exc}")
        elif isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self.window_open.set()
        elif isinstance(ev, h2.events.TrailersReceived | h2.events.ResponseReceived):
            fields = {_text(k): _text(v) for k, v in ev.headers or []}
            status = fields.get("grpc-status")
            if status not in (None, "0"):
                self._finish(f"gRPC status {status}: {fields.get('grpc-message', '')}")
        elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
            self._finish(self.end_reason or "the broker ended the call")
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self._finish(f"the broker closed the connection (GOAWAY {ev.error_code})")

    async def _on_packet(self, pkt: pb.Packet) -> None:
        if pkt.type == pb.DIAL_RSP:
            if pkt.dialResponse.error:
                self.dial_error = pkt.dialResponse.error
            else:
                self.connect_id = pkt.dialResponse.connectID
            self.dialed.set()
        elif pkt.type == pb.DATA and pkt.data.connectID == self.connect_id:
            if pkt.data.data:
                await self._inbox_send.send(pkt.data.data)
        elif pkt.type == pb.CLOSE_RSP:
            error = pkt.closeResponse.error
            self._finish(f"target closed: {error}" if error else "target closed")


async def _grpc_relay(
    uds: str, target: str, client: trio.abc.Stream, early: bytes, *, answer_connect: bool
) -> None:
    """One Proxy call for one local connection; with ``answer_connect`` the
    local client's CONNECT is answered 200 once the dial worked."""
    sock = await trio.open_unix_socket(uds)
    tunnel = GrpcTunnel(sock)
    failure = ""
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tunnel.read_loop)
            await tunnel.open(target, int.from_bytes(os.urandom(7), "big") or 1)
            await tunnel.dialed.wait()
            if tunnel.dial_error or not tunnel.connect_id:
                # raised outside the nursery, which would wrap it in a group
                failure = tunnel.dial_error or tunnel.end_reason or "dial failed"
            else:
                if answer_connect:
                    await client.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await _grpc_splice(tunnel, client, early)
            nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(sock)
    if failure:
        raise ConnectFailed(failure)


async def _grpc_splice(tunnel: GrpcTunnel, client: trio.abc.Stream, early: bytes) -> None:
    async def upstream() -> None:
        try:
            if early:
                await tunnel.send_message(packets.data_packet(tunnel.connect_id, early))
            while data := await client.receive_some(_CHUNK):
                await tunnel.send_message(packets.data_packet(tunnel.connect_id, bytes(data)))
            close = pb.Packet(
                type=pb.CLOSE_REQ, closeRequest=pb.CloseRequest(connectID=tunnel.connect_id)
            )
            await tunnel.send_message(close)
            await tunnel.end_request()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def downstream(cancel: trio.CancelScope) -> None:
        try:
            async for data in tunnel.inbox:
                await client.send_all(data)
            if isinstance(client, trio.SocketStream):
                await client.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        cancel.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(upstream)
        nursery.start_soon(downstream, nursery.cancel_scope)


# ----------------------------------------------------------- local server


async def _local_connect_request(client: trio.abc.Stream) -> tuple[str, bytes]:
    """Proxy mode: read the client's ``CONNECT host:port``; return it and any
    bytes the client sent after its request."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_HEADER_LIMIT)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await client.receive_some(4096)
            conn.receive_data(bytes(data))
            if not data:
                raise ConnectFailed("client closed before its request")
            continue
        if isinstance(event, h11.Request):
            if event.method != b"CONNECT":
                raise ConnectFailed(f"only CONNECT is proxied, got {event.method.decode()}")
            target = event.target.decode("ascii", "replace")
            _target(target)
            early, _ = conn.trailing_data
            return target, bytes(early)
        raise ConnectFailed("malformed request")


async def _answer(client: trio.abc.Stream, status: int, body: str) -> None:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Error"
    payload = body.replace("\r", " ").replace("\n", " ").encode("utf-8", "replace") + b"\n"
    text = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode() + payload
    try:
        await client.send_all(text)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def serve_one(
    client: trio.SocketStream,
    *,
    uds: str,
    mode: str,
    target: str | None,
    counter: Callable[[], int],
) -> None:
    number = counter()
    peer = client.socket.getpeername()
    try:
        early = b""
        dial_to = target
        if dial_to is None:
            try:
                dial_to, early = await _local_connect_request(client)
            except (ConnectFailed, argparse.ArgumentTypeError, h11.RemoteProtocolError) as exc:
                await _answer(client, 400, str(exc))
                return
        _say(f"#{number} {peer[0]}:{peer[1]} -> {dial_to} ({mode})")
        try:
            if mode == "grpc":
                await _grpc_relay(uds, dial_to, client, early, answer_connect=target is None)
            else:
                broker, rest = await _http_connect(uds, dial_to)
                async with broker:
                    if target is None:
                        await client.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    if early:
                        await broker.send_all(early)
                    if rest:
                        await client.send_all(rest)
                    await _splice(client, broker)
        except ConnectFailed as exc:
            _say(f"#{number} {dial_to}: {exc}")
            if target is None:
                await _answer(client, exc.status, str(exc))
        except OSError as exc:
            _say(f"#{number} cannot reach the broker at {uds}: {exc.strerror or exc}")
            if target is None:
                await _answer(client, 502, f"broker unreachable: {exc}")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except Exception as exc:  # one connection's trouble never ends the tool
        _say(f"#{number}: connection ended: {exc!r}")
    finally:
        await trio.aclose_forcefully(client)


async def run(
    uds: str,
    mode: str,
    listen: tuple[str, int],
    target: str | None,
    ready: Callable[[int], Awaitable[None]] | None = None,
) -> int:
    if not await trio.Path(uds).exists():
        _say(f"{_PROG}: error: --uds {uds}: no such socket")
        return 2
    try:
        listeners = await trio.open_tcp_listeners(listen[1], host=listen[0])
    except OSError as exc:
        _say(f"{_PROG}: error: cannot listen on {listen[0]}:{listen[1]}: {exc.strerror or exc}")
        return 2
    port = int(listeners[0].socket.getsockname()[1])
    what = f"to {target}" if target else "as an HTTP CONNECT proxy"
    print(
        f"listening on {listen[0]}:{port}, forwarding each connection {what} "
        f"through {uds} ({mode})",
        flush=True,
    )
    if ready is not None:
        await ready(port)
    counter = itertools.count(1).__next__
    handler = functools.partial(serve_one, uds=uds, mode=mode, target=target, counter=counter)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(trio.serve_listeners, handler, listeners))
            async for signum in signals:
                _say(f"{signal.Signals(signum).name}: stopping")
                nursery.cancel_scope.cancel()
                break
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Forward a local TCP port through the broker's Unix-socket frontend.",
        allow_abbrev=False,
    )
    parser.add_argument("--uds", required=True, help="the broker's frontend Unix socket")
    parser.add_argument(
        "--mode",
        choices=["http-connect", "grpc"],
        default="http-connect",
        help="the frontend's mode, as the broker's --mode (default: http-connect)",
    )
    parser.add_argument(
        "--listen",
        type=_split_listen,
        default=("127.0.0.1", 8080),
        metavar="[HOST:]PORT",
        help="local address to listen on (default: 127.0.0.1:8080; port 0 picks one)",
    )
    parser.add_argument(
        "--target",
        type=_target,
        metavar="HOST:PORT",
        help="tunnel every connection to this address (default: act as a CONNECT proxy)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return trio.run(run, args.uds, args.mode, args.listen, args.target)


if __name__ == "__main__":
    sys.exit(main())
