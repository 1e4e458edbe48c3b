"""The per-process buffer budget: its accounting (sans-IO, hypothesis), the
per-stream windows the session grants from it, and the trio driver's
release of every grant exactly once."""

from __future__ import annotations

import math
import random

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from test_tunnel_memory import (
    AUTHORITY,
    AgentHandler,
    BrokerHandler,
    agent_session,
    broker_session,
    receive_stream,
    send_stream,
    sha,
)

from protocol import budget
from protocol.budget import BufferBudget, Grant, outbox_limit, stream_cost
from protocol.errors import LocalProtocolError
from protocol.outcomes import CloseReason
from protocol.session import SessionConfig
from tether.netio.tunnel import Keepalive, StreamAborted, TunnelConnection, TunnelStream

MiB = 1024 * 1024
FULL = stream_cost(MiB)
FLOOR = stream_cost(budget.MIN_WINDOW)


# ------------------------------------------------------------ accounting


def test_full_windows_below_high_water_then_the_floor_then_busy() -> None:
    b = BufferBudget(4 * FULL, window=MiB)
    grants = [b.open() for _ in range(2)]
    assert [g.window for g in grants if g] == [MiB, MiB]
    assert b.reserved == 2 * FULL == b.high_water
    floor = b.open()
    assert floor is not None and floor.window == budget.MIN_WINDOW and b.shrunk_total == 1
    while (g := b.open()) is not None:
        grants.append(g)
    assert b.exhausted and b.refused_total == 1
    assert b.available < FLOOR <= b.limit
    # Once a stream ends, a new one fits again; the budget is not stuck.
    assert grants[0] is not None
    b.release(grants[0])
    again = b.open()
    assert again is not None and not b.exhausted


def test_release_is_idempotent_and_grow_respects_high_water() -> None:
    b = BufferBudget(8 * FULL, window=MiB)
    g = b.open()
    assert g is not None
    assert b.may_grow(g, MiB)
    assert b.grow(g, MiB) and g.window == 2 * MiB and b.reserved == stream_cost(2 * MiB)
    assert not b.may_grow(g, 8 * FULL)  # past the high-water mark
    b.shrink(g, 10 * MiB)
    assert g.window == budget.MIN_WINDOW and b.reserved == FLOOR
    b.release(g)
    b.release(g)
    assert b.reserved == 0 and b.streams == 0
    assert not b.may_grow(g, 1) and not b.grow(g, 1)


def test_outbox_is_a_quarter_window_up_to_the_limit() -> None:
    assert outbox_limit(MiB) == budget.OUTBOX_LIMIT == 256 * 1024
    assert outbox_limit(budget.MIN_WINDOW) == 16 * 1024
    assert outbox_limit(16 * MiB) == budget.OUTBOX_LIMIT


def test_a_budget_too_small_for_one_stream_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one stream"):
        BufferBudget(FLOOR - 1)


def test_the_agent_default_fits_its_unit() -> None:
    from test_hostile_memory import unit_memory_max

    assert unit_memory_max() // 2 >= budget.AGENT_DEFAULT


ops = st.lists(
    st.tuples(
        st.sampled_from(["open", "grow", "shrink", "release"]),
        st.integers(0, 100),
        st.integers(0, 4 * MiB),
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(FLOOR, 64 * MiB),
    window=st.integers(budget.MIN_WINDOW, 4 * MiB),
    steps=ops,
)
def test_any_sequence_keeps_the_invariant_and_releases_to_zero(
    limit: int, window: int, steps: list[tuple[str, int, int]]
) -> None:
    b = BufferBudget(limit, window=window)
    live: list[Grant] = []
    for op, pick, n in steps:
        if op == "open":
            g = b.open()
            if g is not None:
                assert budget.MIN_WINDOW <= g.window <= window
                live.append(g)
            else:
                assert b.available < stream_cost(budget.MIN_WINDOW)
        elif live:
            g = live[pick % len(live)]
            if op == "grow":
                allowed = b.may_grow(g, n)
                assert b.grow(g, n) == allowed
            elif op == "shrink":
                b.shrink(g, n)
            else:
                b.release(g)  # sometimes twice: still counted once
        assert 0 <= b.reserved <= b.limit
        assert b.reserved == sum(g.cost for g in live if not g.released)
        assert b.streams == sum(1 for g in live if not g.released)
    for g in live:
        b.release(g)
    assert b.reserved == 0 and b.streams == 0


# --------------------------------------------------- per-stream windows


def test_streams_start_at_the_floor_and_are_raised_to_their_grant() -> None:
    cfg = SessionConfig()
    agent, broker = agent_session(cfg), broker_session(cfg)
    broker.receive_data(agent.data_to_send())
    agent.receive_data(broker.data_to_send())
    assert broker._h2.local_settings.initial_window_size == cfg.min_stream_window
    # The control stream keeps the full window on both sides.
    ctl = agent._control_id
    assert ctl is not None
    broker.accept_control({"tether-server-id": "b"})
    agent.receive_data(broker.data_to_send())
    broker.receive_data(agent.data_to_send())
    assert broker._h2.remote_flow_control_window(ctl) == cfg.stream_window
    assert agent._h2.remote_flow_control_window(ctl) == cfg.stream_window
    small = agent.open_data_stream(1, AUTHORITY, window=cfg.min_stream_window)
    full = agent.open_data_stream(2, AUTHORITY)
    with pytest.raises(LocalProtocolError, match="below min_stream_window"):
        agent.open_data_stream(3, AUTHORITY, window=cfg.min_stream_window - 1)
    broker.receive_data(agent.data_to_send())
    broker.accept_data_stream(small, window=cfg.min_stream_window)
    broker.accept_data_stream(full, window=256 * 1024)
    agent.receive_data(broker.data_to_send())
    # What each side may send is what the other granted.
    assert agent.send_capacity(small) == min(cfg.min_stream_window, cfg.send_chunk + 5) - 5
    assert agent._h2.local_flow_control_window(full) == 256 * 1024
    assert broker._h2.local_flow_control_window(small) == cfg.min_stream_window
    assert broker._h2.local_flow_control_window(full) == cfg.stream_window
    assert agent.stream_window(small) == cfg.min_stream_window
    assert agent.grow_window(small, 64 * 1024) and agent.stream_window(small) == 128 * 1024
    broker.receive_data(agent.data_to_send())
    assert broker._h2.local_flow_control_window(small) == 128 * 1024


# ------------------------------------------------------ the trio driver


async def _pair(
    nursery: trio.Nursery, b_agent: BufferBudget, b_broker: BufferBudget
) -> tuple[TunnelConnection, TunnelConnection, BrokerHandler]:
    a_end, b_end = trio.testing.memory_stream_pair()
    ah, bh = AgentHandler(), BrokerHandler()
    none = Keepalive(interval=math.inf)
    agent = TunnelConnection(a_end, agent_session(None), ah, keepalive=none, budget=b_agent)
    broker = TunnelConnection(b_end, broker_session(None), bh, keepalive=none, budget=b_broker)
    ah.conn, bh.conn = agent, broker
    nursery.start_soon(agent.run)
    nursery.start_soon(broker.run)
    with trio.fail_after(5):
        await ah.accepted.wait()
    return agent, broker, bh


async def _open(
    agent: TunnelConnection, bh: BrokerHandler, dial_id: int, grant: Grant
) -> tuple[TunnelStream, TunnelStream]:
    sid = agent.session.open_data_stream(dial_id, AUTHORITY, window=grant.window)
    ts = agent.add_stream(sid, dial_id, grant)
    agent.wake_writer()
    with trio.fail_after(5):
        await ts.wait_accepted()
        peer = await bh.streams.receive()
    return ts, peer


@pytest.mark.timeout(30)
async def test_every_grant_comes_back_once_however_the_stream_ends() -> None:
    b_agent, b_broker = BufferBudget(64 * MiB), BufferBudget(64 * MiB)
    async with trio.open_nursery() as n:
        agent, _broker, bh = await _pair(n, b_agent, b_broker)
        data = random.Random(5).randbytes(3 * MiB)
        # 1. a clean transfer both ways, then forget (what relay() does)
        g = b_agent.open()
        assert g is not None
        a, b = await _open(agent, bh, 1, g)
        got: list[bytes] = []

        async def recv() -> None:
            got.append(await receive_stream(b))

        with trio.fail_after(20):
            async with trio.open_nursery() as inner:
                inner.start_soon(send_stream, a, data)
                inner.start_soon(recv)
        assert sha(got[0]) == sha(data)
        b.send_eof()
        assert await receive_stream(a) == b""
        agent.forget(a.stream_id)
        agent.forget(a.stream_id)  # twice: still once
        assert b_agent.reserved == 0
        # growing a window goes through the budget, and comes back with it
        g = b_agent.open()
        assert g is not None
        a, b = await _open(agent, bh, 9, g)
        assert a.grow_window(MiB) and g.window == 2 * MiB
        assert b_agent.reserved == stream_cost(2 * MiB)
        assert not a.grow_window(64 * MiB)  # past the high-water mark
        peer_h2 = b.conn.session._h2
        with trio.fail_after(5):  # the peer may now send the larger window
            while peer_h2.local_flow_control_window(b.stream_id) < 2 * MiB:
                await trio.sleep(0.01)
        a.reset()
        assert b_agent.reserved == 0
        # 2. a local reset
        g = b_agent.open()
        assert g is not None
        a, b = await _open(agent, bh, 2, g)
        await a.send_all(b"x" * 1000)
        a.reset()
        assert b_agent.reserved == 0
        with trio.fail_after(5), pytest.raises(StreamAborted):
            while await b.receive() is not None:
                pass
        # 3. forgotten with output still queued: held until it is sent
        g = b_agent.open()
        assert g is not None
        a, b = await _open(agent, bh, 3, g)
        await a.send_all(b"y" * outbox_limit(g.window))
        a.send_eof()
        agent.forget(a.stream_id)
        got.clear()
        with trio.fail_after(5):
            got.append(await receive_stream(b))
            while b_agent.reserved:
                await trio.sleep(0.01)
        assert len(got[0]) == outbox_limit(g.window)
        # 4. the connection dies with streams open, one of them stalled
        grants = [b_agent.open() for _ in range(3)]
        pairs = [await _open(agent, bh, 10 + i, g) for i, g in enumerate(grants) if g]
        with trio.move_on_after(0.5):
            await pairs[0][0].send_all(b"z" * 4 * MiB)  # nobody reads: stalls
        assert b_agent.reserved == sum(g.cost for g in grants if g)
        agent.abort(CloseReason.ABORTED, "test says so")
        with trio.fail_after(5):
            while b_agent.reserved:
                await trio.sleep(0.01)
        n.cancel_scope.cancel()
    assert b_agent.reserved == 0 and b_agent.streams == 0


# ------------------------------------------------- the agent's refusals


class _Conn:
    def __init__(self) -> None:
        self.sent: list[object] = []

    def send_message(self, msg: object) -> None:
        self.sent.append(msg)


class _Agent:
    def __init__(self, limit: int) -> None:
        self.budget = BufferBudget(limit)
        self.metrics = None

    def reserve(self) -> Grant | None:
        return None  # exhausted: every dial is refused


@pytest.mark.parametrize("knows_busy", [True, False])
async def test_a_busy_agent_answers_in_the_broker_s_vocabulary(knows_busy: bool) -> None:
    """``busy`` goes only to a broker that lists it in
    ``tether-dial-fail-codes``; an older broker, which would drop the
    connection on an unknown code, gets ``error`` with "agent busy"."""
    from edge_agent.app import BrokerLink
    from protocol import messages
    from protocol.codes import DialFailCode
    from protocol.events import ControlAccepted

    async with trio.open_nursery() as nursery:
        link = BrokerLink(_Agent(FLOOR), nursery)  # type: ignore[arg-type]
        conn = _Conn()
        link.conn = conn  # type: ignore[assignment]
        headers = {"tether-server-id": "b"}
        if knows_busy:
            headers["tether-dial-fail-codes"] = "busy"
        link.on_control_accepted(ControlAccepted(headers))
        link.on_message(messages.Dial(id=7, addr="127.0.0.1:1", timeout_ms=100))
    (sent,) = conn.sent
    assert isinstance(sent, messages.DialFail) and sent.id == 7
    if knows_busy:
        assert sent.code is DialFailCode.BUSY
    else:
        assert sent.code is DialFailCode.ERROR and sent.msg.startswith("agent busy:")
    assert link.dials == {}
