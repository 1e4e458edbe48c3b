"""The stream scheduler: queued payload reaches the wire in round-robin
quanta, so a bulk stream can neither starve nor delay an interactive one
by more than one write batch. Correctness tests, not timing tests: they
count bytes, never seconds."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing
from test_tunnel_memory import tunnel

from tether.netio.h2driver import BATCH
from tether.netio.scheduler import QUANTUM, SMALL_MESSAGE, SMALL_RATE, RoundRobin
from tether.netio.tunnel import TunnelStream

MiB = 1024 * 1024
#: Kernel buffers of the TCP pair: small, so that what the kernel holds
#: (which no scheduler of ours can reorder) stays small next to a batch.
SOCKBUF = 32 * 1024


def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """Two ends of a loopback TCP connection with small kernel buffers: the
    writer and senders see a real socket, so write-through is in play (it
    needs the kernel's unsent count, which memory streams do not have)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.socket()
        for s in (a,):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKBUF)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKBUF)
        a.connect(listener.getsockname())
        b, _ = listener.accept()
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKBUF)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKBUF)
        s.setblocking(False)
    return (
        trio.SocketStream(trio.socket.from_stdlib_socket(a)),
        trio.SocketStream(trio.socket.from_stdlib_socket(b)),
    )


def kernel_slack(pair: object) -> int:
    """Bytes the kernel may hold between the two ends (0 in memory)."""
    if pair is not tcp_pair:
        return 0
    return 4 * 2 * SOCKBUF  # send and receive buffers, both ends; Linux doubles them


PAIRS = pytest.mark.parametrize(
    "pair", [trio.testing.lockstep_stream_pair, tcp_pair], ids=["lockstep", "tcp"]
)


class Sink:
    """Reads a stream as fast as it comes, acknowledging at once."""

    def __init__(self, ts: TunnelStream) -> None:
        self.ts = ts
        self.counted = 0

    @property
    def received(self) -> int:
        return self.counted + self.ts.buffered

    async def run(self) -> None:
        while (chunk := await self.ts.receive()) is not None:
            self.counted += len(chunk.data)
            self.ts.acknowledge(chunk.flow_len)


async def push(ts: TunnelStream, total: int, piece: int = MiB) -> None:
    block = b"b" * piece
    for _ in range(total // piece):
        await ts.send_all(block)


@pytest.mark.timeout(60)
@PAIRS
async def test_interactive_bytes_overtake_queued_bulk(pair: object) -> None:
    async with tunnel(pair=pair) as t:  # type: ignore[arg-type]
        bulk_a, bulk_b = await t.open_stream(1)
        chat_a, chat_b = await t.open_stream(2)
        sink = Sink(bulk_b)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sink.run)
            nursery.start_soon(push, bulk_a, 64 * MiB)
            while sink.received < 4 * MiB:  # bulk is streaming at full tilt
                await trio.sleep(0.001)
            for _ in range(20):
                mark = sink.received
                await chat_a.send_all(b"x" * 64)
                chunk = await chat_b.receive()
                assert chunk is not None and chunk.data == b"x" * 64
                chat_b.acknowledge(chunk.flow_len)
                overtaken_by = sink.received - mark
                # The write in progress plus one quantum of bulk; one more batch
                # of slack because the mark may be taken while a batch has
                # left the sender but not yet been counted by the receiver.
                # (Without the scheduler this was megabytes: a bulk stream
                # could queue up to the connection window ahead.)
                # Over TCP, what the kernel buffers comes on top (and write-
                # through, a batch at most, replaces a writer's batch).
                bound = 2 * BATCH + 2 * QUANTUM + kernel_slack(pair)
                assert overtaken_by <= bound, overtaken_by
            nursery.cancel_scope.cancel()


@pytest.mark.timeout(60)
@PAIRS
async def test_bulk_streams_share_the_connection_fairly(pair: object) -> None:
    async with tunnel(pair=pair) as t:  # type: ignore[arg-type]
        pairs = [await t.open_stream(n) for n in (1, 2, 3)]
        sinks = [Sink(b) for _, b in pairs]
        async with trio.open_nursery() as nursery:
            for (a, _), sink in zip(pairs, sinks, strict=True):
                nursery.start_soon(sink.run)
                nursery.start_soon(push, a, 256 * MiB)
            while sum(s.received for s in sinks) < 24 * MiB:
                await trio.sleep(0.001)
            shares = [s.received for s in sinks]
            nursery.cancel_scope.cancel()
    total = sum(shares)
    assert min(shares) >= total / 3 * 0.7, shares  # round robin: nobody starves


# ---------------------------------------------------------- the fast lane


class Queue:
    """A stream for the scheduler alone: ``pending`` bytes, taken in order."""

    def __init__(self, name: str, pending: int, log: list[tuple[str, int]]) -> None:
        self.name, self.pending, self.log = name, pending, log
        self.queued = False
        self.aborted = False

    @property
    def has_output(self) -> bool:
        return self.pending > 0

    @property
    def small(self) -> bool:
        return self.pending <= SMALL_MESSAGE

    def take(self, limit: int) -> int:
        n = min(limit, self.pending)
        self.pending -= n
        self.log.append((self.name, n))
        return n


def test_a_small_message_goes_first_ahead_of_every_bulk_stream() -> None:
    log: list[tuple[str, int]] = []
    rr = RoundRobin()
    bulk = [Queue(f"bulk{i}", MiB, log) for i in range(3)]
    for q in bulk:
        rr.schedule(q)
    chat = Queue("chat", 64, log)
    rr.schedule(chat)  # joins last
    rr.fill(32 * 1024)
    assert log[0] == ("chat", 64)
    assert rr.fast_turns == 1 and not chat.queued


def test_the_fast_lane_never_takes_more_than_half_a_batch_beside_bulk() -> None:
    log: list[tuple[str, int]] = []
    rr = RoundRobin()
    bulk = Queue("bulk", 1 << 40, log)
    chatty = [Queue(f"c{i}", SMALL_MESSAGE, log) for i in range(200)]
    for _ in range(50):
        rr.schedule(bulk)
        for q in chatty:  # every one keeps a full small message queued
            q.pending = SMALL_MESSAGE
            rr.schedule(q)
        del log[:]
        rr.fill(BATCH)
        to_bulk = sum(n for name, n in log if name == "bulk")
        assert to_bulk >= BATCH // 2, to_bulk
    # Streams the fast lane did not reach wait their turn there, in order.
    assert rr.ready


def test_a_small_stream_with_more_queued_than_one_message_joins_the_round_robin() -> None:
    log: list[tuple[str, int]] = []
    rr = RoundRobin()
    q = Queue("q", SMALL_MESSAGE, log)
    rr.schedule(q)
    q.pending = 10 * SMALL_MESSAGE  # queued more before the writer came
    rr.fill(BATCH)
    assert log[0] == ("q", SMALL_MESSAGE)
    assert q.pending == 0  # the rest went through the round robin


@pytest.mark.timeout(60)
async def test_a_stream_that_sends_fast_is_bulk_however_small_its_writes() -> None:
    async with tunnel() as t:
        chat_a, _ = await t.open_stream(1)
        await chat_a.send_all(b"x" * 64)
        assert chat_a.small
        for _ in range(SMALL_RATE // 1024 + 1):  # > SMALL_RATE within a moment
            await chat_a.send_all(b"y" * 1024)
        assert not chat_a.small
