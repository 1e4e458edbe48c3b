"""The reconnect schedules, as the real agent lives them: cheap, frequent
probes while the broker cannot be reached, full exponential backoff when a
broker answers and refuses."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from procs import BrokerHandle, Proc, free_port, wait_for

pytestmark = [pytest.mark.e2e]

FLAGS = ("--sync-interval=0.2", "--sync-interval-cap=4", "--probe-interval-cap=0.5")


def ceilings(proc: Proc, schedule: str) -> list[float]:
    return [float(x) for x in re.findall(rf"{schedule} ceiling ([\d.]+)s", proc.log())]


@pytest.mark.timeout(60)
async def test_unreachable_broker_is_probed_often(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
) -> None:
    broker = broker_factory()
    await broker.up()
    # Point the agent at a port where nothing listens: connect is refused.
    agent = agent_factory(broker, *FLAGS, f"--proxy-server-port={free_port()}")

    async def many_attempts() -> bool:
        return len(ceilings(agent, "probe")) >= 8

    await wait_for(many_attempts, 30, "eight probe attempts")
    seen = ceilings(agent, "probe")
    assert max(seen) <= 0.5, seen  # never beyond the probe cap
    assert not ceilings(agent, "backoff")


@pytest.mark.timeout(60)
async def test_refusing_broker_gets_the_full_backoff(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
) -> None:
    broker = broker_factory()
    await broker.up()
    # agent-2's certificate claiming to be agent-1: the broker answers 403.
    cert, key = broker.pki.agent("agent-2")
    agent = agent_factory(broker, *FLAGS, f"--agent-cert={cert}", f"--agent-key={key}")

    async def at_cap() -> bool:
        return 4.0 in ceilings(agent, "backoff")

    await wait_for(at_cap, 30, "the backoff at its cap")
    assert not ceilings(agent, "probe")
