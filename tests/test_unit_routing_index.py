"""The routing indexes (broker/routing_index.py) against the linear scan
they replace: for random fleets, identifiers (host names, IPv4 and IPv6
addresses, CIDRs of every length, default-route, none), addresses, and
random removals, replacements, identifier and usability changes, the
registry names exactly the agents the old scan would have, and chooses
among them by load."""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Sequence
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.metrics import BrokerMetrics
from broker.registry import Membership, Registry, RoutableAgent
from broker.routing_index import SCAN_LIMIT, ClusterIndex, Pool, _address
from protocol.identifiers import AgentIdentifiers, match_rank
from tether.netio.tunnel import TunnelStream

pytestmark = pytest.mark.timeout(60)


@attrs.define(eq=False)
class FakeAgent:
    """What the registry reads of a connection."""

    agent_id: str
    identifiers: AgentIdentifiers
    cluster: str = "c"
    load: int = 0
    usable: bool = True

    async def dial(
        self, dial_id: int, addr: str, timeout: float, early: bytes | None = None
    ) -> TunnelStream:
        raise AssertionError("not dialed here")

    def abort(self, reason: str) -> None:
        raise AssertionError("not replaced here")


# ------------------------------------------------ the scan it replaces


def old_most_specific(agents: Sequence[FakeAgent], host: str) -> list[FakeAgent]:
    """The registry's destHost scan before the indexes, kept as it was."""
    best: int | None = None
    found: list[FakeAgent] = []
    for agent in agents:
        rank = match_rank(agent.identifiers, host)
        if rank is None or (best is not None and rank < best):
            continue
        if best is None or rank > best:
            best, found = rank, []
        found.append(agent)
    return found


def old_eligible(
    agents: Sequence[FakeAgent], strategies: Sequence[str], host: str
) -> list[FakeAgent]:
    """The candidates the old ``choose`` took the least loaded of."""
    usable = [a for a in agents if a.usable]
    for strategy in strategies:
        if strategy == "destHost":
            candidates = old_most_specific(usable, host)
        elif strategy == "defaultRoute":
            candidates = [a for a in usable if a.identifiers.default_route]
        else:
            candidates = usable
        if candidates:
            return candidates
    return []


# ----------------------------------------------------------- fleets

BASES4 = ["10.0.0.1", "10.0.1.200", "10.128.0.7", "192.168.1.1"]
BASES6 = ["fd00::1", "fd00::1:5", "fd00:8000::9", "2001:db8::1"]
#: Names, some of them address literals (host= is matched as a string).
HOSTS = ["n1", "n2", "node-3.edge", "10.0.0.1", "fd00::1"]
QUERIES = [
    *BASES4,
    *BASES6,
    *HOSTS,
    "N1",
    "[fd00::1]",
    "[10.0.0.1]",
    "10.0.0.2",
    "10.0.1.1",
    "10.255.0.1",
    "172.16.0.1",
    "fd00::2",
    "fd00:8000::1",
    "fe80::1",
    "::ffff:10.0.0.1",
    "other.example",
    "010.0.0.1",
]

networks = st.one_of(
    st.builds(
        lambda base, length: ipaddress.ip_network(f"{base}/{length}", strict=False),
        st.sampled_from(BASES4),
        st.integers(0, 32),
    ),
    st.builds(
        lambda base, length: ipaddress.ip_network(f"{base}/{length}", strict=False),
        st.sampled_from(BASES6),
        st.integers(0, 128),
    ),
    # a few common lengths, so several agents share a network
    st.builds(
        lambda base, length: ipaddress.ip_network(f"{base}/{length}", strict=False),
        st.sampled_from(BASES4),
        st.sampled_from([8, 16, 24]),
    ),
)

#: A few sets many agents share, so that tiers grow past SCAN_LIMIT.
SHARED = [
    AgentIdentifiers.parse(text)
    for text in ["cidr=10.0.0.0/8", "host=n1&default-route=true", "ipv4=10.0.0.1&cidr=fd00::/16"]
]

identifiers = st.one_of(
    st.just(AgentIdentifiers()),
    st.sampled_from(SHARED),
    st.builds(
        AgentIdentifiers,
        hosts=st.frozensets(st.sampled_from(HOSTS), max_size=2),
        ipv4=st.frozensets(st.sampled_from(BASES4).map(ipaddress.IPv4Address), max_size=2),
        ipv6=st.frozensets(st.sampled_from(BASES6).map(ipaddress.IPv6Address), max_size=1),
        cidrs=st.lists(networks, max_size=3).map(tuple),
        default_route=st.booleans(),
    ),
)

STRATEGIES = [
    ("destHost", "defaultRoute", "default"),
    ("destHost",),
    ("destHost", "default"),
    ("defaultRoute", "destHost"),
    ("default",),
]

# Operations on the fleet; indexes into it are taken modulo its size.
ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), identifiers, st.integers(0, 3), st.sampled_from(["c", "d"])),
        st.tuples(st.just("remove"), st.integers(0, 99)),
        st.tuples(st.just("replace"), st.integers(0, 99), identifiers),
        st.tuples(st.just("identifiers"), st.integers(0, 99), identifiers),
        st.tuples(st.just("unusable"), st.integers(0, 99)),
        st.tuples(st.just("usable"), st.integers(0, 99)),
        st.tuples(st.just("load"), st.integers(0, 99), st.integers(0, 3)),
        st.tuples(st.just("query"), st.sampled_from(QUERIES)),
    ),
    max_size=40,
)


def check_choice(registry: Registry, cluster: str, host: str, live: list[FakeAgent]) -> None:
    expected: list[RoutableAgent] = list(old_eligible(live, registry.strategies, host))
    assert {a.agent_id for a in registry.eligible(cluster, host)} == {
        a.agent_id for a in expected
    }, host
    chosen = registry.choose(cluster, host)
    if not expected:
        assert chosen is None
        return
    assert chosen is not None and chosen in expected
    loads = sorted(a.load for a in expected)
    if len(expected) <= 2:  # both compared: the less loaded wins
        assert chosen.load == loads[0]
    elif loads[-1] > loads[-2]:  # two distinct agents compared: never the one busiest
        assert chosen.load < loads[-1]


@settings(max_examples=150, deadline=None)
@given(
    start=st.lists(st.tuples(identifiers, st.integers(0, 3), st.booleans()), max_size=24),
    steps=ops,
    strategies=st.sampled_from(STRATEGIES),
    seed=st.integers(0, 2**32),
)
def test_the_index_answers_what_the_scan_would(
    start: list[tuple[AgentIdentifiers, int, bool]],
    steps: list[tuple[Any, ...]],
    strategies: tuple[str, ...],
    seed: int,
) -> None:
    registry = Registry(BrokerMetrics(), strategies, rng=random.Random(seed))
    live: list[FakeAgent] = []  # registered, in both clusters
    names = iter(range(10_000))

    def add(idents: AgentIdentifiers, load: int, cluster: str = "c", usable: bool = True) -> None:
        agent = FakeAgent(f"a{next(names)}", idents, cluster, load, usable)
        registry.add(agent, Membership(f"cred-{agent.agent_id}"))
        live.append(agent)

    for idents, load, usable in start:
        add(idents, load, usable=usable)
    for step in steps:
        kind = step[0]
        if kind == "add":
            add(step[1], step[2], step[3])
            continue
        if kind == "query":
            for cluster in ("c", "d"):
                check_choice(registry, cluster, step[1], [a for a in live if a.cluster == cluster])
            continue
        if not live:
            continue
        at = step[1] % len(live)
        agent = live[at]
        if kind == "remove":
            registry.remove(agent)
            del live[at]
        elif kind == "replace":  # the same id reconnects with the same credential
            newcomer = FakeAgent(agent.agent_id, step[2], agent.cluster)
            assert registry.add(newcomer, Membership(f"cred-{agent.agent_id}")) is agent
            registry.remove(live[at])  # the stale one ends later: a no-op
            live[at] = newcomer
        elif kind == "identifiers":
            agent.identifiers = step[2]
            registry.refresh(agent)
        elif kind == "unusable":  # draining or closed: the registry is not told
            agent.usable = False
        elif kind == "usable":  # usable again: the registry is told
            agent.usable = True
            registry.refresh(agent)
        else:
            agent.load = step[2]
    for host in QUERIES:
        for cluster in ("c", "d"):
            check_choice(registry, cluster, host, [a for a in live if a.cluster == cluster])
    assert registry.count() == len(live)


# ------------------------------------------------------------ examples


def _agents(count: int, text: str = "", **kw: Any) -> list[FakeAgent]:
    idents = AgentIdentifiers.parse(text)
    return [FakeAgent(f"a{i}", idents, **kw) for i in range(count)]


def test_pool_adds_removes_by_swapping_with_the_last() -> None:
    pool: Pool[FakeAgent] = Pool()
    agents = _agents(4)
    for agent in [*agents, agents[0]]:  # adding twice keeps one
        pool.add(agent)
    assert pool.items == agents
    pool.remove(agents[1])
    assert pool.items == [agents[0], agents[3], agents[2]]
    pool.remove(agents[2])  # the last one
    pool.remove(agents[0])
    assert pool.items == [agents[3]]
    pool.remove(agents[3])
    assert len(pool) == 0
    with pytest.raises(KeyError):
        pool.remove(agents[3])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3 * SCAN_LIMIT)), max_size=200))
def test_pool_is_a_set_small_or_large(steps: list[tuple[bool, int]]) -> None:
    """Across the size where the position map is built, a pool holds what
    a set would, each agent once."""
    agents = _agents(3 * SCAN_LIMIT + 1)
    pool: Pool[FakeAgent] = Pool()
    model: set[str] = set()
    for adding, i in steps:
        if adding:
            pool.add(agents[i])
            model.add(agents[i].agent_id)
        elif agents[i].agent_id in model:
            pool.remove(agents[i])
            model.discard(agents[i].agent_id)
        assert sorted(a.agent_id for a in pool.items) == sorted(model)


def test_a_large_tier_compares_two_and_spreads_dials() -> None:
    """Above SCAN_LIMIT: the less loaded of two distinct agents, never the
    busiest, and every agent gets dials."""
    index: ClusterIndex[FakeAgent] = ClusterIndex()
    agents = _agents(SCAN_LIMIT * 4)
    for i, agent in enumerate(agents):
        agent.load = i
        index.add(agent)
    rng = random.Random(7)
    picked = [index.choose(("default",), "x", rng.randrange) for _ in range(2000)]
    assert agents[-1] not in picked
    assert {a.agent_id for a in picked if a is not None} == {a.agent_id for a in agents[:-1]}
    # with equal loads, every agent is drawn about as often as any other
    for agent in agents:
        agent.load = 0
    counts = {a.agent_id: 0 for a in agents}
    for _ in range(6400):
        chosen = index.choose(("default",), "x", rng.randrange)
        assert chosen is not None
        counts[chosen.agent_id] += 1
    assert min(counts.values()) > 100 and max(counts.values()) < 300, counts


def test_unusable_agents_are_parked_once_not_scanned_per_dial() -> None:
    """Draws that find an unusable agent take it out of every pool, so the
    next dials do not meet it again; refreshing files it again."""
    index: ClusterIndex[FakeAgent] = ClusterIndex()
    agents = _agents(100, "cidr=10.0.0.0/8&default-route=true")
    for agent in agents:
        index.add(agent)
    for agent in agents[:99]:
        agent.usable = False
    rng = random.Random(1)
    for _ in range(3):
        assert index.choose(("destHost",), "10.1.1.1", rng.randrange) is agents[99]
    pool = index._pools[("net", 4, 8, 10 << 24)]
    assert pool.items == [agents[99]]
    assert index._pools[("any",)].items == [agents[99]]  # parked everywhere
    assert len(index) == 100
    agents[0].usable = True
    index.refresh(agents[0])
    assert set(pool.items) == {agents[0], agents[99]}
    agents[99].usable = agents[0].usable = False
    assert index.choose(("destHost", "defaultRoute", "default"), "10.1.1.1", rng.randrange) is None
    assert ("net", 4, 8, 10 << 24) not in index._pools and index._order[4] == ()


def test_prefix_lengths_in_use_are_kept_longest_first() -> None:
    index: ClusterIndex[FakeAgent] = ClusterIndex()
    a, b, c = (
        FakeAgent(name, AgentIdentifiers.parse(text))
        for name, text in [
            ("a", "cidr=10.0.0.0/8&cidr=10.1.0.0/16"),
            ("b", "cidr=10.2.0.0/16&cidr=fd00::/64"),
            ("c", "cidr=0.0.0.0/0"),
        ]
    )
    for agent in (a, b, c):
        index.add(agent)
    assert index._order == {4: (16, 8, 0), 6: (64,)}
    index.remove(a)
    assert index._order == {4: (16, 0), 6: (64,)}
    b.identifiers = AgentIdentifiers.parse("ipv4=10.2.0.1")
    index.refresh(b)  # filed by its new identifiers, unfiled from the old ones
    assert index._order == {4: (0,), 6: ()}
    rng = random.Random(0)
    assert index.choose(("destHost",), "10.2.0.1", rng.randrange) is b
    assert index.choose(("destHost",), "10.2.0.2", rng.randrange) is c


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="0123456789.:abcdefx%٣", max_size=24) | st.sampled_from(QUERIES))
def test_the_address_shortcut_parses_what_ip_address_parses(text: str) -> None:
    try:
        want: object = ipaddress.ip_address(text)
    except ValueError:
        want = None
    assert _address(text) == want
