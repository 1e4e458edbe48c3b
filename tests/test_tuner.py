"""Windows that follow the link (protocol/tuner.py).

Sans-IO first: a fluid model of one stream over a link (rate, RTT, a reader
of some speed), on an injected clock, with the window's changes applied
through a real :class:`protocol.budget.BufferBudget` exactly as the tunnel
applies them. Then the trio tunnel itself over a transport that delays and
paces its bytes (on the autojump clock): the receiving stream's window grows
past its initial size and the bytes arrive intact, and with a reader that
does not read it does not grow.
"""

from __future__ import annotations

import collections
import contextlib
import math
import random
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from test_tunnel_memory import (
    AUTHORITY,
    AgentHandler,
    agent_session,
    broker_session,
    sha,
)

from protocol import flow
from protocol.budget import BufferBudget, Grant, stream_cost
from protocol.events import DataStreamRequested
from protocol.tuner import (
    LOWAT_MAX,
    LOWAT_MIN,
    LinkEstimate,
    StreamTuner,
    TunerConfig,
)
from tether.netio.tunnel import Keepalive, TunnelConnection, TunnelStream

KiB, MiB = 1024, 1024 * 1024


# ------------------------------------------------------------ the fluid model


@attrs.define
class Model:
    """One stream: a sender that always has data, a link of ``rate`` bytes/s
    and round trip ``rtt``, a reader taking ``reader_rate`` bytes/s (None:
    all it gets, at once). Credit and windows follow protocol.flow and the
    session's shrink rule (credit kept back until the reader caught up)."""

    rate: float
    rtt: float
    budget: BufferBudget
    reader_rate: float | None = None
    config: TunerConfig = attrs.field(factory=TunerConfig)
    now: float = 0.0
    link: LinkEstimate = attrs.field(factory=LinkEstimate)
    grant: Grant = attrs.field(init=False)
    tuner: StreamTuner = attrs.field(init=False)
    window: int = attrs.field(init=False)
    sender_credit: int = attrs.field(init=False)
    granted: int = attrs.field(init=False)
    landed_total: int = 0
    buffered: int = 0
    unacked: int = 0
    withheld: int = 0
    delivered: int = 0
    to_receiver: collections.deque[tuple[float, int]] = attrs.field(factory=collections.deque)
    to_sender: collections.deque[tuple[float, int]] = attrs.field(factory=collections.deque)
    pressure: bool = False
    peak_reserved: int = 0
    peak_window: int = 0

    def __attrs_post_init__(self) -> None:
        grant = self.budget.open()
        assert grant is not None
        self.grant = grant
        self.window = self.sender_credit = self.granted = grant.window
        self.tuner = StreamTuner(self.config, grant.window)
        self.link.rtt_sample(self.rtt)

    def run(self, seconds: float, dt: float | None = None) -> float:
        """Advance ``seconds``; return the goodput (bytes/s) over them."""
        dt = dt or self.rtt / 20
        start, end = self.delivered, self.now + seconds
        while self.now < end:
            self.step(dt)
        return (self.delivered - start) / seconds

    def step(self, dt: float) -> None:
        self.now += dt
        half = self.rtt / 2
        n = int(min(self.sender_credit, self.rate * dt))
        if n > 0:
            self.sender_credit -= n
            self.to_receiver.append((self.now + half, n))
        while self.to_sender and self.to_sender[0][0] <= self.now:
            self.sender_credit += self.to_sender.popleft()[1]
        while self.to_receiver and self.to_receiver[0][0] <= self.now:
            k = self.to_receiver.popleft()[1]
            self.landed_total += k
            self.buffered += k
            self.link.delivered(k, self.now)
            self.tuner.landed(k)
        take = self.buffered if self.reader_rate is None else int(self.reader_rate * dt)
        take = min(take, self.buffered)
        if take > 0:
            self.acknowledge(take)
        self.peak_reserved = max(self.peak_reserved, self.budget.reserved)
        self.peak_window = max(self.peak_window, self.window)

    def credit(self, n: int) -> None:
        self.granted += n
        self.to_sender.append((self.now + self.rtt / 2, n))

    def acknowledge(self, n: int) -> None:
        self.buffered -= n
        self.delivered += n
        if self.withheld:
            kept = min(self.withheld, n)
            self.withheld -= kept
            self.budget.shrink(self.grant, kept)
            n -= kept
            self.unacked += n
        else:
            self.unacked += n
            change = self.tuner.advise(self.link, self.now, self.pressure, self.buffered)
            if change > 0 and self.budget.grow(self.grant, change):
                self.window += change
                self.credit(change)
                self.tuner.resized(self.window)
            elif change < 0:
                shrink = min(-change, self.window - self.config.floor)
                self.window -= shrink
                self.withheld += shrink
                self.tuner.resized(self.window)
        if flow.stream_credit_due(self.unacked, self.window):
            self.credit(self.unacked)
            self.unacked = 0
        # What the peer may have outstanding never exceeds what is reserved.
        outstanding = self.granted - self.landed_total + self.buffered
        assert outstanding <= self.grant.window + 1


links = st.tuples(
    st.sampled_from([0.25, 1.0, 2.5, 12.5]).map(lambda mbyte: mbyte * MiB),  # bytes/s
    st.sampled_from([0.02, 0.06, 0.2, 0.6]),  # RTT, s
)


@settings(max_examples=25, deadline=None)
@given(link=links, initial=st.sampled_from([64 * KiB, 256 * KiB, MiB]))
def test_a_window_grows_to_carry_the_link_and_stays_within_its_bounds(
    link: tuple[float, float], initial: int
) -> None:
    rate, rtt = link
    bdp = rate * rtt
    budget = BufferBudget(1024 * MiB, window=initial)
    m = Model(rate, rtt, budget)
    m.run(60 * rtt + 2)  # converge
    goodput = m.run(20 * rtt + 1)
    assert goodput >= 0.9 * rate, (goodput / rate, m.window, bdp)
    # Never past its cap: headroom x the largest delivery rate seen x RTT.
    cap = max(initial, m.config.headroom * bdp * 1.1)
    assert m.peak_window <= min(cap, m.config.ceiling) + 1, (m.peak_window, cap)
    assert m.peak_window >= min(bdp, m.config.ceiling) or m.peak_window == initial
    assert budget.grown_total == m.tuner.grown


@settings(max_examples=25, deadline=None)
@given(link=links, streams=st.integers(1, 6), limit_mib=st.integers(2, 12))
def test_windows_never_take_the_process_past_its_budget(
    link: tuple[float, float], streams: int, limit_mib: int
) -> None:
    rate, rtt = link
    budget = BufferBudget(max(limit_mib * MiB, stream_cost(64 * KiB)), window=256 * KiB)
    models: list[Model] = []
    for _ in range(streams):
        if budget.available < stream_cost(budget.min_window):
            break
        models.append(Model(rate / streams, rtt, budget))
    opened = budget.reserved
    dt = rtt / 20
    for _ in range(int((40 * rtt + 2) / dt)):
        for m in models:
            m.step(dt)
            assert budget.reserved <= budget.limit
            # growth stops at the high-water mark: room stays for new tunnels
            assert budget.reserved <= max(budget.high_water, opened)
    assert budget.reserved == sum(m.grant.cost for m in models)


@settings(max_examples=20, deadline=None)
@given(link=links)
def test_memory_pressure_shrinks_a_grown_window_back_to_its_initial_size(
    link: tuple[float, float],
) -> None:
    rate, rtt = link
    budget = BufferBudget(1024 * MiB, window=64 * KiB)
    m = Model(rate, rtt, budget)
    m.run(60 * rtt + 2)
    grown = m.window
    m.pressure = True
    m.run(20 * rtt + 2)
    assert m.window == 64 * KiB
    # The budget share follows once the reader took what was credited.
    assert m.grant.window == m.window + m.withheld
    if grown > 64 * KiB:
        assert m.tuner.shrunk >= 1 and budget.window_shrunk_total >= 1
        assert budget.reserved < stream_cost(grown)


def test_a_slow_reader_never_grows_its_window() -> None:
    budget = BufferBudget(1024 * MiB, window=256 * KiB)
    # A 600 ms, 10 MiB/s link, but the reader takes 100 KiB/s.
    m = Model(10 * MiB, 0.6, budget, reader_rate=100 * KiB)
    m.run(60)
    assert m.peak_window == 256 * KiB
    assert budget.reserved == stream_cost(256 * KiB)


def test_a_window_oversized_for_a_slower_link_comes_back_down() -> None:
    budget = BufferBudget(1024 * MiB, window=64 * KiB)
    m = Model(12.5 * MiB, 0.2, budget)
    m.run(20)
    big = m.window
    assert big > 2 * MiB
    # The link slows to a tenth: the windowed-max rate forgets the fast
    # samples and quiet rounds bring the window down toward the new cap.
    m.rate = 1.25 * MiB
    m.run(40)
    assert m.window < big / 2
    assert m.run(10) >= 0.9 * m.rate


# ----------------------------------------------------------- LinkEstimate


def test_link_estimate_bdp_and_notsent_lowat_follow_the_samples() -> None:
    link = LinkEstimate()
    assert link.bdp(0.0) == 0 and link.notsent_lowat(0.0) == LOWAT_MIN
    link.rtt_sample(0.1)
    for i in range(1, 200):  # 2.5 MB/s in 100 ms rounds
        link.delivered(25_000, i * 0.01)
    assert link.rate(2.0) == pytest.approx(2.5e6, rel=0.05)
    assert link.bdp(2.0) == pytest.approx(250_000, rel=0.05)
    assert link.notsent_lowat(2.0) == pytest.approx(25_000, rel=0.05)
    link.rate_sample(1e12, 2.0)  # loopback's kernel estimate
    assert link.notsent_lowat(2.0) == LOWAT_MAX
    # Samples older than the horizon are forgotten.
    assert link.rate(100.0) == 0.0
    link.rtt_sample(-1.0)
    link.rtt_sample(math.nan)
    assert link.srtt is not None and link.srtt > 0


@given(st.lists(st.tuples(st.floats(0, 1e9), st.floats(-1, 1e10)), max_size=50))
def test_rate_is_the_windowed_maximum(samples: list[tuple[float, float]]) -> None:
    link = LinkEstimate()
    now = 0.0
    kept: list[tuple[float, float]] = []
    for step, rate in samples:
        now += step / 1e8
        link.rate_sample(rate, now)
        if rate > 0:
            kept.append((now, rate))
    recent = [r for t, r in kept if t >= now - 10.0]
    assert link.rate(now) == (max(recent) if recent else 0.0)


def test_tuner_config_is_checked() -> None:
    with pytest.raises(ValueError):
        TunerConfig(floor=0)
    with pytest.raises(ValueError):
        TunerConfig(floor=2 * MiB, ceiling=MiB)
    with pytest.raises(ValueError):
        TunerConfig(gain=1)


# ------------------------------------------------ the tunnel, over a slow link


class SlowLink(trio.abc.Stream):
    """One end of a link that delivers each write ``delay`` seconds later,
    paced at ``rate`` bytes/s (no TCP_INFO: the tunnel times PINGs)."""

    def __init__(
        self,
        out: trio.MemorySendChannel[tuple[float, bytes]],
        inbox: trio.MemoryReceiveChannel[tuple[float, bytes]],
        delay: float,
        rate: float,
    ) -> None:
        self._out, self._in = out, inbox
        self.delay, self.rate = delay, rate
        self._free_at = 0.0
        self._pending = b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        now = trio.current_time()
        start = max(now, self._free_at)
        self._free_at = start + len(data) / self.rate
        await trio.sleep_until(self._free_at)  # the sender waits for the wire
        await self._out.send((self._free_at + self.delay, bytes(data)))

    async def wait_send_all_might_not_block(self) -> None:
        await trio.sleep_until(self._free_at)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._pending:
            try:
                at, self._pending = await self._in.receive()
            except trio.EndOfChannel:
                return b""
            await trio.sleep_until(at)
        n = len(self._pending) if max_bytes is None else max_bytes
        out, self._pending = self._pending[:n], self._pending[n:]
        return out

    async def aclose(self) -> None:
        await self._out.aclose()


def slow_pair(delay: float, rate: float) -> tuple[SlowLink, SlowLink]:
    a_out, b_in = trio.open_memory_channel[tuple[float, bytes]](math.inf)
    b_out, a_in = trio.open_memory_channel[tuple[float, bytes]](math.inf)
    return SlowLink(a_out, a_in, delay, rate), SlowLink(b_out, b_in, delay, rate)


class GrantingBroker:
    """Accepts every data stream with a grant from the broker's budget."""

    def __init__(self, budget: BufferBudget) -> None:
        self.budget = budget
        self.conn: TunnelConnection | None = None
        self.send, self.streams = trio.open_memory_channel[TunnelStream](math.inf)

    def on_control_requested(self, ev: object) -> None:
        assert self.conn is not None
        self.conn.session.accept_control({"tether-server-id": "broker-1"})
        self.conn.wake_writer()

    def on_control_accepted(self, ev: object) -> None:
        raise AssertionError

    def on_message(self, msg: object) -> None:
        pass

    def on_data_stream_requested(self, ev: DataStreamRequested) -> None:
        assert self.conn is not None
        grant = self.budget.open()
        assert grant is not None
        ts = self.conn.add_stream(ev.stream_id, ev.dial_id, grant)
        self.conn.session.accept_data_stream(ev.stream_id, window=grant.window)
        self.conn.wake_writer()
        self.send.send_nowait(ts)


@attrs.define
class StreamPair:
    """Two tunnel connections, agent and broker, running with one data
    stream open from the agent: its two ends."""

    agent: TunnelConnection
    broker: TunnelConnection
    sender: TunnelStream
    receiver: TunnelStream


@contextlib.asynccontextmanager
async def stream_pair(
    a_end: trio.abc.Stream, b_end: trio.abc.Stream, budget: BufferBudget, keepalive: Keepalive
) -> AsyncIterator[StreamPair]:
    ah, bh = AgentHandler(), GrantingBroker(budget)
    agent = TunnelConnection(a_end, agent_session(None), ah, keepalive=keepalive)
    broker = TunnelConnection(b_end, broker_session(None), bh, keepalive=keepalive, budget=budget)
    ah.conn, bh.conn = agent, broker
    async with trio.open_nursery() as n:
        n.start_soon(agent.run)
        n.start_soon(broker.run)
        with trio.fail_after(5):
            await ah.accepted.wait()
        sid = agent.session.open_data_stream(1, AUTHORITY)
        ts = agent.add_stream(sid, 1)
        agent.wake_writer()
        peer = await bh.streams.receive()
        yield StreamPair(agent, broker, ts, peer)
        n.cancel_scope.cancel()


async def upload_over_slow_link(
    budget: BufferBudget, data: bytes, reader_sleep: float, seconds: float
) -> tuple[TunnelStream, int, bytes]:
    """The agent sends ``data`` over a 100 ms, 8 MiB/s link; the broker's
    reader sleeps ``reader_sleep`` per piece. Returns the broker's stream,
    its largest window seen, and what it read within ``seconds``."""
    a_end, b_end = slow_pair(0.05, 8 * MiB)
    got = bytearray()
    peak = 0
    async with (
        stream_pair(a_end, b_end, budget, Keepalive(interval=math.inf)) as pair,
        trio.open_nursery() as n,
    ):
        ts, peer = pair.sender, pair.receiver

        async def send() -> None:
            for i in range(0, len(data), 64 * KiB):
                await ts.send_all(data[i : i + 64 * KiB])
            ts.send_eof()

        n.start_soon(send)
        with trio.move_on_after(seconds):
            while (chunk := await peer.receive()) is not None:
                got += chunk.data
                if reader_sleep:
                    await trio.sleep(reader_sleep)
                peer.acknowledge(chunk.flow_len)
                peak = max(peak, pair.broker.session.stream_window(peer.stream_id))
                assert budget.reserved <= budget.limit
        n.cancel_scope.cancel()
    return peer, peak, bytes(got)


@pytest.mark.timeout(60)
async def test_over_a_long_fat_link_the_receive_window_grows_and_bytes_arrive_intact(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # BDP: 8 MiB/s x 100 ms = 0.8 MiB (more with the link's own queueing):
    # a 256 KiB window carries a third of the link until it grows.
    budget = BufferBudget(64 * MiB, window=256 * KiB)
    data = random.Random(3).randbytes(24 * MiB)
    peer, peak, got = await upload_over_slow_link(budget, data, 0.0, 60.0)
    assert sha(got) == sha(data)
    assert peak >= MiB, peak
    assert peer.tuner is not None and peer.tuner.grown >= 2
    assert budget.reserved == 0  # the stream ended: its grown share came back


@pytest.mark.timeout(60)
async def test_a_receiver_that_does_not_keep_up_keeps_its_window(
    autojump_clock: trio.testing.MockClock,
) -> None:
    budget = BufferBudget(64 * MiB, window=256 * KiB)
    data = random.Random(4).randbytes(4 * MiB)
    # 64 KiB pieces at 20 per second: 1.3 MiB/s of a 8 MiB/s link.
    _peer, peak, got = await upload_over_slow_link(budget, data, 0.05, 2.0)
    assert got == data[: len(got)]
    assert peak == 256 * KiB


@given(
    window=st.integers(min_value=64 * 1024, max_value=16 * 1024 * 1024),
    bdp=st.integers(min_value=0, max_value=16 * 1024 * 1024),
)
def test_credit_goes_back_in_small_steps_only_while_the_window_is_tight(
    window: int, bdp: int
) -> None:
    """1/16 steps while the window is under four BDPs (or the BDP is not
    known yet); quarter (stream) and eighth (connection) steps once it is
    ample, so a short link is not sent four times the WINDOW_UPDATEs."""
    ample = bdp > 0 and window >= flow.AMPLE_BDPS * bdp
    stream_step = window // (4 if ample else 16)
    conn_step = window // (8 if ample else 16)
    assert flow.stream_credit_due(stream_step, window, bdp)
    assert not flow.stream_credit_due(stream_step - 1, window, bdp)
    assert flow.connection_credit_due(conn_step, window, bdp)
    assert not flow.connection_credit_due(conn_step - 1, window, bdp)
    # A tight window never waits longer for credit than an ample one would.
    assert stream_step <= window // 4
    if ample:
        # The sender stays at least three BDPs in flight between updates.
        assert window - stream_step >= 3 * bdp


async def quiet_stream_tuning_rounds(
    a_end: trio.abc.Stream, b_end: trio.abc.Stream, keepalive: Keepalive, seconds: float
) -> tuple[int, int, int]:
    """Open one data stream, move 256 KiB over it, then leave it open and
    quiet for ``seconds``. Returns the tuning rounds of both ends during the
    transfer and during the quiet part, and the bytes the connections moved
    while quiet."""
    budget = BufferBudget(64 * MiB, window=256 * KiB)
    rounds = [0]
    async with stream_pair(a_end, b_end, budget, keepalive) as pair, trio.open_nursery() as n:
        agent, broker, ts, peer = pair.agent, pair.broker, pair.sender, pair.receiver
        for conn in (agent, broker):
            real = conn.tune_once

            def counted(now: float, *, probe: bool = True, real: Any = real) -> None:
                rounds[0] += 1
                real(now, probe=probe)

            conn.tune_once = counted  # type: ignore[method-assign]
        data = random.Random(5).randbytes(256 * KiB)
        got = bytearray()
        n.start_soon(ts.send_all, data)
        with trio.fail_after(10):
            while len(got) < len(data):
                chunk = await peer.receive()
                assert chunk is not None
                got += chunk.data
                peer.acknowledge(chunk.flow_len)
        assert bytes(got) == data
        await trio.sleep(2.0)  # the transfer's last rounds
        busy_rounds, rounds[0] = rounds[0], 0
        moved = agent._driver.moved + broker._driver.moved
        await trio.sleep(seconds)
        quiet_moved = agent._driver.moved + broker._driver.moved - moved
        assert ts.stream_id in agent.streams and peer.stream_id in broker.streams  # still open
    return busy_rounds, rounds[0], quiet_moved


@pytest.mark.timeout(60)
async def test_an_open_quiet_stream_is_not_tuned_every_round(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A port-forward nobody uses: open, nothing moving but keepalive PINGs
    # every 15 s. Polling every round (100 ms here) would be 1,200 rounds
    # in 60 s on the two ends; each PING exchange wakes each end for one.
    a_end, b_end = slow_pair(0.05, 8 * MiB)
    busy, quiet, moved = await quiet_stream_tuning_rounds(
        a_end, b_end, Keepalive(interval=15, timeout=15), 60.0
    )
    assert busy >= 4  # the transfer was tuned
    assert moved > 0  # the PINGs went
    assert quiet <= 2 * (60 // 15 + 1), quiet


@pytest.mark.timeout(30)
async def test_an_open_quiet_stream_over_tcp_is_not_tuned_every_round() -> None:
    # The same over a real loopback TCP connection, where the tuner reads
    # TCP_INFO instead of timing PINGs: 3 s quiet with keepalive at 1 s.
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listeners[0]:
        a_end = await trio.testing.open_stream_to_socket_listener(listeners[0])
        b_end = await listeners[0].accept()
        busy, quiet, moved = await quiet_stream_tuning_rounds(
            a_end, b_end, Keepalive(interval=1, timeout=5), 3.0
        )
    assert busy >= 2
    assert moved > 0
    # Polling would be 2 x 60 rounds (the 50 ms floor on loopback).
    assert quiet <= 2 * (3 + 2), quiet
