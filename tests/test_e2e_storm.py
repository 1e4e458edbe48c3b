"""Reconnect storms (issue 14 item 4): the broker admits new agent
connections at a bounded pace (protocol/admission.py,
tether/netio/admission.py), keeps answering /healthz and serving dials to
the agents already back, and sheds the excess with ``503 overloaded`` and
a retry hint that tether-agent honours.

A storm of a few hundred simulated agents (benchmarks/many_agents.py: the
project's own TLS, session and backoff code in one process) against a real
broker that is SIGKILLed and restarted; and a real agent shed by a broker
whose handshake slots hostile silent connections hold.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from hostile import metric
from procs import BrokerHandle, Proc, status_of, wait_for
from test_e2e_routing import dials_by, serve_whoami, whoami

from benchmarks import many_agents

pytestmark = [pytest.mark.e2e]

STORM_AGENTS = 300


@pytest.mark.timeout(240)
async def test_a_storm_of_agents_after_a_crash(tmp_path: Path) -> None:
    """300 agents reconnect at once to a restarted broker: all are back
    within 60 s, /healthz answered every probe (every 100 ms) with a
    bounded p99, dials to the agents already back kept working, and the
    reconnects resumed their TLS sessions (the same ticket key file).
    Margins are generous: the machine running the suite is shared."""
    out = await many_agents.run(
        STORM_AGENTS,
        tmp_path,
        dial_s=1.0,
        storm_cap_s=60.0,
        progress=lambda _line: None,
        extra_args=("--max-concurrent-handshakes=8", "--agent-accept-rate=300"),
    )
    assert out["initial_connected"] == STORM_AGENTS
    assert out["storm_connected"] == STORM_AGENTS, out
    assert out["storm_settle_s"] is not None and out["storm_settle_s"] < 60, out
    health = out["storm_healthz"]
    assert health["probes"] >= 5 and health["failed"] == 0, health
    assert health["p99_ms"] < 1500, health
    dials = out["storm_dials"]
    assert dials["ok"] >= 1 and dials["failed"] <= dials["ok"], dials
    # Every reconnect resumed (the restarted broker read the same key).
    assert out["storm_tls"]["resumed"] >= STORM_AGENTS * 0.9, out["storm_tls"]
    admitted = [line for line in out["broker_admission"] if 'verdict="admit"' in line]
    assert admitted and float(admitted[0].split()[-1]) >= STORM_AGENTS, out["broker_admission"]


async def _silent(port: int, held: list[trio.SocketStream], source: str | None = None) -> None:
    """A TCP connection to the agent port that never sends a ClientHello."""
    held.append(await trio.open_tcp_stream("127.0.0.1", port, local_address=source))


async def _admission(broker: BrokerHandle, verdict: str) -> float:
    return metric(await broker.metrics(), "tether_agent_admission_total", verdict=verdict)


@pytest.mark.timeout(120)
async def test_a_shed_agent_waits_out_the_retry_hint_then_connects(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    """One handshake slot, no queue. Silent connections hold the slot and
    the shedding lane; the next connection is closed before TLS (drop).
    Then a real agent dials while only the slot is held: it is shed (503
    overloaded, tether-retry-after), logs the hint and waits at least that
    long before dialing again; /healthz answers throughout; once the slot
    is free the agent connects and is dialed."""
    broker = broker_factory(
        "--max-concurrent-handshakes=1",
        "--agent-accept-queue=0",
        "--handshake-timeout=30",
    )
    await broker.up()
    held: list[trio.SocketStream] = []
    await _silent(broker.agent_port, held)  # the handshake slot
    await _silent(broker.agent_port, held)  # the shedding lane
    await wait_for(lambda: _at_least(broker, "shed", 1), 10, "the second silent connection shed")
    dropped = await trio.open_tcp_stream("127.0.0.1", broker.agent_port)
    with trio.fail_after(5):
        assert await dropped.receive_some(10) == b""  # closed before any TLS
    await dropped.aclose()
    assert await _admission(broker, "drop") == 1
    assert await status_of(broker.health_port, "/healthz") == 200

    await trio.aclose_forcefully(held.pop())  # free the shedding lane only
    agent = agent_factory(broker, "--sync-interval-cap=30")
    await wait_for(lambda: _logged(agent, r"broker overloaded \(503\)"), 20, "agent shed")
    line = re.search(r"broker overloaded \(503\): .*; retry hint ([0-9.]+)s", agent.log())
    assert line is not None, agent.log()[-2000:]
    hint = float(line.group(1))
    assert 0.5 <= hint <= 30.0
    await wait_for(lambda: _logged(agent, r"reconnecting in [0-9.]+s"), 10, "reconnect logged")
    delay = float(re.findall(r"reconnecting in ([0-9.]+)s .*cause: overloaded", agent.log())[0])
    assert hint <= delay <= hint * 1.25 + 0.01, (hint, delay)
    assert (
        metric(
            await broker.metrics(), "tether_agent_connections_rejected_total", reason="overloaded"
        )
        >= 1
    )
    for _ in range(5):
        assert await status_of(broker.health_port, "/healthz") == 200

    for stream in held:
        await trio.aclose_forcefully(stream)
    await broker.ready(agents=1, timeout=60)
    port = await serve_whoami(nursery, "127.0.0.1")
    assert await whoami(broker, f"127.0.0.1:{port}") == (200, b"127.0.0.1")
    assert len(dials_by(agent)) == 1


async def _at_least(broker: BrokerHandle, verdict: str, n: float) -> bool:
    return await _admission(broker, verdict) >= n


async def _logged(proc: Proc, pattern: str) -> bool:
    return re.search(pattern, proc.log()) is not None


@pytest.mark.timeout(120)
async def test_one_address_cannot_hold_every_handshake_slot(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    """Four handshake slots, so one address may hold one of them. 40 silent
    connections from 127.0.0.66 do not keep an agent from 127.0.0.1 out:
    it is admitted at once (no 503) and dialed, while they wait."""
    broker = broker_factory("--max-concurrent-handshakes=4", "--handshake-timeout=30")
    await broker.up()
    held: list[trio.SocketStream] = []
    for _ in range(40):
        await _silent(broker.agent_port, held, source="127.0.0.66")
    await wait_for(lambda: _at_least(broker, "queue", 39), 10, "the silent ones queued")
    agent = agent_factory(broker)
    with trio.fail_after(10):
        await broker.ready(agents=1)
    assert "overloaded" not in agent.log()
    port = await serve_whoami(nursery, "127.0.0.1")
    assert await whoami(broker, f"127.0.0.1:{port}") == (200, b"127.0.0.1")
    text = await broker.metrics()
    assert metric(text, "tether_agent_admission_connections", state="handshaking") <= 1
    assert metric(text, "tether_agent_admission_connections", state="queued") >= 38
    for stream in held:
        await trio.aclose_forcefully(stream)


@pytest.mark.timeout(60)
async def test_a_connection_that_left_while_queued_costs_no_handshake(
    broker_factory: Callable[..., BrokerHandle],
) -> None:
    """In a storm, agents give up on connections that waited too long in
    the queue and dial again. One handshake slot, held by a silent
    connection; two more queue, and their clients leave (one after sending
    the start of a ClientHello, one without a byte). When the slot frees,
    the broker finds them closed by the peer and drops them before any TLS:
    counted as abandoned, not as failed handshakes."""
    broker = broker_factory("--max-concurrent-handshakes=1", "--handshake-timeout=30")
    await broker.up()
    held: list[trio.SocketStream] = []
    await _silent(broker.agent_port, held)  # the handshake slot
    await wait_for(lambda: _at_least(broker, "admit", 1), 10, "the slot taken")
    left = [await trio.open_tcp_stream("127.0.0.1", broker.agent_port) for _ in range(2)]
    await wait_for(lambda: _at_least(broker, "queue", 2), 10, "both queued")
    await left[0].send_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    for stream in left:
        await stream.aclose()
    await trio.aclose_forcefully(held.pop())  # the slot frees: the queue moves
    await wait_for(lambda: _at_least(broker, "abandoned", 2), 10, "both found abandoned")
    text = await broker.metrics()
    # The one failed handshake is the silent slot holder's, closed above.
    assert metric(text, "tether_bad_input_total", source="agent", reason="tls_handshake") == 1
    assert metric(text, "tether_agent_admission_connections", state="queued") == 0
    assert await status_of(broker.health_port, "/healthz") == 200
