"""Issue 14 item 2: the agent drives keepalive and announces its interval
(``tether-keepalive-ms``); the broker only answers, with a dead-link
deadline of three intervals (docs/protocol.md, 5). Real broker and agent
processes on loopback; a frozen process (SIGSTOP) stands in for a dead
link, since its socket stays open but nothing answers."""

from __future__ import annotations

import re
import signal
from collections.abc import Callable

import pytest
import trio
from hostile import metric, open_peer
from procs import BrokerHandle, Proc, free_port, http_get, wait_for

from protocol.keepalive import DEAD_AFTER_INTERVALS, HEADER
from tether.tools.certs import PkiPaths, init_pki

pytestmark = [pytest.mark.e2e]

INTERVAL = 1.0  # the agent's --keepalive-time in these tests
PING = 0x6


async def scrape(port: int) -> str:
    code, body = await http_get(port, "/metrics")
    assert code == 200
    return body.decode()


async def ready_agents(broker: BrokerHandle) -> int:
    code, body = await http_get(broker.health_port, "/readyz")
    return int(body.split()[1]) if code == 200 else 0


@pytest.mark.timeout(60)
async def test_the_broker_drops_a_frozen_agent_within_three_intervals(
    broker_factory: Callable[..., BrokerHandle], agent_factory: Callable[..., Proc]
) -> None:
    broker = broker_factory()  # --keepalive-time 15 s: longer than the agent's
    admin = free_port()
    agent = agent_factory(
        broker,
        f"--keepalive-time={INTERVAL}",
        "--keepalive-timeout=1",
        "--metrics",
        f"--admin-server-port={admin}",
    )
    await broker.ready(agents=1)
    text = await broker.metrics()
    assert metric(text, "tether_agent_keepalive_announced_total", verdict="accepted") == 1

    # The agent drives: its RTT samples grow; the broker sends no PINGs.
    async def agent_pinged() -> bool:
        return metric(await scrape(admin), "tether_keepalive_rtt_seconds_count") >= 3

    await wait_for(agent_pinged, 15, "the agent's keepalive round trips")
    assert metric(await broker.metrics(), "tether_keepalive_rtt_seconds_count") == 0

    agent.signal(signal.SIGSTOP)
    try:
        stopped = trio.current_time()

        async def dropped() -> bool:
            return await ready_agents(broker) == 0

        await wait_for(dropped, 20, "the broker to drop the frozen agent", interval=0.1)
        took = trio.current_time() - stopped
        budget = DEAD_AFTER_INTERVALS * INTERVAL
        # The last byte came up to one interval before the freeze; the
        # margin above is for a loaded machine.
        assert budget - INTERVAL - 0.5 <= took <= budget + 3.0, took
        text = await broker.metrics()
        assert metric(text, "tether_agent_disconnects_total", cause="keepalive_timeout") == 1
        assert re.search(
            r"keepalive: nothing heard for 3s \(peer drives PINGs\)", broker.proc.log()
        )
    finally:
        agent.signal(signal.SIGCONT)
    # Woken, it finds its connection gone and comes back.
    await broker.ready(agents=1, timeout=30)


@pytest.mark.timeout(60)
async def test_the_agent_reconnects_when_the_broker_freezes(
    broker_factory: Callable[..., BrokerHandle], agent_factory: Callable[..., Proc]
) -> None:
    broker = broker_factory()
    agent = agent_factory(broker, f"--keepalive-time={INTERVAL}", "--keepalive-timeout=1")
    await broker.ready(agents=1)
    broker.proc.signal(signal.SIGSTOP)
    try:
        stopped = trio.current_time()

        async def gave_up() -> bool:
            return "keepalive: no PING ACK within 1s" in agent.log()

        await wait_for(gave_up, 15, "the agent to detect the frozen broker", interval=0.1)
        # interval + timeout, plus a margin for a loaded machine
        assert trio.current_time() - stopped <= INTERVAL + 1.0 + 3.0
    finally:
        broker.proc.signal(signal.SIGCONT)
    await wait_for(
        lambda: _count(agent, "connected to broker", 2), 30, "the agent to reconnect", interval=0.1
    )
    await broker.ready(agents=1, timeout=30)


async def _count(proc: Proc, needle: str, n: int) -> bool:
    return proc.log().count(needle) >= n


@pytest.mark.timeout(60)
async def test_hostile_keepalive_announcements_are_refused_or_clamped(
    pki: PkiPaths, broker_factory: Callable[..., BrokerHandle]
) -> None:
    """Junk, zero, negative and absurdly long values leave the broker
    driving (it PINGs the peer), counted as bad input; an out-of-range
    number is clamped: 1 ms becomes 1 s, so a silent peer is dropped after
    three seconds, not three milliseconds, and 10^11 ms becomes 10 min,
    longer than the broker's own 2 s, so the broker drives."""
    junk = ["0", "-1000", "abc", "1e4", "9" * 4000]
    drives = [*junk, "99999999999"]
    ids = [f"junk-{i}" for i in range(len(drives))]
    init_pki(pki.ca_cert.parent, agents=[*ids, "clamped"])  # their certificates
    broker = broker_factory("--keepalive-time=2", "--keepalive-timeout=30")
    await broker.up()
    peers = []
    for agent_id, value in zip(ids, drives, strict=True):
        peers.append(await open_peer(broker, agent_id=agent_id, headers=[(HEADER, value)]))
    clamped = await open_peer(broker, agent_id="clamped", headers=[(HEADER, "1")])
    opened = trio.current_time()
    text = await broker.metrics()
    assert metric(text, "tether_agent_keepalive_announced_total", verdict="invalid") == len(junk)
    assert metric(text, "tether_agent_keepalive_announced_total", verdict="clamped") == 2
    assert metric(text, "tether_bad_input_total", source="agent", reason="bad_keepalive_ms") == len(
        junk
    )
    assert re.search(
        r"announced tether-keepalive-ms 'abc': not a positive integer", broker.proc.log()
    )
    # Every peer the broker drives gets its PING (none of them answer it).
    for peer in peers:
        assert await peer.wait_for(lambda f: f.kind == PING and not f.flags, 10) is not None
        assert not peer.eof
    # The clamped one gets no PING and is dropped for its silence.
    assert await clamped.closed(10)
    assert 3.0 - 0.5 <= trio.current_time() - opened <= 3.0 + 4.0
    assert not any(f.kind == PING and not f.flags for f in clamped.frames)
    for peer in peers:
        await peer.aclose()
    await clamped.aclose()
    assert broker.proc.alive()
