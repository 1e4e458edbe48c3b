"""The trio driver (TunnelConnection / TunnelStream) over in-memory transports.

A broker-role and an agent-role connection talk over ``trio.testing`` stream
pairs, with minimal handlers implementing the ConnectionHandler protocol.
Timers run on pytest-trio's autojump clock where the test is about time.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import attrs
import pytest
import trio
import trio.lowlevel
import trio.testing

from protocol import messages
from protocol.codes import CloseCode, DialFailCode
from protocol.events import ControlAccepted, ControlRequested, DataStreamRequested
from protocol.keepalive import TIMER_SLACK
from protocol.outcomes import CloseReason
from protocol.session import Role, SessionConfig, TunnelSession
from tether.netio.tunnel import (
    Keepalive,
    StreamAborted,
    TunnelClosed,
    TunnelConnection,
    TunnelStream,
)

AUTHORITY = "broker.test:8443"
SMALL = SessionConfig(stream_window=64 * 1024, connection_window=128 * 1024)
NO_KEEPALIVE = Keepalive(interval=math.inf)


class BrokerHandler:
    """Accepts the control stream and every data stream it is offered."""

    def __init__(self) -> None:
        self.conn: TunnelConnection | None = None
        self.messages: list[messages.Message] = []
        self.streams_send, self.streams = trio.open_memory_channel[TunnelStream](math.inf)
        self.control_headers: dict[str, str] = {}

    def on_control_requested(self, ev: ControlRequested) -> None:
        assert self.conn is not None
        self.control_headers = ev.headers
        self.conn.session.accept_control({"tether-server-id": "broker-1"})
        self.conn.wake_writer()

    def on_control_accepted(self, ev: ControlAccepted) -> None:
        raise AssertionError("a broker is never accepted")

    def on_message(self, msg: messages.Message) -> None:
        self.messages.append(msg)

    def on_data_stream_requested(self, ev: DataStreamRequested) -> None:
        assert self.conn is not None
        ts = self.conn.add_stream(ev.stream_id, ev.dial_id)
        self.conn.session.accept_data_stream(ev.stream_id)
        self.conn.wake_writer()
        self.streams_send.send_nowait(ts)


class AgentHandler:
    def __init__(self) -> None:
        self.conn: TunnelConnection | None = None
        self.accepted = trio.Event()
        self.server_id = ""
        self.messages: list[messages.Message] = []

    def on_control_requested(self, ev: ControlRequested) -> None:
        raise AssertionError("an agent is never asked")

    def on_control_accepted(self, ev: ControlAccepted) -> None:
        self.server_id = ev.headers["tether-server-id"]
        self.accepted.set()

    def on_message(self, msg: messages.Message) -> None:
        self.messages.append(msg)

    def on_data_stream_requested(self, ev: DataStreamRequested) -> None:
        raise AssertionError("an agent is never offered streams")


@attrs.define
class Tunnel:
    agent: TunnelConnection
    broker: TunnelConnection
    agent_handler: AgentHandler
    broker_handler: BrokerHandler
    agent_transport: trio.abc.Stream
    broker_transport: trio.abc.Stream
    done: dict[str, trio.Event]

    async def open_stream(self, dial_id: int) -> tuple[TunnelStream, TunnelStream]:
        """(agent end, broker end) of a new data stream."""
        sid = self.agent.session.open_data_stream(dial_id, AUTHORITY)
        ts = self.agent.add_stream(sid, dial_id)
        self.agent.wake_writer()
        with trio.fail_after(5):
            await ts.wait_accepted()
            peer = await self.broker_handler.streams.receive()
        assert (peer.stream_id, peer.dial_id) == (sid, dial_id)
        return ts, peer


def agent_session(config: SessionConfig | None) -> TunnelSession:
    sess = TunnelSession(Role.AGENT, config, clock=time.monotonic)
    sess.initiate()
    sess.open_control({"tether-agent-id": "agent-1"}, AUTHORITY)
    return sess


def broker_session(config: SessionConfig | None) -> TunnelSession:
    sess = TunnelSession(Role.BROKER, config, clock=time.monotonic)
    sess.initiate()
    return sess


PairFactory = Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]]


@asynccontextmanager
async def tunnel(
    config: SessionConfig | None = None,
    keepalive: Keepalive = NO_KEEPALIVE,
    pair: PairFactory = trio.testing.memory_stream_pair,
    *,
    agent_keepalive: Keepalive | None = None,
    park_when_idle: bool = False,
) -> AsyncIterator[Tunnel]:
    """``agent_keepalive``: the agent's, when it differs from the broker's;
    ``park_when_idle``: the broker side's (tether/netio/idle.py)."""
    a_end, b_end = pair()
    agent_handler, broker_handler = AgentHandler(), BrokerHandler()
    agent = TunnelConnection(
        a_end,
        agent_session(config),
        agent_handler,
        keepalive=agent_keepalive or keepalive,
        name="agent",
    )
    broker = TunnelConnection(
        b_end,
        broker_session(config),
        broker_handler,
        keepalive=keepalive,
        name="broker",
        park_when_idle=park_when_idle,
    )
    agent_handler.conn, broker_handler.conn = agent, broker
    done = {"agent": trio.Event(), "broker": trio.Event()}

    async def run(conn: TunnelConnection, ev: trio.Event) -> None:
        try:
            await conn.run()
        finally:
            ev.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, agent, done["agent"])
        nursery.start_soon(run, broker, done["broker"])
        with trio.fail_after(5):
            await agent_handler.accepted.wait()
        assert agent_handler.server_id == "broker-1"
        assert broker_handler.control_headers["tether-agent-id"] == "agent-1"
        yield Tunnel(agent, broker, agent_handler, broker_handler, a_end, b_end, done)
        nursery.cancel_scope.cancel()


async def send_stream(ts: TunnelStream, data: bytes, piece: int = 100_000) -> None:
    for i in range(0, len(data), piece):
        await ts.send_all(data[i : i + piece])
    ts.send_eof()


async def receive_stream(ts: TunnelStream, ack: bool = True) -> bytes:
    got = bytearray()
    while (chunk := await ts.receive()) is not None:
        got += chunk.data
        if ack:
            ts.acknowledge(chunk.flow_len)
    return bytes(got)


async def exchange(
    a: TunnelStream, b: TunnelStream, up: bytes, down: bytes, timeout: float = 30
) -> tuple[bytes, bytes]:
    """Send ``up`` from the agent end ``a`` and ``down`` from the broker end
    ``b`` at once; what each end received: (up, down)."""
    results: dict[str, bytes] = {}

    async def recv(name: str, ts: TunnelStream) -> None:
        results[name] = await receive_stream(ts)

    with trio.fail_after(timeout):
        async with trio.open_nursery() as n:
            n.start_soon(send_stream, a, up)
            n.start_soon(send_stream, b, down)
            n.start_soon(recv, "up", b)
            n.start_soon(recv, "down", a)
    return results["up"], results["down"]


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------ data


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "pair",
    [trio.testing.memory_stream_pair, trio.testing.lockstep_stream_pair],
    ids=["memory", "lockstep"],
)
@pytest.mark.parametrize("config", [None, SMALL], ids=["default", "small"])
async def test_five_megabytes_both_ways(pair: PairFactory, config: SessionConfig | None) -> None:
    up = random.Random(1).randbytes(5 * 1024 * 1024)
    down = random.Random(2).randbytes(5 * 1024 * 1024 + 333)
    async with tunnel(config, pair=pair) as t:
        a, b = await t.open_stream(7)
        got_up, got_down = await exchange(a, b, up, down)
        assert sha(got_up) == sha(up)
        assert sha(got_down) == sha(down)
        assert a.buffered == 0 and b.buffered == 0


async def test_control_messages_through_the_driver() -> None:
    async with tunnel() as t:
        t.broker.send_message(messages.Dial(id=3, addr="[fd00::1]:22", timeout_ms=500))
        t.agent.send_message(messages.DialFail(3, DialFailCode.UNREACHABLE, "no route"))
        with trio.fail_after(5):
            while not (t.agent_handler.messages and t.broker_handler.messages):
                await trio.sleep(0.01)
        assert t.agent_handler.messages == [messages.Dial(3, "[fd00::1]:22", 500)]
        assert t.broker_handler.messages == [
            messages.DialFail(3, DialFailCode.UNREACHABLE, "no route")
        ]


@pytest.mark.timeout(30)
async def test_stalled_reader_is_bounded_while_another_stream_completes() -> None:
    async with tunnel(SMALL) as t:
        stalled = [await t.open_stream(i) for i in range(3)]
        live_a, live_b = await t.open_stream(99)
        data = random.Random(3).randbytes(3 * 1024 * 1024)
        stalled_total = 10 * SMALL.stream_window
        finished: list[int] = []

        async def stalled_sender(ts: TunnelStream) -> None:
            await ts.send_all(b"s" * stalled_total)
            finished.append(ts.stream_id)

        async with trio.open_nursery() as n:
            for a, _ in stalled:
                # these writers block: nobody reads the other end
                n.start_soon(stalled_sender, a)
            got: list[bytes] = []

            async def recv() -> None:
                got.append(await receive_stream(live_b))

            with trio.fail_after(20):
                async with trio.open_nursery() as inner:
                    inner.start_soon(send_stream, live_a, data)
                    inner.start_soon(recv)
            assert sha(got[0]) == sha(data)
            for _, b in stalled:
                assert 0 < b.buffered <= SMALL.stream_window
                assert b.buffered > SMALL.stream_window - 1024  # the window was used
            # the stalled senders are still waiting for credit
            for a, _ in stalled:
                assert t.agent.session.send_capacity(a.stream_id) == 0
            assert finished == []
            # a reader that finally drains frees its sender, and only that one
            a0, b0 = stalled[0]
            drained = 0
            with trio.fail_after(10):
                while drained < stalled_total:
                    chunk = await b0.receive()
                    assert chunk is not None
                    drained += len(chunk.data)
                    b0.acknowledge(chunk.flow_len)
                while not finished:
                    await trio.sleep(0.01)
            assert finished == [a0.stream_id]
            for _, b in stalled[1:]:
                assert b.buffered <= SMALL.stream_window
            n.cancel_scope.cancel()


@pytest.mark.timeout(30)
async def test_slow_reader_still_gets_everything() -> None:
    """Receiving without acknowledging straight away only slows that stream."""
    async with tunnel(SMALL) as t:
        a, b = await t.open_stream(1)
        data = random.Random(4).randbytes(1024 * 1024)
        got = bytearray()

        async def slow() -> None:
            pending = []
            while (chunk := await b.receive()) is not None:
                got.extend(chunk.data)
                pending.append(chunk.flow_len)
                assert sum(pending) <= SMALL.stream_window
                # Hold back a few pieces, but never a whole window: the sender
                # could then send nothing more and we would wait forever.
                if len(pending) >= 3 or sum(pending) >= SMALL.stream_window // 2:
                    await trio.sleep(0.001)
                    for f in pending:
                        b.acknowledge(f)
                    pending.clear()
            for f in pending:
                b.acknowledge(f)

        with trio.fail_after(20):
            async with trio.open_nursery() as n:
                n.start_soon(send_stream, a, data, 7000)
                n.start_soon(slow)
        assert sha(got) == sha(data)


async def test_reset_and_close_reach_the_peer() -> None:
    async with tunnel() as t:
        a1, b1 = await t.open_stream(1)
        a2, b2 = await t.open_stream(2)
        a1.reset()
        with trio.fail_after(5), pytest.raises(StreamAborted, match="reset by peer"):
            await b1.receive()
        with pytest.raises(StreamAborted):
            await a1.receive()
        await a2.send_all(b"bye")
        a2.send_close(CloseCode.ERROR, "target exploded")
        chunk = await b2.receive()
        assert chunk is not None and chunk.data == b"bye"
        with trio.fail_after(5), pytest.raises(StreamAborted) as info:
            await b2.receive()
        assert info.value.close == messages.Close(CloseCode.ERROR, "target exploded")


async def test_stream_reset_right_after_opening_does_not_kill_the_connection() -> None:
    """Regression: request and RST_STREAM in one read made the broker handler's
    accept_data_stream raise, and TunnelConnection.run died with it."""
    async with tunnel() as t:
        sid = t.agent.session.open_data_stream(1, AUTHORITY)
        ts = t.agent.add_stream(sid, 1)
        ts.reset()  # same write as the request
        with trio.fail_after(5):
            peer = await t.broker_handler.streams.receive()
            with pytest.raises(StreamAborted):
                await peer.receive()
        assert t.broker.closed_reason is None and t.broker.streams == {}
        a, b = await t.open_stream(2)
        await a.send_all(b"still fine")
        chunk = await b.receive()
        assert chunk is not None and chunk.data == b"still fine"


# ------------------------------------------------------------------ keepalive


async def _silent_after(stream: trio.abc.Stream, healthy_for: float) -> None:
    """A broker that answers (handshake, PINGs) for a while, then stops reading."""
    sess = broker_session(None)
    await stream.send_all(sess.data_to_send())
    with trio.move_on_after(healthy_for):
        while data := await stream.receive_some(65536):
            for ev in sess.receive_data(bytes(data)):
                if isinstance(ev, ControlRequested):
                    sess.accept_control({"tether-server-id": "silent"})
            if out := sess.data_to_send():
                await stream.send_all(out)
    await trio.sleep_forever()


@pytest.mark.parametrize("interval,timeout", [(15.0, 15.0), (5.0, 2.0)])
async def test_keepalive_aborts_a_silent_peer(
    autojump_clock: trio.testing.MockClock, interval: float, timeout: float
) -> None:
    a_end, b_end = trio.testing.memory_stream_pair()
    handler = AgentHandler()
    conn = TunnelConnection(
        a_end, agent_session(None), handler, keepalive=Keepalive(interval, timeout)
    )
    handler.conn = conn
    rtts: list[float] = []
    conn.set_rtt_observer(rtts.append)
    healthy_for = 10 * interval
    async with trio.open_nursery() as n:
        n.start_soon(_silent_after, b_end, healthy_for)
        start = trio.current_time()
        with trio.fail_after(healthy_for + 10 * (interval + timeout)):
            await conn.run()
        ended = trio.current_time() - start
        n.cancel_scope.cancel()
    assert handler.accepted.is_set()
    assert conn.closed_reason is not None and "keepalive" in conn.closed_reason
    assert conn.close_reason is CloseReason.KEEPALIVE_TIMEOUT
    assert rtts  # PINGs were answered while the peer was alive
    assert healthy_for < ended <= healthy_for + interval + timeout + 1e-6


@pytest.mark.parametrize(
    "pair", [trio.testing.memory_stream_pair, trio.testing.lockstep_stream_pair]
)
async def test_keepalive_aborts_a_peer_that_never_reads(
    autojump_clock: trio.testing.MockClock, pair: PairFactory
) -> None:
    """The far end exists but never reads or answers: not even the preface.

    Regression (lockstep): the writer is cancelled mid-send_all when keepalive
    aborts; the final flush used to write again to that half-written transport
    (its guard, ``_pending_out == 0``, was always true by then).
    """
    a_end, _b_end = pair()
    handler = AgentHandler()
    conn = TunnelConnection(a_end, agent_session(None), handler, keepalive=Keepalive(15, 15))
    handler.conn = conn
    start = trio.current_time()
    aborted_at: list[float] = []

    async def watch() -> None:
        while conn.closed_reason is None:
            await trio.sleep(0.01)
        aborted_at.append(trio.current_time() - start)

    async with trio.open_nursery() as n:
        n.start_soon(watch)
        with trio.fail_after(120):
            await conn.run()
    assert conn.closed_reason is not None and conn.closed_reason.startswith("keepalive")
    # interval + timeout, each timer up to TIMER_SLACK late (the PING, the verdict)
    late = 2 * TIMER_SLACK
    assert aborted_at[0] <= 30.0 + late + 0.02
    # the transport is closed afterwards, at once or after the bounded final flush
    assert trio.current_time() - start <= 30.0 + late + 1.0 + 0.02


async def test_keepalive_keeps_a_healthy_idle_tunnel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with tunnel(keepalive=Keepalive(15, 15)) as t:
        rtts: list[float] = []
        t.agent.set_rtt_observer(rtts.append)
        await trio.sleep(600)
        assert t.agent.closed_reason is None and t.broker.closed_reason is None
        assert len(rtts) >= 10
        a, b = await t.open_stream(1)
        await a.send_all(b"still alive")
        chunk = await b.receive()
        assert chunk is not None and chunk.data == b"still alive"


# ------------------------------------------------------------------ teardown


@pytest.mark.parametrize("side", ["agent", "broker"])
async def test_closing_the_transport_aborts_every_stream(side: str) -> None:
    async with tunnel() as t:
        pairs = [await t.open_stream(i) for i in range(4)]
        await pairs[0][0].send_all(b"in flight")
        blocked: list[BaseException] = []

        async def reader(ts: TunnelStream) -> None:
            try:
                while True:
                    chunk = await ts.receive()
                    if chunk is None:
                        return
                    ts.acknowledge(chunk.flow_len)
            except StreamAborted as exc:
                blocked.append(exc)

        async with trio.open_nursery() as n:
            for a, b in pairs:
                n.start_soon(reader, a)
                n.start_soon(reader, b)
            await trio.testing.wait_all_tasks_blocked()
            transport = t.agent_transport if side == "agent" else t.broker_transport
            await transport.aclose()
            with trio.fail_after(5):
                await t.done["agent"].wait()
                await t.done["broker"].wait()
        assert len(blocked) == 8
        assert all("tunnel connection lost" in str(e) for e in blocked)
        for a, b in pairs:
            for ts in (a, b):
                assert ts.aborted
                with pytest.raises(StreamAborted):
                    await ts.receive()
                with pytest.raises(StreamAborted):
                    await ts.wait_writable()
                with pytest.raises(StreamAborted):
                    await ts.send_all(b"x")
        for conn in (t.agent, t.broker):
            assert conn.closed_reason is not None
            assert conn.streams == {}
            with pytest.raises(TunnelClosed):
                conn.check_open()
            with pytest.raises(TunnelClosed):
                conn.send_message(messages.Cancel(1))


async def test_abort_aborts_every_stream() -> None:
    async with tunnel() as t:
        pairs = [await t.open_stream(i) for i in range(3)]
        t.agent.abort(CloseReason.ABORTED, "operator says so")
        with trio.fail_after(5):
            await t.done["agent"].wait()
            await t.done["broker"].wait()
        assert t.agent.closed_reason == "operator says so"
        for a, b in pairs:
            with pytest.raises(StreamAborted, match="operator says so"):
                await a.receive()
            with pytest.raises(StreamAborted):
                await b.receive()


async def test_protocol_error_closes_the_connection_with_a_reason() -> None:
    async with tunnel() as t:
        control_id = t.agent.session._control_id
        assert control_id is not None
        t.agent.session._h2.send_data(control_id, b"\xc1")  # not msgpack
        t.agent.wake_writer()
        with trio.fail_after(5):
            await t.done["broker"].wait()
            await t.done["agent"].wait()
        assert t.broker.protocol_error is not None
        assert (t.broker.closed_reason or "").startswith("protocol error")


@pytest.mark.parametrize("closer_role", ["agent", "broker"])
async def test_clean_goaway_while_credit_is_in_flight_is_no_violation(closer_role: str) -> None:
    """A drain's GOAWAY while a bulk transfer runs: the peer's WINDOW_UPDATEs
    sent before it saw the GOAWAY are no protocol violation on the side that
    sent it (they were: "RECV_WINDOW_UPDATE in state CLOSED"), and both ends
    close cleanly."""
    async with tunnel(SMALL) as t:
        a, b = await t.open_stream(1)
        closer, peer = (t.agent, t.broker) if closer_role == "agent" else (t.broker, t.agent)
        src = a if closer_role == "agent" else b
        dst = b if closer_role == "agent" else a
        got = 0

        async def sink() -> None:
            nonlocal got
            with contextlib.suppress(StreamAborted):
                while (chunk := await dst.receive()) is not None:
                    got += len(chunk.data)
                    dst.acknowledge(chunk.flow_len)  # credit flows back at once

        async def pump() -> None:
            with contextlib.suppress(StreamAborted, TunnelClosed):
                while True:
                    await src.send_all(b"z" * 16 * 1024)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sink)
            nursery.start_soon(pump)
            with trio.fail_after(5):
                while got < 1024 * 1024:  # credit is flowing both ways
                    await trio.lowlevel.checkpoint()
            closer.goaway("shutting down")
            with trio.fail_after(5):
                await t.done[
                    "agent" if peer is t.agent else "broker"
                ].wait()  # the peer ends at the GOAWAY
                await t.done["agent" if closer is t.agent else "broker"].wait()
            nursery.cancel_scope.cancel()
        assert closer.protocol_error is None, closer.closed_reason
        assert peer.protocol_error is None, peer.closed_reason
        assert peer.close_reason is CloseReason.GOAWAY
        assert peer.closed_reason == "peer closed: shutting down"
        assert closer.close_reason is CloseReason.PEER_CLOSED
