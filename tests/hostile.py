"""Hostile peers and measurements for the ``test_hostile_*`` suites.

The peers speak HTTP/2 at the frame level (raw frames, a stateless HPACK
encoding, a frame reader with its own HPACK decoder), so they can send what a
well-behaved library refuses to: resets right after requests, windows that
overflow, oversized frames, header bombs, floods of PINGs and SETTINGS. They
run over real sockets against the real broker process (127.0.0.1 or a Unix
socket only).

:class:`Meter` samples the broker's RSS and CPU time from ``/proc`` while an
attack runs, so each test can bound both.
"""

from __future__ import annotations

import os
import re
import ssl
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import attrs
import hpack
import pytest
import trio
import trio.lowlevel

from protocol import framing, messages, session
from tether.netio import tls
from tether.tools.certs import PkiPaths
from tether.tools.launch import (
    BrokerHandle,
    Proc,
    connect_tunnel,
    http_get,
    start_agent,
    start_broker,
)

MiB = 1024 * 1024

# Frame types and flags (RFC 9113 section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM, ACK, END_HEADERS, PADDED = 0x1, 0x1, 0x4, 0x8
# Error codes.
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR = 0x0, 0x1, 0x3, 0x6
REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x7, 0x8, 0x9, 0xB
# Settings.
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE = 0x4, 0x5

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


# ------------------------------------------------------------ measurements

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` so far (``/proc/<pid>/stat``)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Meter:
    """CPU seconds, wall seconds and peak RSS growth of a process meanwhile.

    ``async with Meter(pid) as m:`` samples RSS every 20 ms in the
    background; afterwards ``m.cpu``, ``m.wall``, ``m.rss_growth_mib``.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.cpu = 0.0
        self.wall = 0.0
        self.rss_start = 0
        self.rss_peak = 0
        self._cpu0 = 0.0
        self._t0 = 0.0
        self._scope: trio.CancelScope | None = None
        self._done = trio.Event()

    @property
    def rss_growth_mib(self) -> float:
        return (self.rss_peak - self.rss_start) / 1024

    async def _sample(self) -> None:
        try:
            with trio.CancelScope() as self._scope:
                while True:
                    self.rss_peak = max(self.rss_peak, rss_kib(self.pid))
                    await trio.sleep(0.02)
        finally:
            self._done.set()

    def _begin(self) -> None:
        self.rss_start = self.rss_peak = rss_kib(self.pid)
        self._cpu0 = cpu_seconds(self.pid)
        self._t0 = time.monotonic()

    def _end(self) -> None:
        self.rss_peak = max(self.rss_peak, rss_kib(self.pid))
        self.cpu = cpu_seconds(self.pid) - self._cpu0
        self.wall = time.monotonic() - self._t0

    def start_in(self, nursery: trio.Nursery) -> Meter:
        """Start measuring, sampling in ``nursery``; finish with :meth:`stop`."""
        self._begin()
        nursery.start_soon(self._sample)
        return self

    async def stop(self) -> Meter:
        while self._scope is None:
            await trio.lowlevel.checkpoint()
        self._scope.cancel()
        await self._done.wait()
        self._end()
        return self

    async def __aenter__(self) -> Meter:
        self._begin()
        self._nursery_cm = trio.open_nursery()
        nursery = await self._nursery_cm.__aenter__()
        nursery.start_soon(self._sample)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        while self._scope is None:
            await trio.lowlevel.checkpoint()
        self._scope.cancel()
        result = await self._nursery_cm.__aexit__(exc_type, exc, tb)
        self._end()
        return result

    def report(self, what: str) -> str:
        return (
            f"{what}: broker cpu {self.cpu:.2f}s over {self.wall:.2f}s wall, "
            f"rss growth {self.rss_growth_mib:.1f} MiB"
        )


async def idle_cpu(pid: int, seconds: float = 1.0) -> float:
    """CPU the process burns over ``seconds`` with nobody talking to it."""
    before = cpu_seconds(pid)
    await trio.sleep(seconds)
    return cpu_seconds(pid) - before


# ----------------------------------------------------------------- metrics

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match.group(1) != name:
            continue
        have = dict(_LABEL.findall(match.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
    return total


async def bad_input(broker: BrokerHandle, source: str, reason: str) -> float:
    text = await broker.metrics()
    return metric(text, "tether_bad_input_total", source=source, reason=reason)


async def wait_metric(
    broker: BrokerHandle, source: str, reason: str, at_least: float, timeout: float = 5.0
) -> float:
    deadline = time.monotonic() + timeout
    while True:
        value = await bad_input(broker, source, reason)
        if value >= at_least or time.monotonic() > deadline:
            return value
        await trio.sleep(0.05)


async def wait_log(broker: BrokerHandle, needle: str, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while needle not in broker.proc.log():
        if time.monotonic() > deadline:
            return False
        await trio.sleep(0.05)
    return True


# ----------------------------------------------------------- normal traffic


async def tunnel_roundtrip(
    broker: BrokerHandle, echo_port: int, *, via: str = "uds", size: int = 64 * 1024
) -> None:
    """A normal CONNECT tunnel to the echo target works: bytes come back."""
    payload = os.urandom(size)
    with trio.fail_after(10):
        tunnel = await connect_tunnel(broker, f"127.0.0.1:{echo_port}", via=via)
        try:
            assert tunnel.status == 200, (tunnel.status, tunnel.body)
            await tunnel.send_all(payload)
            got = b""
            while len(got) < size:
                chunk = await tunnel.receive_some()
                assert chunk, "tunnel closed early"
                got += chunk
            assert got == payload
        finally:
            await tunnel.aclose()


async def health_ok(broker: BrokerHandle) -> None:
    with trio.fail_after(5):
        status, _ = await http_get(broker.health_port, "/healthz")
    assert status == 200


# ------------------------------------------------------------------ frames


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", sid)
        + payload
    )


def settings_frame(values: dict[int, int] | None = None, *, ack: bool = False) -> bytes:
    body = b"".join(struct.pack(">HI", k, v) for k, v in (values or {}).items())
    return frame(SETTINGS, ACK if ack else 0, 0, body)


#: Frames a server must acknowledge, for the PING and SETTINGS flood tests:
#: (frame, the tether_bad_input_total reason the broker counts them under).
ACK_FLOODS = pytest.mark.parametrize(
    ("unit", "reason"),
    [
        (frame(PING, 0, 0, b"12345678"), "flood_pings"),
        (settings_frame({0x4: 65535}), "flood_settings"),
    ],
    ids=["ping", "settings"],
)


def window_update(sid: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, sid, struct.pack(">I", increment))


def rst_stream(sid: int, code: int = CANCEL) -> bytes:
    return frame(RST_STREAM, 0, sid, struct.pack(">I", code))


def header_block(headers: list[tuple[str, str]] | list[tuple[bytes, bytes]]) -> bytes:
    """HPACK without the dynamic table (never-indexed literals): the same
    block can be sent any number of times, on any connection."""
    encoder = hpack.Encoder()
    return bytes(
        encoder.encode([hpack.NeverIndexedHeaderTuple(n, v) for n, v in headers], huffman=False)
    )


def request_headers(path: str, extra: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "https"),
        (":authority", "broker"),
        (":path", path),
        ("content-type", session.CONTENT_TYPE),
        *(extra or []),
    ]


def data_stream_block(dial_id: int | str) -> bytes:
    return header_block(
        request_headers(session.STREAM_PATH, [(session.DIAL_ID_HEADER, str(dial_id))])
    )


@attrs.frozen
class Frame:
    kind: int
    flags: int
    sid: int
    payload: bytes
    headers: list[tuple[str, str]] | None = None

    @property
    def error_code(self) -> int:
        """RST_STREAM's or GOAWAY's error code."""
        if self.kind == GOAWAY:
            return int(struct.unpack(">I", self.payload[4:8])[0])
        return int(struct.unpack(">I", self.payload[:4])[0])

    @property
    def status(self) -> str | None:
        return dict(self.headers or []).get(":status")


class FrameReader:
    """Splits received bytes into frames; decodes header blocks in order."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._decoder = hpack.Decoder()
        self._decoder.max_header_list_size = 1 << 20
        self._pending: tuple[int, int, int, bytearray] | None = None

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        out: list[Frame] = []
        while len(self._buf) >= 9:
            length = int.from_bytes(self._buf[:3], "big")
            if len(self._buf) < 9 + length:
                break
            kind, flags = self._buf[3], self._buf[4]
            sid = int.from_bytes(self._buf[5:9], "big") & 0x7FFFFFFF
            payload = bytes(self._buf[9 : 9 + length])
            del self._buf[: 9 + length]
            if kind in (HEADERS, CONTINUATION):
                if kind == HEADERS:
                    block = payload
                    if flags & PADDED:
                        block = block[1 : len(block) - block[0]]
                    if flags & 0x20:
                        block = block[5:]
                    self._pending = (kind, flags, sid, bytearray(block))
                elif self._pending is not None:
                    self._pending[3].extend(payload)
                if flags & END_HEADERS and self._pending is not None:
                    _, hflags, hsid, block = self._pending
                    self._pending = None
                    decoded = self._decoder.decode(bytes(block), raw=False)
                    out.append(Frame(HEADERS, hflags, hsid, bytes(block), list(decoded)))
                continue
            out.append(Frame(kind, flags, sid, payload))
        return out


# -------------------------------------------------------------------- peers


class RawPeer:
    """One hostile HTTP/2 client connection, frame by frame."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.reader = FrameReader()
        self.frames: list[Frame] = []
        self.eof = False
        self.control = framing.ControlDecoder()
        self.messages: list[messages.Message] = []

    async def send(self, data: bytes) -> bool:
        """False once the broker has closed the connection."""
        try:
            await self.stream.send_all(data)
            return True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.eof = True
            return False

    async def receive(self, timeout: float) -> list[Frame]:
        """Frames that arrive within ``timeout`` (fewer if the broker closes)."""
        got: list[Frame] = []
        with trio.move_on_after(timeout):
            while not self.eof:
                got += await self._read_once()
        return got

    async def _read_once(self) -> list[Frame]:
        try:
            data = await self.stream.receive_some(1 << 20)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self.eof = True
            return []
        new = self.reader.feed(bytes(data))
        for f in new:
            if f.kind == DATA and f.sid == 1 and f.payload:
                self.messages += self.control.feed(f.payload)
                await self.send(window_update(1, len(f.payload)))
        self.frames += new
        return new

    async def wait_for(self, predicate: Callable[[Frame], bool], timeout: float) -> Frame | None:
        """The first frame (already received or arriving) that matches."""
        for f in self.frames:
            if predicate(f):
                return f
        with trio.move_on_after(timeout):
            while not self.eof:
                for f in await self._read_once():
                    if predicate(f):
                        return f
        return None

    async def goaway(self, timeout: float = 5.0) -> Frame | None:
        return await self.wait_for(lambda f: f.kind == GOAWAY, timeout)

    async def closed(self, timeout: float = 5.0) -> bool:
        """True once the broker closed the connection (reads drained)."""
        with trio.move_on_after(timeout):
            while not self.eof:
                await self._read_once()
        return self.eof

    async def wait_message(self, kind: type[Any], timeout: float = 5.0) -> Any:
        deadline = trio.current_time() + timeout
        while True:
            for msg in self.messages:
                if isinstance(msg, kind):
                    self.messages.remove(msg)
                    return msg
            if self.eof or trio.current_time() > deadline:
                return None
            with trio.move_on_at(deadline):
                await self._read_once()

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


@contextmanager
def broker_with_agent(tmp: Path, pki: PkiPaths, *flags: str) -> Iterator[BrokerHandle]:
    """A broker with ``flags`` and one real agent (agent-1, ipv4=127.0.0.1)
    that ``tunnel_roundtrip`` goes through; both stopped at the end."""
    broker = start_broker(tmp, pki, *flags)
    agent: Proc | None = None
    try:
        agent = start_agent(tmp, broker, "--agent-identifiers=ipv4=127.0.0.1")
        trio.run(broker.ready)
        yield broker
    finally:
        if agent is not None:
            agent.stop(timeout=5)
        broker.proc.stop(timeout=5)


def agent_ssl(broker: BrokerHandle, agent_id: str) -> ssl.SSLContext:
    cert, key = broker.pki.agent(agent_id)
    return tls.client_context(broker.pki.ca_cert, cert, key, alpn=["h2"])


async def tls_to_agent_port(
    broker: BrokerHandle, agent_id: str = "agent-2", source: str | None = None
) -> trio.SSLStream[trio.SocketStream]:
    tcp = await trio.open_tcp_stream("127.0.0.1", broker.agent_port, local_address=source)
    stream = trio.SSLStream(tcp, agent_ssl(broker, agent_id), server_hostname="localhost")
    await stream.do_handshake()
    return stream


async def open_peer(
    broker: BrokerHandle,
    *,
    agent_id: str = "agent-2",
    identifiers: str = "host=evil",
    settings: dict[int, int] | None = None,
    control: bool = True,
    source: str | None = None,
    headers: list[tuple[str, str]] | None = None,
) -> RawPeer:
    """A TLS HTTP/2 connection with a valid agent certificate (from the
    ``source`` address, default 127.0.0.1); with ``control`` the control
    stream is opened (with ``headers`` besides the agent's id and
    identifiers) and accepted (200)."""
    with trio.fail_after(10):
        peer = RawPeer(await tls_to_agent_port(broker, agent_id, source))
        initial = {S_ENABLE_PUSH: 0, S_MAX_FRAME_SIZE: 65536}
        await peer.send(PREFACE + settings_frame({**initial, **(settings or {})}))
        if not control:
            return peer
        headers = request_headers(
            session.CONTROL_PATH,
            [
                ("tether-agent-id", agent_id),
                ("tether-agent-identifiers", identifiers),
                *(headers or []),
            ],
        )
        await peer.send(frame(HEADERS, END_HEADERS, 1, header_block(headers)))
        reply = await peer.wait_for(lambda f: f.kind == HEADERS and f.sid == 1, 5)
        assert reply is not None and reply.status == "200", reply
        await peer.send(settings_frame(ack=True))
        return peer


async def flood(peer: RawPeer, unit: bytes, count: int, batch: int = 500) -> int:
    """Send ``unit`` ``count`` times in batches; returns how many went out
    before the broker closed the connection."""
    sent = 0
    block = unit * batch
    while sent < count:
        if not await peer.send(block):
            break
        sent += batch
        await trio.lowlevel.checkpoint()
    return sent


def dial_id_from(msg: messages.Message) -> int:
    assert isinstance(msg, messages.Dial), msg
    return msg.id


def is_rst(sid: int) -> Callable[[Frame], bool]:
    return lambda f: f.kind == RST_STREAM and f.sid == sid


def is_status(sid: int) -> Callable[[Frame], bool]:
    return lambda f: f.kind == HEADERS and f.sid == sid
