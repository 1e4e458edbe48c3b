"""Hedged reconnect end to end (issue 13 item 3): real broker and agent
processes on loopback, with a TCP relay standing in for a path that goes
silent. Over an emulated link and a network namespace, see
tests/benchmarks/test_mobility_netns.py."""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Callable

import pytest
import trio
from hostile import metric
from procs import BrokerHandle, Proc, connect_tunnel, free_port, http_get, wait_for
from test_e2e_routing import dials_by, serve_whoami, whoami

from tether.tools.launch import Tunnel

pytestmark = [pytest.mark.e2e]

MiB = 1024 * 1024


class PausingRelay:
    """A TCP relay to the broker's agent port. :meth:`pause` holds every
    byte of the connections it carries now (they stay open, as a path that
    went dead without a FIN); :meth:`resume` lets them flow again. New
    connections pass unless :attr:`refusing` (then they are closed at once,
    as attempts that fail into an outage)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.refusing = False
        self._conns: list[trio.Event] = []  # each set while its connection may flow

    async def serve(self, nursery: trio.Nursery) -> None:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1")
        )
        self.port = int(listeners[0].socket.getsockname()[1])

    def pause(self) -> list[trio.Event]:
        paused = []
        for i, flowing in enumerate(self._conns):
            if flowing.is_set():
                self._conns[i] = trio.Event()
                paused.append(self._conns[i])
        return paused

    @staticmethod
    def resume(paused: list[trio.Event]) -> None:
        for ev in paused:
            ev.set()

    async def _handle(self, down: trio.SocketStream) -> None:
        if self.refusing:
            await trio.aclose_forcefully(down)
            return
        index = len(self._conns)
        flowing = trio.Event()
        flowing.set()
        self._conns.append(flowing)
        try:
            up = await trio.open_tcp_stream("127.0.0.1", self.target)
        except OSError:
            return

        async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
            while True:
                data = await src.receive_some(65536)
                await self._conns[index].wait()
                if not data:
                    await dst.send_eof()
                    return
                await dst.send_all(data)

        try:
            async with trio.open_nursery() as n:
                n.start_soon(pump, down, up)
                n.start_soon(pump, up, down)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(up)
            await trio.aclose_forcefully(down)


async def serve_digest(nursery: trio.Nursery) -> int:
    """A target that reads everything and answers with its sha256 (hex)."""

    async def handler(stream: trio.SocketStream) -> None:
        digest = hashlib.sha256()
        try:
            while data := await stream.receive_some(65536):
                digest.update(data)
            await stream.send_all(digest.hexdigest().encode())
            await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def agent_metrics(port: int) -> str:
    status, body = await http_get(port, "/metrics")
    assert status == 200
    return body.decode()


def hedged(
    agent_factory: Callable[..., Proc], broker: BrokerHandle, relay: PausingRelay, admin: int
) -> Proc:
    return agent_factory(
        broker,
        "--hedge-after=1",
        "--hedge-interval=0.3",
        "--keepalive-time=8",
        "--keepalive-timeout=8",
        "--metrics",
        f"--admin-server-port={admin}",
        "--watch-network=off",
        port=relay.port,
    )


class HedgeRig:
    """One agent behind a pausable relay with hedging on, and an 8 MiB
    upload to a digest target on its tunnel (:meth:`upload`, progress in
    :attr:`sent`; it stops quietly if the tunnel breaks)."""

    def __init__(
        self, agent: Proc, relay: PausingRelay, admin: int, whoami_port: int, tunnel: Tunnel
    ) -> None:
        self.agent, self.relay, self.admin, self.whoami_port = agent, relay, admin, whoami_port
        self.tunnel = tunnel
        self.payload = os.urandom(8 * MiB)
        self.sent = 0

    async def upload(self) -> None:
        try:
            for off in range(0, len(self.payload), 64 * 1024):
                await self.tunnel.send_all(self.payload[off : off + 64 * 1024])
                self.sent = off + 64 * 1024
            await self.tunnel.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def _hedge_rig(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> tuple[BrokerHandle, HedgeRig]:
    broker = broker_factory("--backend-dial-timeout=20")
    relay = PausingRelay(broker.agent_port)
    await relay.serve(nursery)
    admin = free_port()
    agent = hedged(agent_factory, broker, relay, admin)
    await broker.ready(agents=1)
    whoami_port = await serve_whoami(nursery, "127.0.0.1")
    digest_port = await serve_digest(nursery)
    tunnel = await connect_tunnel(broker, f"127.0.0.1:{digest_port}", via="uds")
    assert tunnel.status == 200
    return broker, HedgeRig(agent, relay, admin, whoami_port, tunnel)


async def _ready(value: bool) -> bool:
    return value


async def _logged(proc: Proc, pattern: str) -> bool:
    return re.search(pattern, proc.log()) is not None


@pytest.mark.timeout(120)
async def test_a_hedge_takes_new_dials_and_the_old_stream_keeps_its_bytes(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    """The path of the agent's connection stalls mid-transfer: within the
    hedge bound a fresh connection takes new dials while the old one still
    holds the transfer. The path returns: the old stream finishes with every
    byte intact (sha256), then the agent retires the old connection."""
    broker, rig = await _hedge_rig(broker_factory, agent_factory, nursery)
    agent, relay, admin, whoami_port = rig.agent, rig.relay, rig.admin, rig.whoami_port
    payload, tunnel = rig.payload, rig.tunnel

    async with trio.open_nursery() as n:
        n.start_soon(rig.upload)
        while rig.sent < 2 * MiB:
            await trio.sleep(0.01)
        paused = relay.pause()
        assert paused
        stalled_at = trio.current_time()
        early: list[tuple[int, bytes]] = []

        async def dial_while_stalled() -> None:
            # Sent on the stalled connection; rerouted to the hedge once it wins.
            early.append(await whoami(broker, f"127.0.0.1:{whoami_port}"))

        n.start_soon(dial_while_stalled)
        await wait_for(lambda: _logged(agent, "hedged reconnect to broker .* won"), 20, "hedge")
        took = trio.current_time() - stalled_at
        assert took < 10, took  # 1 s silence + probe bound + a handshake, on a loaded machine
        await wait_for(lambda: _ready(bool(early)), 10, "the stalled dial, rerouted")
        assert early == [(200, b"127.0.0.1")]
        assert await whoami(broker, f"127.0.0.1:{whoami_port}") == (200, b"127.0.0.1")
        assert "old connection to broker" not in agent.log()  # still carrying the upload
        relay.resume(paused)
    with trio.fail_after(60):
        answer = await tunnel.read_all()
    await tunnel.aclose()
    assert answer == hashlib.sha256(payload).hexdigest().encode()
    await wait_for(lambda: _logged(agent, "old connection to broker .* ended"), 20, "retired")
    text = await agent_metrics(admin)
    assert metric(text, "tether_agent_hedges_total", outcome="won") == 1
    btext = await broker.metrics()
    assert metric(btext, "tether_agent_hedges_accepted_total") == 1
    assert metric(btext, "tether_dials_rerouted_total") >= 1
    assert metric(btext, "tether_agent_disconnects_total", cause="replaced") == 0
    assert "agent_id_live" not in broker.proc.log()
    # New dials keep working through the new connection.
    before = len(dials_by(agent))
    for _ in range(3):
        assert await whoami(broker, f"127.0.0.1:{whoami_port}") == (200, b"127.0.0.1")
    assert len(dials_by(agent)) == before + 3


@pytest.mark.timeout(120)
async def test_a_stream_on_a_dead_old_connection_ends_with_an_error_never_corrupt(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    """The old path never returns: the hedge serves new dials at once, and
    the transfer on the old connection ends when keepalive declares it dead:
    with an error (no digest), never with wrong bytes."""
    broker, rig = await _hedge_rig(broker_factory, agent_factory, nursery)
    agent, relay, admin, whoami_port = rig.agent, rig.relay, rig.admin, rig.whoami_port
    tunnel = rig.tunnel

    answer = b""
    async with trio.open_nursery() as n:
        n.start_soon(rig.upload)
        while rig.sent < 2 * MiB:
            await trio.sleep(0.01)
        relay.pause()
        await wait_for(lambda: _logged(agent, "hedged reconnect to broker .* won"), 20, "hedge")
        assert await whoami(broker, f"127.0.0.1:{whoami_port}") == (200, b"127.0.0.1")
        with trio.fail_after(60):
            try:
                answer = await tunnel.read_all()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                answer = b""
        n.cancel_scope.cancel()
    await tunnel.aclose()
    # Ended with an error (no answer at all), never with an answer about
    # bytes other than those sent.
    assert answer == b"", answer
    await wait_for(lambda: _logged(agent, "old connection to broker .* ended"), 40, "old ended")
    text = await agent_metrics(admin)
    assert metric(text, "tether_agent_hedges_total", outcome="won") == 1
    assert agent.alive()


@pytest.mark.timeout(120)
async def test_the_old_link_answering_starts_a_hedge_at_once(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    """The path goes silent and every fresh connection fails; then the path
    returns. The old connection's first bytes say so: a fresh attempt starts
    then and wins, long before the next attempt of the race was due (8 s)
    and before the race would stop to keep the old connection (4 s after
    the answer, 2x the attempt bound)."""
    broker = broker_factory()
    relay = PausingRelay(broker.agent_port)
    await relay.serve(nursery)
    admin = free_port()
    agent = agent_factory(
        broker,
        "--hedge-after=1",
        "--hedge-interval=8",
        "--keepalive-time=10",
        "--keepalive-timeout=10",
        "--metrics",
        f"--admin-server-port={admin}",
        "--watch-network=off",
        port=relay.port,
    )
    await broker.ready(agents=1)
    whoami_port = await serve_whoami(nursery, "127.0.0.1")
    relay.refusing = True
    paused = relay.pause()
    assert paused
    await wait_for(lambda: _logged(agent, "racing fresh connections"), 20, "the race")

    async def refused() -> bool:
        text = await agent_metrics(admin)
        return metric(text, "tether_agent_hedges_total", outcome="failed") >= 1

    await wait_for(refused, 10, "the race's first attempt, refused")
    assert "hedged reconnect to broker" not in agent.log()
    relay.refusing = False
    resumed_at = trio.current_time()
    relay.resume(paused)
    await wait_for(lambda: _logged(agent, "hedged reconnect to broker .* won"), 10, "hedge")
    took = trio.current_time() - resumed_at
    assert took < 3.0, took  # a handshake on loopback, on a loaded machine
    text = await agent_metrics(admin)
    assert metric(text, "tether_agent_hedges_total", outcome="won") == 1
    assert metric(text, "tether_agent_hedges_total", outcome="recovered") == 0
    assert await whoami(broker, f"127.0.0.1:{whoami_port}") == (200, b"127.0.0.1")


@pytest.mark.timeout(120)
async def test_a_dial_unanswered_on_a_replaced_connection_goes_again_on_the_new_one(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    """Hedging off: the path stalls with a dial on its way to the agent; the
    agent's keepalive gives up and it reconnects (the same process and
    credential), which replaces the stalled connection at the broker. The
    dial the agent never saw is sent again on the new connection and
    succeeds, instead of failing as "agent connection lost"."""
    broker = broker_factory("--backend-dial-timeout=20")
    relay = PausingRelay(broker.agent_port)
    await relay.serve(nursery)
    agent = agent_factory(
        broker,
        "--hedge-after=0",
        # The agent gives up on the link after 3 s; the broker, which
        # expects a PING every 2 s, only after 6 s: the reconnect comes first.
        "--keepalive-time=2",
        "--keepalive-timeout=1",
        "--watch-network=off",
        port=relay.port,
    )
    await broker.ready(agents=1)
    whoami_port = await serve_whoami(nursery, "127.0.0.1")
    paused = relay.pause()
    assert paused
    answers: list[tuple[int, bytes]] = []

    async def dial() -> None:
        answers.append(await whoami(broker, f"127.0.0.1:{whoami_port}"))

    async with trio.open_nursery() as n:
        n.start_soon(dial)
        await wait_for(lambda: _logged(broker.proc, "reconnected from"), 20, "the reconnect")
        await wait_for(lambda: _ready(bool(answers)), 10, "the dial")
    assert answers == [(200, b"127.0.0.1")]
    assert "disconnected from broker" in agent.log()  # a reconnect, not a hedge
    assert metric(await broker.metrics(), "tether_dials_rerouted_total") == 1
    relay.resume(paused)
