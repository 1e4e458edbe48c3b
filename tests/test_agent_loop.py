"""The agent's connection loop in process, on the autojump clock: it follows
the reconnect policy, and once the drain has begun it never dials again
(docs/protocol.md, 6. Reconnect and 7. Shutdown). Links are scripted: each
"dial" reports the next outcome and, when connected, holds a fake link
until the test ends it."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from edge_agent.app import Agent
from edge_agent.config import AgentConfig
from protocol.reconnect import Cause, Kind, LinkOutcome
from tether.tools.certs import PkiPaths

pytestmark = [pytest.mark.timeout(20)]


class Script:
    """Stands in for ``Agent._run_link``."""

    def __init__(self, agent: Agent, outcomes: list[LinkOutcome]) -> None:
        self.agent = agent
        self.outcomes = outcomes
        self.dials: list[float] = []
        self.end_link = trio.Event()

    async def run_link(self, *, task_status: trio.TaskStatus[LinkOutcome]) -> None:
        self.dials.append(trio.current_time())
        outcome = self.outcomes.pop(0) if self.outcomes else LinkOutcome.connected()
        task_status.started(outcome)
        if outcome.kind is not Kind.CONNECTED:
            return
        agent = self.agent
        end = self.end_link = trio.Event()  # one per link
        link: Any = object()
        agent.links["b1"] = link
        agent._changed()
        await end.wait()
        # What _run_link does when a working link ends (the broker closed it).
        del agent.links["b1"]
        agent._changed()
        if not agent.stopping:
            lost = LinkOutcome(Kind.LOST, Cause.BROKER_CLOSED, "peer closed", True, lasted=1.0)
            agent._lost.append(lost)
            agent._changed()


def make_agent(pki: PkiPaths) -> Agent:
    cfg = AgentConfig(
        ca_cert=str(pki.ca_cert),
        agent_id="a",
        sync_interval=1.0,
        sync_interval_cap=8.0,
        probe_interval_cap=2.0,
    )
    return Agent(cfg)


async def test_a_lost_link_is_redialed_after_a_backoff(
    autojump_clock: trio.testing.MockClock, pki: PkiPaths
) -> None:
    agent = make_agent(pki)
    script = Script(agent, [LinkOutcome.connected()])
    agent._run_link = script.run_link  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent._connection_loop)
        await trio.sleep(5)
        assert len(script.dials) == 1
        script.end_link.set()
        await trio.sleep(5)
        assert len(script.dials) == 2
        assert 0 <= script.dials[1] - script.dials[0] - 5 <= 1.0  # backoff ceiling: base
        nursery.cancel_scope.cancel()


async def test_an_unreachable_broker_is_probed(
    autojump_clock: trio.testing.MockClock, pki: PkiPaths
) -> None:
    agent = make_agent(pki)
    refused = LinkOutcome.failed(Cause.CONNECT_FAILED, "connect failed: x: refused")
    script = Script(agent, [refused] * 6)
    agent._run_link = script.run_link  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent._connection_loop)
        await trio.sleep(60)
        nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in zip(script.dials, script.dials[1:], strict=False)]
    assert len(script.dials) == 7  # six refusals, then connected
    assert all(0 <= g <= 2.0 for g in gaps)  # the probe cap, not the 8 s backoff cap


async def test_once_stopping_a_link_that_ends_is_never_redialed(
    autojump_clock: trio.testing.MockClock, pki: PkiPaths
) -> None:
    """The drain race: the link ends (the broker closing after our GOAWAY)
    before the drain cancels the loop; the loop must not dial again."""
    agent = make_agent(pki)
    script = Script(agent, [LinkOutcome.connected()])
    agent._run_link = script.run_link  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent._connection_loop)
        await trio.sleep(1)
        agent.reconnect.stop()  # what Agent.drain does first
        script.end_link.set()
        await trio.sleep(120)
        assert len(script.dials) == 1
        assert agent.readiness() == (503, "draining")
        nursery.cancel_scope.cancel()


async def test_a_failure_while_stopping_is_not_followed_by_a_dial(
    autojump_clock: trio.testing.MockClock, pki: PkiPaths
) -> None:
    agent = make_agent(pki)
    gate = trio.Event()
    dials: list[float] = []

    async def run_link(*, task_status: trio.TaskStatus[LinkOutcome]) -> None:
        dials.append(trio.current_time())
        await gate.wait()  # the dial is in flight when the drain begins
        task_status.started(LinkOutcome.failed(Cause.BROKER_CLOSED, "peer closed"))

    agent._run_link = run_link  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent._connection_loop)
        await trio.sleep(1)
        agent.reconnect.stop()
        gate.set()
        await trio.sleep(120)
        assert len(dials) == 1
        nursery.cancel_scope.cancel()
