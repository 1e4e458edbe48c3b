"""Dials held for a departed agent (``--agent-return-wait``,
broker/departures.py and Registry.await_return), in process with trio's
autojump clock: what is held and for how long, what is never held, the
bound on what the broker remembers, and cluster isolation. End to end
through real processes: tests/test_e2e_agent_return.py."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import prometheus_client as prom
import pytest
import trio
import trio.testing
from hostile import metric
from test_unit_registry import StubAgent, _add, _agent

from broker.departures import Departures
from broker.dialing import DialError, DialOutcome
from broker.metrics import BrokerMetrics
from broker.registry import Registry, RoutableAgent
from protocol.identifiers import AgentIdentifiers

pytestmark = pytest.mark.timeout(30)


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def _held(registry: Registry, outcome: str) -> float:
    text = prom_text(registry.metrics)
    return metric(text, "tether_dials_held_total", outcome=outcome)


def prom_text(metrics: BrokerMetrics) -> str:
    return prom.generate_latest(metrics.registry).decode()


def _registry(*strategies: str, wait: float = 2.0, window: float = 300.0) -> Registry:
    r = Registry(BrokerMetrics(), strategies or ("default",), rng=random.Random(0))
    r.hold_for_return(wait, window)
    return r


def _left(registry: Registry, identifiers: str = "host=node-1", cluster: str = "c") -> None:
    """An agent ``node-1`` registered in ``cluster`` and left."""
    node = _agent("node-1", identifiers, cluster=cluster)
    _add(registry, node)
    registry.remove(node)


async def _dial_while(
    registry: Registry, arrivals: Callable[[], Awaitable[None]], addr: str
) -> tuple[object, RoutableAgent, float]:
    """Dial ``addr`` while ``arrivals`` runs: the stream, the agent it went
    to, and how long it took."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(arrivals)
        started = trio.current_time()
        stream, agent = await registry.dial("c", addr, 10.0)
    return stream, agent, trio.current_time() - started


def test_departures_match_by_the_routing_rule_and_expire() -> None:
    clock = Clock()
    d = Departures(10.0, clock)
    d.left("c", "node-1", AgentIdentifiers.parse("host=node-1"))
    d.left("c", "edge", AgentIdentifiers.parse("cidr=10.0.0.0/8"))
    strategies = ("destHost",)
    found = d.expected("c", "NODE-1", strategies)
    assert found is not None and found.agent_id == "node-1"
    found = d.expected("c", "10.1.2.3", strategies)
    assert found is not None and found.agent_id == "edge"
    assert d.expected("c", "node-2", strategies) is None  # nobody would have taken it
    assert d.expected("other", "node-1", strategies) is None  # another cluster's
    d.returned("c", "node-1")
    assert d.expected("c", "node-1", strategies) is None
    clock.now += 10.0
    assert d.expected("c", "10.1.2.3", strategies) is None  # past the window
    assert len(d) == 0


def test_departures_are_bounded_per_cluster_oldest_first() -> None:
    clock = Clock()
    d = Departures(300.0, clock, max_per_cluster=100)
    for i in range(1000):
        clock.now += 0.001
        d.left("c", f"a{i}", AgentIdentifiers.parse(f"host=a{i}"))
        d.left("c", "again", AgentIdentifiers.parse("host=again"))  # one entry per id
    assert len(d) == 100
    assert d.expected("c", "a999", ("destHost",)) is not None
    assert d.expected("c", "a0", ("destHost",)) is None
    assert d.expected("c", "again", ("destHost",)) is not None
    with pytest.raises(ValueError):
        Departures(0.0, clock)


async def test_a_dial_for_a_departed_agent_waits_for_its_return(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = _registry("destHost")
    _left(registry)
    back = _agent("node-1", "host=node-1", cluster="c", answer="stream")

    async def come_back() -> None:
        await trio.sleep(0.7)
        _add(registry, back)

    stream, agent, took = await _dial_while(registry, come_back, "node-1:10250")
    assert agent is back and stream == "stream"
    assert took == pytest.approx(0.7)
    assert back.dials and back.dials[0][2] == pytest.approx(9.3)  # the hold counts
    assert _held(registry, "returned") == 1


async def test_a_dial_for_an_agent_that_stays_away_fails_after_the_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = _registry("destHost", wait=2.0)
    _left(registry)
    started = trio.current_time()
    with pytest.raises(DialError) as err:
        await registry.dial("c", "node-1:10250", 10.0)
    assert err.value.outcome is DialOutcome.NO_AGENT
    assert trio.current_time() - started == pytest.approx(2.0)
    assert _held(registry, "not_back") == 1
    # Never past the dial's own timeout.
    started = trio.current_time()
    with pytest.raises(DialError):
        await registry.dial("c", "node-1:10250", 0.5)
    assert trio.current_time() - started == pytest.approx(0.5)


async def test_dials_no_departed_agent_matches_fail_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Unknown hosts, another cluster (a tenant never waits on another's
    departures), a window that passed, the wait turned off."""
    registry = _registry("destHost", window=60.0)
    node = _agent("node-1", "host=node-1", cluster="a")
    _add(registry, node)
    registry.remove(node)
    for cluster, addr in (("a", "node-2:1"), ("b", "node-1:1")):
        started = trio.current_time()
        with pytest.raises(DialError) as err:
            await registry.dial(cluster, addr, 10.0)
        assert err.value.outcome is DialOutcome.NO_AGENT
        assert trio.current_time() == started
    await trio.sleep(60.0)
    started = trio.current_time()
    with pytest.raises(DialError):
        await registry.dial("a", "node-1:1", 10.0)
    assert trio.current_time() == started
    off = _registry("destHost", wait=0.0)
    _add(off, node)
    off.remove(node)
    assert off.departures is None
    with pytest.raises(DialError):
        await off.dial("a", "node-1:1", 10.0)
    assert trio.current_time() == started
    assert _held(registry, "returned") + _held(registry, "not_back") == 0


async def test_another_agent_that_takes_the_host_ends_the_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Any agent the dial may go to ends the hold, not only the one that
    left; an unrelated arrival does not."""
    registry = _registry("destHost")
    _left(registry)
    other = _agent("other", "host=elsewhere", cluster="c")
    twin = _agent("twin", "host=node-1", cluster="c", answer="s")

    async def arrivals() -> None:
        await trio.sleep(0.3)
        _add(registry, other)  # wakes the dial, which keeps waiting
        await trio.sleep(0.3)
        _add(registry, twin)

    _stream, agent, took = await _dial_while(registry, arrivals, "node-1:1")
    assert agent is twin
    assert took == pytest.approx(0.6)
    assert not other.dials


def test_a_replaced_connection_is_not_a_departure() -> None:
    registry = _registry("destHost")
    first = _agent("node-1", "host=node-1", cluster="c")
    _add(registry, first)
    second = StubAgent("node-1", AgentIdentifiers.parse("host=node-1"), cluster="c")
    registry.add(second, registry._members[first])  # the same credential: replaces
    assert registry.departures is not None and len(registry.departures) == 0
    registry.remove(first)  # the replaced one ending: not registered, a no-op
    assert len(registry.departures) == 0
