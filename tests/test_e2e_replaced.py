"""Issue 15 item 4: an agent replaced by another connection of the same id
is told so and logs it at WARNING, and two devices sharing one certificate
and id never flap: the live connection stays (docs/security.md, "Which
connection wins").

Real broker and agent processes on loopback; a small TCP relay in the test
stands in for a network path that goes silent.
"""

from __future__ import annotations

import functools
import re
import signal
from collections.abc import Callable

import pytest
import trio
from hostile import metric
from procs import BrokerHandle, Proc, wait_for
from test_e2e_routing import dials_by, serve_whoami, whoami

pytestmark = [pytest.mark.e2e]

LIVE = "agent_id_live"
REPLACED_WARNING = re.compile(
    r"WARNING.*replaced by another connection with agent id agent-1 \(instance [0-9a-f]+\) "
    r"from 127\.0\.0\.1:\d+: if two devices share this identity"
)


def connected_lines(broker: BrokerHandle) -> int:
    return len(re.findall(r"agent connected: id=agent-1 ", broker.proc.log()))


def refusals(agent: Proc) -> int:
    return len(re.findall(r"WARNING.*broker refused this agent \(409 agent_id_live\)", agent.log()))


async def _logged(proc: Proc, pattern: str | re.Pattern[str]) -> bool:
    return re.search(pattern, proc.log()) is not None


async def _served_by(broker: BrokerHandle, agent: Proc, port: int, n: int = 5) -> None:
    before = len(dials_by(agent))
    for _ in range(n):
        assert await whoami(broker, f"127.0.0.1:{port}") == (200, b"127.0.0.1")
    assert len(dials_by(agent)) == before + n


@pytest.mark.timeout(90)
async def test_two_devices_sharing_an_identity_never_flap(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    """Two agent processes with one certificate and id: the first stays
    connected for the whole window, the second is refused (409
    agent_id_live) at the backoff cap's pace and says why at WARNING;
    CONNECT keeps working through the first throughout."""
    broker = broker_factory()
    first = agent_factory(broker)
    await broker.ready(agents=1)
    port = await serve_whoami(nursery, "127.0.0.1")
    second = agent_factory(broker, "--sync-interval-cap=1")
    await wait_for(lambda: _logged(second, "agent_id_live"), 20, "second agent refused")
    window_end = trio.current_time() + 10
    while trio.current_time() < window_end:
        await _served_by(broker, first, port, n=2)
        assert connected_lines(broker) == 1, broker.proc.log()[-3000:]
        await trio.sleep(0.5)
    assert first.alive() and second.alive()
    # Refused again and again (never connected), paced by the backoff cap.
    n = refusals(second)
    assert 2 <= n <= 40, n
    assert "connected to broker" not in second.log()
    assert not re.search(r"replaced by another connection", first.log())
    assert re.search(
        r"WARNING.*rejected \(409\): agent_id_live: agent id agent-1 is live", broker.proc.log()
    )
    assert "two devices may share one identity" in broker.proc.log()
    text = await broker.metrics()
    assert metric(text, "tether_agent_connections_rejected_total", reason=LIVE) >= n
    assert metric(text, "tether_agent_disconnects_total", cause="replaced") == 0
    assert dials_by(second) == []


@pytest.mark.timeout(120)
async def test_a_stale_connection_is_replaced_and_its_agent_told(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    """The first agent freezes (SIGSTOP): its connection no longer answers
    PINGs, so a second process with the same id replaces it within the
    probe bound. Woken, the first reads why it was replaced, logs the
    WARNING once, and is refused when it comes back: the second stays."""
    broker = broker_factory()
    first = agent_factory(broker)
    await broker.ready(agents=1)
    port = await serve_whoami(nursery, "127.0.0.1")
    first.signal(signal.SIGSTOP)
    try:
        await trio.sleep(1.5)  # nothing heard from it within the probe window
        started = trio.current_time()
        second = agent_factory(broker)
        await wait_for(lambda: _logged(second, "connected to broker"), 20, "second connected")
        # Agent start-up (a Python process) plus the probe bound.
        assert trio.current_time() - started < 15
        assert re.search(
            r"reconnected from 127\.0\.0\.1:\d+ \(instance [0-9a-f]+\)", broker.proc.log()
        )
        await _served_by(broker, second, port)
    finally:
        first.signal(signal.SIGCONT)
    await wait_for(lambda: _logged(first, REPLACED_WARNING), 20, "first told it was replaced")
    await wait_for(lambda: _logged(first, "agent_id_live"), 30, "first refused on its return")
    await trio.sleep(3)
    assert connected_lines(broker) == 2  # the first, then the second; never the first again
    assert len(REPLACED_WARNING.findall(first.log())) == 1
    assert "disconnected from broker" not in first.log()  # the one WARNING is the replaced one
    await _served_by(broker, second, port)
    text = await broker.metrics()
    assert metric(text, "tether_agent_disconnects_total", cause="replaced") == 1
    assert metric(text, "tether_agent_connections_rejected_total", reason=LIVE) >= 1


class Relay:
    """A TCP relay to the broker's agent port; :meth:`freeze` silences every
    connection it carries now (they stay open, nothing passes), as a network
    path that goes dead without a FIN or RST does; new ones pass."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self._frozen: list[trio.Event] = []

    async def serve(self, nursery: trio.Nursery) -> None:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1")
        )
        self.port = int(listeners[0].socket.getsockname()[1])

    def freeze(self) -> None:
        for ev in self._frozen:
            ev.set()

    async def _handle(self, down: trio.SocketStream) -> None:
        frozen = trio.Event()
        self._frozen.append(frozen)
        try:
            up = await trio.open_tcp_stream("127.0.0.1", self.target)
        except OSError:
            return

        async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
            while True:
                data = await src.receive_some(65536)
                if frozen.is_set():
                    await trio.sleep_forever()
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


@pytest.mark.timeout(90)
async def test_a_reconnect_of_the_same_process_replaces_at_once(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    """The agent's path to the broker goes silent: the agent's keepalive
    gives up and it reconnects (through the relay) while the broker still
    holds the silent connection. Same process, same instance id: the new
    connection replaces the old one at once, no probe, no refusal."""
    broker = broker_factory()
    relay = Relay(broker.agent_port)
    await relay.serve(nursery)
    # The broker drops the silent connection 3 s after it last heard it,
    # the agent gives up after 2 s: its reconnect must come within the
    # second between, whatever attempt count start-up failures left it at.
    agent = agent_factory(
        broker,
        "--keepalive-time=1",
        "--keepalive-timeout=1",
        "--sync-interval-cap=0.4",
        port=relay.port,
    )
    await broker.ready(agents=1)
    port = await serve_whoami(nursery, "127.0.0.1")
    relay.freeze()
    await wait_for(lambda: _logged(agent, "keepalive"), 20, "agent noticed the dead path")
    await wait_for(lambda: _logged(broker.proc, "reconnected from"), 20, "old connection replaced")
    await wait_for(lambda: _async(connected_lines(broker) == 2), 10, "agent connected again")
    assert "agent_id_live" not in broker.proc.log()
    assert "agent_id_live" not in agent.log()
    await _served_by(broker, agent, port)
    text = await broker.metrics()
    assert metric(text, "tether_agent_disconnects_total", cause="replaced") == 1


async def _async(value: bool) -> bool:
    return value
