"""The gRPC frontend's Proxy call logic in process: a real h2 client talks
to ``GrpcFrontend.handle`` over trio.testing memory streams; the registry
and the tunnel are stand-ins, so every step is visible and timed on the
autojump clock."""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator
from typing import Any

import attrs
import h2.config
import h2.connection
import h2.events
import pytest
import trio
import trio.testing

from broker.dialing import DialError, DialOutcome
from broker.grpc_frontend import GrpcFrontend, GrpcSettings
from broker.metrics import BrokerMetrics
from protocol import konnectivity_pb2 as pb
from protocol import packets
from protocol.grpc_framing import GrpcMessageDecoder, encode_message

pytestmark = [pytest.mark.timeout(30)]

METHOD = "/ProxyService/Proxy"


@attrs.frozen
class Chunk:
    data: bytes
    flow_len: int


class FakeTunnel:
    """What the Proxy call uses of a TunnelStream, observable."""

    stream_id = 1

    def __init__(self) -> None:
        self.conn = self
        self.up = bytearray()
        self.chunks: collections.deque[Chunk] = collections.deque()
        self.eof = False
        self.aborted = False
        self.eof_sent = False
        self.forgotten = False
        self.acked = 0
        self._lot = trio.lowlevel.ParkingLot()

    @property
    def buffered(self) -> int:
        return sum(len(c.data) for c in self.chunks)

    def feed(self, data: bytes) -> None:
        self.chunks.append(Chunk(data, len(data)))
        self._lot.unpark_all()

    def end(self) -> None:
        self.eof = True
        self._lot.unpark_all()

    async def send_all(self, data: bytes) -> None:
        self.up += data
        await trio.lowlevel.checkpoint()

    async def receive(self) -> Chunk | None:
        while not self.chunks:
            if self.eof:
                return None
            await self._lot.park()
        return self.chunks.popleft()

    def acknowledge(self, n: int) -> None:
        self.acked += n

    def send_eof(self) -> None:
        self.eof_sent = True
        self.end()  # the agent's side ends too: the linger is short

    def reset(self) -> None:
        self.aborted = True

    def forget(self) -> None:
        self.forgotten = True


class FakeRegistry:
    def __init__(self) -> None:
        self.tunnels: list[FakeTunnel] = []
        self.fail: DialError | None = None
        self.hang = False
        self.cancelled = 0

    async def dial(self, cluster: str, address: str, timeout: float) -> tuple[FakeTunnel, None]:
        if self.hang:
            try:
                await trio.sleep_forever()
            finally:
                self.cancelled += 1
        if self.fail is not None:
            raise self.fail
        ts = FakeTunnel()
        self.tunnels.append(ts)
        return ts, None


class Client:
    """An h2 client on the other end of a memory stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.h2.initiate_connection()
        self.decoders: dict[int, GrpcMessageDecoder] = {}
        self.packets: dict[int, list[pb.Packet]] = collections.defaultdict(list)
        self.trailers: dict[int, dict[str, str]] = {}
        self.resets: dict[int, int] = {}
        self._send_lock = trio.Lock()

    async def flush(self) -> None:
        async with self._send_lock:
            if data := self.h2.data_to_send():
                await self.stream.send_all(data)

    async def open(self, sid: int) -> None:
        self.h2.send_headers(
            sid,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", METHOD),
                (":authority", "x"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ],
        )
        self.decoders[sid] = GrpcMessageDecoder()
        await self.flush()

    async def send(self, sid: int, pkt: pb.Packet, end: bool = False) -> None:
        self.h2.send_data(sid, encode_message(packets.encode_packet(pkt)), end_stream=end)
        await self.flush()

    async def read_until(self, done: Any) -> None:
        """Read (and credit) until ``done()`` holds."""
        while not done():
            data = await self.stream.receive_some(65536)
            assert data, "the broker closed the connection"
            for e in self.h2.receive_data(data):
                if isinstance(e, h2.events.DataReceived):
                    self.h2.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                    for raw in self.decoders[e.stream_id].feed(e.data):
                        self.packets[e.stream_id].append(packets.decode_packet(raw))
                elif isinstance(e, h2.events.TrailersReceived | h2.events.ResponseReceived):
                    headers = dict(e.headers)
                    if "grpc-status" in headers:
                        self.trailers[e.stream_id] = headers
                elif isinstance(e, h2.events.StreamReset):
                    self.resets[e.stream_id] = e.error_code
            await self.flush()


@pytest.fixture
async def env(nursery: trio.Nursery) -> AsyncIterator[tuple[Client, FakeRegistry, GrpcFrontend]]:
    registry = FakeRegistry()
    frontend = GrpcFrontend(
        registry,  # type: ignore[arg-type]
        BrokerMetrics(),
        GrpcSettings(cluster="default", dial_timeout=5),
    )
    client_end, server_end = trio.testing.memory_stream_pair()
    nursery.start_soon(frontend.handle, server_end)
    client = Client(client_end)
    await client.flush()
    yield client, registry, frontend
    await client_end.aclose()


def dial(random: int = 7) -> pb.Packet:
    return pb.Packet(
        type=pb.DIAL_REQ, dialRequest=pb.DialRequest(protocol="tcp", address="a:1", random=random)
    )


async def test_dial_data_both_ways_and_close(
    env: tuple[Client, FakeRegistry, GrpcFrontend], autojump_clock: trio.testing.MockClock
) -> None:
    client, registry, _ = env
    await client.open(1)
    await client.send(1, dial())
    await client.read_until(lambda: client.packets[1])
    rsp = client.packets[1][0]
    assert rsp.type == pb.DIAL_RSP and rsp.dialResponse.random == 7
    cid = rsp.dialResponse.connectID
    assert cid != 0 and rsp.dialResponse.error == ""
    (ts,) = registry.tunnels

    await client.send(1, packets.data_packet(cid, b"up bytes"))
    with trio.fail_after(5):
        while bytes(ts.up) != b"up bytes":
            await trio.sleep(0.01)
    ts.feed(b"down ")
    ts.feed(b"bytes")
    await client.read_until(lambda: sum(len(p.data.data) for p in client.packets[1][1:]) == 10)
    assert b"".join(p.data.data for p in client.packets[1][1:]) == b"down bytes"
    assert ts.acked == 10  # acknowledged once HTTP/2 held them

    await client.send(1, pb.Packet(type=pb.CLOSE_REQ, closeRequest=pb.CloseRequest(connectID=cid)))
    await client.read_until(lambda: 1 in client.trailers)
    assert client.packets[1][-1].type == pb.CLOSE_RSP
    assert client.trailers[1]["grpc-status"] == "0"
    with trio.fail_after(5):
        while not ts.forgotten:
            await trio.sleep(0.01)
    assert ts.eof_sent and not ts.aborted  # a clean close: FIN, no reset


async def test_dial_failure_is_a_dial_rsp_error_and_an_ok_status(
    env: tuple[Client, FakeRegistry, GrpcFrontend], autojump_clock: trio.testing.MockClock
) -> None:
    client, registry, _ = env
    registry.fail = DialError(DialOutcome.FAILED, "dial failed (refused)")
    await client.open(1)
    await client.send(1, dial(3))
    await client.read_until(lambda: 1 in client.trailers)
    (rsp,) = client.packets[1]
    assert rsp.dialResponse.connectID == 0 and "refused" in rsp.dialResponse.error
    assert client.trailers[1]["grpc-status"] == "0"


async def test_client_reset_during_a_dial_cancels_it(
    env: tuple[Client, FakeRegistry, GrpcFrontend], autojump_clock: trio.testing.MockClock
) -> None:
    client, registry, _ = env
    registry.hang = True
    await client.open(1)
    await client.send(1, dial())
    await trio.sleep(1)
    client.h2.reset_stream(1)
    await client.flush()
    with trio.fail_after(5):
        while not registry.cancelled:
            await trio.sleep(0.01)


async def test_target_reset_is_a_close_rsp_with_the_reason_and_the_tunnel_reset(
    env: tuple[Client, FakeRegistry, GrpcFrontend], autojump_clock: trio.testing.MockClock
) -> None:
    from tether.netio.tunnel import StreamAborted

    client, registry, _ = env
    await client.open(1)
    await client.send(1, dial())
    await client.read_until(lambda: client.packets[1])
    (ts,) = registry.tunnels

    async def aborted() -> Chunk | None:
        raise StreamAborted("stream reset by peer")

    ts.receive = aborted  # type: ignore[method-assign]
    ts.feed(b"")  # wake the downstream task
    await client.read_until(lambda: 1 in client.trailers)
    close = client.packets[1][-1]
    assert close.type == pb.CLOSE_RSP and "reset by peer" in close.closeResponse.error


async def test_many_calls_waiting_for_the_socket_all_resume(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The stall of issue 12 in process: with a tiny write buffer and a
    socket that takes nothing until the client reads, every call's sender
    waits for the writer at once; each must resume when it drains (one
    shared Event replaced by each waiter woke only the last)."""
    registry = FakeRegistry()
    frontend = GrpcFrontend(
        registry,  # type: ignore[arg-type]
        BrokerMetrics(),
        GrpcSettings(cluster="default", dial_timeout=5, write_buffer=1024),
    )
    client_end, server_end = trio.testing.lockstep_stream_pair()
    nursery.start_soon(frontend.handle, server_end)
    client = Client(client_end)
    n = 20
    cids: dict[int, int] = {}

    async def open_all() -> None:
        await client.flush()
        for i in range(n):
            await client.open(2 * i + 1)
            await client.send(2 * i + 1, dial(i))

    async with trio.open_nursery() as inner:
        inner.start_soon(open_all)
        await client.read_until(lambda: len(registry.tunnels) == n and len(client.packets) == n)
    for sid, pkts in client.packets.items():
        cids[sid] = pkts[0].dialResponse.connectID
    # Every tunnel sends 8 KiB at once; the client does not read for a while.
    for ts in registry.tunnels:
        ts.feed(b"d" * 8192)
    await trio.sleep(5)

    def all_down() -> bool:
        return all(sum(len(p.data.data) for p in client.packets[sid][1:]) == 8192 for sid in cids)

    with trio.fail_after(10):
        await client.read_until(all_down)
        # Each sender resumes once the socket took its bytes: it then
        # acknowledges its tunnel chunk.
        while not all(ts.acked == 8192 for ts in registry.tunnels):
            await trio.sleep(0.01)
    await client_end.aclose()
