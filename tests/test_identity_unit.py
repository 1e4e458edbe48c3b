"""In-process tests of issue 11 items 4-5: most-specific routing against a
reference implementation, identifier allowances, registry membership
(live one wins, caps), token file entries, and the TokenReview guards."""

from __future__ import annotations

import hashlib
import ipaddress
import random
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.auth import parse_entry
from broker.metrics import BrokerMetrics
from broker.registry import Membership, Registry, RegistryRefused
from broker.tokenreview import FailureCache, RateLimiter
from protocol.identifiers import EXACT_RANK, AgentIdentifiers, Allowance, match_rank

# ------------------------------------------------------------- routing


@attrs.define(eq=False)
class FakeAgent:
    """What the registry reads of a connection."""

    agent_id: str
    identifiers: AgentIdentifiers
    load: int = 0
    cluster: str = "c"
    usable: bool = True


ADDRS = [f"10.0.{a}.{b}" for a in range(3) for b in (1, 2, 200)]
NETS = ["10.0.0.0/8", "10.0.0.0/16", "10.0.0.0/24", "10.0.1.0/24", "0.0.0.0/0", "10.0.0.2/32"]
HOSTS = ["n1", "n2", "N1"]


@st.composite
def agent_sets(draw: st.DrawFn) -> list[FakeAgent]:
    count = draw(st.integers(0, 6))
    agents = []
    for i in range(count):
        idents = AgentIdentifiers(
            hosts=frozenset(h.lower() for h in draw(st.lists(st.sampled_from(HOSTS), max_size=2))),
            ipv4=frozenset(
                ipaddress.IPv4Address(a) for a in draw(st.lists(st.sampled_from(ADDRS), max_size=2))
            ),
            cidrs=tuple(
                ipaddress.ip_network(n) for n in draw(st.lists(st.sampled_from(NETS), max_size=3))
            ),
            default_route=draw(st.booleans()),
        )
        agents.append(
            FakeAgent(
                f"a{i}",
                idents,
                load=draw(st.integers(0, 2)),
                usable=draw(st.booleans() | st.just(True)),
            )
        )
    return agents


def reference_tier(agent: FakeAgent, host: str) -> int | None:
    """Linear reference: 1000 for exact, else the longest containing prefix."""
    idents = agent.identifiers
    if host.lower() in idents.hosts:
        return 1000
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return None
    if addr in idents.ipv4:
        return 1000
    lengths = [n.prefixlen for n in idents.cidrs if addr in n]
    return max(lengths) if lengths else None


def reference_choice(
    agents: list[FakeAgent], strategies: tuple[str, ...], host: str
) -> set[str] | None:
    """The set of agents any correct choice may return."""
    usable = [a for a in agents if a.usable]
    for strategy in strategies:
        if strategy == "destHost":
            tiers = {a.agent_id: reference_tier(a, host) for a in usable}
            ranked = [t for t in tiers.values() if t is not None]
            cands = [a for a in usable if ranked and tiers[a.agent_id] == max(ranked)]
        elif strategy == "defaultRoute":
            cands = [a for a in usable if a.identifiers.default_route]
        else:
            cands = usable
        if cands:
            least = min(a.load for a in cands)
            return {a.agent_id for a in cands if a.load == least}
    return None


@settings(max_examples=300, deadline=None)
@given(
    agents=agent_sets(),
    host=st.sampled_from([*ADDRS, *HOSTS, "10.9.9.9", "192.168.0.1", "other"]),
    strategies=st.sampled_from(
        [
            ("destHost", "defaultRoute", "default"),
            ("destHost",),
            ("destHost", "default"),
            ("defaultRoute", "destHost"),
            ("default",),
        ]
    ),
    seed=st.integers(0, 1000),
)
def test_choose_matches_the_reference(
    agents: list[FakeAgent], host: str, strategies: tuple[str, ...], seed: int
) -> None:
    registry = Registry(BrokerMetrics(), strategies, rng=random.Random(seed))
    for agent in agents:
        registry.add(agent, Membership(f"cred-{agent.agent_id}"))  # type: ignore[arg-type]
    chosen = registry.choose("c", host)
    expected = reference_choice(agents, strategies, host)
    if expected is None:
        assert chosen is None
    else:
        assert chosen is not None and chosen.agent_id in expected


def test_exact_beats_any_cidr_and_longest_prefix_wins() -> None:
    exact = AgentIdentifiers.parse("ipv4=10.0.0.5")
    wide = AgentIdentifiers.parse("cidr=0.0.0.0/0&cidr=10.0.0.0/8")
    narrow = AgentIdentifiers.parse("cidr=10.0.0.0/24")
    assert match_rank(exact, "10.0.0.5") == 1000
    assert match_rank(wide, "10.0.0.5") == 8
    assert match_rank(narrow, "10.0.0.5") == 24
    assert match_rank(narrow, "10.0.1.5") is None
    registry = Registry(BrokerMetrics(), ("destHost", "default"), rng=random.Random(1))
    agents = [FakeAgent("e", exact, load=5), FakeAgent("w", wide), FakeAgent("n", narrow)]
    for agent in agents:
        registry.add(agent)  # type: ignore[arg-type]
    for _ in range(50):  # load never overrides specificity
        assert registry.choose("c", "10.0.0.5") is agents[0]
        assert registry.choose("c", "10.0.0.9") is agents[2]
        assert registry.choose("c", "10.9.0.9") is agents[1]


# ----------------------------------------------------------- allowances


def test_allowance_drops_what_the_credential_does_not_allow() -> None:
    allowed = Allowance.parse("host=*.edge&ipv4=10.0.0.5&cidr=10.1.0.0/16")
    claimed = AgentIdentifiers.parse(
        "host=n1.edge&host=evil&ipv4=10.0.0.5&ipv4=10.1.2.3&cidr=10.1.2.0/24"
        "&cidr=0.0.0.0/0&cidr=10.0.0.5/32&default-route=true"
    )
    kept, refused = allowed.restrict(claimed)
    assert kept == AgentIdentifiers.parse(
        "host=n1.edge&ipv4=10.0.0.5&cidr=10.1.2.0/24&cidr=10.0.0.5/32"
    )
    # An address inside an allowed CIDR is not an exact claim it may make.
    assert refused == ["host=evil", "ipv4=10.1.2.3", "cidr=0.0.0.0/0", "default-route=true"]
    assert Allowance().restrict(claimed)[0] == AgentIdentifiers()


@settings(max_examples=200, deadline=None)
@given(
    allowed=st.lists(st.sampled_from([*NETS, *ADDRS]), max_size=4),
    claimed=st.lists(st.sampled_from([*NETS, *ADDRS]), max_size=4),
    host=st.sampled_from([*ADDRS, "10.9.9.9"]),
)
def test_restricted_claims_never_outrank_what_is_allowed(
    allowed: list[str], claimed: list[str], host: str
) -> None:
    """Whatever an agent claims, after restriction it matches only hosts its
    allowance covers, and matches exactly only what it may claim exactly."""

    def text(items: list[str]) -> str:
        return "&".join(("cidr=" if "/" in i else "ipv4=") + i for i in items)

    allowance = Allowance.parse(text(allowed))
    kept, _ = allowance.restrict(AgentIdentifiers.parse(text(claimed)))
    ceiling = match_rank(AgentIdentifiers.parse(text(allowed)), host)
    rank = match_rank(kept, host)
    if rank is not None:
        assert ceiling is not None
        if rank == EXACT_RANK:
            assert ceiling == EXACT_RANK


# ------------------------------------------------------------ membership


def test_same_credential_replaces_another_is_refused() -> None:
    registry = Registry(BrokerMetrics())
    live = FakeAgent("n1", AgentIdentifiers())
    assert registry.add(live, Membership("cert:aa")) is None  # type: ignore[arg-type]
    with pytest.raises(RegistryRefused) as refused:
        registry.add(FakeAgent("n1", AgentIdentifiers()), Membership("cert:bb"))  # type: ignore[arg-type]
    assert refused.value.status == 409 and refused.value.reason == "identity_in_use"
    with pytest.raises(RegistryRefused):  # a shared credential (None) never replaces
        registry.add(FakeAgent("n1", AgentIdentifiers()), Membership(None))  # type: ignore[arg-type]
    again = FakeAgent("n1", AgentIdentifiers())
    assert registry.add(again, Membership("cert:aa")) is live  # type: ignore[arg-type]
    assert registry.agents("c") == [again]


def test_capped_credential_holds_at_most_its_cap() -> None:
    registry = Registry(BrokerMetrics())
    member = Membership(None, cap_key="token:x", cap=2)
    first, second = FakeAgent("e1", AgentIdentifiers()), FakeAgent("e2", AgentIdentifiers())
    registry.add(first, member)  # type: ignore[arg-type]
    registry.add(second, member)  # type: ignore[arg-type]
    with pytest.raises(RegistryRefused) as refused:
        registry.add(FakeAgent("e3", AgentIdentifiers()), member)  # type: ignore[arg-type]
    assert refused.value.reason == "token_cap" and registry.count() == 2
    registry.remove(first)  # type: ignore[arg-type]
    registry.add(FakeAgent("e3", AgentIdentifiers()), member)  # type: ignore[arg-type]
    assert registry.count() == 2


# ------------------------------------------------------------ token file


def _line(pattern: str, *options: str) -> str:
    return " ".join([f"sha256:{hashlib.sha256(b't').hexdigest()}", "c", pattern, *options])


def test_token_entries() -> None:
    exact = parse_entry(_line("edge-01"))
    assert not exact.is_glob and exact.max_ids == 0
    glob = parse_entry(_line("edge-*", "max=5", "identifiers=cidr=10.0.0.0/24&host=*.edge"))
    assert glob.is_glob and glob.max_ids == 5
    assert glob.identifiers == Allowance.parse("cidr=10.0.0.0/24&host=*.edge")
    for bad, why in (
        (_line("edge-*"), "needs max=N"),
        (_line("edge-?"), "needs max=N"),
        (_line("edge-*", "max=0"), "bad option"),
        (_line("edge-*", "max=3", "colour=red"), "bad option"),
        (_line("e", "identifiers=cidr=banana"), "does not appear"),
        ("sha256:abc c e", "want"),
    ):
        with pytest.raises(ValueError, match=why):
            parse_entry(bad)


# ------------------------------------------------------- review guards


def test_failure_cache_expires_and_is_bounded() -> None:
    cache = FailureCache(ttl=10, size=3)
    refusal: Any = (401, "bad_token", "no")
    cache.put("a", refusal, now=0)
    assert cache.get("a", now=9.9) == refusal
    assert cache.get("a", now=10) is None
    for i in range(10):
        cache.put(i, refusal, now=20)
    assert len(cache) == 3 and cache.get(9, now=20) == refusal and cache.get(0, now=20) is None


def test_rate_limiter_per_source_global_and_bounded() -> None:
    limiter = RateLimiter(rate=2, burst=3, global_rate=100, global_burst=100, max_sources=5)
    assert [limiter.take("x", 0) for _ in range(5)] == [True, True, True, False, False]
    assert limiter.take("y", 0)  # another address has its own bucket
    assert not limiter.take("x", 0.4) and limiter.take("x", 0.6)  # 2/s refill
    for i in range(100):
        limiter.take(f"s{i}", 1)
    assert len(limiter) <= 5
    shared = RateLimiter(rate=100, burst=100, global_rate=1, global_burst=2)
    assert [shared.take(f"s{i}", 0) for i in range(4)] == [True, True, False, False]
